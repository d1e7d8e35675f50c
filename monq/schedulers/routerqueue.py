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
in a thread of the controller and takes the GIL per batch of messages, not
per frame.  The
load-balanced ROUTER->DEALER relay does not swap identities, reads whole
messages, and stays on the C loop.
"""

from __future__ import annotations

from collections import Counter

import zmq

#: a ROUTER->ROUTER message needs the sender's identity, the destination and a body
MIN_FRAMES = 3
#: messages moved per socket before looking at the other one (fairness, fewer polls)
BATCH = 256


def router_router_queue(front: zmq.Socket, back: zmq.Socket, mon: zmq.Socket,
                        in_prefix: bytes, out_prefix: bytes,
                        rejected: Counter[str] | None = None,
                        reason: str = "relay: too few frames") -> None:
    """Relay between two ROUTERs until the Context ends (raises ContextTerminated).

    ``[sender, destination, *body]`` received on one side is sent to the other
    as ``[destination, sender, *body]`` and copied to ``mon`` as
    ``[prefix, destination, sender, *body]``.  Shorter messages are dropped and
    counted in ``rejected[reason]``.  Frames are passed by reference
    (``copy=False``): a payload is not copied for the second send.
    """
    if rejected is None:
        rejected = Counter()
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    routes = ((front, back, in_prefix), (back, front, out_prefix))
    flags = zmq.NOBLOCK
    while True:
        ready = dict(poller.poll())
        for src, dst, prefix in routes:
            if src not in ready:
                continue
            for _ in range(BATCH):
                try:
                    frames = src.recv_multipart(flags, copy=False)
                except zmq.Again:
                    break
                if len(frames) < MIN_FRAMES:
                    rejected[reason] += 1
                    continue
                frames[0], frames[1] = frames[1], frames[0]
                dst.send_multipart(frames, copy=False)
                mon.send_multipart([prefix, *frames], copy=False)
