"""The Hub alone: CPU per task and bytes per task in flight, on recorded messages.

Two steps:

``record``: start a real 2-engine cluster whose controller also writes down,
in order, every message its Hub handles (the monitor copies and what engines
send to the Hub's ROUTER), run N no-ops with ``apply_async``, stop the
cluster; the recording (and the cluster key) goes to a pickle file.

``replay``: feed the recording into fresh Hubs (each with its own temporary
SQLite history and fresh sockets that nothing talks to), exactly as
``Hub._drain_monitor``/``_drain_router`` would, writing rows where the
recorded Hub's loop wrote them (recordings without them: every
``flush_rows`` rows); report process CPU per task
(time.process_time, so other load on the machine does not count), best of
``--repeat`` runs.  Then feed only the request copies of the tasks (their
replies not yet come: tasks in flight) and report the bytes the Hub holds
per task in flight (tracemalloc), after the rows are written.

Run:
    python bench/hub_replay.py record --tasks 20000 --out /tmp/hub-rec.pkl
    python bench/hub_replay.py replay /tmp/hub-rec.pkl [--repeat 5] [--profile out.prof]
        [--frozen-clock]

``replay --compare DIR`` also replays with the monq package found in DIR
(another checkout, e.g. the commit before a change), in alternating runs, so
before and after are measured in the same conditions.

``burst``: the whole controller, end to end: a real 2-engine cluster runs N
no-ops with ``apply_async``; reported are the controller's CPU per task (relays
and Hub, /proc; and the Hub's alone: the controller's main thread) until the
last result reaches the client (as
``bench/latency.py`` counts it) AND until the Hub has recorded every task
finished (read from the history's ``task_counts`` by a separate read-only
SQLite connection, every 20 ms, without asking the Hub anything): a Hub that
lags does its remaining work after the last result, where the first figure
does not see it.  Also the rate tasks are recorded at and the controller's
peak RSS (VmHWM).  ``--compare DIR`` alternates with another checkout.

    python bench/hub_replay.py burst --tasks 10000 --rounds 4 --compare ../main
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# -- record -----------------------------------------------------------------------------


def _controller(out: str, argv: list[str]) -> int:
    """The controller (``python -m monq.hub``), writing down what its Hub handles."""
    from monq.hub import controller
    from monq.hub.hub import Hub

    log: list[tuple[str, list[bytes]]] = []
    on_monitor, on_router, close, flush = Hub._on_monitor, Hub._on_router, Hub.close, Hub.flush
    depth = [0]  # inside a router message's handling

    def rec_flush(self: Hub, hold: bool = False) -> None:
        # the loop's own writes (timed, or every flush_rows), where they happened: a replay
        # makes them at the same places, so that its tasks are written as in the real run
        # (in a burst, most as a pending INSERT, then an UPDATE); those made while handling
        # a router message the replay makes itself
        if not depth[0] and self._dirty:
            log.append(("flush", [b"hold" if hold else b""]))
        flush(self, hold)

    def rec_monitor(self: Hub, frames: list[Any]) -> None:
        log.append(("monitor", [f if type(f) is bytes else f.bytes for f in frames]))
        on_monitor(self, frames)

    def rec_router(self: Hub, frames: list[Any]) -> None:
        # written down once handled: a receipt, an engine's end or a query first handles
        # the monitor copies waiting (written down meanwhile, as they are handled), and
        # a replay, whose monitor socket is empty, must see them first too (before, an
        # engine's unregistration replayed before its tasks' last copies recorded
        # thousands of finished tasks lost, then inserted again)
        raw = [f.bytes for f in frames]
        depth[0] += 1
        try:
            on_router(self, frames)
        finally:
            depth[0] -= 1
            log.append(("router", raw))

    def rec_close(self: Hub) -> None:
        close(self)
        with open(out, "wb") as f:
            pickle.dump({"key": self.session.key, "messages": log}, f)

    Hub._on_monitor, Hub._on_router, Hub.close = rec_monitor, rec_router, rec_close  # type: ignore[method-assign]
    Hub.flush = rec_flush  # type: ignore[method-assign]
    return controller.main(argv)


def record(tasks: int, out: Path) -> None:
    from common import make_funcs

    import monq
    from monq.cluster import Cluster, ClusterConfig, _Child, _child_setup

    class RecordingCluster(Cluster):
        def _spawn_controller(self, ready_fd: int = -1) -> _Child:
            # as Cluster._spawn_controller, through _controller above
            cfg = self.config
            args = ["--profile-dir", str(cfg.profile_dir), "--profile", cfg.profile,
                    "--ip", cfg.ip, "--heartbeat-period", str(cfg.heartbeat_period),
                    "--supervisor-pid", str(os.getpid()), "--log-level", cfg.log_level]
            if ready_fd >= 0:
                args += ["--ready-fd", str(ready_fd)]
            log_path = cfg.log_dir / "controller.log"
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(
                    [sys.executable, __file__, "_controller", str(out), *args], env=env,
                    pass_fds=(ready_fd,) if ready_fd >= 0 else (), stdin=subprocess.DEVNULL,
                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_child_setup(os.getpid()))
            self.controller = _Child("controller", proc, log_path, 0)
            return self.controller

    noop, _, _ = make_funcs()
    home = Path(tempfile.mkdtemp(prefix="monq-hub-replay-"))
    cluster = RecordingCluster(ClusterConfig(n=2, home=home, log_level="WARNING",
                                             restart=False))
    try:
        cluster.start(timeout=60)
        with monq.Client(connection_file=cluster.connection_file) as c:
            lb = c.load_balanced_view()
            t0 = time.perf_counter()
            for ar in [lb.apply_async(noop) for _ in range(tasks)]:
                ar.get(600)
            print(f"{tasks} no-ops in {time.perf_counter() - t0:.1f} s (wall)")
    finally:
        cluster.stop()
    rec = pickle.loads(out.read_bytes())
    kinds: dict[str, int] = {}
    for where, _ in rec["messages"]:
        kinds[where] = kinds.get(where, 0) + 1
    print(f"recorded {kinds} to {out}")


# -- replay -----------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        rec: dict[str, Any] = pickle.load(f)
    return rec


def _hub(key: bytes, tmp: Path, name: str) -> Any:
    import zmq

    from monq.hub.hub import Hub, HubConfig
    from monq.hub.store import TaskStore
    from monq.protocol import Session

    ctx = zmq.Context()
    store = TaskStore(f"sqlite:///{tmp / name}")
    config = HubConfig()
    hub = Hub(ctx, Session(key), store, config)
    hub.bind()  # its own Context: the inproc monitor name is free
    if os.environ.get("MONQ_REPLAY_FROZEN_CLOCK"):
        _freeze_clock()
    return hub, ctx


class _FrozenTime:
    """The Hub module's ``time``, with ``monotonic`` stopped (see _freeze_clock)."""

    def __init__(self) -> None:
        self._now = time.monotonic()

    def monotonic(self) -> float:
        return self._now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _freeze_clock() -> None:
    """--frozen-clock: the Hub's monotonic clock stands still during the replay.

    How many rows a replay writes twice (pending, then finished) otherwise
    depends on how fast it runs: a held row is written once it has waited
    ``hold_pending`` seconds since the Hub was last behind, and a replay is
    never behind (nothing waits on its sockets), nor as slow as the burst (a
    profiled or callgrind replay takes minutes: ``hold_max``).  A live Hub in
    a burst is behind throughout: with the clock stopped, rows are written
    where the recorded Hub wrote them, held as long as ``hold_rows`` allows,
    and run after run alike.
    """
    from monq.hub import hub as hub_module

    hub_module.time = _FrozenTime()  # type: ignore[assignment]



