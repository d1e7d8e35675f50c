"""What a task of a burst costs an engine, counted in-process (no cluster, no Hub).

In a burst the tasks come in ``apply_batch`` messages of tens; an engine reads
one (often its link thread, reading ahead), runs its tasks one by one and
answers them in one ``apply_batch_reply``.  Every Python call made per task is
paid tens of thousands of times a second, so this counts them: those made by
the engine's and the protocol's own code (monq.engine, monq.protocol,
monq.frames) for one task of a 32-task batch, from the read to the reply.
a4c9454 made 24 per task (a generator per byte count, a method per receipt, a
BatchBuilder.add/full and a _remember per reply, three msg_id properties, two
capture streams' text()...); now 6 (the task's Message, _Item and _Held, _next,
handle_apply, and its share of the batch's read and reply).  And the messages
stay what they were: one receipt per task in read order, one reply message for
the batch.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
import zmq

from monq.connection import ConnectionInfo
from monq.engine.engine import Engine, EngineConfig, _Link
from monq.frames import recv_frames, send_frames
from monq.protocol import BATCH_REPLY, BATCH_REQUEST, BatchBuilder, Session
from monq.serialize import deserialize, pack_apply

KEY = b"b" * 32
N = 32
OURS = ("/monq/engine/", "/monq/protocol.py", "/monq/frames.py")


def _noop() -> None:
    return None


#: the streams tasks kept (module-level: the functions are pickled by reference)
_KEPT: list[Any] = []


def _keep() -> None:
    _KEPT.append(sys.stdout)


def _late() -> str:
    _KEPT[0].write("from an earlier task")
    print("mine")
    return "done"


@pytest.fixture
def rig() -> Iterator[tuple[Engine, zmq.Socket, zmq.Socket, zmq.Poller]]:
    eng = Engine(ConnectionInfo(key=KEY, ports={"hub": 1}), EngineConfig())
    eng.id = 0
    ctx: Any = zmq.Context.instance()
    client, engine_side = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    url = f"inproc://engine-batch-costs-{id(eng)}"
    client.bind(url)
    engine_side.connect(url)
    eng.channels = {engine_side: "task"}
    poller = zmq.Poller()
    poller.register(engine_side, zmq.POLLIN)
    try:
        yield eng, client, engine_side, poller
    finally:
        client.close(linger=0)
        engine_side.close(linger=0)
        eng.close()


def _batch(session: Session, f: Any, n: int) -> tuple[list[Any], list[str]]:
    """An ``apply_batch`` of ``n`` calls of ``f``, built as a client builds one."""
    b = BatchBuilder()
    ids = []
    hdr: dict[str, Any] = {}
    for _ in range(n):
        bufs, raw = pack_apply(f, (), {})
        hdr = session.header("apply_request", "task")
        ids.append(hdr["msg_id"])
        b.add({"msg_id": hdr["msg_id"], "date": hdr["date"], "metadata": {"func": "f"}},
              bufs, raw)
    header = {**hdr, "msg_id": session.new_msg_id(), "msg_type": BATCH_REQUEST}
    _, frames = session.serialize(BATCH_REQUEST, "task", {"tasks": b.entries},
                                  buffers=b.buffers, raw=b.raw, header=header)
    return frames, ids


def _burst(eng: Engine, client: zmq.Socket, engine_side: zmq.Socket, poller: zmq.Poller,
           frames: list[Any]) -> None:
    """One batch as in a burst: read ahead (as the link thread does), then run."""
    send_frames(client, frames)
    assert engine_side.poll(5000)
    with eng.lock:
        eng.read_available()
    while eng.backlog:
        item = eng._next(poller)
        assert item is not None
        eng.handle_apply(item)


def _ours(frame: FrameType) -> bool:
    code = frame.f_code
    if code.co_filename == "<string>":  # a dataclass's __init__: whose?
        owner = type(frame.f_locals.get("self")).__module__
        return owner in ("monq.engine.engine", "monq.protocol")
    return any(p in code.co_filename for p in OURS)


def test_a_task_of_a_batch_costs_the_engine_few_python_calls(rig: Any) -> None:
    eng, client, engine_side, poller = rig
    session = Session(KEY)
    _burst(eng, client, engine_side, poller, _batch(session, _noop, N)[0])  # warm up
    assert client.poll(5000)
    recv_frames(client)
    eng.receipts.clear()
    frames, ids = _batch(session, _noop, N)
    capture = eng._out
    calls: dict[str, int] = {}

    def count(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and _ours(frame):
            name = f"{frame.f_code.co_filename}:{frame.f_code.co_name}"
            calls[name] = calls.get(name, 0) + 1

    gc.collect()  # a collection while counting would count earlier tests' finalizers
    gc.disable()
    sys.setprofile(count)
    try:
        _burst(eng, client, engine_side, poller, frames)
    finally:
        sys.setprofile(None)
        gc.enable()
    per_task = sum(calls.values()) / N
    assert per_task <= 8, (per_task, sorted(calls.items(), key=lambda kv: -kv[1]))
    # and what it sent and queued is what it was: every task's receipt, in read order,
    # one reply message for the batch, every result in it; the capture streams (nothing
    # was printed) are the same ones
    assert list(eng.receipts) == ids
    assert client.poll(5000)
    reply = session.feed(recv_frames(client))
    assert reply.msg_type == BATCH_REPLY and not client.poll(50)
    tasks = session.split_batch(reply)
    assert [t.parent["msg_id"] for t in tasks] == ids
    assert all(t.content["status"] == "ok" and deserialize(t.buffers) is None for t in tasks)
    assert [r[2][0] for r in list(eng.recent)[-N:]] == ids  # remembered once each
    assert len(eng.recent) == 2 * N
    assert eng._out is capture


def test_a_task_that_prints_or_keeps_its_stream_gets_fresh_ones_next(rig: Any) -> None:
    """Capture streams are reused only when the task wrote nothing and kept none: a
    stream a task kept (a logging handler...) never writes into a later task's output."""
    eng, client, engine_side, poller = rig
    session = Session(KEY)
    _KEPT.clear()
    first = eng._out
    for f in (_keep, _late, _noop):
        send_frames(client, _batch(session, f, 1)[0])
        assert engine_side.poll(5000)
        with eng.lock:
            eng.read_available()
        item = eng._next(poller)
        assert item is not None
        eng.handle_apply(item)
    outs = []
    for _ in range(3):
        assert client.poll(5000)
        outs.append(session.feed(recv_frames(client)).metadata["stdout"])
    assert outs == ["", "mine\n", ""]
    assert _KEPT[0] is first and eng._out is not first
    _KEPT.clear()


