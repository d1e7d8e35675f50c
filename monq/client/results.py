"""Futures for submitted work: AsyncResult and AsyncMapResult.

An :class:`AsyncResult` is a :class:`concurrent.futures.Future` (so it works
with ``concurrent.futures.wait``, ``as_completed`` and callbacks) and is
awaitable in asyncio.  It stands for one task or several: one ``apply`` on a
load-balanced view or a single engine gives one value; an ``apply`` on several
engines gives a list, in target order; a ``map`` gives the flattened list.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

from monq import errors
from monq.client.futures import _DONE, _FINISHED, _LEAN, _MAKE, _NONE, LeanFuture

if TYPE_CHECKING:
    from monq.client.io import QueuedTask

#: the metadata a task's reply sets (copied as they are, and as datetimes)
_REPLY_FIELDS = ("engine", "engine_uuid", "stdout", "stderr")
_REPLY_TIMES = ("started", "completed", "received")


class TaskFuture(LeanFuture):
    """The future of one task (one msg_id); ``metadata`` is filled by the reply.

    ``metadata`` is made when first read: in a burst most tasks' is never
    read, and making it (a dict and four datetimes per task) was a good part
    of the client's CPU per task.  The reply's metadata is kept as it came
    until then.
    """

    #: load-balanced tasks keep what they were sent with, to be sent again: after
    #: their engine died before reading them, or for a retry
    request: QueuedTask | None = None
    retries_left = 0
    _md: dict[str, Any] | None = None
    #: the reply's metadata and status, until ``metadata`` is made
    _reply: dict[str, Any] | None = None
    _status = "pending"

    def __init__(self, msg_id: str, submitted: float, queue: str,
                 engine: int | None = None) -> None:
        if not _LEAN:
            LeanFuture.__init__(self)
        # the other fields start as the class's (see LeanFuture)
        self.msg_id = msg_id
        self.queue = queue
        self._submitted = submitted
        self._engine = engine

    @property
    def metadata(self) -> dict[str, Any]:
        """engine, status, submitted, started, completed, received, stdout, stderr, ..."""
        md = self._md
        if md is None:
            with _MAKE:  # against a reply recorded meanwhile (see replied)
                md = self._md
                if md is None:
                    md = {"msg_id": self.msg_id, "engine": self._engine, "status": "pending",
                          "queue": self.queue, "submitted": _dt(self._submitted),
                          "started": None, "completed": None, "received": None,
                          "stdout": "", "stderr": ""}
                    if self._reply is not None:
                        _set_reply(md, self._reply, self._status)
                        self._reply = None
                    self._md = md
        return md

    def replied(self, md: dict[str, Any], status: str) -> None:
        """Record a reply's metadata and status (in the metadata, or kept until it is made)."""
        with _MAKE:
            if self._md is None:
                self._reply = md
                self._status = status
                return
        _set_reply(self._md, md, status)

    def settle(self, result: Any, md: dict[str, Any], status: str = "ok") -> None:
        """``replied(md, status)`` then ``set_result(result)``, settling in the same step
        the single-task AsyncResult that watches this future.

        A burst's usual reply: nobody has read the metadata, nobody waits on
        either future and neither has a callback or a watcher, so the reply is recorded and
        both futures are settled under one lock, without the chain of calls
        (set_result, callbacks, the AsyncResult's set_result, its callbacks)
        the general way takes; any other case goes that way.
        """
        p = self._parent
        fast = False
        with _MAKE:  # no Condition can be made meanwhile (see LeanFuture)
            if self._md is None:
                self._reply = md
                self._status = status
                md = None  # type: ignore[assignment]
                fast = (p is not None and type(p)._child_done is _ONE_CHILD_DONE and
                        p._single and self._cond is None and p._cond is None and
                        self._state not in _DONE and p._state not in _DONE and
                        self._done_callbacks is _NONE and p._done_callbacks is _NONE and
                        p._parent is None)  # (an AsyncResult of AsyncResults watches p)
                if fast:
                    self._result = p._result = result
                    self._state = p._state = _FINISHED
        if fast:
            self._parent = None  # as after its callbacks ran (see _invoke_callbacks)
            return
        if md is not None:
            _set_reply(self._md, md, status)  # type: ignore[arg-type]
        self.set_result(result)

    def _invoke_callbacks(self) -> None:
        super()._invoke_callbacks()
        # they ran once and never run again: dropping them breaks the cycle with the
        # AsyncResult that waits on this future, so a large result (or the shared memory
        # it views, see monq.shm) is freed as soon as the caller drops it, not at the next GC
        self._parent = None
        self._done_callbacks = _NONE


