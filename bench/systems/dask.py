"""Dask distributed: a LocalCluster of one-thread worker processes and a Client.

Dask's scheduler keeps no task history, so history figures are "—".  Its
scheduler runs in this (the client's) process with LocalCluster, so there is
no separate Hub process to measure either.  "direct" is ``submit(...,
workers=[one])``; map cuts the items into the same chunks monq's map does
(dask has no automatic chunking for ``client.map``).
"""

from __future__ import annotations

import logging
import time
from importlib.metadata import version
from typing import Any

import numpy as np
from common import chunks, make_funcs, map_chunk, median_time, time_calls

from systems.base import System


class Adapter(System):
    name = "dask"

    def __init__(self) -> None:
        self.cluster: Any = None
        self.client: Any = None
        self.noop, self.ident, _ = make_funcs()

    def start(self, n: int) -> None:
        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.ERROR)
        self.n = n
        self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                    dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(n, timeout=120)
        self.worker0 = sorted(self.client.scheduler_info()["workers"])[0]

    def stop(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            self.client = self.cluster = None

    def versions(self) -> dict[str, str]:
        return {"distributed": version("distributed"), "dask": version("dask")}

    def noop_latency(self, kind: str, n: int) -> list[float]:
        workers = [self.worker0] if kind == "direct" else None
        return time_calls(
            lambda: self.client.submit(self.noop, pure=False, workers=workers).result(), n)

    def throughput(self, n: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        futs = [self.client.submit(self.noop, pure=False) for _ in range(n)]
        self.client.gather(futs)
        seconds = time.perf_counter() - t0
        del futs
        return {"seconds": seconds, "recorded": None}

    def map(self, n: int) -> float:
        run = map_chunk(abs)
        t0 = time.perf_counter()
        futs = self.client.map(run, chunks(n, self.n), pure=False)
        out = [x for part in self.client.gather(futs) for x in part]
        seconds = time.perf_counter() - t0
        assert len(out) == n
        return seconds

    def roundtrip(self, nbytes: int, repeat: int) -> float:
        arr = np.ones(nbytes // 8)

        def once() -> Any:
            return self.client.submit(self.ident, arr, pure=False).result()

        assert once().shape == arr.shape
        return median_time(once, repeat)
