"""monq: a Cluster started from Python, a Client, its load-balanced and direct views."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from common import make_funcs, median_time, time_calls, timed

import monq
import monq.client  # noqa: F401 - `import monq` no longer loads it: keep it out of start_s, as before
from monq.cluster import Cluster, ClusterConfig
from systems.base import System


class Adapter(System):
    name = "monq"

    def __init__(self) -> None:
        self.home: Path | None = None
        self.cluster: Cluster | None = None
        self.client: monq.Client | None = None
        self.noop, self.ident, self.fail = make_funcs()

    def start(self, n: int) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="monq-bench-"))
        self.cluster = Cluster(ClusterConfig(n=n, home=self.home, log_level="WARNING"))
        self.cluster.start(timeout=120)
        self.client = monq.Client(connection_file=self.cluster.connection_file)
        self.client.wait_for_engines(n, timeout=60)
        self.lb = self.client.load_balanced_view()
        self.direct = self.client[self.client.ids[0]]

    def stop(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.stop()
        finally:
            self.client = self.cluster = None
            if self.home is not None:
                shutil.rmtree(self.home, ignore_errors=True)

    def versions(self) -> dict[str, str]:
        return {"monq": str(Path(monq.__file__).parent), "pyzmq": version("pyzmq"),
                "SQLAlchemy": version("SQLAlchemy")}

    def hub_pid(self) -> int | None:
        return self.cluster.pids.get("controller") if self.cluster else None

    @property
    def db_path(self) -> Path:
        assert self.cluster is not None
        return self.cluster.config.profile_dir / "history.db"

    def noop_latency(self, kind: str, n: int) -> list[float]:
        view = self.lb if kind == "lb" else self.direct
        return time_calls(lambda: view.apply_sync(self.noop), n)

    def recorded_ok(self) -> int:
        assert self.client is not None
        return int(self.client.cluster_status()["counts"].get("ok", 0))

    def throughput(self, n: int) -> dict[str, Any]:
        """Until every task is recorded: the Hub may lag behind the results (it
        records from copies), and the figure is "with the Hub recording every task"."""
        before = self.recorded_ok()
        t0 = time.perf_counter()
        ars = [self.lb.apply_async(self.noop) for _ in range(n)]
        for ar in ars:
            ar.get(600)
        results = time.perf_counter() - t0
        deadline = time.monotonic() + 600
        recorded = self.recorded_ok() - before
        while recorded < n and time.monotonic() < deadline:
            time.sleep(0.05)
            recorded = self.recorded_ok() - before
        return {"seconds": time.perf_counter() - t0, "results_seconds": results,
                "recorded": recorded}

    def map(self, n: int) -> float:
        t0 = time.perf_counter()
        out = self.lb.map(abs, range(n)).get(600)
        seconds = time.perf_counter() - t0
        assert len(out) == n
        return seconds

    def roundtrip(self, nbytes: int, repeat: int) -> float:
        """Through shared memory when it is on (the default; client and engines share this
        host): only a handle crosses the relay."""
        arr = np.ones(nbytes // 8)
        assert self.lb.apply_sync(self.ident, arr).shape == arr.shape
        return median_time(lambda: self.lb.apply_sync(self.ident, arr), repeat)

    def roundtrip_variants(self, nbytes: int, repeat: int) -> dict[str, float]:
        """The same with shared memory off (the TCP path, as with engines on another
        host): "raw", frames through the relay (MONQ_BULK=0), and "bulk", buffers pulled
        peer to peer (monq.bulk); timed alternately, so both see the same load."""
        assert self.client is not None
        cfg, bcfg = self.client.shm.config, self.client.shm.bulk.config
        was = cfg.enabled, bcfg.enabled
        cfg.enabled = False
        arr = np.ones(nbytes // 8)
        times: dict[str, list[float]] = {"raw": [], "bulk": []}
        try:
            for i in range(max(1, repeat) + 1):
                for name in ("bulk", "raw"):
                    bcfg.enabled = name == "bulk"
                    t = timed(lambda: self.lb.apply_sync(self.ident, arr))
                    if i:  # the first of each warms its path
                        times[name].append(t)
            return {k: statistics.median(v) for k, v in times.items()}
        finally:
            cfg.enabled, bcfg.enabled = was

    def history(self, rows: int, repeat: int) -> dict[str, Any]:
        from systems.monq_history import run_history

        assert self.client is not None
        return run_history(self, rows, repeat)

