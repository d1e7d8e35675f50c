"""Array round trips with shared memory off: raw frames through the relay vs monq.bulk.

Run: python bench/bulk_roundtrip.py [--sizes 1,10,100] [--rounds 7] [--engines 1]

Shared memory is off in the client (``client.shm.config.enabled = False``),
as for engines on another host.  Each round sends the same array through an
identity function once with ``monq.bulk`` (buffers pulled peer to peer over
TCP) and once without (``client.shm.bulk.config.enabled = False``: raw
frames client -> relay -> engine -> relay -> client), so both see the same
machine load.  Prints the medians in MB/s (2 x size / round trip, as
bench/measure.py counts them), the ratio, and the client's CPU seconds per
round trip.  On a 2-core machine shared with other work, read the ratios.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,10,100", help="MiB, comma-separated (fractions allowed)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--engines", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="monq-bulk-bench-") as home, \
            Cluster(ClusterConfig(n=a.engines, home=Path(home), log_level="WARNING")) as cl:
        cl.start(timeout=120)
        with monq.Client(connection_file=cl.connection_file) as c:
            c.wait_for_engines(a.engines, timeout=60)
            c.shm.config.enabled = False
            lb = c.load_balanced_view()
            print(f"{'MB':>5} {'bulk MB/s':>10} {'raw MB/s':>9} {'bulk/raw':>9} "
                  f"{'bulk cpu ms':>12} {'raw cpu ms':>11}")
            for mb in (float(s) for s in a.sizes.split(",")):
                x = np.ones(int(mb * MB) // 8)
                times: dict[bool, list[float]] = {True: [], False: []}
                cpu: dict[bool, list[float]] = {True: [], False: []}
                for on in (True, False):  # warm both paths
                    c.shm.bulk.config.enabled = on
                    lb.apply_sync(ident, x)
                for _ in range(a.rounds):
                    for on in (True, False):
                        c.shm.bulk.config.enabled = on
                        c0, t0 = time.process_time(), time.perf_counter()
                        lb.apply_sync(ident, x)
                        times[on].append(time.perf_counter() - t0)
                        cpu[on].append(time.process_time() - c0)
                bulk, raw = (2 * mb / statistics.median(times[k]) for k in (True, False))
                bc, rc = (1e3 * statistics.median(cpu[k]) for k in (True, False))
                print(f"{mb:>5g} {bulk:>10,.0f} {raw:>9,.0f} {bulk / raw:>9.2f} {bc:>12.1f} "
                      f"{rc:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
