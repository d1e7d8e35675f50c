"""Start, supervise and stop the processes of one cluster: a controller and its engines.

The process that runs :class:`Cluster` is the *supervisor*.  It starts the
controller (``python -m monq.hub``) and, at the same time, the engines
(``python -m monq.engine``), whose start-up (interpreter, imports) overlaps
the controller's.  The controller writes the connection file once every
socket is bound, then one byte to a "ready" pipe the supervisor gave it; the
supervisor and the engines wait on that pipe (no polling), read the file, and
the engines register with the Hub, which announces each registration on its
notify channel, where the supervisor counts them.

Start-up time is mostly the controller's imports (SQLAlchemy), on a machine
whose cores the three processes share: each process imports only what it
needs (tests/test_startup_costs.py counts it), the controller runs without
the ``site`` module (see :func:`_no_site_env`), and both children import with
the cyclic gc off.  A stop wakes the engines' and the Hub's loops at once
(signal wake-up pipes), exits are awaited on pidfds, and the controller skips
the interpreter's teardown once it has closed everything.

Resource handling: the Cluster owns every child process it starts and the
profile's lock file; :meth:`Cluster.stop` (also called by ``__exit__`` and
when :meth:`Cluster.start` fails) ends them all and is safe to call twice.
Children run in their own session, so a Ctrl-C in the terminal reaches the
supervisor alone, which then shuts them down in order.  On Linux each child
also asks the kernel for SIGTERM when the supervisor dies
(``PR_SET_PDEATHSIG``), so a supervisor killed with SIGKILL leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from monq.connection import (
    CONNECTION_FILE,
    ConnectionInfo,
    load_connection_file,
    monq_home,
    profile_dir,
)
from monq.errors import MonqError, NoClusterError

log = logging.getLogger(__name__)

LOCK_FILE = "supervisor.lock"
LOG_DIR = "logs"
#: how often start() looks for the connection file when the controller's ready pipe says
#: nothing (see Cluster.start)
POLL = 0.02
#: how often the supervision loop polls children
SUPERVISE_POLL = 0.1
#: while waiting for engines: the Hub is asked for them after 20 ms without news, then
#: after twice as long each time, up to this long
ENGINES_ASK = 0.25


class ClusterError(MonqError):
    """A cluster could not be started (a process failed or was too slow)."""


class ClusterRunningError(ClusterError):
    """A cluster already runs for this profile."""


@dataclass(frozen=True)
class ClusterConfig:
    """What to start: which profile, how many engines, and the controller's options."""

    profile: str = "default"
    #: the directory holding the profiles (None: $MONQ_HOME, else ~/.monq)
    home: Path | None = None
    #: number of engines (None: one per CPU)
    n: int | None = None
    #: SQLAlchemy URL of the history database (None: sqlite in the profile dir)
    db_url: str | None = None
    ip: str = "127.0.0.1"
    heartbeat_period: float = 1.0
    log_level: str = "INFO"
    #: restart an engine or the controller that exits on its own (at most
    #: ``max_restarts`` times a minute each, so a crash loop ends)
    restart: bool = True
    max_restarts: int = 5
    #: history retention, as `monq start` takes them: "7d", 1000000, "500MB" (None: no limit)
    retain: str | None = None
    max_tasks: int | None = None
    max_bytes: str | None = None
    #: CurveZMQ on every channel: encrypted, and only holders of the keys can connect
    curve: bool = False

    @property
    def n_engines(self) -> int:
        return self.n if self.n is not None else (os.cpu_count() or 1)

    @property
    def profile_dir(self) -> Path:
        return profile_dir(self.profile, self.home if self.home is not None else monq_home())

    @property
    def connection_file(self) -> Path:
        return self.profile_dir / CONNECTION_FILE

    @property
    def log_dir(self) -> Path:
        return self.profile_dir / LOG_DIR


