"""A burst, every 100 ms: results back, rows recorded, CPU of each process.

Starts a 2-engine cluster, submits ``n`` no-ops at once with ``apply_async``
(a thread collects the results), and prints one line per interval until the
Hub has recorded every task: the results the client has, the rows the Hub has
written (read from ``task_counts`` by a separate read-only SQLite connection,
so the Hub is not asked anything), the CPU of the controller's main thread
(the Hub) and of each process, in % of one core.  Shows where a burst's time
goes: how far the Hub falls behind while everything runs, and how long it then
works alone (bench/PROFILE.md, update 11).

Run: PYTHONPATH=$PWD python bench/burst_timeline.py [--n 20000]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> dict[str, float]:
    """tid -> CPU seconds of each thread of ``pid``."""
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (t / "stat").read_text()
        except OSError:
            continue
        f = stat.rsplit(")", 1)[1].split()
        out[t.name] = (int(f[11]) + int(f[12])) / TICK
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--interval", type=float, default=0.1)
    a = p.parse_args()
    from common import monq_cluster  # bench/ (this script's directory) is on sys.path

    def noop() -> None:
        return None

    with monq_cluster(2, "monq-timeline-") as (cluster, client):
        view = client.load_balanced_view()
        for _ in range(300):
            view.apply_sync(noop)
        db = cluster.config.profile_dir / "history.db"
        reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        query = "SELECT coalesce(sum(n), 0) FROM task_counts WHERE status = 'ok'"
        try:
            while True:  # the warm-up's rows first
                base = reader.execute(query).fetchone()[0]
                if base >= 300:
                    break
                time.sleep(0.02)
            pids = {k: v for k, v in cluster.pids.items() if k != "supervisor"}
            pids["client"] = os.getpid()
            hub = pids["controller"]
            got = [0]

            def collect(ars: list[Any]) -> None:
                for ar in ars:
                    ar.get(600)
                    got[0] += 1

            t0 = time.perf_counter()
            prev = {k: sum(cpu(p).values()) for k, p in pids.items()}
            prev_hub = cpu(hub)[str(hub)]
            ars = [view.apply_async(noop) for _ in range(a.n)]
            collector = threading.Thread(target=collect, args=(ars,))
            collector.start()
            print(f"submitted in {time.perf_counter() - t0:.2f} s")
            last = time.perf_counter()
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                time.sleep(a.interval)
                rec = reader.execute(query).fetchone()[0] - base
                now = {k: sum(cpu(p).values()) for k, p in pids.items()}
                now_hub = cpu(hub)[str(hub)]
                t = time.perf_counter()
                dt, last = t - last, t
                procs = " ".join(f"{k} {100 * (now[k] - prev[k]) / dt:4.0f}%" for k in now)
                print(f"{t - t0:6.2f} s  results {got[0]:7d}  recorded {rec:7d}  "
                      f"hub {100 * (now_hub - prev_hub) / dt:4.0f}%  {procs}", flush=True)
                prev, prev_hub = now, now_hub
                if rec >= a.n:
                    break
            collector.join()
        finally:
            reader.close()


if __name__ == "__main__":
    main()
