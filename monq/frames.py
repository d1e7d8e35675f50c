"""Whole zmq messages through pyzmq's Cython calls, without its per-frame Python layers.

Its own module (not monq.serialize) so that the controller, which never
pickles, can use it without importing cloudpickle (tests/test_startup_costs.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _BackendSocket

#: frames smaller than this are received as bytes (one copy, and parsing bytes is cheaper
#: than parsing a Frame); larger ones stay zero-copy Frames (pyzmq's copy threshold)
COPY_BELOW = 64 * 1024
# ints, not pyzmq's IntFlag members: ``flags | SNDMORE`` on those builds a new enum member
# (~1 us) for every frame sent
_SNDMORE = int(zmq.SNDMORE)
# pyzmq's sugar send/recv add several Python layers per frame (type checks, keyword
# handling, a getsockopt(RCVMORE) per frame): 40 us for a 9-frame message here, against
# 8 us through the Cython calls they end in
_send = _BackendSocket.send
_recv = _BackendSocket.recv


def send_frames(socket: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """``socket.send_multipart(frames, flags, copy=False)``, with less overhead.

    Frames under the socket's ``copy_threshold`` are copied, larger ones are sent
    without a copy (the caller must not change them until ZeroMQ has sent them).
    Raises zmq.Again (with NOBLOCK) before anything is sent, never halfway.
    """
    last = len(frames) - 1
    flags = int(flags)
    more = flags | _SNDMORE
    for i, f in enumerate(frames):
        _send(socket, f, more if i < last else flags, False)


def recv_frames(socket: zmq.Socket, flags: int = 0) -> list[Any]:
    """``socket.recv_multipart(flags, copy=False)``, but frames under ``COPY_BELOW``
    bytes come as ``bytes``; larger ones are zmq Frames (no copy)."""
    f = _recv(socket, flags, False)
    out = [f.bytes if len(f) < COPY_BELOW else f]
    while f.more:
        # the rest of a message arrives with its first frame: never waits
        f = _recv(socket, 0, False)
        out.append(f.bytes if len(f) < COPY_BELOW else f)
    return out