# --- children ---------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _child_setup(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive SIGTERM when the supervisor dies (Linux)."""
    libc = _libc
    if libc is None:
        return None

    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # the supervisor may have died between fork and prctl: then nobody will signal us
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def log_tail(path: Path, offset: int = 0, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, from byte ``offset`` on ('' if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


@dataclass
class _Child:
    """One child process, its log file and where this run's output starts in it."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int
    reported: bool = False
    #: monotonic times of this slot's restarts in the last minute
    restarts: list[float] = field(default_factory=list)

    def tail(self) -> str:
        return log_tail(self.log_path, self.log_offset)


#: how a child runs one of monq's modules: ``python -c BOOT <monq's root> <module> args``.
#: ``python -m`` puts the working directory first on sys.path, so a directory holding
#: another ``monq`` (a checkout, an older copy) gave the children that one while this
#: process ran its own.  The package is imported from the parent's root once, then the
#: root leaves sys.path again: user code keeps the import order it would have had.
_BOOT = (
    "import sys, runpy; root, module = sys.argv[1:3]; del sys.argv[1:3]; "
    "sys.path.insert(0, root); import monq; sys.path.remove(root); "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def monq_command(module: str, args: list[str], flags: tuple[str, ...] = ()) -> list[str]:
    """The command that runs ``python -m <module> <args>`` with the monq this process runs."""
    import monq

    root = os.path.dirname(os.path.dirname(os.path.abspath(monq.__file__)))
    return [sys.executable, *flags, "-c", _BOOT, root, module, *args]


def _no_site_env() -> dict[str, str]:
    """The environment of a child started with ``python -S``: this process's sys.path.

    The controller runs monq's own code only (zmq, SQLAlchemy, a database
    driver), so it can skip the ``site`` module: processing site-packages'
    ``.pth`` files (editable installs' import hooks, certifi patches) took
    60-200 ms of its start-up, on the path to "ready".  The directories
    those files add are in this process's sys.path, which the child gets as
    PYTHONPATH, in the same order (the standard library before
    site-packages, where a backport could shadow it).  The directory of the
    monq this process runs goes first when sys.path does not hold it (an
    editable install's import hook found it): both run the same monq.
    Engines keep ``site``: user code may need what a ``.pth`` file sets up.
    """
    import monq

    paths: list[str] = []
    for p in sys.path:
        full = os.path.abspath(p or os.curdir)
        if full not in paths and os.path.exists(full):
            paths.append(full)
    root = os.path.dirname(os.path.dirname(os.path.abspath(monq.__file__)))
    if root not in paths:
        paths.insert(0, root)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _is_monq_process(pid: int) -> bool:
    """False when ``pid`` is known to be something else than monq (a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (or a race): cannot tell, trust the pid
    return b"monq" in cmdline


def running_info(config: ClusterConfig) -> ConnectionInfo | None:
    """The connection info of the live cluster of this profile, or None."""
    try:
        info = load_connection_file(config.connection_file, check_alive=True)
    except NoClusterError:
        return None
    return info if _is_monq_process(info.controller_pid) else None


def _running_error(cfg: ClusterConfig, who: str) -> ClusterRunningError:
    hint = "monq stop" + (f" --profile {cfg.profile}" if cfg.profile != "default" else "")
    return ClusterRunningError(f"a cluster is already running for profile {cfg.profile!r} "
                               f"({who}); stop it with `{hint}`")


def check_not_running(config: ClusterConfig) -> None:
    """Raise ClusterRunningError when a supervisor or a controller runs for this profile."""
    lock = config.profile_dir / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        pass
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise _running_error(config, f"supervisor pid {holder}") from None
        finally:
            os.close(fd)
    info = running_info(config)
    if info is not None:
        raise _running_error(config, f"controller pid {info.controller_pid}")


def wait_exit(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait until every process has exited or ``timeout`` seconds have passed.

    Woken by the exits themselves (Linux pidfds) where it can: ``Popen.wait``
    with a timeout sleeps in steps of up to 50 ms, and a stop waits twice
    (the engines, then the controller).
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return
    deadline = time.monotonic() + timeout
    fds: dict[int, subprocess.Popen[bytes]] = {}
    poller = select.poll()
    try:
        for p in procs:
            # only a process not yet reaped: its pid cannot have been reused
            if p.poll() is None:
                try:
                    fd = pidfd_open(p.pid)
                except OSError:
                    continue
                fds[fd] = p
                poller.register(fd, select.POLLIN)
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, _ in poller.poll(max(1, math.ceil(left * 1000))):
                poller.unregister(fd)
                os.close(fd)
                fds.pop(fd).poll()
    finally:
        for fd in fds:
            os.close(fd)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` (any processes, not only children) is alive, or
    ``timeout`` seconds pass; return the survivors.  Woken by the exits themselves
    (pidfds, Linux 5.3+); elsewhere it looks every 10 ms."""
    from monq.connection import pid_alive

    deadline = time.monotonic() + timeout
    left = [p for p in pids if pid_alive(p)]
    pidfd_open = getattr(os, "pidfd_open", None)
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0:
            break
        fds: list[int] = []
        try:
            if pidfd_open is not None:
                for p in left:
                    with contextlib.suppress(OSError):  # gone meanwhile
                        fds.append(pidfd_open(p))
            if fds and len(fds) == len(left):
                poller = select.poll()
                for fd in fds:
                    poller.register(fd, select.POLLIN)
                poller.poll(max(1, math.ceil(min(wait, 1.0) * 1000)))
            else:
                time.sleep(min(wait, 0.01))
        finally:
            for fd in fds:
                os.close(fd)
        left = [p for p in left if pid_alive(p)]
    return left


def hub_request(info: ConnectionInfo, msg_type: str, content: dict[str, Any],
                timeout: float) -> dict[str, Any]:
    """Ask the Hub of ``info`` one question; the content of its answer.

    zmq and the protocol only, for the command line's quick questions (``monq
    stop`` asks for the engines' pids): no Client, nor what importing one
    costs.  Raises monq.TimeoutError without an answer in ``timeout`` seconds
    (a wrong key gets none), HubError when the Hub answers with an error.
    """
    import zmq

    from monq.errors import HubError, ProtocolError
    from monq.errors import TimeoutError as MonqTimeoutError
    from monq.protocol import Session
    from monq.security import client_socket_setup

    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        client_socket_setup(sock, info)
        sock.connect(info.url("hub"))
        session = Session(info.key)
        hdr = session.send(sock, msg_type, "hub", content)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(max(1, math.ceil(left * 1000))):
                break
            try:
                msg = session.feed(sock.recv_multipart(copy=False))
            except ProtocolError:
                continue
            if msg.parent.get("msg_id") != hdr["msg_id"]:
                continue
            if msg.content.get("status") != "ok":
                raise HubError(f"{msg.content.get('ename', 'error')}: "
                               f"{msg.content.get('evalue', '')}")
            return dict(msg.content)
        raise MonqTimeoutError(f"the Hub at {info.url('hub')} did not answer {msg_type} "
                               f"within {timeout}s")
    finally:
        ctx.destroy(linger=0)


def terminate(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM every process, wait for them up to ``timeout`` seconds, SIGKILL the rest."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    wait_exit(procs, timeout)
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not exit within %.1fs of SIGTERM; killing it", p.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def watch_engines(info: ConnectionInfo, n: int, deadline: float,
                  on_engine: Callable[[int, int], None] | None = None,
                  stop: Callable[[], bool] = lambda: False) -> int:
    """Wait until ``n`` engines have registered with the Hub of ``info``; return how many did.

    ``on_engine(engine_id, count)`` is called as each one registers.  Returns
    early (with fewer than ``n``) at the monotonic ``deadline`` or when
    ``stop()`` says so (it may also raise, which ends the wait).

    Driven by the Hub's own news: each registration is published on its
    notify channel, so the wait ends as the last engine registers.  The Hub
    is also asked for its engines at first, then again after 20, 40, 80 ...
    (at most ``ENGINES_ASK``) ms without news: that covers a registration
    published before this subscription was in place.  Only zmq and the
    protocol: a supervisor needs no Client (nor what importing one costs).
    """
    import zmq

    from monq.errors import ProtocolError
    from monq.protocol import Session
    from monq.security import client_socket_setup

    seen: set[int] = set()

    def add(ids: set[int]) -> None:
        for eid in sorted(ids - seen):
            seen.add(eid)
            if on_engine is not None:
                on_engine(eid, len(seen))

    ctx = zmq.Context()
    ctx.linger = 0
    try:
        session = Session(info.key)
        hub = ctx.socket(zmq.DEALER)
        sub = ctx.socket(zmq.SUB)
        for sock in (hub, sub):
            sock.linger = 0
            client_socket_setup(sock, info)
        sub.subscribe(b"notify")
        sub.connect(info.url("notify"))
        hub.connect(info.url("hub"))
        poller = zmq.Poller()
        poller.register(hub, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        asked = -math.inf
        every = 0.01
        while len(seen) < n and not stop():
            now = time.monotonic()
            if now > deadline:
                break
            if now - asked >= every:
                session.send(hub, "engines_request", "hub", {})
                asked = now
                every = min(2 * every, ENGINES_ASK)
            wait = min(asked + every, deadline) - now
            for sock, _ in poller.poll(max(1, math.ceil(wait * 1000))):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        msg = session.feed(frames[1:] if sock is sub else frames)
                    except ProtocolError:
                        continue
                    if msg.msg_type == "engine_registered":
                        add({int(msg.content["id"])})
                        asked = time.monotonic()  # news: no need to ask for a while
                    elif msg.msg_type == "engines_reply" and msg.content.get("status") == "ok":
                        add({int(k) for k in msg.content.get("engines", {})})
    finally:
        ctx.destroy(linger=0)
    return len(seen)


# --- the cluster ------------------------------------------------------------

class Cluster:
    """A controller and ``config.n_engines`` engines, started and stopped as one.

    Usage::

        with Cluster(ClusterConfig(n=4)) as cluster:
            info = cluster.start()
            cluster.wait()        # until stop is requested or the controller exits
    """

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config or ClusterConfig()
        self.info: ConnectionInfo | None = None
        self.controller: _Child | None = None
        self.engines: list[_Child] = []
        self._lock_fd: int | None = None
        self._stop_requested = threading.Event()
        self._stopped = False
        self._watch: threading.Thread | None = None
        #: the exit code that ended supervision (a child that could not be kept up)
        self._failed: int | None = None

    # -- public state

    @property
    def connection_file(self) -> Path:
        return self.config.connection_file

    @property
    def pids(self) -> dict[str, int]:
        """Pid of every process this cluster started, by name (``controller``, ``engine-<i>``)."""
        children = ([self.controller] if self.controller else []) + self.engines
        return {c.name: c.proc.pid for c in children}

    # -- start

    def start(
        self,
        timeout: float = 30.0,
        on_controller: Callable[[ConnectionInfo], None] | None = None,
        on_engine: Callable[[int, int], None] | None = None,
    ) -> ConnectionInfo:
        """Start the controller and the engines; return once every engine has registered.

        ``on_controller(info)`` is called once the controller is up,
        ``on_engine(engine_id, registered_count)`` as each engine registers.
        Raises ClusterError (everything started is stopped again) when a
        cluster already runs for the profile, a process exits early, or the
        whole start takes longer than ``timeout`` seconds.
        """
        if self.controller is not None:
            raise ClusterError("this Cluster was already started")
        deadline = time.monotonic() + timeout
        cfg = self.config
        cfg.profile_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg.log_dir.mkdir(exist_ok=True, mode=0o700)
        self._lock_profile()
        # the controller's "ready" pipe: it writes one byte once its connection file is
        # written, and nobody reads it, so the read end polls readable for everyone at
        # once (and hangs up if the controller exits first).  This process and the first
        # engines wait on it: no polling the file system, no delay.
        ready_r, ready_w = os.pipe()
        try:
            try:
                ctl = self._spawn_controller(ready_fd=ready_w)
            finally:
                os.close(ready_w)
            # engines start at once, beside the controller: their start-up (imports) overlaps
            # its own, and each waits for the connection file that names this controller
            for i in range(cfg.n_engines):
                self.engines.append(self._spawn_engine(f"engine-{i}", ctl.proc.pid, ready_r))
            # what waiting for the engines and supervising them need, imported while the
            # children start rather than after the controller is ready
            import monq.protocol  # noqa: F401
            import monq.security  # noqa: F401
            self.info = self._wait_for_controller(ctl, deadline, ready_r)
            if on_controller is not None:
                on_controller(self.info)
            self._wait_for_engines(deadline, on_engine)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(ready_r)
        log.info("cluster %r up: controller pid %d, %d engines",
                 cfg.profile, self.info.controller_pid, len(self.engines))
        self._watch = threading.Thread(target=self._supervise, name="monq-supervisor",
                                       daemon=True)
        self._watch.start()
        return self.info

    def _lock_profile(self) -> None:
        """Take the profile's lock for the supervisor's lifetime; refuse a second cluster."""
        cfg = self.config
        fd = os.open(cfg.profile_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise _running_error(cfg, f"supervisor pid {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        # a controller started by hand (python -m monq.hub) holds no lock: look for it too
        info = running_info(cfg)
        if info is not None:
            self._unlock_profile()
            raise _running_error(cfg, f"controller pid {info.controller_pid}")

    def _unlock_profile(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            # empty the file first: a reader must not take our pid for a live holder
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def _spawn(self, name: str, module_args: list[str], no_site: bool = False,
               pass_fds: tuple[int, ...] = ()) -> _Child:
        log_path = self.config.log_dir / f"{name}.log"
        logf = open(log_path, "ab")  # noqa: SIM115 - the child owns it once started
        flags, env = (("-S",), _no_site_env()) if no_site else ((), None)
        try:
            offset = logf.tell()
            logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                monq_command(module_args[0], module_args[1:], flags), env=env,
                pass_fds=pass_fds,
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_child_setup(os.getpid()),
            )
        finally:
            logf.close()
        log.debug("started %s: pid %d", name, proc.pid)
        return _Child(name, proc, log_path, offset)

    def _spawn_engine(self, name: str, controller_pid: int, ready_fd: int = -1) -> _Child:
        args = ["monq.engine", "--connection-file", str(self.connection_file),
                "--controller-pid", str(controller_pid), "--log-level", self.config.log_level]
        if ready_fd >= 0:
            args += ["--ready-fd", str(ready_fd)]
        return self._spawn(name, args, pass_fds=(ready_fd,) if ready_fd >= 0 else ())

    def _spawn_controller(self, ready_fd: int = -1) -> _Child:
        cfg = self.config
        args = ["monq.hub", "--profile-dir", str(cfg.profile_dir), "--profile", cfg.profile,
                "--ip", cfg.ip, "--heartbeat-period", str(cfg.heartbeat_period),
                "--supervisor-pid", str(os.getpid()), "--log-level", cfg.log_level]
        if cfg.db_url:
            args += ["--db", cfg.db_url]
        if cfg.curve:
            args.append("--curve")
        if cfg.restart:
            args.append("--restarted")
        for flag, value in (("--retain", cfg.retain), ("--max-tasks", cfg.max_tasks),
                            ("--max-bytes", cfg.max_bytes)):
            if value is not None:
                args += [flag, str(value)]
        if ready_fd >= 0:
            args += ["--ready-fd", str(ready_fd)]
        self.controller = self._spawn("controller", args, no_site=True,
                                      pass_fds=(ready_fd,) if ready_fd >= 0 else ())
        return self.controller

    def _wait_for_controller(self, ctl: _Child, deadline: float,
                             ready_fd: int) -> ConnectionInfo:
        # the controller writes the file (atomically) once every socket is bound, then a
        # byte to the ready pipe; a file naming another pid is a leftover of an earlier run
        pipe = select.poll()
        pipe.register(ready_fd, select.POLLIN)
        ready: select.poll | None = pipe
        while True:
            if ready is not None:
                left = max(0.0, deadline - time.monotonic())
                if ready.poll(max(1, math.ceil(min(left, 1.0) * 1000))):
                    # readable (ready) or hung up (the controller is exiting): it stays so,
                    # so from now on the file and the process are looked at every POLL
                    ready = None
            else:
                time.sleep(POLL)
            try:
                info = load_connection_file(self.connection_file, check_alive=False)
                if info.controller_pid == ctl.proc.pid:
                    return info
            except NoClusterError:
                pass
            code = ctl.proc.poll()
            if code is not None:
                ctl.reported = True
                raise ClusterError(f"the controller exited with code {code} before it was ready; "
                                   f"{ctl.log_path}:\n{ctl.tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"the controller was not ready in time; "
                                   f"{ctl.log_path}:\n{ctl.tail()}")

    def _wait_for_engines(self, deadline: float,
                          on_engine: Callable[[int, int], None] | None) -> None:
        assert self.info is not None
        n = len(self.engines)

        def check() -> bool:
            self._check_started()  # raises when a child died
            return False

        seen = watch_engines(self.info, n, deadline, on_engine, stop=check)
        if seen < n:
            tails = "\n".join(f"{e.log_path}:\n{e.tail()}" for e in self.engines)
            raise ClusterError(f"only {seen} of {n} engines registered in time\n{tails}")

    def _check_started(self) -> None:
        """Fail fast when a child died while the cluster was still starting."""
        for child in ([self.controller] if self.controller else []) + self.engines:
            code = child.proc.poll()
            if code is not None:
                child.reported = True
                raise ClusterError(f"{child.name} (pid {child.proc.pid}) exited with code {code} "
                                   f"while the cluster was starting; {child.log_path}:\n"
                                   f"{child.tail()}")

    # -- supervise

    def request_stop(self) -> None:
        """Make :meth:`wait` return (safe from a signal handler or another thread)."""
        self._stop_requested.set()

    def wait(self) -> int:
        """Supervise until a stop is requested or a child cannot be kept running.

        The supervision itself runs in a thread started by :meth:`start` (see
        :meth:`_supervise`).  Returns 0 after a requested stop, else the exit
        code of the child that kept failing.  Does not stop anything itself:
        the caller calls :meth:`stop` (``__exit__`` does).
        """
        if self.controller is None:
            raise ClusterError("the cluster was not started")
        # in slices: a Ctrl-C that the kernel hands to another thread (any thread not
        # blocking SIGINT may take it) only trips Python's flag, which this thread
        # looks at when it wakes; blocked in one endless wait it never would
        while not self._stop_requested.wait(0.25):
            pass
        return self._failed or 0

    def _supervise(self) -> None:
        """Watch the children: an engine that exits is reported to the Hub at once (it ends
        the tasks the engine held without waiting for heartbeats) and restarted; a
        controller that exits is restarted with the same profile, so the engines and
        clients reconnect to it by themselves."""
        import zmq

        from monq.protocol import Session
        from monq.security import client_socket_setup

        assert self.info is not None
        ctx = zmq.Context()
        ctx.linger = 0
        hub = ctx.socket(zmq.DEALER)
        hub.linger = 0
        session = Session(self.info.key)
        client_socket_setup(hub, self.info)
        hub.connect(self.info.url("hub"))
        try:
            while not self._stop_requested.wait(SUPERVISE_POLL):
                self._check_controller()
                for i, e in enumerate(self.engines):
                    code = e.proc.poll()
                    if code is None or e.reported or self._stop_requested.is_set():
                        continue
                    e.reported = True
                    log.warning("%s (pid %d) exited with code %d; log: %s",
                                e.name, e.proc.pid, code, e.log_path)
                    session.send(hub, "engine_exited", "supervisor", {
                        "pid": e.proc.pid, "hostname": _hostname(), "code": code})
                    if self._may_restart(e) and self.controller is not None:
                        new = self._spawn_engine(e.name, self.controller.proc.pid)
                        new.restarts = e.restarts
                        self.engines[i] = new
                        log.info("restarted %s: pid %d", e.name, new.proc.pid)
        except Exception:
            log.exception("the supervisor thread failed")
        finally:
            hub.close(linger=0)
            ctx.term()

    def _may_restart(self, child: _Child) -> bool:
        if not self.config.restart:
            return False
        now = time.monotonic()
        child.restarts[:] = [t for t in child.restarts if now - t < 60.0]
        if len(child.restarts) >= self.config.max_restarts:
            log.error("%s exited %d times within a minute: not restarting it again",
                      child.name, len(child.restarts))
            return False
        child.restarts.append(now)
        return True

    def _check_controller(self) -> None:
        ctl = self.controller
        if ctl is None or ctl.reported:
            return
        code = ctl.proc.poll()
        if code is None or self._stop_requested.is_set():
            return
        ctl.reported = True
        log.error("the controller (pid %d) exited with code %d; log: %s\n%s",
                  ctl.proc.pid, code, ctl.log_path, ctl.tail())
        if not self._may_restart(ctl):
            self._failed = code if code != 0 else 1
            self._stop_requested.set()
            return
        new = self._spawn_controller()
        new.restarts = ctl.restarts
        log.info("restarted the controller: pid %d (same profile, ports and key)",
                 new.proc.pid)

    # -- stop

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every process this cluster started; bounded, and safe to call twice.

        Order matters: the engines go first, while the Hub still runs, so that
        each one unregisters and the Hub records the end of whatever it held
        instead of having to wait for missed heartbeats; and no engine is left
        behind retrying a controller that has gone.  Then the controller, which
        flushes its pending history writes on SIGTERM.  Each step waits up to
        ``timeout`` seconds after SIGTERM, then kills.  Last, the connection
        file is removed if it is still ours (a newer cluster may own it).
        """
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()
        if self._watch is not None and self._watch is not threading.current_thread():
            self._watch.join(timeout=5)  # it must not restart what we stop
        try:
            if self.engines:
                terminate([e.proc for e in self.engines], timeout)
            if self.controller is not None:
                terminate([self.controller.proc], timeout)
                self._remove_connection_file(self.controller.proc.pid)
        finally:
            self._unlock_profile()
            if self.info is not None:
                from monq.shm import remove_all

                remove_all(self.info.key)  # every shared-memory segment of this cluster
        if self.controller is not None:
            log.info("cluster %r stopped", self.config.profile)

    def _remove_connection_file(self, controller_pid: int) -> None:
        try:
            info = load_connection_file(self.connection_file, check_alive=False)
        except NoClusterError:
            return
        if info.controller_pid == controller_pid:
            with contextlib.suppress(FileNotFoundError):
                self.connection_file.unlink()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

