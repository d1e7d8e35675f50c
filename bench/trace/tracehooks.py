"""Bench-only timestamps of a round trip's steps (see bench/trace_roundtrip.py).

Wraps a few functions of monq and pyzmq so that each records
``(perf_counter_ns, tag, thread)``; nothing is kept in monq's hot path.  Tags
for functions that a version of monq lacks are simply never recorded.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import threading
import time
from typing import Any

EVENTS: list[tuple[int, str, str]] = []
_ns = time.perf_counter_ns


def mark(tag: str) -> None:
    EVENTS.append((_ns(), tag, threading.current_thread().name))


def wrap(obj: Any, name: str, before: str | None, after: str | None,
         when: Any = None) -> None:
    real = getattr(obj, name, None)
    if real is None:
        return

    @functools.wraps(real)
    def w(*a: Any, **k: Any) -> Any:
        if before and (when is None or when(a, k, None)):
            mark(before)
        r = real(*a, **k)
        if after and (when is None or when(a, k, r)):
            mark(after)
        return r

    setattr(obj, name, w)


def _dump() -> None:
    d = os.environ.get("MONQ_TRACE_DIR")
    if d:
        with open(os.path.join(d, f"{os.getpid()}.json"), "w") as f:
            json.dump(EVENTS, f)


def _common(prefix: str) -> None:
    import zmq

    def returned_something(a: Any, k: Any, r: Any) -> bool:
        return r is None or bool(r)

    wrap(zmq.Poller, "poll", None, f"{prefix}.poll_ret", lambda a, k, r: r is None or bool(r))
    wrap(zmq.Socket, "send_multipart", f"{prefix}.send_in", f"{prefix}.send_out")
    wrap(zmq.Socket, "recv_multipart", None, f"{prefix}.recv_out")
    wrap(zmq.Socket, "poll", None, f"{prefix}.spoll_ret", lambda a, k, r: r is None or bool(r))
    from monq import protocol

    wrap(protocol.Session, "feed", None, f"{prefix}.fed")
    wrap(protocol.Session, "serialize", None, f"{prefix}.serialized")


def install_engine() -> None:
    _common("e")
    from monq.engine import engine

    wrap(engine.Engine, "handle_apply", "e.handle_in", "e.handle_out")
    wrap(engine, "send_frames", "e.send_in", "e.send_out")
    wrap(engine, "recv_frames", None, "e.recv_out")
    atexit.register(_dump)


def install_client() -> None:
    _common("c")
    from monq.client import client, io, results, view

    wrap(view.View, "apply_sync", "c.call", "c.done")
    wrap(io.Outbox, "put", "c.put", None)
    wrap(io.Outbox, "take", "c.take", None)
    wrap(io.IOThread, "_dispatch", "c.dispatch_in", "c.dispatch_out")
    wrap(io.IOThread, "dispatch", "c.dispatch_in", "c.dispatch_out",
         lambda a, k, r: bool(a[1]))
    wrap(io, "send_frames", "c.send_in", "c.send_out")
    wrap(io, "recv_frames", None, "c.recv_out")
    wrap(client.Client, "_on_reply", "c.on_reply", None)
    wrap(results.AsyncResult, "_child_done", None, "c.resolved")
