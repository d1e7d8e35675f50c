"""How often the Hub writes its rows, and what one write costs in statements.

Counting tests (writes, statements, rows), never timings: the CPU figures are
in bench/PROFILE.md.
"""

from __future__ import annotations

import dataclasses
import time
import types
from pathlib import Path
from typing import Any

import pytest
import zmq

from monq.hub import hub as hub_module
from monq.hub.hub import Hub, HubConfig
from monq.hub.store import TaskStore
from monq.protocol import Session

KEY = b"k" * 32


class _Backlog:
    """A monitor socket with copies already waiting (a burst the Hub is behind on)."""

    def __init__(self, copies: list[list[Any]]) -> None:
        self.copies = copies

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[Any]:
        if not self.copies:
            raise zmq.Again()
        return self.copies.pop(0)

    def get(self, option: int) -> int:  # ZMQ_EVENTS: whether another copy waits
        assert option == zmq.EVENTS
        return zmq.POLLIN if self.copies else 0


def _requests(client: Session, n: int) -> list[list[Any]]:
    out = []
    for _ in range(n):
        _, frames = client.serialize("apply_request", "task", {}, buffers=[b"x" * 100])
        out.append([zmq.Frame(b"in.task"), zmq.Frame(b"cid"),
                    *(zmq.Frame(bytes(f)) for f in frames)])
    return out


@pytest.fixture
def hub(tmp_path: Path) -> Any:
    store = TaskStore(f"sqlite:///{tmp_path / 'hub.db'}")
    # flush_interval 0: without a backlog, the loop would write after every turn
    h = Hub(zmq.Context.instance(), Session(KEY), store,
            HubConfig(flush_interval=0.0, flush_rows=1000))
    try:
        yield h
    finally:
        h.close()


