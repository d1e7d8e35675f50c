"""What every system adapter shares: the work it runs, timing helpers, the Hub's RSS.

The no-op and identity functions are made inside a function so that every
system ships them *by value* (cloudpickle pickles a nested function's code):
no engine, worker or raylet has to import a module of this benchmark.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: 8 chunks per engine: monq's default for map, and what the peers are given by hand
CHUNKS_PER_ENGINE = 8


def make_funcs() -> tuple[Callable[[], None], Callable[[Any], Any], Callable[[Any], Any]]:
    """(noop, ident, fail): the task bodies, defined here so they travel by value."""

    def noop() -> None:
        return None

    def ident(x: Any) -> Any:
        return x

    def fail(x: Any) -> Any:
        return 1 / x  # fail(0): a ZeroDivisionError, the error rows of the history

    return noop, ident, fail


def map_chunk(f: Callable[[Any], Any]) -> Callable[[list[Any]], list[Any]]:
    """A task body that maps ``f`` over one chunk (for peers without automatic chunking)."""

    def run(chunk: list[Any]) -> list[Any]:
        return [f(x) for x in chunk]

    return run


def chunks(n: int, engines: int) -> list[list[int]]:
    """range(n) cut into CHUNKS_PER_ENGINE chunks per engine, as monq's map cuts it."""
    size = max(1, -(-n // (engines * CHUNKS_PER_ENGINE)))
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def time_calls(call: Callable[[], Any], n: int, warmup: int = 100) -> list[float]:
    """Seconds taken by each of ``n`` sequential calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def timed(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def median_time(call: Callable[[], Any], repeat: int) -> float:
    return statistics.median(timed(call) for _ in range(max(1, repeat)))


def vm_hwm_mb(pid: int) -> float | None:
    """The kernel's peak resident set (VmHWM) of a live process, in MB; None if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RSSSampler:
    """Samples one process's RSS every ``period`` seconds in a thread; ``peak_mb`` at the end.

    Resource handling: :meth:`stop` ends the thread (safe twice); use as a context manager.
    """

    def __init__(self, pid: int, period: float = 0.2) -> None:
        import psutil

        self.pid = pid
        self.peak = 0
        self._proc = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except Exception:  # the process went away: keep what we saw
                return

    def stop(self) -> dict[str, float | None]:
        """Stop sampling; the sampled peak and the kernel's VmHWM, in MB."""
        self._stop.set()
        self._thread.join(2)
        return {"sampled_peak_mb": self.peak / 2**20 or None, "vm_hwm_mb": vm_hwm_mb(self.pid)}

    def __enter__(self) -> RSSSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()


@contextlib.contextmanager
def monq_cluster(engines: int = 2, prefix: str = "monq-bench-") -> Iterator[tuple[Any, Any]]:
    """A fresh monq cluster in a temporary home and a client with every engine ready:
    ``(cluster, client)``; both stopped and the home removed on the way out."""
    import shutil
    import tempfile

    import monq
    from monq.cluster import Cluster, ClusterConfig

    home = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = Cluster(ClusterConfig(n=engines, home=home, log_level="WARNING"))
    try:
        cluster.start(timeout=120)
        with monq.Client(connection_file=cluster.connection_file) as client:
            client.wait_for_engines(engines, timeout=60)
            yield cluster, client
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)
