"""The engines' CPU per task in a live burst, by thread (2-engine cluster, /proc).

Submits ``n`` no-ops with ``apply_async`` after a warm-up, waits for every
result, and prints the two engines' CPU per task (all threads: the main
thread, the link and heart threads, ZeroMQ's I/O thread) and the rate.  One
process, one cluster: run it alternately from two trees to compare them
(``cd TREE && PYTHONPATH=$PWD python bench/engine_burst_cpu.py``); on a shared
machine take medians of several rounds.

Run: PYTHONPATH=$PWD python bench/engine_burst_cpu.py [--n 20000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s threads, by name ("main" for the main thread)."""
    out: dict[str, float] = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            f = (t / "stat").read_text().rsplit(")", 1)[1].split()
            name = "main" if t.name == str(pid) else (t / "comm").read_text().strip()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / TICK
    return out


def noop() -> None:
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20_000)
    a = p.parse_args()
    from common import monq_cluster  # bench/ (this script's directory) is on sys.path

    with monq_cluster(2, "monq-engine-cpu-") as (cluster, client):
        view = client.load_balanced_view()
        for _ in range(300):
            view.apply_sync(noop)
        pids = {k: p for k, p in cluster.pids.items() if k.startswith("engine")}
        before = {k: threads(p) for k, p in pids.items()}
        t0 = time.perf_counter()
        ars = [view.apply_async(noop) for _ in range(a.n)]
        for ar in ars:
            ar.get(600)
        dt = time.perf_counter() - t0
        by_thread: dict[str, float] = {}
        for k, pid in pids.items():
            for name, v in threads(pid).items():
                by_thread[name] = by_thread.get(name, 0.0) + v - before[k].get(name, 0.0)
    total = sum(by_thread.values())
    print(f"engines' CPU per task: {total / a.n * 1e6:.1f} us  ({a.n / dt:,.0f} tasks/s)")
    for name, v in sorted(by_thread.items(), key=lambda kv: -kv[1]):
        print(f"  {name:14} {v / a.n * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