@pytest.mark.timeout(60)
def test_behind_on_the_monitor_the_loop_writes_every_flush_rows_not_every_turn(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """While copies wait, the loop's turns (here 160 tasks each) do not each end in a
    write: rows go to the database flush_rows at a time (a write's fixed cost, and the
    pages it dirties, shared by more rows)."""
    copies = _requests(Session(KEY), 4000)
    hub.monitor = _Backlog(copies)  # type: ignore[assignment]
    # (only requests come: with rows held for their replies, nothing would be written)
    hub.config = dataclasses.replace(hub.config, hold_rows=0)
    monkeypatch.setattr(hub, "MONITOR_TURN", 160)
    writes: list[int] = []
    write = hub.store.write

    def counted(inserts: Any, updates: Any) -> None:
        writes.append(len(inserts) + len(updates))
        write(inserts, updates)

    monkeypatch.setattr(hub.store, "write", counted)
    held: list[int] = []  # rows in memory at each write
    real_flush = hub._safe_flush

    def flush(hold: bool = False) -> None:
        held.append(len(hub._dirty))
        real_flush(hold)

    monkeypatch.setattr(hub, "_safe_flush", flush)
    turns = 0
    while copies:
        hub._drain_monitor()  # as the loop does: a turn, then its timed write if due
        turns += 1
        assert hub._backlog or not copies  # (a turn that took the last copy cannot tell)
        if hub._dirty and hub._flush_due():
            hub._safe_flush(hold=True)
    hub._drain_monitor()
    assert not hub._backlog and turns >= 25
    hub._safe_flush()
    assert sum(writes) == 4000 == hub.store.count()
    # every flush_rows,
    # instead of one write per turn (25 or more)
    assert len(writes) <= 4000 // 1000 + 2, writes
    assert all(n >= 1000 for n in writes[:-1]), writes
    # and never more rows in memory than a write's
    assert max(held) <= 1000 + hub.MONITOR_STEP, held


@pytest.mark.timeout(30)
def test_a_backlog_write_waits_at_most_flush_backlog_interval(hub: Hub) -> None:
    hub._touch("a" * 32, status="pending", submitted=time.time(), client="c", queue="task")
    hub._backlog = True
    hub._dirty_since = time.monotonic()
    assert not hub._flush_due()  # 1 row, just dirty, copies waiting
    hub._dirty_since = time.monotonic() - hub.config.flush_backlog_interval - 0.01
    assert hub._flush_due()
    hub._dirty_since = time.monotonic()
    hub._backlog = False  # caught up: every flush_interval again (0 here)
    assert hub._flush_due()
    hub.config = dataclasses.replace(hub.config, flush_interval=60.0)
    assert not hub._flush_due()


def test_the_store_checkpoints_its_wal_every_10000_pages(tmp_path: Path) -> None:
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as store, store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 10_000


def test_a_batch_hashes_each_distinct_payload_once(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst's tasks carry the same request and result bytes: each distinct payload
    is hashed once per write, however many rows carry it, and still stored once."""
    from monq.hub import payloads

    calls: list[int] = []
    key_of = payloads.key_of
    monkeypatch.setattr(payloads, "key_of", lambda data: calls.append(len(data)) or key_of(data))
    request, result = b"f" * 600, b"r" * 100
    rows = [{"msg_id": f"{i:032x}", "status": "ok", "submitted": 1.0 + i,
             "request": bytes(request), "result": bytes(result)} for i in range(300)]
    rows.append({"msg_id": "x" * 32, "status": "ok", "submitted": 2000.0,
                 "request": b"g" * 600})
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as store:
        store.write(rows, [])
        assert sorted(calls) == [100, 600, 600]  # request, result, the other request
        with store.engine.connect() as c:
            assert c.exec_driver_sql("SELECT count(*), sum(refs) FROM payloads").one() == \
                (3, 601)
        assert bytes(store.get_task("0" * 32, with_payload=True)["request"]) == request


def test_packed_frames_read_back_the_same_whatever_they_were() -> None:
    """Small zmq Frames are packed from their bytes, large ones (and other buffers) from
    a view: the blob is the same either way."""
    from monq.hub import blobs

    small, big = zmq.Frame(b"s" * 100), zmq.Frame(bytes(range(256)) * 1000)
    frames = [small, big, b"xyz", memoryview(b"view"), bytearray(b"ba"), small]
    raw = [0, 1, 0, 1, 0, 1]
    blob = blobs.pack(frames, raw)
    got, flags = blobs.unpack(blob)
    assert [bytes(g) for g in got] == [bytes(memoryview(f)) for f in frames]
    assert flags == [bool(r) for r in raw]
    assert len(blob) == sum(9 + len(bytes(memoryview(f))) for f in frames)


def test_times_are_rounded_to_the_microsecond_exactly_as_round_does() -> None:
    """The Hub's fast rounding gives round(x, 6) bit for bit, near half microseconds too."""
    import math
    import random

    from monq.hub.hub import _epoch

    rnd = random.Random(7)
    values = [1.7e9 + rnd.random() * 1e8 for _ in range(20_000)]
    values += [1795849868.5 + k * 2.0 ** -22 for k in range(-2000, 2000)]  # ties, near-ties
    values += [k / 2e6 for k in range(-2000, 2000)] + [rnd.uniform(-1e3, 1e3) for _ in range(5000)]
    values += [math.ldexp(rnd.random(), rnd.randint(-40, 60)) for _ in range(5000)]
    assert [_epoch(v) for v in values] == [round(v, 6) for v in values]
    assert math.isnan(_epoch(float("nan")) or 0.0) and _epoch(float("inf")) == math.inf
    assert (_epoch(None), _epoch("1.25"), _epoch(3), _epoch("x")) == (None, 1.25, 3.0, None)


def test_most_times_skip_the_decimal_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """round(x, 6) (a decimal conversion, ~1 us) only for times near a half microsecond:
    about one in four of today's timestamps."""
    import builtins
    import random


    slow: list[float] = []

    def counting_round(x: Any, *nd: Any) -> Any:
        if nd:
            slow.append(x)
        return builtins.round(x, *nd)

    monkeypatch.setattr(hub_module, "round", counting_round, raising=False)
    rnd = random.Random(3)
    values = [1.79e9 + rnd.random() * 1e7 for _ in range(10_000)]
    assert [hub_module._epoch(v) for v in values] == [builtins.round(v, 6) for v in values]
    assert len(slow) <= 3500, len(slow)


# -- rows of pending tasks wait in memory for their replies ------------------------------

def _burst(n: int) -> tuple[list[list[Any]], list[list[Any]]]:
    """The monitor copies of ``n`` tasks: requests, and replies (each "ok")."""
    client, engine = Session(KEY), Session(KEY)
    requests, replies = [], []
    for _ in range(n):
        hdr, frames = client.serialize("apply_request", "task", {}, buffers=[b"x" * 100])
        requests.append([zmq.Frame(b"in.task"), zmq.Frame(b"cid"),
                         *(zmq.Frame(bytes(f)) for f in frames)])
        now = time.time()
        _, frames = engine.serialize("apply_reply", "task", {"status": "ok"}, parent=hdr,
                                     metadata={"engine": 0, "engine_uuid": "e0",
                                               "started": now, "completed": now})
        replies.append([zmq.Frame(b"out.task"), zmq.Frame(b"cid"),
                        *(zmq.Frame(bytes(f)) for f in frames)])
    return requests, replies


def _counting_writes(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    writes: list[tuple[int, int]] = []
    write = hub.store.write

    def counted(inserts: Any, updates: Any) -> None:
        writes.append((len(inserts), len(updates)))
        write(inserts, updates)

    monkeypatch.setattr(hub.store, "write", counted)
    return writes


def test_a_task_read_over_several_writes_is_still_one_insert(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a burst the Hub is behind on: requests are read thousands of copies before
    their replies, with writes in between; each task is still written once, whole."""
    writes = _counting_writes(hub, monkeypatch)
    requests, replies = _burst(3000)
    for i in range(0, 3000, 500):  # six writes of requests only
        for frames in requests[i:i + 500]:
            hub._on_monitor(frames)
        hub.flush(hold=True)
    assert len(hub._held) == 3000 and hub.store.count() == 0
    for i in range(0, 3000, 1000):
        for frames in replies[i:i + 1000]:
            hub._on_monitor(frames)
        hub.flush(hold=True)
    assert writes == [(1000, 0)] * 3, writes  # no UPDATE: the old rule held a row once
    assert hub.store.count(status="ok") == 3000 and not hub._inflight and not hub._held


def test_held_rows_are_written_pending_after_hold_pending(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long task's row waits hold_pending seconds at most (without a backlog), then is
    written pending; its reply updates it."""
    hub.config = dataclasses.replace(hub.config, hold_pending=0.2)
    writes = _counting_writes(hub, monkeypatch)
    requests, replies = _burst(3)
    for frames in requests:
        hub._on_monitor(frames)
    hub.flush(hold=True)
    assert writes == [] and not hub._held_due()
    time.sleep(0.25)
    assert hub._held_due()
    hub._backlog = True  # copies still waiting: the history is behind them anyway
    assert not hub._held_due()
    hub._backlog = False
    hub._on_monitor(replies[0])  # this one ended meanwhile: written whole
    hub.flush(hold=True)
    assert writes == [(3, 0)] and not hub._held
    assert hub.store.count(status="pending") == 2 and hub.store.count(status="ok") == 1
    for frames in replies[1:]:
        hub._on_monitor(frames)
    hub.flush(hold=True)
    assert writes[1] == (0, 2) and hub.store.count(status="ok") == 3


def test_held_rows_wait_while_the_hub_is_behind(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """hold_pending counts from when the Hub last found copies piling up (a query's
    catch-up included): in a long burst the replies of rows held for seconds are still
    on their way.  hold_max bounds the wait whatever happens."""
    hub.config = dataclasses.replace(hub.config, hold_pending=0.2, hold_max=0.8)
    writes = _counting_writes(hub, monkeypatch)
    requests, replies = _burst(40)
    for frames in requests[:3]:
        hub._on_monitor(frames)
    hub.flush(hold=True)
    time.sleep(0.25)  # older than hold_pending, but copies have piled up meanwhile
    hub.monitor = _Backlog(requests[3:])  # type: ignore[assignment]
    hub._catch_up()
    assert not hub._backlog and not hub._held_due()
    hub.flush(hold=True)
    assert writes == [] and len(hub._held) == 40
    time.sleep(0.25)  # caught up for hold_pending since
    assert hub._held_due()
    hub.monitor = _Backlog(replies[:3])  # type: ignore[assignment]
    hub._drain_monitor()
    hub.flush(hold=True)
    assert writes == [(40, 0)], writes  # 3 finished, 37 pending
    assert hub.store.count(status="pending") == 37
    # behind all along: hold_max still writes them
    for frames in [*replies[3:], *_burst(5)[0]]:
        hub._on_monitor(frames)
    hub.flush(hold=True)
    assert len(hub._held) == 5
    hub._backlog, hub._behind_at = True, time.monotonic()
    assert not hub._held_due()
    # (the loop sleeps until then, not until hold_pending: nothing would be due)
    assert hub._held_until() == pytest.approx(next(iter(hub._held.values()))[0] + 0.8)
    time.sleep(0.85)
    hub._behind_at = time.monotonic()
    assert hub._held_due()
    hub.flush(hold=True)
    assert not hub._held and hub.store.count(status="pending") == 5


def test_the_loop_writes_held_rows_when_they_are_due(
        hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing else to do: the loop wakes up for a held row and writes it."""
    hub.config = dataclasses.replace(hub.config, hold_pending=0.1)
    hub.bind()
    # (no engine was ever registered: the loop would settle the task as lost at once)
    monkeypatch.setattr(hub, "_settle_orphans", lambda: None)
    requests, _ = _burst(1)
    hub._on_monitor(requests[0])
    hub.flush(hold=True)
    assert len(hub._held) == 1
    stop = time.monotonic() + 5
    real = hub._safe_flush

    def flush(hold: bool = False) -> None:
        real(hold)
        if hub.store.count() or time.monotonic() > stop:
            hub.stop()

    monkeypatch.setattr(hub, "_safe_flush", flush)
    t0 = time.monotonic()
    hub.run()
    assert hub.store.count(status="pending") == 1 and not hub._held
    assert time.monotonic() - t0 < 4  # (woken by the held row, not the 5 s guard)


def test_at_most_hold_rows_are_held(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.config = dataclasses.replace(hub.config, hold_rows=100)
    writes = _counting_writes(hub, monkeypatch)
    requests, replies = _burst(250)
    for frames in requests[:150]:
        hub._on_monitor(frames)
    hub.flush(hold=True)
    for frames in requests[150:]:
        hub._on_monitor(frames)
    hub.flush(hold=True)
    # the first 100 wait for their replies (they come first); the later ones are written
    assert len(hub._held) == 100 and writes == [(50, 0), (100, 0)], writes
    for frames in replies:
        hub._on_monitor(frames)
    hub.flush(hold=True)
    assert writes[2] == (100, 150) and hub.store.count(status="ok") == 250


def test_a_query_or_close_writes_the_held_rows(tmp_path: Path) -> None:
    """A query that reads rows writes the held ones first; one that only counts tasks
    (cluster_status, polled during a burst) leaves them held and counts them pending:
    polling must not turn a burst's tasks back into an INSERT and an UPDATE each."""
    store = TaskStore(f"sqlite:///{tmp_path / 'hub.db'}")
    hub = Hub(zmq.Context.instance(), Session(KEY), store, HubConfig())
    requests, replies = _burst(20)
    client = Session(KEY)

    def ask(what: str, content: dict[str, Any]) -> None:
        _, frames = client.serialize(what, "hub", content)
        hub._on_router([b"client-ident", *frames])
        assert hub.received[f"hub {what}"] >= 1

    try:
        hub.bind()
        for frames in requests[:10]:
            hub._on_monitor(frames)
        hub._on_monitor(replies[0])  # one finished: written before any answer
        for what in ("status_request", "queue_request", "engines_request"):
            ask(what, {})
            assert len(hub._held) == 9 and store.count(status="ok") == 1
            assert store.count(status="pending") == 0
        assert hub._q_status(None)["counts"] == {"ok": 1, "pending": 9}  # type: ignore[arg-type]
        ask("history_request", {"status": "pending"})  # reads rows: everything written
        assert not hub._held and store.count(status="pending") == 9
        assert hub._q_status(None)["counts"] == {"ok": 1, "pending": 9}  # type: ignore[arg-type]
        for frames in requests[10:]:
            hub._on_monitor(frames)
        hub.flush(hold=True)
        assert len(hub._held) == 10
    finally:
        hub.close()
    with TaskStore(f"sqlite:///{tmp_path / 'hub.db'}") as again:
        assert again.count(status="pending") == 19 and again.count(status="ok") == 1


def test_a_failed_write_drops_its_rows_only(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database error loses the rows of that write (counted), not the held ones, and
    forgets the finished tasks it had."""
    requests, replies = _burst(4)
    for frames in requests:
        hub._on_monitor(frames)
    hub.flush(hold=True)
    hub._on_monitor(replies[0])
    hub._on_monitor(replies[1])

    def broken(inserts: Any, updates: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(hub.store, "write", broken)
    hub._safe_flush(hold=True)
    assert hub.rejected["store error"] == 2
    assert len(hub._held) == 2 and len(hub._inflight) == 2 and not hub._dirty
    monkeypatch.undo()
    for frames in replies[2:]:
        hub._on_monitor(frames)
    hub.flush(hold=True)
    assert hub.store.count(status="ok") == 2 and not hub._inflight


def test_a_sequential_stream_is_written_four_times_a_second_not_fifty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One task per millisecond for a second (a loop of ``apply_sync``), with the
    default config, as the loop runs it (a copy, then the timed write if due): a
    few writes, not one every 20 ms.  Each write is a CPU burst of a few ms on the
    cores the relays and engines share, and at 50 a second they were the p99."""
    store = TaskStore(f"sqlite:///{tmp_path / 'hub.db'}")
    hub = Hub(zmq.Context.instance(), Session(KEY), store, HubConfig())
    clock = [1000.0]
    # the Hub's clock only (not the process's): the stream's second passes at once
    monkeypatch.setattr(hub_module, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], time=time.time))
    try:
        writes = _counting_writes(hub, monkeypatch)
        requests, replies = _burst(1000)
        for request, reply in zip(requests, replies):
            for frames in (request, reply):
                hub._on_monitor(frames)
                if hub._dirty and hub._flush_due():
                    hub._safe_flush(hold=True)
            clock[0] += 0.001
        assert 3 <= len(writes) <= 5, writes
        assert all(u == 0 for _, u in writes), writes  # each task written once, whole
        hub._safe_flush()
        assert hub.store.count(status="ok") == 1000
    finally:
        hub.close()
