"""The ``monq`` command: start, stop and inspect a cluster, and query its history.

This module and :mod:`monq.connection` are the only places that read
environment variables (``MONQ_HOME``), and this is the only place that
configures logging handlers.  Errors users can cause (no cluster, a cluster
already running, a failed start) are one line on stderr and a named exit code,
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import enum
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from monq import cli_history
from monq.cluster import (
    Cluster,
    ClusterConfig,
    ClusterError,
    ClusterRunningError,
    check_not_running,
    hub_request,
    log_tail,
    monq_command,
    wait_gone,
    watch_engines,
)
from monq.connection import (
    ConnectionInfo,
    find_connection_file,
    load_connection_file,
    monq_home,
    pid_alive,
)
from monq.errors import MonqError, NoClusterError
from monq.hub.filters import parse_duration, parse_size

if TYPE_CHECKING:
    from monq.client import Client

log = logging.getLogger(__name__)


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1             # any other monq error (bad query, authentication, ...)
    USAGE = 2             # bad arguments (argparse's own code)
    NO_CLUSTER = 3        # nothing is running for the profile
    ALREADY_RUNNING = 4   # `start` on a profile whose cluster runs
    START_FAILED = 5      # a process exited early or was not ready in time
    STOP_FAILED = 6       # some process survived SIGKILL (should not happen)
    CONTROLLER_DIED = 7   # the controller exited while `start` supervised it
    INTERRUPTED = 130     # Ctrl-C outside of `start`


# --- argument parsing -------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monq", description=__doc__.splitlines()[0])
    p.add_argument("--home", help="directory of the profiles (default: $MONQ_HOME or ~/.monq)")
    p.add_argument("--log-level", default=None, type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level of this command (default WARNING) and of the processes "
                        "it starts (default INFO, in the profile's logs/)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def profile(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profile", default="default", help="cluster profile (default: default)")

    s = sub.add_parser("start", help="start a controller and engines (foreground until Ctrl-C)")
    s.add_argument("-n", type=int, default=None, help="number of engines (default: one per CPU)")
    profile(s)
    s.add_argument("--db", default=None, help="SQLAlchemy URL of the history database "
                   "(default: sqlite in the profile directory)")
    s.add_argument("--ip", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    s.add_argument("--heartbeat-period", type=float, default=1.0, metavar="S")
    s.add_argument("--curve", action="store_true",
                   help="encrypt and authenticate every channel with CurveZMQ (keys in the "
                        "connection file); needed whenever --ip is not a loopback address")
    s.add_argument("--daemon", action="store_true",
                   help="run in the background; return once every engine has registered")
    s.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="give up if the cluster is not ready within S seconds (default 60)")
    s.add_argument("--retain", default=None, metavar="DURATION",
                   help="delete finished tasks completed longer ago than this (7d, 12h, 30m)")
    s.add_argument("--max-tasks", type=int, default=None, metavar="N",
                   help="keep at most N tasks in the history (the oldest finished go)")
    s.add_argument("--max-bytes", default=None, metavar="SIZE",
                   help="keep stored payloads and output under SIZE (500MB, 2GiB); payloads "
                        "of the oldest tasks go first, then whole records")

    s = sub.add_parser("stop", help="stop a running cluster")
    profile(s)
    s.add_argument("--timeout", type=float, default=20.0, metavar="S",
                   help="seconds to wait after SIGTERM before killing (default 20)")

    s = sub.add_parser("dashboard", help="serve a web page of the cluster and its history "
                       "(foreground until Ctrl-C)")
    profile(s)
    s.add_argument("--db", default=None, metavar="URL",
                   help="post-mortem: show this history database (no cluster needed)")
    s.add_argument("--ip", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8465,
                   help="port (default 8465; 0: any free port, printed)")

    s = sub.add_parser("status", help="engines, queue depths and task counts")
    profile(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="S",
                   help="redraw every S seconds (default 2) until Ctrl-C")

    cli_history.add_commands(sub, profile)
    return p


# --- helpers ----------------------------------------------------------------

def _err(msg: str) -> None:
    print(f"monq: {msg}", file=sys.stderr, flush=True)


def _out(msg: str = "") -> None:
    print(msg, flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _db_display(url: str) -> str:
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):]
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    return url


def _print_info(info: ConnectionInfo, path: Path) -> None:
    _out(f"connection file: {path}")
    _out(f"history database: {_db_display(info.db_url)}")
    _out(f"controller pid {info.controller_pid}, listening on {info.ip}")


def _profile_hint(profile: str) -> str:
    return "" if profile == "default" else f" --profile {profile}"


def _connect(profile: str, home: Path, timeout: float = 5.0) -> tuple[Client, ConnectionInfo, Path]:
    """A client of the profile's running cluster (NoClusterError, quickly, if there is none)."""
    path = find_connection_file(profile, home=home)
    info = load_connection_file(path)  # fails fast on a missing file or a dead controller
    from monq.client import Client  # only now: importing it costs more than the check

    return Client(connection_file=path, timeout=timeout, query_timeout=30.0), info, path


