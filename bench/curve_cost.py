"""What CurveZMQ costs monq: round-trip latency with and without ``--curve``, same run.

Starts two clusters side by side (one engine each, one with Curve), then
measures ``apply_sync`` round trips through the load-balanced and the direct
view, alternating blocks between the two clusters so that both see the same
machine load.  Prints the median of the block medians, per cluster and view.

Run: python bench/curve_cost.py [--blocks 6] [--n 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import monq
from monq.cluster import Cluster, ClusterConfig


def _noop() -> None:
    return None


def _block(view: monq.LoadBalancedView | monq.DirectView, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        view.apply_sync(_noop)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--engines", type=int, default=1)
    a = p.parse_args()
    clusters = {}
    clients = {}
    try:
        for curve in (False, True):
            home = Path(tempfile.mkdtemp(prefix="monq-curve-bench-"))
            c = Cluster(ClusterConfig(n=a.engines, home=home, curve=curve, log_level="WARNING"))
            clusters[curve] = c
            c.start(timeout=60)
            clients[curve] = monq.Client(connection_file=c.connection_file, timeout=10)
        views = {(curve, kind): (cl.load_balanced_view() if kind == "lb" else cl[cl.ids[0]])
                 for curve, cl in clients.items() for kind in ("lb", "direct")}
        for v in views.values():  # warm up
            _block(v, 100)
        results: dict[tuple[bool, str], list[float]] = {k: [] for k in views}
        for _ in range(a.blocks):
            for k, v in views.items():
                results[k].append(_block(v, a.n))
        for kind in ("lb", "direct"):
            off = statistics.median(results[(False, kind)]) * 1e6
            on = statistics.median(results[(True, kind)]) * 1e6
            print(f"{kind:6s} round trip: plain {off:6.0f} us, curve {on:6.0f} us, "
                  f"+{on - off:.0f} us ({on / off:.2f}x); blocks plain "
                  f"{[round(x * 1e6) for x in results[(False, kind)]]}, curve "
                  f"{[round(x * 1e6) for x in results[(True, kind)]]}")
    finally:
        for cl in clients.values():
            cl.close()
        for c in clusters.values():
            c.stop()


if __name__ == "__main__":
    main()
