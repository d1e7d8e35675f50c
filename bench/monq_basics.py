"""A quick measure of monq alone: start, latency, throughput, map, arrays.

Run: python bench/monq_basics.py [--engines 2] [--json out.json]
(Not part of the test suite.  The side-by-side comparison with other systems
is a separate benchmark.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import monq
from monq.cluster import Cluster, ClusterConfig


def latency(view: monq.LoadBalancedView | monq.DirectView, n: int,
            f: Any = None, warm: int = 100) -> dict[str, float]:
    """``n`` sequential ``apply_sync(f)`` (default: a no-op) after ``warm`` untimed ones:
    median and p99 in microseconds."""
    f = _noop if f is None else f
    for _ in range(warm):
        view.apply_sync(f)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        view.apply_sync(f)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return {"median_us": statistics.median(ts) * 1e6, "p99_us": ts[int(n * 0.99)] * 1e6}


def _noop() -> None:
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out: dict[str, object] = {"engines": a.engines, "cpus": os.cpu_count()}
    home = Path(tempfile.mkdtemp(prefix="monq-bench-"))
    cluster = Cluster(ClusterConfig(n=a.engines, home=home, log_level="WARNING"))
    t0 = time.perf_counter()
    cluster.start(timeout=60)
    out["start_to_ready_s"] = time.perf_counter() - t0
    try:
        with monq.Client(connection_file=cluster.connection_file) as c:
            lb = c.load_balanced_view()
            out["latency_lb"] = latency(lb, 1000)
            out["latency_direct"] = latency(c[c.ids[0]], 1000)
            for n in (10_000,):
                t0 = time.perf_counter()
                ars = [lb.apply_async(_noop) for _ in range(n)]
                for ar in ars:
                    ar.get(120)
                out[f"apply_async_{n}_tasks_per_s"] = n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            lb.map(abs, range(100_000)).get(120)
            out["map_100k_items_per_s"] = 100_000 / (time.perf_counter() - t0)
            for mb in (1, 10, 100):
                arr = np.ones(mb * 1024 * 1024 // 8)
                lb.apply_sync(_ident, arr)
                ts = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    lb.apply_sync(_ident, arr)
                    ts.append(time.perf_counter() - t0)
                out[f"roundtrip_{mb}MB_MBps"] = 2 * mb / statistics.median(ts)
            st = c.cluster_status()
            out["recorded_ok"] = st["counts"].get("ok", 0)
    finally:
        t0 = time.perf_counter()
        cluster.stop()
        out["stop_s"] = time.perf_counter() - t0
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


def _ident(x: object) -> object:
    return x


if __name__ == "__main__":
    main()
