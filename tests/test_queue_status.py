"""The Hub's queue status (``queue_status``, ``cluster_status``'s ``queue``): what it
counts, and that polling it during a burst costs the Hub a bounded share of its time.

Counting tests: the walks over the tasks in flight are counted, not timed.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import zmq

from monq.hub import hub as hub_module
from monq.hub.hub import Hub, HubConfig, _Engine, _InFlight
from monq.hub.store import TaskStore
from monq.protocol import Session

KEY = b"q" * 32


@pytest.fixture
def hub(tmp_path: Path) -> Any:
    h = Hub(zmq.Context.instance(), Session(KEY), TaskStore(f"sqlite:///{tmp_path / 'h.db'}"),
            HubConfig())
    for i, status in enumerate(("alive", "alive", "dead")):
        h._engines[f"e{i}"] = _Engine(i, f"e{i}", "host", 100 + i, 0.0, status)
    try:
        yield h
    finally:
        h.close()


def _add(hub: Hub, n: int, status: str, engine: int | None, prefix: str) -> None:
    for i in range(n):
        hub._inflight[f"{prefix}{i}"] = _InFlight("task", status, engine, "c")


def test_tasks_in_flight_are_counted_by_engine_and_state(hub: Hub) -> None:
    _add(hub, 3, "pending", 0, "a")    # addressed to / read by engine 0, waiting
    _add(hub, 2, "running", 0, "b")
    _add(hub, 4, "running", 1, "c")
    _add(hub, 5, "pending", None, "d")  # in the task queue, no engine yet
    _add(hub, 6, "running", 2, "e")    # its engine is dead: nobody's now
    _add(hub, 7, "ok", 1, "f")         # finished, its row not written yet: not counted
    q = hub._queue_status()
    assert {k: v for k, v in q.items() if k != "unassigned"} == {
        "0": {"queue": 3, "tasks": 2, "completed": 0},
        "1": {"queue": 0, "tasks": 4, "completed": 0}}
    assert q["unassigned"] == 5 + 6


def test_a_costly_walk_is_reused_for_ten_times_its_cost(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Polled every 5 ms for a second by a walk that costs 10 ms (50,000 tasks in flight):
    ~10 walks, not 200; a cheap walk is never reused."""
    clock = [100.0]
    walk_cost = [0.010]
    walks = []
    real_values = dict.values

    class Inflight(dict):  # type: ignore[type-arg]
        def values(self) -> Any:
            walks.append(clock[0])
            clock[0] += walk_cost[0]  # the walk takes this long on the Hub's clock
            return real_values(self)

    hub._inflight = Inflight(hub._inflight)
    monkeypatch.setattr(hub_module, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], time=__import__("time").time))
    _add(hub, 2, "running", 0, "r")
    for _ in range(200):
        hub._queue_status()
        clock[0] += 0.005
    assert 8 <= len(walks) <= 12, len(walks)
    # the answer follows the tasks once the reuse is over
    _add(hub, 3, "pending", 1, "p")
    clock[0] += 1.0
    assert hub._queue_status()["1"]["queue"] == 3
    walk_cost[0] = 1e-6  # a few hundred tasks
    clock[0] += 1.0
    walks.clear()
    for _ in range(50):
        hub._queue_status()
        clock[0] += 0.001
    assert len(walks) == 50