def _set_reply(dst: dict[str, Any], md: dict[str, Any], status: str) -> None:
    for k in _REPLY_FIELDS:
        dst[k] = md.get(k)
    for k in _REPLY_TIMES:
        dst[k] = _dt(md.get(k))
    dst["status"] = status


def _dt(t: float | None) -> datetime | None:
    """Epoch seconds to an aware UTC datetime, as TaskRecord has them."""
    return None if t is None else datetime.fromtimestamp(t, timezone.utc)


class AsyncResult(LeanFuture):
    """The result of work submitted to the cluster, available later."""

    # what :meth:`_of` leaves as the class's (one task)
    _waiter: Callable[[cf.Future[Any], float | None], bool] | None = None
    _child: TaskFuture | None = None
    _many: list[TaskFuture] | None = None
    _single = True
    _reduce: Callable[[list[Any]], Any] | None = None
    _left = 1
    _lock: threading.Lock | None = None

    @classmethod
    def _of(cls, fut: TaskFuture,
            waiter: Callable[[cf.Future[Any], float | None], bool] | None) -> AsyncResult:
        """``AsyncResult([fut], waiter=waiter)`` for a future nobody else knows yet (a
        task being submitted, not yet registered for its reply): nothing to check,
        nothing to lock, a field or two to set."""
        if not _LEAN or fut._parent is not None or fut._done_callbacks is not _NONE:
            return cls([fut], waiter=waiter)
        self = cls.__new__(cls)
        if waiter is not None:
            self._waiter = waiter
        self._child = fut
        fut._parent = self
        return self

    def __init__(self, children: Sequence[TaskFuture], single: bool = True,
                 reduce: Callable[[list[Any]], Any] | None = None,
                 waiter: Callable[[cf.Future[Any], float | None], bool] | None = None
                 ) -> None:
        LeanFuture.__init__(self)
        #: ``waiter(self, timeout)`` waits until done (the client's, which receives the
        #: replies in the waiting thread when it can); None: wait on the future alone
        self._waiter = waiter
        kids = list(children)
        one = len(kids) == 1
        #: the one task's future, kept without a list (one object fewer per task in a
        #: burst for the garbage collector); else None and ``_many`` has them all
        self._child: TaskFuture | None = kids[0] if one else None
        self._many: list[TaskFuture] | None = None if one else kids
        self._single = single and one
        self._reduce = reduce
        self._left = len(kids)
        #: counts the children left (one child needs no count)
        self._lock = threading.Lock() if self._left > 1 else None
        if not kids:
            self.set_result([])
        for c in kids:
            c._watched_by(self)

    @property
    def _children(self) -> list[TaskFuture]:
        """The tasks' futures, in order."""
        c = self._child
        return [c] if c is not None else self._many  # type: ignore[return-value]

    # -- composition -----------------------------------------------------------

    def _child_done(self, _: cf.Future) -> None:  # type: ignore[type-arg]
        if self._lock is not None:
            with self._lock:
                self._left -= 1
                if self._left:
                    return
        if self._single:
            c = self._child
            assert c is not None
            if c._state != _FINISHED:
                c.exception()  # cancelled: raises CancelledError (as the stock Future's)
            if c._exception is not None:
                self.set_exception(c._exception)
            else:
                self.set_result(c._result)
            return
        failed = [c for c in self._children if c.exception() is not None]
        if failed:
            self.set_exception(failed[0].exception())
            return
        values = [c.result() for c in self._children]
        if self._reduce is not None:
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
        if self._state == _FINISHED and self._exception is None:
            return self._result  # done (a burst's results, read after it): final, no lock
        try:
            return self.result(timeout)
        except cf.TimeoutError:
            raise errors.TimeoutError(
                f"{len(self._children) - self.finished} of {len(self._children)} task(s) "
                f"not finished after {timeout}s") from None

    def result(self, timeout: float | None = None) -> Any:
        if self._state not in _DONE and self._waiter is not None:
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


_ONE_CHILD_DONE = AsyncResult._child_done
