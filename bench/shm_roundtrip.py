"""Array round trips through one cluster, shared memory on and off, alternating.

Run: python bench/shm_roundtrip.py [--sizes 1,10,100] [--rounds 7] [--engines 2]

Each round sends the same array through an identity function once with
shared memory on and once off (raw frames through the relay), so both see
the same machine load; a round also times ``x + 1`` (a new result, written
by the engine into a segment the client lends it).  Prints the medians in
MB/s (bytes out and back, as bench/measure.py counts them) and the ratio.
On a 2-core machine shared with other work, read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monq  # noqa: E402
from monq.cluster import Cluster, ClusterConfig  # noqa: E402

MB = 2**20


def ident(x: Any) -> Any:
    return x


def plus_one(x: Any) -> Any:
    return x + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,10,100", help="MiB, comma-separated (fractions allowed)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--engines", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="monq-shm-bench-") as home, \
            Cluster(ClusterConfig(n=a.engines, home=Path(home), log_level="WARNING")) as cl:
        cl.start(timeout=120)
        with monq.Client(connection_file=cl.connection_file) as c:
            c.wait_for_engines(a.engines, timeout=60)
            lb = c.load_balanced_view()
            print(f"{'MB':>5} {'function':>9} {'shm MB/s':>9} {'raw MB/s':>9} {'shm/raw':>8}")
            for mb in (float(s) for s in a.sizes.split(",")):
                x = np.ones(int(mb * MB) // 8)
                for f in (ident, plus_one):
                    times: dict[bool, list[float]] = {True: [], False: []}
                    for on in (True, False):  # warm both paths (and the pool)
                        c.shm.config.enabled = on
                        lb.apply_sync(f, x)
                    for _ in range(a.rounds):
                        for on in (True, False):
                            c.shm.config.enabled = on
                            t0 = time.perf_counter()
                            lb.apply_sync(f, x)
                            times[on].append(time.perf_counter() - t0)
                    shm, raw = (2 * mb / statistics.median(times[k]) for k in (True, False))
                    print(f"{mb:>5g} {f.__name__:>9} {shm:>9,.0f} {raw:>9,.0f} {shm / raw:>8.1f}",
                          flush=True)


if __name__ == "__main__":
    main()
