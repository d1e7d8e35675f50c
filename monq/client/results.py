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
from typing import IO, TYPE_CHECKING, Any

from monq import errors

if TYPE_CHECKING:
    from monq.client.io import QueuedTask

class _Condition(threading.Condition):
    """A ``threading.Condition`` that does not keep five bound methods of its lock.

    Made only for a future a thread waits on (see :class:`LeanFuture`); the
    stock one is eight objects the cyclic garbage collector tracks (the bound
    methods ``acquire``, ``release``, ``_release_save``, ``_acquire_restore``
    and ``_is_owned``), this one three.  Same behaviour: the methods delegate
    to the RLock.
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


#: what cf.Future.__init__ sets (checked once: another Python may set more, and then
#: futures are made the stock way, with their Condition at once)
_FUTURE_FIELDS = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
_LEAN = set(vars(cf.Future())) == _FUTURE_FIELDS and hasattr(threading.RLock(), "_is_owned")

_RUNNING, _FINISHED = cf._base.RUNNING, cf._base.FINISHED
_CANCELLED = (cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED)
_DONE = frozenset((_FINISHED, *_CANCELLED))

#: makes every LeanFuture's Condition, and guards the state of those that have none
_MAKE = threading.Lock()
#: a callback list or waiter list not made yet (shared: never appended to)
_NONE: tuple[Any, ...] = ()


class LeanFuture(cf.Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` whose Condition is made only when a thread waits.

    A burst of ``apply_async`` holds two futures per task until their
    replies come, and resolves them in the I/O thread while the caller goes
    on submitting; with the stock Future each is a Condition, an RLock, a
    deque and two lists to make, to lock three to five times per task and
    for the cyclic garbage collector to walk again and again.  Here a
    future is one object until someone waits on it (``result`` or
    ``exception`` before it is done, ``concurrent.futures.wait``,
    ``as_completed``, ``cancel``): only then is its Condition made.

    The rule that keeps it correct: a Condition is only ever made under the
    module's ``_MAKE`` lock, and a future's state and callbacks change under
    its Condition once it has one, else under ``_MAKE``.  A done future's
    state never changes again, so reading a finished future needs no lock.
    """

    _cond: threading.Condition | None

    def __init__(self) -> None:  # noqa: D107
        self._parent = None
        if not _LEAN:
            cf.Future.__init__(self)
            return
        self._cond = None
        self._state = cf._base.PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._waiters: Any = _NONE
        self._done_callbacks: Any = _NONE

    @property
    def _condition(self) -> threading.Condition:
        """The future's Condition, made on first use (what the stock Future code,
        ``wait`` and ``as_completed`` lock and wait on)."""
        c = self._cond
        if c is None:
            with _MAKE:
                c = self._cond
                if c is None:
                    self._waiters = []
                    c = self._cond = _Condition()
        return c

    @_condition.setter
    def _condition(self, c: threading.Condition) -> None:
        self._cond = c  # cf.Future.__init__, where futures are not lean

    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == _RUNNING

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED:  # final: no lock needed to read it
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    self = None  # type: ignore[assignment]  # no cycle through the traceback
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED:
            return self._exception
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        if not self._keep(fn, False):
            try:
                fn(self)
            except Exception:
                cf._base.LOGGER.exception("exception calling callback for %r", self)

    def _watched_by(self, parent: AsyncResult) -> None:
        """``add_done_callback(parent._child_done)``, without a bound method and a list
        per task when ``parent`` is the first to watch (the usual case)."""
        if not self._keep(parent, True):
            try:
                parent._child_done(self)
            except Exception:
                cf._base.LOGGER.exception("exception calling callback for %r", self)

    def _keep(self, x: Any, parent: bool) -> bool:
        """Keep a callback (or a parent) to call when done; False if done already."""
        c = self._cond
        if c is None:
            with _MAKE:
                if self._cond is None:
                    if self._state in _DONE:
                        return False
                    self._store(x, parent)
                    return True
                c = self._cond
        with c:
            if self._state in _DONE:
                return False
            self._store(x, parent)
            return True

    def _store(self, x: Any, parent: bool) -> None:
        if parent and self._parent is None and self._done_callbacks is _NONE:
            self._parent = x  # called first, as it was added first
            return
        fn = x._child_done if parent else x
        if self._done_callbacks is _NONE:
            self._done_callbacks = [fn]
        else:
            self._done_callbacks.append(fn)

    def _invoke_callbacks(self) -> None:
        p = self._parent
        if p is not None:
            try:
                p._child_done(self)
            except Exception:
                cf._base.LOGGER.exception("exception calling callback for %r", self)
        if self._done_callbacks is not _NONE:
            super()._invoke_callbacks()  # type: ignore[misc]

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        c = self._cond
        if c is None:
            with _MAKE:
                c = self._cond
                if c is None:
                    # nobody can wait without the Condition: nobody to wake
                    if self._state in _DONE:
                        raise cf.InvalidStateError(f"{self._state}: {self!r}")
                    self._result = result
                    self._exception = exception
                    self._state = _FINISHED
            if c is None:
                self._invoke_callbacks()
                return
        with c:
            self._set_state(result, exception)
            for waiter in self._waiters:
                if exception is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            c.notify_all()
        self._invoke_callbacks()

    def _set_state(self, result: Any, exception: BaseException | None) -> None:
        if self._state in _DONE:
            raise cf.InvalidStateError(f"{self._state}: {self!r}")
        self._result = result
        self._exception = exception
        self._state = _FINISHED

    def __repr__(self) -> str:
        state = self._state
        if state == _FINISHED:
            what = (f"raised {type(self._exception).__name__}" if self._exception is not None
                    else f"returned {type(self._result).__name__}")
            return f"<{type(self).__name__} at {id(self):#x} state=finished {what}>"
        return f"<{type(self).__name__} at {id(self):#x} state={state.lower()}>"


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

    def __init__(self, msg_id: str, submitted: float, queue: str,
                 engine: int | None = None) -> None:
        LeanFuture.__init__(self)
        self.msg_id = msg_id
        self.queue = queue
        #: load-balanced tasks keep what they were sent with, to be sent again: after
        #: their engine died before reading them, or for a retry
        self.request: QueuedTask | None = None
        self.retries_left = 0
        self._submitted = submitted
        self._engine = engine
        self._md: dict[str, Any] | None = None
        #: the reply's metadata and status, until ``metadata`` is made
        self._reply: dict[str, Any] | None = None
        self._status = "pending"

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