def _local_time(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        value = dt.datetime.fromtimestamp(value, dt.timezone.utc)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _duration(value: Any) -> str:
    if value is None:
        return "-"
    s = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
    if s < 1.0:
        return f"{s * 1000:.1f}ms"
    if s < 120.0:
        return f"{s:.2f}s"
    return f"{s / 60:.1f}min"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: str = "") -> str:
    """Aligned columns; columns whose header is in ``right`` are right-aligned."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if h in right.split() else c.ljust(w)
                 for c, w, h in zip(r, widths, headers, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dt.datetime):
        return obj.isoformat()
    if isinstance(obj, dt.timedelta):
        return obj.total_seconds()
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


# --- commands ---------------------------------------------------------------

def cmd_start(args: argparse.Namespace, home: Path) -> int:
    # checked here, so a typo is a usage error and not a controller that fails to start
    if args.retain is not None:
        parse_duration(args.retain)
    if args.max_bytes is not None:
        parse_size(args.max_bytes)
    if args.max_tasks is not None and args.max_tasks < 0:
        raise ValueError(f"--max-tasks must be >= 0, not {args.max_tasks}")
    cfg = ClusterConfig(profile=args.profile, home=home, n=args.n, db_url=args.db, ip=args.ip,
                        heartbeat_period=args.heartbeat_period,
                        log_level=args.log_level or "INFO", retain=args.retain,
                        max_tasks=args.max_tasks, max_bytes=args.max_bytes,
                        curve=args.curve)
    if cfg.n_engines < 0:
        _err("-n must be at least 0")
        return ExitCode.USAGE
    if args.daemon:
        return _start_daemon(args, cfg, home)
    n = cfg.n_engines
    cluster = Cluster(cfg)
    # SIGTERM (e.g. from `monq stop`) stops the cluster exactly as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _out(f"starting cluster {cfg.profile!r}: controller and {n} engines "
             f"(logs in {cfg.log_dir})")
        cluster.start(
            timeout=args.timeout,
            on_controller=lambda info: _print_info(info, cfg.connection_file),
            on_engine=lambda eid, k: _out(f"engines ready: {k}/{n} (engine {eid} registered)"),
        )
        _out(f"cluster {cfg.profile!r} ready with {n} engines; Ctrl-C stops it")
        code = cluster.wait()
        return ExitCode.OK if code == 0 else ExitCode.CONTROLLER_DIED
    except KeyboardInterrupt:
        _out("stopping...")
        return ExitCode.OK
    finally:
        # a second Ctrl-C must not cut the ordered shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cluster.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
        if cluster.controller is not None:
            _out(f"cluster {cfg.profile!r} stopped")


def _start_daemon(args: argparse.Namespace, cfg: ClusterConfig, home: Path) -> int:
    """Run ``monq start`` (without --daemon) detached, and wait until it is ready."""
    check_not_running(cfg)
    cfg.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = monq_command("monq", [
        "--home", str(home), "--log-level", cfg.log_level, "start", "-n", str(cfg.n_engines),
        "--profile", cfg.profile, "--ip", cfg.ip, "--heartbeat-period", str(cfg.heartbeat_period),
        "--timeout", str(args.timeout)])
    if cfg.db_url:
        cmd += ["--db", cfg.db_url]
    if cfg.curve:
        cmd.append("--curve")
    for flag, value in (("--retain", cfg.retain), ("--max-tasks", cfg.max_tasks),
                        ("--max-bytes", cfg.max_bytes)):
        if value is not None:
            cmd += [flag, str(value)]
    log_path = cfg.log_dir / "cluster.log"
    with open(log_path, "ab") as logf:
        offset = logf.tell()
        # own session: the supervisor must survive this terminal and its Ctrl-C
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def fail(why: str) -> int:
        if proc.poll() is None:
            proc.terminate()  # it stops whatever it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        # the supervisor's own error (with the failing process's log) is the useful part
        lines = log_tail(log_path, offset, lines=200).splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("monq: ")]
        tail = lines[starts[-1]:][:40] if starts else lines[-20:]
        _err(f"{why}; {log_path}:\n" + "\n".join(tail))
        return ExitCode.START_FAILED

    # what watching the engines register needs, imported while the cluster starts
    import monq.protocol  # noqa: F401
    import monq.security  # noqa: F401

    deadline = time.monotonic() + args.timeout
    path = cfg.connection_file
    while True:
        if proc.poll() is not None:
            return fail(f"the cluster exited with code {proc.returncode} while starting")
        with contextlib.suppress(NoClusterError):
            info = load_connection_file(path, check_alive=False)
            if info.supervisor_pid == proc.pid:
                break
        if time.monotonic() > deadline:
            return fail("the controller was not ready in time")
        time.sleep(0.01)
    _print_info(info, path)

    n = cfg.n_engines
    seen = watch_engines(
        info, n, deadline,
        on_engine=lambda eid, k: _out(f"engines ready: {k}/{n} (engine {eid} registered)"),
        stop=lambda: proc.poll() is not None)
    if proc.poll() is not None:
        return fail(f"the cluster exited with code {proc.returncode} while starting")
    if seen < n:
        return fail(f"only {seen} of {n} engines registered in time")
    _out(f"cluster {cfg.profile!r} running in the background (supervisor pid {proc.pid}); "
         f"stop it with `monq stop{_profile_hint(cfg.profile)}`")
    return ExitCode.OK


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive or ``timeout`` passes; return the survivors."""
    return wait_gone(list(pids), timeout)


