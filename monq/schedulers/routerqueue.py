"""A monitored ROUTER->ROUTER queue that checks frame counts: the direct relay's loop.

pyzmq's C ``monitored_queue`` swaps the two routing identities of a
ROUTER->ROUTER message by receiving two frames and then "the rest" without
looking at ``RCVMORE`` in between.  A peer that sends a single frame (the
ROUTER adds its identity: two frames in all) leaves it waiting inside the C
loop for the rest of a message that has ended: it blocks until the next
message arrives on that side, glues it on, and the router drops the glued
message for want of a route.  On the engine side nothing else may come for a
long time, so one stray frame stalls the whole direct channel.

:func:`router_router_queue` does the same job (identities swapped, every
forwarded message copied to the monitor with the same prefixes and frame
order as the C loop) with whole multipart messages, so a message too short to
carry two identities and a body is dropped and counted, never glued.  It is
Python, so it costs more per message than the C loop; bench/direct_relay.py
measures both (figures in the docstring of monq.schedulers.relay).  It runs
in a thread of the controller and holds the GIL, shared with the Hub, while it
moves a message: it calls pyzmq's Cython send/recv directly (25-31 us of CPU
per message and its monitor copy, against 66 through recv_multipart /
send_multipart, 9-frame messages timed alone) and asks ZMQ_EVENTS rather than
raising zmq.Again after a lone message.  The
load-balanced ROUTER->DEALER relay does not swap identities, reads whole
messages, and stays on the C loop.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import zmq
from zmq.backend import Socket as _BackendSocket

#: a ROUTER->ROUTER message needs the sender's identity, the destination and a body
MIN_FRAMES = 3
#: messages moved per socket before looking at the other one (fairness, fewer polls)
BATCH = 256

# pyzmq's recv_multipart/send_multipart add several Python layers per frame (keyword
# handling, type checks, a getsockopt(RCVMORE) per frame); the Cython calls they end in
# cost a fraction of that.  This loop holds the GIL, shared with the Hub, for every
# message it moves: each microsecond here is one the Hub or a relayed message waits.
_recv = _BackendSocket.recv
_send = _BackendSocket.send
_get = _BackendSocket.get
_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)


def _recv_message(sock: zmq.Socket) -> list[Any]:
    """One whole multipart message as Frames (zmq.Again if none is waiting)."""
    f = _recv(sock, _NOBLOCK, False)
    frames = [f]
    while f.more:
        # the rest of a message arrives with its first frame: never waits
        f = _recv(sock, 0, False)
        frames.append(f)
    return frames


def _send_message(sock: zmq.Socket, frames: list[Any]) -> None:
    last = len(frames) - 1
    for i, f in enumerate(frames):
        _send(sock, f, _SNDMORE if i < last else 0, False)


def router_router_queue(front: zmq.Socket, back: zmq.Socket, mon: zmq.Socket,
                        in_prefix: bytes, out_prefix: bytes,
                        rejected: Counter[str] | None = None,
                        reason: str = "relay: too few frames") -> None:
    """Relay between two ROUTERs until the Context ends (raises ContextTerminated).

    ``[sender, destination, *body]`` received on one side is sent to the other
    as ``[destination, sender, *body]`` and copied to ``mon`` as
    ``[prefix, destination, sender, *body]``.  Shorter messages are dropped and
    counted in ``rejected[reason]``.  Frames are passed by reference
    (zmq Frames, ``copy=False``): a payload is not copied for the second send.
    """
    if rejected is None:
        rejected = Counter()
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    routes = ((front, back, in_prefix), (back, front, out_prefix))
    while True:
        ready = dict(poller.poll())
        for src, dst, prefix in routes:
            if src not in ready:
                continue
            for i in range(BATCH):
                # the poll said a message waits; after it, ask the socket once rather
                # than end on zmq.Again (raising it costs ~3x a look at ZMQ_EVENTS, and a
                # sequential round trip has one message per wake-up); a burst reads on
                # until zmq.Again
                if i == 1 and not int(_get(src, _EVENTS)) & _POLLIN:
                    break
                try:
                    frames = _recv_message(src)
                except zmq.Again:
                    break
                if len(frames) < MIN_FRAMES:
                    rejected[reason] += 1
                    continue
                frames[0], frames[1] = frames[1], frames[0]
                # the copy first: once a client has a reply, its copy is already waiting
                # for the Hub, so a query the client sends next (which the Hub answers
                # after taking in every waiting copy) sees the task finished, as with
                # the C loop, which copies each frame before forwarding it
                _send(mon, prefix, _SNDMORE, True)
                _send_message(mon, frames)
                _send_message(dst, frames)
