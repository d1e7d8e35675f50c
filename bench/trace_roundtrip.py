"""Where a sequential round trip's time goes: timestamps of each step, per round trip.

Starts a 2-engine cluster whose engines load bench/trace/sitecustomize.py
(it wraps a few functions to record ``perf_counter_ns``; the clock is the
same in every process), wraps the same in this client, runs ``n``
sequential load-balanced ``apply_sync(noop)`` and prints, for each step, the
median and p90 time from the previous step, in microseconds.  The tracing
itself adds a few microseconds per step.

Run: PYTHONPATH=$PWD python bench/trace_roundtrip.py [--n 1000] [--view lb|direct] [--slowest]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "trace"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--view", default="lb")
    p.add_argument("--raw", type=int, default=0, help="print the events of this many round trips")
    p.add_argument("--slowest", action="store_true",
                   help="the steps of the slowest 1 %% of round trips only (what makes the p99)")
    a = p.parse_args()
    tdir = Path(tempfile.mkdtemp(prefix="monq-trace-"))
    os.environ["MONQ_TRACE_DIR"] = str(tdir)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE / "trace"),
                                                os.environ.get("PYTHONPATH", "")])
    import tracehooks

    tracehooks.install_client()
    from common import monq_cluster  # bench/ (this script's directory) is on sys.path

    def noop() -> None:
        return None

    with monq_cluster(2, "monq-lat-") as (cluster, client):
        view = client.load_balanced_view() if a.view == "lb" else client[client.ids[0]]
        for _ in range(200):
            view.apply_sync(noop)
        tracehooks.EVENTS.clear()
        for _ in range(a.n):
            view.apply_sync(noop)
        client_events = list(tracehooks.EVENTS)
    events = [(t, tag, th) for t, tag, th in client_events]
    for f in tdir.glob("*.json"):
        events += [tuple(e) for e in json.loads(f.read_text())]
    shutil.rmtree(tdir, ignore_errors=True)
    events.sort()
    # cut into round trips: from each c.call to its c.done
    trips: list[list[tuple[int, str, str]]] = []
    cur: list[tuple[int, str, str]] | None = None
    for e in events:
        if e[1] == "c.call":
            cur = [e]
        elif cur is not None:
            cur.append(e)
            if e[1] == "c.done":
                trips.append(cur)
                cur = None
    steps: dict[str, list[float]] = collections.defaultdict(list)
    order: dict[str, int] = {}
    totals = [(trip[-1][0] - trip[0][0]) / 1000 for trip in trips]
    if a.slowest:
        # only the slowest 1 %: which steps make the p99
        cut = sorted(totals)[int(len(totals) * 0.99)]
        trips = [t for t, total in zip(trips, totals) if total >= cut]
        print(f"slowest {len(trips)} round trips (>= {cut:.0f} us):")
    for trip in trips:
        prev = trip[0][0]
        seen = set()
        for t, tag, th in trip[1:]:
            key = f"{tag} [{th}]"
            if key in seen:
                key = key + " (again)"
                if key in seen:
                    continue
            seen.add(key)
            steps[key].append((t - prev) / 1000)
            order.setdefault(key, len(order))
            prev = t
    print(f"{len(trips)} round trips ({a.view}); median {statistics.median(totals):.0f} us, "
          f"p99 {sorted(totals)[int(len(totals) * 0.99)]:.0f} us")
    print(f"{'step (time since the previous step)':60} {'n':>5} {'median':>7} {'p90':>7}")
    for key in sorted(steps, key=lambda k: order[k]):
        xs = sorted(steps[key])
        print(f"{key:60} {len(xs):5} {statistics.median(xs):7.1f} {xs[int(len(xs) * 0.9)]:7.1f}")
    for trip in trips[:a.raw]:
        t0 = trip[0][0]
        print(" | ".join(f"{(t - t0) / 1000:.0f} {tag}@{th[:10]}" for t, tag, th in trip))


if __name__ == "__main__":
    main()
