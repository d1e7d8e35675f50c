"""A one-shot timer that a poll can wait on: Linux's timerfd, through ctypes.

Why: the engine's link thread must wake ``delay`` after a task started, but
only if the task is still running then (to tell the Hub about a long task).
Most tasks end far sooner.  Waking the thread at each start (a pipe write)
and letting it wait out the delay costs two thread wake-ups per task, which
fight the task's own thread for the GIL and the CPU; polling every ``delay``
costs wake-ups whether or not anything runs.  With a timerfd the main thread
arms the timer when a task starts (one system call, ~1 us, no other thread
woken): a short task wakes nobody.  The engine does not disarm it when a
task ends: the next task's start moves it on, so a stream of short tasks
wakes the link once, ``delay`` after the last one started, and finds nothing
to do.

:func:`make_timer` returns None where timerfd is not available (not Linux,
no libc through ctypes); the engine then wakes its link thread as before.
Python 3.13 has ``os.timerfd_create``; this module is for 3.10-3.12 too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class OneShotTimer:
    """A file descriptor that polls readable once the armed time has passed.

    ``arm(seconds)`` (re)starts it, ``disarm()`` stops it, ``clear()`` reads
    its expiry count so that it stops polling readable.  Not thread-safe in
    itself; arming from one thread while another polls is what it is for
    (the kernel serializes the calls).
    """

    def __init__(self, libc: Any) -> None:
        self._settime = libc.timerfd_settime
        self._gettime = libc.timerfd_gettime
        fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._fd = fd
        #: the time specs armed so far, by seconds (an engine arms one or two delays)
        self._specs: dict[float, Any] = {}
        self._zero = ctypes.byref(_Itimerspec())
        #: how many times it was armed (tests count them)
        self.armed = 0

    def fileno(self) -> int:
        return self._fd

    def arm(self, seconds: float) -> None:
        """Fire ``seconds`` from now (replacing any earlier time)."""
        ref = self._specs.get(seconds)
        if ref is None:
            spec = _Itimerspec()
            ns = max(1000, int(seconds * 1e9))  # an all-zero it_value would disarm it
            spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
            ref = self._specs[seconds] = ctypes.byref(spec)
        self.armed += 1
        if self._settime(self._fd, 0, ref, None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def pending(self) -> bool:
        """Whether it is armed and has not fired yet."""
        cur = _Itimerspec()
        if self._gettime(self._fd, ctypes.byref(cur)) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_gettime failed")
        return bool(cur.it_value.tv_sec or cur.it_value.tv_nsec)

    def disarm(self) -> None:
        self._settime(self._fd, 0, self._zero, None)

    def clear(self) -> None:
        """Forget an expiry (the fd polls readable until this is called)."""
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def make_timer() -> OneShotTimer | None:
    """A timerfd-backed one-shot timer, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_create.restype = ctypes.c_int
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int,
                                         ctypes.POINTER(_Itimerspec),
                                         ctypes.POINTER(_Itimerspec)]
        libc.timerfd_settime.restype = ctypes.c_int
        libc.timerfd_gettime.argtypes = [ctypes.c_int, ctypes.POINTER(_Itimerspec)]
        libc.timerfd_gettime.restype = ctypes.c_int
        return OneShotTimer(libc)
    except (OSError, AttributeError):
        return None
