"""An engine's task path in-process (no cluster, no Hub): what one small task costs in
messages and objects, counted, and that output capping still works with the cheaper
capture streams."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from monq.connection import ConnectionInfo
from monq.engine.engine import Engine, EngineConfig, _Capture, _Item
from monq.protocol import Session
from monq.serialize import deserialize, pack_apply, recv_frames, send_frames

KEY = b"k" * 32


@pytest.fixture
def rig() -> Iterator[tuple[Engine, zmq.Socket, zmq.Socket, Session]]:
    eng = Engine(ConnectionInfo(key=KEY, ports={"hub": 1}), EngineConfig(output_cap=10))
    ctx = zmq.Context.instance()
    client, engine_side = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    url = f"inproc://engine-inprocess-{id(eng)}"
    client.bind(url)
    engine_side.connect(url)
    try:
        yield eng, client, engine_side, Session(KEY)
    finally:
        client.close(linger=0)
        engine_side.close(linger=0)
        eng.close()


def _task(eng: Engine, client: zmq.Socket, engine_side: zmq.Socket, session: Session,
          f: Any, *args: Any) -> list[Any]:
    bufs, raw = pack_apply(f, args, {})
    _, frames = session.serialize("apply_request", "task", {}, metadata={"func": "f"},
                                  buffers=bufs, raw=raw)
    send_frames(client, [b"client-ident", *frames])
    assert engine_side.poll(5000)
    msg = eng.session.feed(recv_frames(engine_side))
    eng.handle_apply(_Item(engine_side, "task", msg, time.time()))
    assert client.poll(5000)
    return recv_frames(client)


def test_a_short_task_is_one_reply_and_output_is_capped(rig: Any) -> None:
    eng, client, engine_side, session = rig
    reply = _task(eng, client, engine_side, session, lambda: print("x" * 25) or 42)
    msg = session.feed(reply)
    assert msg.idents == [b"client-ident"] and msg.msg_type == "apply_reply"
    assert deserialize(msg.buffers) == 42
    assert msg.metadata["stdout"].startswith("x" * 10)
    assert "16 characters dropped" in msg.metadata["stdout"]  # 25 + newline - 10
    assert msg.metadata["stderr"] == ""
    assert not client.poll(50)  # one reply, nothing else


def test_capture_defaults_are_per_instance_once_set() -> None:
    a, b = _Capture(), _Capture()
    a.cap = 3
    a.write("abcdef")
    b.write("abcdef")
    assert a.text() == "abc\n[... 3 characters dropped]"
    assert b.text() == "abcdef" and b.dropped == 0 and _Capture.dropped == 0


def test_a_task_taken_without_a_receipt_is_named_before_any_later_read(rig: Any) -> None:
    """The first task read when idle runs at once with no receipt (its reply says it
    was read).  A task read after it, while it runs or just before it is marked
    running, gets a receipt: the earlier one must be named first, or the Hub sees the
    engine read past a task it never heard of, takes that for a task dealt to a dead
    engine, and has the client send a running task again."""
    eng, client, engine_side, session = rig
    eng.channels = {engine_side: "task"}
    poller = zmq.Poller()
    poller.register(engine_side, zmq.POLLIN)

    def send(i: int) -> str:
        bufs, raw = pack_apply(abs, (i,), {})
        hdr, frames = session.serialize("apply_request", "task", {}, metadata={"func": "abs"},
                                        buffers=bufs, raw=raw)
        send_frames(client, frames)
        return str(hdr["msg_id"])

    first = send(-1)
    item = eng._next(poller)
    assert item is not None and item.msg.msg_id == first
    assert not eng.receipts  # a lone task read when idle costs no receipt
    # the link thread reads the next one before the main thread has set ``current``
    second = send(-2)
    assert engine_side.poll(5000)
    with eng.lock:
        eng.read_available()
    assert list(eng.receipts) == [first, second]
    # named once: a third read is reported alone
    eng.receipts.clear()
    third = send(-3)
    assert engine_side.poll(5000)
    with eng.lock:
        eng.read_available()
    assert list(eng.receipts) == [third]
