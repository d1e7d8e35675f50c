"""Futures for submitted work: AsyncResult and AsyncMapResult.

An :class:`AsyncResult` is a :class:`concurrent.futures.Future` (so it works
with ``concurrent.futures.wait``, ``as_completed`` and callbacks) and is
awaitable in asyncio.  It stands for one task or several: one ``apply`` on a
load-balanced view or a single engine gives one value; an ``apply`` on several
engines gives a list, in target order; a ``map`` gives the flattened list.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import datetime, timezone
from typing import IO, Any

from monq import errors

_PENDING = cf._base.PENDING


class _Condition(threading.Condition):
    """A ``threading.Condition`` that does not keep five bound methods of its lock.

    A burst holds two futures per task, each with a Condition, for as long as
    the caller keeps them: the stock one is eight objects the cyclic garbage
    collector tracks (the bound methods ``acquire``, ``release``,
    ``_release_save``, ``_acquire_restore`` and ``_is_owned``), this one three,
    and the collector's full passes over a growing heap of 100,000s of them cost
    the client more CPU than sending the tasks (counted in tests/test_costs.py).
    Same behaviour: the methods delegate to the RLock.
    """

    def __init__(self) -> None:  # noqa: D107 - the lock is always a fresh RLock
        self._lock = threading.RLock()
        self._waiters: collections.deque[Any] = collections.deque()

    def acquire(self, *args: Any) -> bool:  # type: ignore[override]
        return self._lock.acquire(*args)

    def release(self) -> None:  # type: ignore[override]
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, x: Any) -> None:
        self._lock._acquire_restore(x)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined,no-any-return]


#: what cf.Future.__init__ sets (checked once: another Python may set more)
_FUTURE_FIELDS = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
_LIGHT = set(vars(cf.Future())) == _FUTURE_FIELDS and hasattr(threading.RLock(), "_is_owned")


def _init_future(f: cf.Future[Any]) -> None:
    """``cf.Future.__init__`` with a :class:`_Condition`."""
    if not _LIGHT:
        cf.Future.__init__(f)
        return
    f._condition = _Condition()  # type: ignore[attr-defined]
    f._state = _PENDING  # type: ignore[attr-defined]
    f._result = None  # type: ignore[attr-defined]
    f._exception = None  # type: ignore[attr-defined]
    f._waiters = []  # type: ignore[attr-defined]
    f._done_callbacks = []  # type: ignore[attr-defined]


class TaskFuture(cf.Future):  # type: ignore[type-arg]
    """The future of one task (one msg_id); ``metadata`` is filled by the reply."""

    def __init__(self, msg_id: str, submitted: float, queue: str,
                 engine: int | None = None) -> None:
        _init_future(self)
        self.msg_id = msg_id
        self.queue = queue
        #: load-balanced tasks keep what they were sent with, to be sent again: after
        #: their engine died before reading them, or for a retry
        self.request: tuple[dict[str, Any], Sequence[Any], Sequence[bool]] | None = None
        self.retries_left = 0
        self.metadata: dict[str, Any] = {
            "msg_id": msg_id, "engine": engine, "status": "pending", "queue": queue,
            "submitted": _dt(submitted), "started": None, "completed": None, "received": None,
            "stdout": "", "stderr": "",
        }

    def _invoke_callbacks(self) -> None:
        super()._invoke_callbacks()  # type: ignore[misc]
        # they ran once and never run again: dropping them breaks the cycle with the
        # AsyncResult that waits on this future, so a large result (or the shared memory
        # it views, see monq.shm) is freed as soon as the caller drops it, not at the next GC
        self._done_callbacks: list[Any] = []


def _dt(t: float | None) -> datetime | None:
    """Epoch seconds to an aware UTC datetime, as TaskRecord has them."""
    return None if t is None else datetime.fromtimestamp(t, timezone.utc)


class AsyncResult(cf.Future):  # type: ignore[type-arg]
    """The result of work submitted to the cluster, available later."""

    def __init__(self, children: Sequence[TaskFuture], single: bool = True,
                 reduce: Callable[[list[Any]], Any] | None = None,
                 waiter: Callable[[cf.Future[Any], float | None], bool] | None = None
                 ) -> None:
        _init_future(self)
        #: ``waiter(self, timeout)`` waits until done (the client's, which receives the
        #: replies in the waiting thread when it can); None: wait on the future alone
        self._waiter = waiter
        self._children = list(children)
        self._single = single and len(self._children) == 1
        self._reduce = reduce
        self._left = len(self._children)
        # the condition's RLock: one object fewer per task for the garbage collector
        self._lock = self._condition
        if not self._children:
            self.set_result([])
        for c in self._children:
            c.add_done_callback(self._child_done)

    # -- composition -----------------------------------------------------------

    def _child_done(self, _: cf.Future) -> None:  # type: ignore[type-arg]
        with self._lock:
            self._left -= 1
            if self._left:
                return
        failed = [c for c in self._children if c.exception() is not None]
        if failed:
            self.set_exception(failed[0].exception())
            return
        values = [c.result() for c in self._children]
        if self._single:
            self.set_result(values[0])
        elif self._reduce is not None:
            self.set_result(self._reduce(values))
        else:
            self.set_result(values)

    # -- the ipyparallel-style API ---------------------------------------------

    @property
    def msg_ids(self) -> list[str]:
        return [c.msg_id for c in self._children]

    @property
    def msg_id(self) -> str:
        if len(self._children) != 1:
            raise AttributeError("this result covers several tasks; use msg_ids")
        return self._children[0].msg_id

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the result and return it; raise the remote error if the task failed.

        Raises monq.TimeoutError if it is not ready within ``timeout`` seconds
        (the work goes on: call get again later).
        """
        try:
            return self.result(timeout)
        except cf.TimeoutError:
            raise errors.TimeoutError(
                f"{len(self._children) - self.finished} of {len(self._children)} task(s) "
                f"not finished after {timeout}s") from None

    def result(self, timeout: float | None = None) -> Any:
        if self._waiter is not None and not self.done():
            if not self._waiter(self, timeout):
                timeout = 0  # not done in time: raise TimeoutError at once
        return super().result(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until ready or ``timeout``; return whether it is ready."""
        if self._waiter is not None:
            return self.done() or self._waiter(self, timeout)
        cf.wait([self], timeout)
        return self.done()

    def ready(self) -> bool:
        return self.done()

    def wait_interactive(self, interval: float = 0.1, timeout: float | None = None,
                         file: IO[str] | None = None, desc: str | None = None) -> bool:
        """Wait, showing a progress bar of finished tasks; return whether all are done.

        The bar is ``tqdm.auto``'s: a widget in Jupyter (with ipywidgets), text
        in a terminal; ``file`` sends the text bar elsewhere (default stderr).
        It is redrawn at least every ``interval`` seconds and closed on return,
        also on Ctrl-C or after ``timeout`` seconds (the work goes on).
        """
        if file is not None:
            from tqdm import tqdm as bar_cls
        else:
            from tqdm.auto import tqdm as bar_cls
        total = len(self._children)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = bar_cls(total=total, desc=desc or f"{total} task{'s' * (total != 1)}",
                      unit="task", file=file, mininterval=interval, leave=True)
        try:
            shown = 0
            while True:
                n = self.finished
                if n != shown:
                    bar.update(n - shown)
                    shown = n
                if n >= total:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                cf.wait([c for c in self._children if not c.done()],
                        timeout=interval if left is None else min(interval, left),
                        return_when=cf.FIRST_COMPLETED)
        finally:
            bar.close()

    def successful(self) -> bool:
        """True when finished without error (False while still running)."""
        return self.done() and not self.cancelled() and self.exception() is None

    @property
    def finished(self) -> int:
        """How many of the tasks have finished."""
        return sum(1 for c in self._children if c.done())

    def __len__(self) -> int:
        return len(self._children)

    @property
    def metadata(self) -> Any:
        """A mapping per task: engine, status, submitted, started, completed, stdout, stderr.

        One mapping for a single task; a list of them otherwise.
        """
        mds = [c.metadata for c in self._children]
        return mds[0] if self._single else mds

    @property
    def stdout(self) -> Any:
        out = [c.metadata["stdout"] for c in self._children]
        return out[0] if self._single else out

    @property
    def stderr(self) -> Any:
        err = [c.metadata["stderr"] for c in self._children]
        return err[0] if self._single else err

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else f"{self.finished}/{len(self._children)} done"
        return f"<{type(self).__name__} {state}>"


class AsyncMapResult(AsyncResult):
    """The result of a ``map``: iterating yields items as their chunk finishes."""

    def __init__(self, children: Sequence[TaskFuture], ordered: bool = True,
                 waiter: Callable[[cf.Future[Any], float | None], bool] | None = None
                 ) -> None:
        self.ordered = ordered
        self._order: list[TaskFuture] = []
        self._order_lock = threading.Lock()
        for c in children:
            c.add_done_callback(self._record_order)
        super().__init__(children, single=False, reduce=self._flatten, waiter=waiter)

    def _record_order(self, f: cf.Future) -> None:  # type: ignore[type-arg]
        with self._order_lock:
            self._order.append(f)  # type: ignore[arg-type]

    def _flatten(self, values: list[Any]) -> list[Any]:
        if self.ordered:
            chunks = values
        else:
            with self._order_lock:
                chunks = [f.result() for f in self._order]
        return [x for chunk in chunks for x in chunk]

    def __iter__(self) -> Iterator[Any]:
        if self.ordered:
            for c in self._children:
                yield from c.result()
        else:
            for done in cf.as_completed(self._children):
                yield from done.result()
