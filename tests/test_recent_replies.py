"""An engine's recent replies, told to a restarted controller: what the engine keeps and
sends, and what the new Hub records of them (only what it does not hold finished).

The end-to-end case (a controller SIGKILLed mid-run, every task still in the history)
is tests/test_reliability.py::test_controller_killed_and_restarted_loses_nothing.
"""

from __future__ import annotations

import collections
import types
from pathlib import Path
from typing import Any

import pytest
import zmq

from monq.engine.engine import RECENT_RESULT_BYTES, RECENT_SECONDS, Engine, recent_batches
from monq.hub import blobs
from monq.hub.hub import Hub, HubConfig, _Engine, _InFlight
from monq.hub.store import TaskStore
from monq.protocol import MAX_BATCH_TASKS, RECENT_REPLIES, Session

KEY = b"r" * 32


class _NoCopies:
    """A monitor socket with nothing waiting."""

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[Any]:
        raise zmq.Again()

    def get(self, option: int) -> int:
        return 0


def _reply(msg_id: str, channel: str = "task", result: bytes = b"R", sent: float = 100.0
           ) -> tuple[Any, ...]:
    request = (msg_id, "client-1", 1_800_000_000.0)
    metadata = {"engine": 0, "engine_uuid": "e0", "started": 1_800_000_000.5,
                "completed": 1_800_000_000.6, "stdout": "", "stderr": ""}
    return (sent, channel, request, {"status": "ok"}, metadata, [result], [False])


def test_an_engine_keeps_small_results_and_drops_large_ones() -> None:
    fake = types.SimpleNamespace(recent=collections.deque(maxlen=3))
    item = types.SimpleNamespace(channel="task", msg=types.SimpleNamespace(
        header={"msg_id": "a", "session": "s", "date": 1.0, "buffers": []}))
    small, large = b"s" * RECENT_RESULT_BYTES, b"l" * (RECENT_RESULT_BYTES + 1)
    for result in (small, large, small, small):
        Engine._remember(fake, item, {"status": "ok"}, {}, [result], [False])  # type: ignore[arg-type]
    assert len(fake.recent) == 3  # the oldest went
    assert [r[5] for r in fake.recent] == [[], [small], [small]]
    assert fake.recent[0][2] == ("a", "s", 1.0)  # the request's header itself is not kept


def test_recent_batches_cover_the_last_seconds_by_channel_in_batches() -> None:
    recent = collections.deque([_reply("old", sent=100.0 - RECENT_SECONDS - 1)] +
                               [_reply(f"t{i}", sent=100.0) for i in range(MAX_BATCH_TASKS + 1)]
                               + [_reply("d0", channel="direct", result=b"D", sent=99.0)])
    out = recent_batches(recent, "e0", now=100.0)
    assert [(c["queue"], len(c["tasks"])) for c, _, _ in out] == [
        ("task", MAX_BATCH_TASKS), ("task", 1), ("direct", 1)]
    content, buffers, raw = out[2]
    assert content["engine_uuid"] == "e0" and buffers == [b"D"] and raw == [False]
    assert content["tasks"][0]["parent"]["msg_id"] == "d0"
    assert "old" not in {t["parent"]["msg_id"] for c, _, _ in out for t in c["tasks"]}


@pytest.fixture
def hub(tmp_path: Path) -> Any:
    store = TaskStore(f"sqlite:///{tmp_path / 'h.db'}")
    h = Hub(zmq.Context.instance(), Session(KEY), store, HubConfig())
    h.monitor = _NoCopies()  # type: ignore[assignment]
    h._engines["e0"] = _Engine(0, "e0", "host", 100, 0.0)
    try:
        yield h
    finally:
        h.close()


def _frames(content: dict[str, Any], buffers: list[Any], raw: list[bool]) -> list[Any]:
    _, frames = Session(KEY).serialize(RECENT_REPLIES, "link", content, buffers=buffers,
                                       raw=raw)
    return [b"e0", *(bytes(f) for f in frames)]


