"""The engine link thread's one-shot timer (monq.engine.timer): fires once armed, not
once disarmed, and stops polling readable once cleared."""

from __future__ import annotations

import select
import sys

import pytest

from monq.engine.timer import OneShotTimer, make_timer


@pytest.fixture
def timer() -> OneShotTimer:
    t = make_timer()
    if t is None:
        pytest.skip("no timerfd on this platform")
    yield t
    t.close()


def _readable(t: OneShotTimer, ms: int) -> bool:
    p = select.poll()
    p.register(t.fileno(), select.POLLIN)
    return bool(p.poll(ms))


def test_an_armed_timer_fires_once_and_clears(timer: OneShotTimer) -> None:
    assert not _readable(timer, 0) and not timer.pending()
    timer.arm(1e-6)
    assert _readable(timer, 5000)
    assert not timer.pending()  # fired
    assert _readable(timer, 0)  # stays readable until read
    timer.clear()
    assert not _readable(timer, 0)
    timer.clear()  # nothing to read: no error
    assert timer.armed == 1


def test_a_disarmed_timer_does_not_fire(timer: OneShotTimer) -> None:
    timer.arm(30.0)
    assert timer.pending()
    timer.disarm()
    assert not timer.pending()
    timer.arm(1e-6)  # re-arming replaces the earlier time
    assert _readable(timer, 5000)
    timer.clear()
    timer.arm(30.0)
    timer.disarm()
    assert not _readable(timer, 0)
    assert timer.armed == 3


def test_make_timer_is_none_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert make_timer() is None