def _received(where: str, frames: list[bytes]) -> list[Any]:
    """A recorded message as the Hub receives it: a monitor copy through
    ``monq.frames.recv_frames`` (frames under COPY_BELOW bytes as ``bytes``, larger ones
    zmq Frames), a router message as zmq Frames (``recv_multipart(copy=False)``)."""
    import zmq

    if where == "monitor":
        from monq.frames import COPY_BELOW

        return [b if len(b) < COPY_BELOW else zmq.Frame(b) for b in frames]
    return [zmq.Frame(b) for b in frames]


def _frames(messages: list[tuple[str, list[bytes]]]) -> list[tuple[str, list[Any]]]:
    return [(where, _received(where, frames) if where != "flush" else frames)
            for where, frames in messages]


def _tasks(messages: list[tuple[str, list[bytes]]]) -> int:
    """Load-balanced tasks in a recording: single requests, and the tasks of batches."""
    n = 0
    for where, fr in messages:
        if where != "monitor" or fr[0] != b"in.task":
            continue
        if b'"apply_request"' in fr[4]:
            n += 1
        elif b'"apply_batch"' in fr[4]:
            n += len(json.loads(fr[7])["tasks"])
    return n


def replay_cpu(rec: dict[str, Any], tmp: Path, name: str, profile: str | None = None
               ) -> tuple[float, int]:
    """Process CPU seconds to handle the whole recording (and write it), and the tasks."""
    hub, ctx = _hub(rec["key"], tmp, name)
    try:
        msgs = _frames(rec["messages"])
        on_monitor, on_router = hub._on_monitor, hub._on_router
        rows = hub.config.flush_rows
        # as Hub._drain_monitor does (its flush holds new pending rows back once, where
        # it can: see Hub.flush)
        can_hold = "hold" in inspect.signature(hub._safe_flush).parameters
        if can_hold:
            def flush() -> None:
                hub._safe_flush(hold=True)
        else:
            flush = hub._safe_flush
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
        gc.collect()
        t0 = time.process_time()
        if prof is not None:
            prof.enable()
        # a recording with the loop's writes makes them where the real Hub did (older ones:
        # every flush_rows only)
        timed = any(where == "flush" for where, _ in msgs)
        for where, frames in msgs:
            if where == "monitor":
                on_monitor(frames)
                if not timed and len(hub._dirty) >= rows:
                    flush()
            elif where == "router":
                on_router(frames)
            else:
                hub._safe_flush(**({"hold": True} if frames[0] and can_hold else {}))
        hub._safe_flush()
        if prof is not None:
            prof.disable()
        cpu = time.process_time() - t0
        if prof is not None:
            prof.dump_stats(profile)
        n = _tasks(rec["messages"])
        assert hub.store.count() == n, (hub.store.count(), n)
        assert not hub._inflight, len(hub._inflight)
        assert not hub.rejected, hub.rejected
        return cpu, n
    finally:
        hub.close()
        ctx.term()