def _sleep_5ms() -> None:
    time.sleep(0.005)


def _sleep_300ms() -> None:
    time.sleep(0.3)


@pytest.fixture
def running() -> Iterator[tuple[Engine, zmq.Socket, Session]]:
    """An engine whose loop and link thread run (in this process, no Hub), replies held
    up to 50 ms."""
    eng = Engine(ConnectionInfo(key=KEY, ports={"hub": 1}), EngineConfig(reply_hold=0.05))
    eng.id = 0
    ctx: Any = zmq.Context.instance()
    client, engine_side = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    hub, link_side = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for a, b, name in ((client, engine_side, "task"), (hub, link_side, "hub")):
        url = f"inproc://engine-batch-costs-{name}-{id(eng)}"
        a.bind(url)
        b.connect(url)
    eng.channels = {engine_side: "task"}
    eng._link = _Link(eng, link_side, Session(KEY, eng.session.session_id),
                      eng.config.started_notice_delay)
    eng._link.start()
    loop = threading.Thread(target=eng.run, daemon=True)
    loop.start()
    try:
        yield eng, client, Session(KEY)
    finally:
        eng.stop()
        loop.join(5)
        eng.close()  # stops and joins the link thread
        for s in (client, engine_side, hub, link_side):
            s.close(linger=0)


def _replies(client: zmq.Socket, session: Session, n: int, timeout: float) -> list[list[str]]:
    """The msg_ids each reply message answers, until ``n`` tasks are answered."""
    out: list[list[str]] = []
    deadline = time.monotonic() + timeout
    while sum(map(len, out)) < n:
        assert client.poll(max(1, int((deadline - time.monotonic()) * 1000))), out
        msg = session.feed(recv_frames(client))
        if msg.msg_type == BATCH_REPLY:
            out.append([t.parent["msg_id"] for t in session.split_batch(msg)])
        else:
            out.append([msg.parent["msg_id"]])
    return out


def test_a_batch_of_short_tasks_outlasting_the_hold_is_answered_in_one_message(
        running: Any) -> None:
    """16 tasks of 5 ms: 80 ms of run, more than the 50 ms hold.  No task holds the
    replies up, so the link thread leaves them to go together when the batch ends (at
    a4c9454 it sent them in pieces, every 50 ms: one message more per piece for the
    engine, the relay, the Hub and the client)."""
    eng, client, session = running
    frames, ids = _batch(session, _sleep_5ms, 16)
    send_frames(client, frames)
    assert _replies(client, session, 16, 30) == [ids]
    assert not client.poll(100)


def test_a_long_task_never_holds_up_the_replies_before_it(running: Any) -> None:
    eng, client, session = running
    b = BatchBuilder()
    ids = []
    hdr: dict[str, Any] = {}
    for f in (_noop, _noop, _sleep_300ms):
        bufs, raw = pack_apply(f, (), {})
        hdr = session.header("apply_request", "task")
        ids.append(hdr["msg_id"])
        b.add({"msg_id": hdr["msg_id"], "date": hdr["date"], "metadata": {}}, bufs, raw)
    header = {**hdr, "msg_id": session.new_msg_id(), "msg_type": BATCH_REQUEST}
    _, frames = session.serialize(BATCH_REQUEST, "task", {"tasks": b.entries},
                                  buffers=b.buffers, raw=b.raw, header=header)
    send_frames(client, frames)
    first = _replies(client, session, 2, 30)
    assert first == [ids[:2]]
    assert eng.current is not None and eng.current[0] == ids[2]  # sent while it ran
    assert _replies(client, session, 1, 30) == [ids[2:]]


def test_a_signed_request_without_a_msg_id_is_read_ahead_and_answered(rig: Any) -> None:
    """Its receipt names it "" (as Message.msg_id does): the read goes on, nothing raises."""
    eng, client, engine_side, poller = rig
    session = Session(KEY)
    bufs, raw = pack_apply(_noop, (), {})
    header = session.header("apply_request", "task")
    del header["msg_id"]
    _, frames = session.serialize("apply_request", "task", {}, metadata={}, buffers=bufs,
                                  raw=raw, header=header)
    send_frames(client, frames)
    assert engine_side.poll(5000)
    with eng.lock:
        eng.read_available()
    assert list(eng.receipts) == [""]
    item = eng._next(poller)
    assert item is not None
    eng.handle_apply(item)
    assert client.poll(5000)
    assert session.feed(recv_frames(client)).content["status"] == "ok"
