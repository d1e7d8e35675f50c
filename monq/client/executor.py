"""A concurrent.futures.Executor over a view, for code written against that interface."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from monq.client.results import AsyncResult
from monq.client.view import View


class MonqExecutor(cf.Executor):
    """``submit`` and ``map`` send work through ``view``; futures are AsyncResults.

    ``shutdown(wait=True)`` waits for what was submitted; the cluster and the
    client stay up (the client's owner closes it).
    """

    def __init__(self, view: View) -> None:
        self.view = view
        self._lock = threading.Lock()
        self._shut = False
        self._pending: set[AsyncResult] = set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> AsyncResult:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot submit after shutdown")
            ar = self.view.apply_async(fn, *args, **kwargs)
            self._pending.add(ar)
        ar.add_done_callback(self._discard)
        return ar

    def _discard(self, ar: cf.Future) -> None:  # type: ignore[type-arg]
        with self._lock:
            self._pending.discard(ar)  # type: ignore[arg-type]

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Like Executor.map, in chunks of ``chunksize`` items per task."""
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot submit after shutdown")
        ar = self.view.map_async(fn, *iterables, chunksize=chunksize)
        if timeout is not None:
            ar.get(timeout)  # raises monq.TimeoutError (a TimeoutError) when late
        return iter(ar)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            pending = list(self._pending)
        if wait:
            cf.wait(pending)