def replay_memory(rec: dict[str, Any], tmp: Path, name: str) -> tuple[float, float, int]:
    """(bytes held per task in flight once written, bytes per dirty row, tasks): only the
    request copies and engine messages, none of the replies."""
    hub, ctx = _hub(rec["key"], tmp, name)
    try:
        # no replies, and engines do not leave (that would end their tasks as lost); the
        # frames are made as they come in, so that what they cache (Frame.bytes) is only
        # counted if the Hub keeps them
        msgs = [(where == "monitor", fr) for where, fr in rec["messages"]
                if where != "flush" and not (where == "monitor" and fr[0].startswith(b"out.")) and
                not (where == "router" and any(b"unregistration_request" in f or
                                               b"engine_exited" in f for f in fr))]
        n = _tasks(rec["messages"])
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for is_monitor, raw in msgs:
            frames = _received("monitor" if is_monitor else "router", raw)
            (hub._on_monitor if is_monitor else hub._on_router)(frames)
            del frames
        gc.collect()
        dirty = tracemalloc.get_traced_memory()[0] - base
        hub._safe_flush()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert len(hub._inflight) == n, (len(hub._inflight), n)
        return held / n, dirty / n, n
    finally:
        hub.close()
        ctx.term()


def _one(path: str, repeat: int, profile: str | None) -> dict[str, Any]:
    rec = _load(Path(path))
    with tempfile.TemporaryDirectory(prefix="monq-hub-replay-") as d:
        tmp = Path(d)
        cpus = []
        for i in range(repeat):
            cpu, n = replay_cpu(rec, tmp, f"cpu{i}.db", profile if i == 0 else None)
            cpus.append(cpu / n * 1e6)
        held, dirty, n = replay_memory(rec, tmp, "mem.db")
    return {"tasks": n, "cpu_us": cpus, "held_bytes": held, "dirty_bytes": dirty}


def replay(path: Path, repeat: int, compare: Path | None, rounds: int, profile: str | None
           ) -> None:
    sides = {"this": HERE.parent} | ({"other": compare} if compare else {})
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    for _ in range(rounds if compare else 1):
        for side, root in sides.items():
            env = dict(os.environ, PYTHONPATH=str(root))
            cmd = [sys.executable, __file__, "_replay", str(path), str(repeat)]
            if profile and side == "this":
                cmd.append(profile)
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for side, runs in results.items():
        cpus = sorted(c for r in runs for c in r["cpu_us"])
        print(f"{side} ({sides[side]}): {runs[0]['tasks']} tasks; Hub CPU per task "
              f"min {cpus[0]:.1f} us, median {cpus[len(cpus) // 2]:.1f} us; held per task in "
              f"flight {min(r['held_bytes'] for r in runs):.0f} B (before the flush: "
              f"{min(r['dirty_bytes'] for r in runs):.0f} B)")


# -- burst, end to end ----------------------------------------------------------------


