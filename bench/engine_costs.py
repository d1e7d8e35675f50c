"""CPU of an engine's steps for one small task, timed alone (no cluster).

Builds the ``apply_request`` a client sends for ``noop()`` (same Session,
same framing), then times, with ``time.process_time`` over many repeats:
receiving it from a socket, verifying it (``Session.feed``), and the whole
``Engine.handle_apply`` (unpack, run, capture, pickle, sign, send).  The
engine's sockets are inproc pairs inside this process; nothing is
registered.

Run: PYTHONPATH=$PWD python bench/engine_costs.py [--n 20000]
"""

from __future__ import annotations

import argparse
import time

import zmq

from monq.connection import ConnectionInfo
from monq.engine.engine import Engine, _Item
from monq.protocol import Session
from monq.serialize import pack_apply, recv_frames, send_frames


def noop() -> None:
    return None


def request(session: Session) -> list[bytes]:
    bufs, raw = pack_apply(noop, (), {})
    _, frames = session.serialize("apply_request", "task", {}, metadata={"func": "noop"},
                                  buffers=bufs, raw=raw)
    return [b"client-ident", *[bytes(f) for f in frames]]


def per_call(fn, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    a = p.parse_args()
    key = b"k" * 32
    info = ConnectionInfo(key=key, ports={"hub": 1})
    eng = Engine(info)
    client = Session(key)
    ctx = zmq.Context.instance()
    a_, b_ = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a_.bind("inproc://x")
    b_.connect("inproc://x")
    frames = [request(client) for _ in range(a.n)]
    it = iter(frames)
    print(f"{'step':40} {'us':>7}")
    print(f"{'client: sign a request':40} {per_call(lambda: request(client), a.n):7.1f}")

    def sendrecv() -> None:
        send_frames(a_, next(it))
        recv_frames(b_)

    print(f"{'send + recv_frames (inproc)':40} {per_call(sendrecv, a.n):7.1f}")
    msgs = []
    it = iter(frames)
    print(f"{'engine: Session.feed':40} "
          f"{per_call(lambda: msgs.append(eng.session.feed(next(it))), a.n):7.1f}")
    items = iter([_Item(b_, "task", m, time.time()) for m in msgs])

    def handle() -> None:
        eng.handle_apply(next(items))
        recv_frames(a_)

    print(f"{'engine: handle_apply (+ recv of reply)':40} {per_call(handle, a.n):7.1f}")
    reply = None

    def rr() -> None:
        nonlocal reply
        send_frames(b_, [b"client-ident", b"x"])
        reply = recv_frames(a_)

    print(f"{'(send + recv of 2 frames alone)':40} {per_call(rr, a.n):7.1f}")
    for s in (a_, b_):
        s.close(linger=0)
    eng.close()


if __name__ == "__main__":
    main()
