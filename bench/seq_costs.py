"""CPU and wake-ups per sequential round trip, by process and thread.

Starts a 2-engine cluster, runs ``n`` sequential ``apply_sync(noop)`` on a
load-balanced (or direct) view after a warm-up, and reads before and after,
for every thread of the client, the engines and the controller, the CPU time
(utime + stime, /proc/<pid>/task/<tid>/stat) and the voluntary context
switches (each one a sleep, i.e. one wake-up later).  Prints them per round
trip.  CPU and wake-up counts are steadier than wall time on a shared
machine: they say what a round trip costs whoever runs it.

Run: PYTHONPATH=$PWD python bench/seq_costs.py [--n 2000] [--view lb|direct]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[str, tuple[float, int, int, float]]:
    """name/tid -> (cpu seconds, voluntary switches, involuntary switches, of the cpu
    seconds those in the kernel)."""
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (t / "stat").read_text()
            status = (t / "status").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        f = stat.rsplit(")", 1)[1].split()
        cpu = (int(f[11]) + int(f[12])) / TICK
        d = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out[f"{name}/{t.name}"] = (cpu, int(d["voluntary_ctxt_switches"]),
                                   int(d["nonvoluntary_ctxt_switches"]), int(f[12]) / TICK)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--view", default="lb")
    p.add_argument("--nice-hub", type=int, default=None,
                   help="experiment: renice the controller's main (Hub) thread to this")
    p.add_argument("--pin", action="store_true",
                   help="experiment: the controller on CPU 0, client and engines on CPU 1")
    p.add_argument("--idle-hub", action="store_true",
                   help="experiment: the controller's main (Hub) thread under SCHED_IDLE")
    p.add_argument("--burst", action="store_true",
                   help="n apply_async at once instead of one at a time; counted until the "
                        "Hub has recorded every task")
    a = p.parse_args()
    from common import monq_cluster  # bench/ (this script's directory) is on sys.path

    def noop() -> None:
        return None

    with monq_cluster(2, "monq-seq-") as (cluster, client):
        view = client.load_balanced_view() if a.view == "lb" else client[client.ids[0]]
        for _ in range(300):
            view.apply_sync(noop)
        pids = {"client": os.getpid(), **cluster.pids}
        pids.pop("supervisor", None)
        if a.nice_hub is not None:
            os.setpriority(os.PRIO_PROCESS, pids["controller"], a.nice_hub)
        if a.pin:
            for who, pid in pids.items():
                cpus = {0} if who == "controller" else {1}
                for t in Path(f"/proc/{pid}/task").iterdir():
                    os.sched_setaffinity(int(t.name), cpus)
        if a.idle_hub:
            os.sched_setscheduler(pids["controller"], os.SCHED_IDLE, os.sched_param(0))
        before = {k: threads(p) for k, p in pids.items()}
        ts = []
        if a.burst:
            ok0 = client.cluster_status()["counts"].get("ok", 0)
            t0 = time.perf_counter()
            for ar in [view.apply_async(noop) for _ in range(a.n)]:
                ar.get(600)
            ts.append(time.perf_counter() - t0)
            while client.cluster_status()["counts"].get("ok", 0) - ok0 < a.n:
                time.sleep(0.01)
            ts.append(time.perf_counter() - t0)
        else:
            for _ in range(a.n):
                t0 = time.perf_counter()
                view.apply_sync(noop)
                ts.append(time.perf_counter() - t0)
        after = {k: threads(p) for k, p in pids.items()}
    if a.burst:
        print(f"{a.n} tasks at once ({a.view}): results {a.n / ts[0]:.0f}/s, "
              f"recorded {a.n / ts[1]:.0f}/s")
    else:
        ts.sort()
        print(f"{a.n} round trips ({a.view}): median {statistics.median(ts) * 1e6:.0f} us, "
              f"p99 {ts[int(a.n * 0.99)] * 1e6:.0f} us")
    print(f"{'thread':40} {'cpu us/rt':>10} {'of it sys':>10} {'wakes/rt':>9} "
          f"{'preempt/rt':>10}")
    tot = [0.0, 0.0, 0.0, 0.0]
    for proc in pids:
        for th, (c1, v1, i1, s1) in sorted(after[proc].items()):
            c0, v0, i0, s0 = before[proc].get(th, (0.0, 0, 0, 0.0))
            row = ((c1 - c0) / a.n * 1e6, (s1 - s0) / a.n * 1e6, (v1 - v0) / a.n,
                   (i1 - i0) / a.n)
            if row[0] < 0.5 and row[2] < 0.01:
                continue
            tot = [x + y for x, y in zip(tot, row)]
            print(f"{proc + ':' + th:40} {row[0]:10.1f} {row[1]:10.1f} {row[2]:9.2f} "
                  f"{row[3]:10.2f}")
    print(f"{'total':40} {tot[0]:10.1f} {tot[1]:10.1f} {tot[2]:9.2f} {tot[3]:10.2f}")


if __name__ == "__main__":
    main()
