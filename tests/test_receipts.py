"""An engine's receipts in a burst: the Hub parks them instead of draining everything.

A receipt (``tasks_received``, ``task_started``) names requests whose monitor
copies were sent before it.  The Hub used to drain the whole monitor backlog
before applying one, which in a 100,000-task burst kept its loop from beating
for seconds.  Now it handles at most ``RECEIPT_DRAIN`` copies and parks the
receipt until the backlog is gone, or until a decision needs it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from monq.hub import hub as hub_mod
from monq.hub.hub import MONITOR_URL, Hub, HubConfig
from monq.hub.store import TaskStore
from monq.protocol import Session

KEY = b"r" * 32
UUID = "engine-uuid-0"


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[tuple[Hub, zmq.Socket, Session]]:
    monkeypatch.setattr(hub_mod, "RECEIPT_DRAIN", 100)
    monkeypatch.setattr(hub_mod, "TURN", 60.0)  # counts, not time, bound these tests' turns
    ctx = zmq.Context()
    hub = Hub(ctx, Session(KEY), TaskStore(f"sqlite:///{tmp_path / 'h.db'}"),
              HubConfig(ip="127.0.0.1"))
    pub = None
    try:
        hub.bind()
        pub = ctx.socket(zmq.XPUB)
        pub.linger = 0
        pub.sndhwm = 0
        pub.connect(MONITOR_URL)
        # a bound inproc socket takes in a peer only when its own thread touches it
        deadline = time.monotonic() + 5
        while not pub.poll(5):
            hub.monitor.getsockopt(zmq.EVENTS)
            assert time.monotonic() < deadline, "the Hub's subscription never came"
        pub.recv()
        client = Session(KEY)
        engine = Session(KEY)
        _, frames = engine.serialize("registration_request", "hub",
                                     {"uuid": UUID, "hostname": "h", "pid": 1})
        hub._register(hub.session.feed([UUID.encode(), *frames]))
        yield hub, pub, client
    finally:
        if pub is not None:
            pub.close()
        hub.close()
        ctx.term()


def _requests(pub: zmq.Socket, client: Session, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        hdr, frames = client.serialize("apply_request", "task", content={},
                                       metadata={"func": "noop"}, buffers=[b"f"])
        pub.send_multipart([b"in.task", b"client-ident", *frames])
        ids.append(hdr["msg_id"])
    return ids


def _receipt(hub: Hub, ids: list[str]) -> list[Any]:
    _, frames = Session(KEY).serialize("tasks_received", "link", {
        "msg_ids": ids, "engine": 0, "engine_uuid": UUID})
    return [UUID.encode(), *frames]


@pytest.mark.timeout(30)
def test_a_receipt_in_a_burst_is_parked_and_applied_once_the_backlog_is_gone(
        setup: tuple[Hub, zmq.Socket, Session]) -> None:
    hub, pub, client = setup
    ids = _requests(pub, client, 1000)
    hub._on_router(_receipt(hub, ids[:10]))
    # only a bounded part of the backlog was handled, and the receipt waits
    assert hub.received["in.task apply_request"] == 100
    assert len(hub._parked) == 1
    assert all(hub._inflight[m].holder is None for m in ids[:10])
    # a second receipt meanwhile is parked behind it without handling more copies
    hub._on_router(_receipt(hub, ids[10:12]))
    assert hub.received["in.task apply_request"] == 100 and len(hub._parked) == 2
    turns = 0
    while hub._parked:
        hub._drain_monitor()
        turns += 1
        assert turns < 100
    assert hub.received["in.task apply_request"] == 1000
    assert all(hub._inflight[m].holder == UUID for m in ids[:12])
    assert all(hub._inflight[m].holder is None for m in ids[12:])


@pytest.mark.timeout(30)
def test_a_turn_on_the_monitor_is_bounded_in_time(
        setup: tuple[Hub, zmq.Socket, Session], monkeypatch: pytest.MonkeyPatch) -> None:
    hub, pub, client = setup
    _requests(pub, client, 3000)
    monkeypatch.setattr(hub_mod, "TURN", 0.0)
    hub._drain_monitor()
    # the budget is looked at after each step of a few copies: an exhausted one ends the
    # turn after the first step
    assert hub.received["in.task apply_request"] == hub.MONITOR_STEP


@pytest.mark.timeout(30)
def test_with_no_backlog_a_receipt_applies_at_once(
        setup: tuple[Hub, zmq.Socket, Session]) -> None:
    hub, pub, client = setup
    ids = _requests(pub, client, 50)
    hub._on_router(_receipt(hub, ids))
    assert not hub._parked
    assert all(hub._inflight[m].holder == UUID for m in ids)


@pytest.mark.timeout(30)
def test_a_query_or_an_engines_end_applies_parked_receipts_first(
        setup: tuple[Hub, zmq.Socket, Session]) -> None:
    hub, pub, client = setup
    ids = _requests(pub, client, 1000)
    hub._on_router(_receipt(hub, ids[:5]))
    assert hub._parked
    # a query sees everything the relays copied and every receipt
    _, frames = client.serialize("queue_request", "hub", {})
    hub._on_router([b"client-ident", *frames])
    assert not hub._parked and hub.received["in.task apply_request"] == 1000
    assert all(hub._inflight[m].holder == UUID for m in ids[:5])

    more = _requests(pub, client, 1000)
    hub._on_router(_receipt(hub, more[:3]))
    assert hub._parked
    # the engine dies: what it had read is lost with it (not left to the orphan search)
    hub._engine_gone(UUID, "missed heartbeats")
    assert not hub._parked
    for m in ids[:5] + more[:3]:
        assert hub._inflight[m].status == "lost", m
    assert hub._inflight[more[3]].status == "pending"


@pytest.mark.timeout(60)
def test_a_query_after_a_burst_writes_rows_as_it_catches_up(
        setup: tuple[Hub, zmq.Socket, Session], monkeypatch: pytest.MonkeyPatch) -> None:
    """A query drains the whole backlog before answering, but never piles it up unwritten."""
    hub, pub, client = setup
    monkeypatch.setattr(hub, "config", dataclasses.replace(hub.config, flush_rows=200,
                                                           hold_rows=300))
    ids = _requests(pub, client, 3000)
    most = 0
    on_monitor = hub._on_monitor

    def watched(frames: list[Any]) -> None:
        nonlocal most
        on_monitor(frames)
        most = max(most, len(hub._dirty) + len(hub._held))

    monkeypatch.setattr(hub, "_on_monitor", watched)
    _, frames = client.serialize("queue_request", "hub", {})
    hub._on_router([b"client-ident", *frames])
    assert hub.received["in.task apply_request"] == 3000
    # (a queue query only counts tasks: pending rows held for their replies stay held)
    assert hub.store.count() + len(hub._held) == 3000 and not hub._dirty
    assert len(hub._held) <= 300
    # at most the rows of one flush, and the pending rows flushes hold back (hold_rows)
    assert most <= 200 + hub.MONITOR_STEP + 300, most
    assert all(m in hub._inflight for m in ids)
