"""Futures that make their Condition only when a thread waits on them.

A burst of ``apply_async`` holds two futures per task (the task's and its
AsyncResult, see monq.client.results) until the replies come, and the I/O
thread resolves them while the caller goes on submitting.  A stock
``concurrent.futures.Future`` is a Condition, an RLock, a deque and two
lists to make, to lock several times per task and for the cyclic garbage
collector to walk again and again; in a 10,000-task burst that was a good
part of the client's CPU per task (bench/PROFILE.md, update 9a).
:class:`LeanFuture` is one object until a thread waits on it.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
from collections.abc import Callable
from typing import Any


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

    # A fresh future's fields are these class attributes: made per task, a future sets
    # none of them until it changes (a burst makes two futures per task)
    _cond: threading.Condition | None = None
    _parent: Any = None
    _state: str = cf._base.PENDING
    _result: Any = None
    _exception: BaseException | None = None
    _waiters: Any = _NONE
    _done_callbacks: Any = _NONE

    def __init__(self) -> None:  # noqa: D107
        if not _LEAN:
            cf.Future.__init__(self)

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

    def _watched_by(self, parent: Any) -> None:
        """``add_done_callback(parent._child_done)`` (``parent``: an AsyncResult), without
        a bound method and a list per task when ``parent`` is the first to watch (the
        usual case)."""
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
