"""CPU per task of an engine's burst path, for batches of N no-op tasks (no cluster).

A burst reaches an engine as ``apply_batch`` messages of tens of tasks: this
builds them as a client does (same Session, same BatchBuilder), then times,
with ``time.process_time`` over many batches, what the engine does for each:
the read ahead (``read_available``: receive, verify, split, queue receipts),
the receipts message to the Hub (``_Link._report_receipts``), every task run
(``_next`` + ``handle_apply``) and the batch's ``apply_batch_reply``.  The
sockets are inproc pairs in this process; the batches are re-sent from a pool
(the replay check is off), so the figure is the engine's own work.

Deterministic figure (other processes do not change it): instructions per task,
``(I(20 + M batches) - I(20 batches)) / (M * N)`` from two runs of
``valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/engine_batch_costs.py
--n 32 --batches K``.

Run: PYTHONPATH=$PWD python bench/engine_batch_costs.py [--n 32] [--batches 600]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import zmq

from monq.connection import ConnectionInfo
from monq.engine.engine import Engine, _Link
from monq.frames import recv_frames, send_frames
from monq.protocol import BATCH_REQUEST, BatchBuilder, Session
from monq.serialize import pack_apply

KEY = b"k" * 32
POOL = 20


def noop() -> None:
    return None


def batch(session: Session, n: int) -> list[Any]:
    b = BatchBuilder()
    hdr: dict[str, Any] = {}
    for _ in range(n):
        bufs, raw = pack_apply(noop, (), {})
        hdr = session.header("apply_request", "task")
        b.add({"msg_id": hdr["msg_id"], "date": hdr["date"], "metadata": {"func": "noop"}},
              bufs, raw)
    header = {**hdr, "msg_id": session.new_msg_id(), "msg_type": BATCH_REQUEST}
    _, frames = session.serialize(BATCH_REQUEST, "task", {"tasks": b.entries},
                                  buffers=b.buffers, raw=b.raw, header=header)
    return [b"client-ident", *[bytes(f) for f in frames]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=32, help="tasks per batch")
    p.add_argument("--batches", type=int, default=600, help="batches, the first 20 warm up")
    p.add_argument("--calls", action="store_true", help="also count Python calls per task")
    a = p.parse_args()
    eng = Engine(ConnectionInfo(key=KEY, ports={"hub": 1}))
    eng.id = 0
    ctx: Any = zmq.Context.instance()
    client, engine_side = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    hub, link_side = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for x, y, url in ((client, engine_side, "inproc://t"), (hub, link_side, "inproc://h")):
        x.bind(url)
        y.connect(url)
    eng.channels = {engine_side: "task"}
    link = _Link(eng, link_side, Session(KEY, eng.session.session_id), 0.005)
    eng.session.replay.check = lambda *args, **kw: None  # type: ignore[method-assign]
    sender = Session(KEY)
    pool = [batch(sender, a.n) for _ in range(POOL)]
    poller = zmq.Poller()
    poller.register(engine_side, zmq.POLLIN)

    def one(frames: list[Any]) -> None:
        send_frames(client, frames)
        with eng.lock:  # the link thread reads ahead while the first task runs
            eng.read_available()
        link._report_receipts()
        while eng.backlog:
            item = eng._next(poller)
            assert item is not None
            eng.handle_apply(item)
        while hub.poll(0):
            recv_frames(hub)
        while client.poll(0):
            recv_frames(client)

    for i in range(min(POOL, a.batches)):
        one(pool[i])
    rest = max(0, a.batches - POOL)
    t0 = time.process_time()
    for i in range(rest):
        one(pool[i % POOL])
    dt = time.process_time() - t0
    if rest:
        print(f"engine CPU per task ({a.n}-task batches): {dt / (rest * a.n) * 1e6:.2f} us")
    if a.calls:
        calls = 0

        def count(frame: Any, event: str, arg: Any) -> None:
            nonlocal calls
            calls += event == "call"

        sys.setprofile(count)
        one(pool[0])
        sys.setprofile(None)
        print(f"Python calls per task: {calls / a.n:.1f}")
    for s in (client, engine_side, hub, link_side):
        s.close(linger=0)
    eng.close()


if __name__ == "__main__":
    main()
