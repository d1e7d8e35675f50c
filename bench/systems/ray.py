"""Ray: ``ray.init(num_cpus=N)`` on this machine and ``@ray.remote`` tasks.

Ray keeps no per-task history one can query this way, so history figures
are "—".  "direct" is a method call on an actor (one chosen worker process);
map cuts the items into the same chunks monq's map does.  Arrays come back
through Ray's shared-memory object store, read without a copy.
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
    name = "ray"

    def __init__(self) -> None:
        self.started = False
        noop, ident, _ = make_funcs()
        self._bodies = (noop, ident)

    def start(self, n: int) -> None:
        import ray

        self.ray = ray
        self.n = n
        ray.init(num_cpus=n, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        self.started = True
        noop, ident = self._bodies
        remote: Any = ray.remote(num_cpus=1)
        self.noop, self.ident, self.chunk = remote(noop), remote(ident), remote(map_chunk(abs))

        class Echo:
            def noop(self) -> None:
                return None

        actor_cls: Any = ray.remote(num_cpus=0)(Echo)
        self.actor = actor_cls.remote()
        # ready = every worker has run a task
        ray.get([self.noop.remote() for _ in range(4 * n)])
        ray.get(self.actor.noop.remote())

    def stop(self) -> None:
        if self.started:
            self.started = False
            self.ray.shutdown()

    def versions(self) -> dict[str, str]:
        return {"ray": version("ray")}

    def noop_latency(self, kind: str, n: int) -> list[float]:
        get = self.ray.get
        if kind == "direct":
            return time_calls(lambda: get(self.actor.noop.remote()), n)
        return time_calls(lambda: get(self.noop.remote()), n)

    def throughput(self, n: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        refs = [self.noop.remote() for _ in range(n)]
        self.ray.get(refs)
        return {"seconds": time.perf_counter() - t0, "recorded": None}

    def map(self, n: int) -> float:
        t0 = time.perf_counter()
        parts = self.ray.get([self.chunk.remote(c) for c in chunks(n, self.n)])
        out = [x for part in parts for x in part]
        seconds = time.perf_counter() - t0
        assert len(out) == n
        return seconds

    def roundtrip(self, nbytes: int, repeat: int) -> float:
        arr = np.ones(nbytes // 8)

        def once() -> Any:
            return self.ray.get(self.ident.remote(arr))

        assert once().shape == arr.shape
        return median_time(once, repeat)