def cmd_stop(args: argparse.Namespace, home: Path) -> int:
    path = find_connection_file(args.profile, home=home)
    info = load_connection_file(path, check_alive=False)
    sup = info.supervisor_pid if pid_alive(info.supervisor_pid) else 0
    ctl = info.controller_pid if pid_alive(info.controller_pid) else 0
    if not sup and not ctl:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise NoClusterError(f"no cluster running for profile {args.profile!r} "
                             f"(removed the stale {path})")
    # the engines' pids, to make sure none survives whatever happens to the supervisor
    engines: list[int] = []
    with contextlib.suppress(MonqError, OSError, ValueError, TypeError):
        here = socket.gethostname()
        engines = [int(e["pid"]) for e in
                   hub_request(info, "status_request", {}, timeout=2.0).get("engines", [])
                   if e.get("pid") and e.get("hostname", here) == here]
    # the supervisor stops the engines, then the controller, in order; without a
    # supervisor (a controller started by hand) the controller is all we own
    target = sup or ctl
    os.kill(target, signal.SIGTERM)
    if _wait_gone([target], args.timeout):
        _err(f"pid {target} still running {args.timeout:.0f}s after SIGTERM; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    rest = [p for p in {ctl, *engines} if p and p != target]
    survivors = _wait_gone(rest + [target], 5.0)
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if _wait_gone(survivors, 5.0):
        _err(f"could not stop pids {survivors}")
        return ExitCode.STOP_FAILED
    with contextlib.suppress(NoClusterError, FileNotFoundError):
        if load_connection_file(path, check_alive=False).controller_pid == info.controller_pid:
            path.unlink()
    from monq.shm import remove_all

    remove_all(info.key)  # every shared-memory segment of the cluster
    _out(f"cluster {args.profile!r} stopped")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace, home: Path) -> int:
    if args.watch is not None:
        return _watch_status(args, home)
    client, info, path = _connect(args.profile, home)
    with client:
        st = dict(client.cluster_status())
    st.pop("status", None)  # the reply's own "ok", not the cluster's
    if args.json:
        doc = {"profile": info.profile or args.profile, "connection_file": str(path),
               "controller_pid": info.controller_pid, "supervisor_pid": info.supervisor_pid,
               **st}
        _out(json.dumps(doc, indent=2, default=_jsonable))
        return ExitCode.OK
    _out("\n".join(_status_lines(args.profile, info, path, st)))
    return ExitCode.OK