def _cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _main_thread_cpu(pid: int) -> float:
    """utime + stime of a process's main thread (the controller's: the Hub), seconds."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def burst_once(tasks: int, engines: int = 2) -> dict[str, Any]:
    """One cluster, one burst (see the module docstring); the figures as a dict."""
    import sqlite3

    from common import make_funcs

    import monq
    from monq.cluster import Cluster, ClusterConfig

    noop, _, _ = make_funcs()
    home = Path(tempfile.mkdtemp(prefix="monq-hub-burst-"))
    db = home / "history.db"
    cluster = Cluster(ClusterConfig(n=engines, home=home, log_level="WARNING",
                                    db_url=f"sqlite:///{db}"))
    out: dict[str, Any] = {"monq": str(Path(monq.__file__).parent.parent), "tasks": tasks}
    try:
        cluster.start(timeout=120)
        with monq.Client(connection_file=cluster.connection_file) as c:
            c.wait_for_engines(engines, timeout=60)
            lb = c.load_balanced_view()
            for _ in range(200):
                lb.apply_sync(noop)
            want = 200 + tasks
            reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            ctl = cluster.pids["controller"]
            c0, h0, t0 = _cpu(ctl), _main_thread_cpu(ctl), time.perf_counter()
            ars = [lb.apply_async(noop) for _ in range(tasks)]
            for ar in ars:
                ar.get(600)
            t_res, c_res = time.perf_counter() - t0, _cpu(ctl) - c0
            deadline = time.monotonic() + 600
            while True:
                got = reader.execute("SELECT coalesce(sum(n), 0) FROM task_counts "
                                     "WHERE status = 'ok'").fetchone()[0]
                if got >= want or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            t_rec, c_rec = time.perf_counter() - t0, _cpu(ctl) - c0
            h_rec = _main_thread_cpu(ctl) - h0
            reader.close()
            out.update(results_per_s=tasks / t_res, recorded_per_s=tasks / t_rec,
                       ctl_us_to_results=c_res / tasks * 1e6,
                       ctl_us_to_recorded=c_rec / tasks * 1e6,
                       hub_us_to_recorded=h_rec / tasks * 1e6, ctl_peak_mb=_hwm_mb(ctl),
                       recorded=got - 200)
    finally:
        cluster.stop()
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return out


_BURST_KEYS = ("results_per_s", "recorded_per_s", "ctl_us_to_results", "ctl_us_to_recorded",
               "hub_us_to_recorded", "ctl_peak_mb")


def burst(tasks: int, compare: Path | None, rounds: int) -> None:
    import statistics

    sides = {"this": HERE.parent} | ({"other": compare} if compare else {})
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    for r in range(rounds):
        for side, root in sides.items():
            env = dict(os.environ, PYTHONPATH=str(root))
            # cwd=root: see bench/latency.py's ab() (`python -m` and the working directory)
            out = subprocess.run([sys.executable, __file__, "_burst", str(tasks)], env=env,
                                 check=True, capture_output=True, text=True, timeout=1800,
                                 cwd=str(root))
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[side].append(res)
            print(f"round {r} {side:5}: " + " ".join(f"{k}={res[k]:.0f}" for k in _BURST_KEYS),
                  flush=True)
    print(f"\n{'median of rounds':22}" + "".join(f"{s:>10}" for s in sides) +
          ("  this/other" if compare else ""))
    for k in _BURST_KEYS:
        med = {s: statistics.median(x[k] for x in results[s]) for s in sides}
        ratio = f"  {med['this'] / med['other']:10.2f}" if compare else ""
        print(f"{k:22}" + "".join(f"{med[s]:10.0f}" for s in sides) + ratio)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_burst":
        sys.path.insert(0, str(HERE))
        print(json.dumps(burst_once(int(sys.argv[2]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_controller":
        sys.exit(_controller(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_replay":
        # as the controller does (monq/hub/__main__.py): what the imports made (SQLAlchemy's
        # hundreds of thousands of objects) is frozen, out of the collector's full passes
        import monq.hub.hub  # noqa: F401
        import monq.hub.store  # noqa: F401

        gc.freeze()
        print(json.dumps(_one(sys.argv[2], int(sys.argv[3]),
                              sys.argv[4] if len(sys.argv) > 4 else None)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--tasks", type=int, default=20_000)
    r.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("replay")
    q.add_argument("recording", type=Path)
    q.add_argument("--repeat", type=int, default=3, help="replays per process")
    q.add_argument("--compare", type=Path, default=None,
                   help="a checkout whose monq to replay too, alternating")
    q.add_argument("--rounds", type=int, default=3, help="alternations with --compare")
    q.add_argument("--profile", default=None, help="write a cProfile of one replay here")
    q.add_argument("--frozen-clock", action="store_true",
                   help="the Hub's monotonic clock stands still: rows are held and written "
                        "alike whatever the replay's speed (see _freeze_clock)")
    b = sub.add_parser("burst")
    b.add_argument("--tasks", type=int, default=10_000)
    b.add_argument("--compare", type=Path, default=None,
                   help="a checkout whose monq to run too, alternating")
    b.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if a.cmd == "record":
        record(a.tasks, a.out)
    elif a.cmd == "burst":
        burst(a.tasks, a.compare, a.rounds)
    else:
        if a.frozen_clock:
            os.environ["MONQ_REPLAY_FROZEN_CLOCK"] = "1"
        replay(a.recording, a.repeat, a.compare, a.rounds, a.profile)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