def test_the_new_hub_records_only_what_it_does_not_hold_finished(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"client": "client-1", "queue": "task", "submitted": 1_800_000_000.0}
    hub.store.write([{**base, "msg_id": "done", "status": "ok", "completed": 1.8e9},
                     {**base, "msg_id": "pending", "status": "pending"}], [])
    # what a restarted Hub holds of an unfinished row of the history (see _recover)
    hub._inflight["pending"] = _InFlight("task", "pending", 0, "client-1", inserted=True)
    writes: list[tuple[list[str], list[str]]] = []
    write = hub.store.write

    def counted(inserts: Any, updates: Any) -> None:
        writes.append(([r["msg_id"] for r in inserts], [r["msg_id"] for r in updates]))
        write(inserts, updates)

    monkeypatch.setattr(hub.store, "write", counted)
    recent = collections.deque([_reply("done"), _reply("pending"), _reply("unknown")])
    [(content, buffers, raw)] = recent_batches(recent, "e0", now=100.0)
    hub._on_router(_frames(content, buffers, raw))
    hub.flush()
    assert writes == [(["unknown"], ["pending"])], writes  # "done" not written again
    assert hub.received["recovered replies"] == 2
    unknown = hub.store.get_task("unknown", with_payload=True)
    assert unknown is not None and unknown["status"] == "ok" and unknown["engine"] == 0
    assert unknown["client"] == "client-1" and unknown["result"] is not None
    assert hub.store.get_task("pending")["status"] == "ok"  # type: ignore[index]


def test_each_recovered_reply_keeps_its_own_raw_flags(hub: Hub) -> None:
    """A batch's replies may share its header (no raw buffer in it); with a raw one they
    must not: each recorded result keeps the flags its own reply had."""
    plain, rawr = _reply("plain", result=b"P"), _reply("rawr", result=b"Q")
    rawr = (*rawr[:6], [True])
    [(content, buffers, raw)] = recent_batches(collections.deque([plain, rawr]), "e0",
                                               now=100.0)
    assert raw == [False, True]
    hub._on_router(_frames(content, buffers, raw))
    hub.flush()
    for msg_id, data, flag in (("plain", b"P", False), ("rawr", b"Q", True)):
        row = hub.store.get_task(msg_id, with_payload=True)
        assert row is not None and row["status"] == "ok"
        frames, flags = blobs.unpack(row["result"])
        assert [bytes(f) for f in frames] == [data] and flags == [flag], (msg_id, flags)


def test_recent_replies_of_an_unknown_engine_are_refused(hub: Hub) -> None:
    recent = collections.deque([_reply("x")])
    [(content, buffers, raw)] = recent_batches(recent, "nobody", now=100.0)
    hub._on_router(_frames(content, buffers, raw))
    hub.flush()
    assert hub.store.get_task("x") is None
    assert hub.rejected["recent replies of an unknown engine"] == 1



def test_malformed_recent_replies_are_counted_and_change_nothing(hub: Hub) -> None:
    """A batch whose entries do not fit (here: a reply without a parent msg_id) is
    refused whole, counted, and the Hub goes on."""
    recent = collections.deque([_reply("good")])
    [(content, buffers, raw)] = recent_batches(recent, "e0", now=100.0)
    content["tasks"].append({"parent": {}, "metadata": {}, "content": {"status": "ok"},
                             "b": []})
    hub._on_router(_frames(content, buffers, raw))
    hub.flush()
    assert hub.store.get_task("good") is None
    assert hub.session.rejected["malformed"] == 1
    # and the next one, well formed, is recorded
    [(content, buffers, raw)] = recent_batches(recent, "e0", now=100.0)
    hub._on_router(_frames(content, buffers, raw))
    hub.flush()
    assert hub.store.get_task("good")["status"] == "ok"  # type: ignore[index]