def _watch_status(args: argparse.Namespace, home: Path) -> int:
    """Redraw the status every ``args.watch`` seconds until Ctrl-C (or SIGTERM).

    In a terminal each frame replaces the last; otherwise frames follow each
    other, each starting with a ``--- <time> ---`` line.  A cluster that is
    not (or no longer) running is a frame saying so, and the watch goes on.
    """
    if args.watch <= 0:
        raise ValueError(f"--watch takes a period > 0 seconds, not {args.watch}")
    tty = sys.stdout.isatty()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    client: Client | None = None
    try:
        while True:
            try:
                if client is None:
                    client, info, path = _connect(args.profile, home)
                st = dict(client.cluster_status())
                st.pop("status", None)
                lines = _status_lines(args.profile, info, path, st)
            except MonqError as e:
                if client is not None:
                    client.close()
                    client = None
                lines = [f"{type(e).__name__}: {str(e).splitlines()[0]}"]
            stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            head = f"--- {stamp} (every {args.watch:g}s; Ctrl-C to stop) ---"
            if args.json:
                lines = [json.dumps({"time": stamp, "status": lines}, default=_jsonable)]
            frame = "\n".join([head, *lines])
            print(("\x1b[H\x1b[2J" if tty else "") + frame, flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return ExitCode.OK
    finally:
        signal.signal(signal.SIGTERM, previous)
        if client is not None:
            client.close()


def _status_lines(profile: str, info: ConnectionInfo, path: Path,
                  st: dict[str, Any]) -> list[str]:
    lines = [f"cluster {profile!r}: controller pid {info.controller_pid}"
             + (f", supervisor pid {info.supervisor_pid}" if info.supervisor_pid else ""),
             f"connection file: {path}",
             f"history database: {_db_display(str(st.get('db_url') or info.db_url))}"]
    engines = st.get("engines", [])
    queue: dict[str, Any] = {str(k): v for k, v in (st.get("queue") or {}).items()}
    lines.append(f"\nengines ({len(engines)}):")
    if engines:
        rows = []
        for e in engines:
            q = queue.get(str(e.get("id")), {})
            rows.append([e.get("id"), e.get("pid"), e.get("hostname"), e.get("status"),
                         q.get("queue", "-"), q.get("tasks", "-"), q.get("completed", "-"),
                         _local_time(e.get("registered"))])
        lines.append(_table(["id", "pid", "host", "status", "queue", "tasks", "completed",
                             "registered"], rows, right="id pid queue tasks completed"))
    lines.append(f"unassigned tasks: {queue.get('unassigned', 0)}")
    counts = st.get("counts") or {}
    lines.append("tasks: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                              or "none"))
    rejected = st.get("rejected") or {}
    lines.append("rejected messages: "
                 + (", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"))
    return lines


def cmd_history(args: argparse.Namespace, home: Path) -> int:
    return cli_history.cmd_history(args, home, _table, _local_time, _duration)


def cmd_show(args: argparse.Namespace, home: Path) -> int:
    return cli_history.cmd_show(args, home, _local_time, _duration)


def cmd_stats(args: argparse.Namespace, home: Path) -> int:
    return cli_history.cmd_stats(args, home, _table, _local_time, _duration)


def cmd_purge(args: argparse.Namespace, home: Path) -> int:
    return cli_history.cmd_purge(args, home)


COMMANDS = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "history": cmd_history,
            "show": cmd_show, "stats": cmd_stats, "purge": cmd_purge}


def cmd_dashboard(args: argparse.Namespace, home: Path) -> int:
    try:
        # the extra, checked before anything starts
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401

        from monq.dashboard import DashboardOptions, run
    except ImportError as e:
        _err(f"the dashboard needs its extra ({e.name} is missing): "
             "pip install 'monq[dashboard]'")
        return ExitCode.ERROR
    opts = DashboardOptions(profile=args.profile, home=home, db=args.db, ip=args.ip,
                            port=args.port)
    # SIGTERM stops the server gracefully, as Ctrl-C does (uvicorn re-raises it after)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run(opts, out=_out)
    except KeyboardInterrupt:
        return ExitCode.OK
    except OSError as e:
        _err(f"cannot serve on {args.ip}:{args.port}: {e.strerror or e} "
             "(--port 0 picks a free port)")
        return ExitCode.ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)


COMMANDS["dashboard"] = cmd_dashboard


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``monq`` command; returns the process exit code."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level or "WARNING", handlers=[handler], force=True)
    home = Path(args.home).expanduser() if args.home else monq_home()
    try:
        return int(COMMANDS[args.command](args, home))
    except NoClusterError as e:
        _err(str(e).splitlines()[0])
        return ExitCode.NO_CLUSTER
    except ClusterRunningError as e:
        _err(str(e))
        return ExitCode.ALREADY_RUNNING
    except ClusterError as e:
        _err(str(e))
        return ExitCode.START_FAILED
    except ValueError as e:  # bad profile name, bad time phrase
        _err(str(e))
        return ExitCode.USAGE
    except MonqError as e:
        _err(f"{type(e).__name__}: {e}")
        return ExitCode.ERROR
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
