"""Where monq's time goes: py-spy on the client, the controller and one engine.

Runs two workloads on a fresh 2-engine cluster, each under ``py-spy record
--format raw`` attached to the three processes (on-CPU samples only, so an
idle thread costs nothing), then prints, per process, the share of samples
by thread and the top functions by self and by inclusive time.

Run: python bench/profile_monq.py [--out DIR] [--native] [--tasks 10000] [--calls 1000]
(needs `pip install py-spy` and the right to ptrace: root, or ptrace_scope 0)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import make_funcs

import monq
from monq.cluster import Cluster, ClusterConfig


def record(pids: dict[str, int], out: Path, phase: str, native: bool
           ) -> list[subprocess.Popen[bytes]]:
    procs = []
    for role, pid in pids.items():
        # --nonblocking: do not pause the process per sample (a paused relay would skew
        # the very latencies being profiled)
        cmd = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--threads",
               "--nonblocking", "--rate", "250", "-o", str(out / f"{phase}-{role}.txt")]
        cmd += ["--native"] if native else []
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    time.sleep(1.0)  # let py-spy attach
    return procs


def finish(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def summary(path: Path, top: int = 12) -> str:
    """Shares by thread, and top functions by self and inclusive samples."""
    threads: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        funcs = [_short(f) for f in frames[1:]]
        if funcs:
            selfs[funcs[-1]] += count
        for f in set(funcs):
            incl[f] += count
    if not total:
        return f"{path.name}: no samples\n"
    lines = [f"{path.name}: {total} on-CPU samples"]
    lines += [f"  thread {t}: {c / total:.0%}" for t, c in threads.most_common(6)]
    lines.append("  self:")
    lines += [f"    {c / total:6.1%}  {f}" for f, c in selfs.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {c / total:6.1%}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py)'."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(file).parts
    return f"{name} ({'/'.join(parts[-2:])})" if parts else name


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--native", action="store_true")
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--calls", type=int, default=1000)
    a = p.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="monq-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    noop, _, _ = make_funcs()
    home = Path(tempfile.mkdtemp(prefix="monq-profile-home-"))
    with Cluster(ClusterConfig(n=2, home=home, log_level="WARNING")) as cluster:
        cluster.start(timeout=60)
        pids = {"client": os.getpid(), "controller": cluster.pids["controller"],
                "engine": cluster.pids["engine-0"]}
        with monq.Client(connection_file=cluster.connection_file) as c:
            lb = c.load_balanced_view()
            for _ in range(200):
                lb.apply_sync(noop)

            def latency() -> None:
                for _ in range(a.calls):
                    lb.apply_sync(noop)

            def throughput() -> None:
                for ar in [lb.apply_async(noop) for _ in range(a.tasks)]:
                    ar.get(600)

            phases: dict[str, Callable[[], None]] = {"latency": latency,
                                                     "throughput": throughput}
            for phase, work in phases.items():
                spies = record(pids, out, phase, a.native)
                try:
                    t0 = time.perf_counter()
                    work()
                    print(f"{phase}: {time.perf_counter() - t0:.2f} s", flush=True)
                finally:
                    finish(spies)
    for f in sorted(out.glob("*.txt")):
        print(summary(f))
    print(f"raw profiles in {out}")


if __name__ == "__main__":
    main()
