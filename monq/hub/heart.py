"""Heartbeats: the Hub pings every engine and declares dead those that stop answering.

The Hub publishes ``[b"ping", <beat number>]`` on a PUB socket every
``period`` seconds.  Each engine forwards every ping, in a C proxy thread
(so a task holding the GIL does not silence it), to the Hub's pong ROUTER,
where it arrives prefixed with the engine's uuid.  An engine that has not
answered for ``period * max_missed`` seconds is reported dead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import zmq


class HeartMonitor:
    """Tracks when each engine last answered; owned and driven by the Hub thread."""

    def __init__(self, ping: zmq.Socket, pong: zmq.Socket, period: float = 1.0,
                 max_missed: int = 3) -> None:
        self.ping = ping
        self.pong = pong
        self.period = period
        self.max_missed = max_missed
        self.beat = 0
        self.next_beat = time.monotonic()
        self._last: dict[bytes, float] = {}

    def add(self, uuid: bytes) -> None:
        self._last[uuid] = time.monotonic()

    def remove(self, uuid: bytes) -> None:
        self._last.pop(uuid, None)

    def __contains__(self, uuid: bytes) -> bool:
        return uuid in self._last

    def handle_pong(self, frames: list[bytes]) -> bool:
        """Record one pong: ``[uuid, b"ping", beat]``; False (ignored) for anything else."""
        if len(frames) != 3 or frames[1] != b"ping":
            return False
        uuid = frames[0]
        if uuid in self._last:
            self._last[uuid] = time.monotonic()
            return True
        return False

    def tick(self, now: float | None = None) -> Iterable[bytes]:
        """Send a ping when one is due; return the uuids of engines now dead."""
        now = time.monotonic() if now is None else now
        if now < self.next_beat:
            return ()
        self.beat += 1
        self.next_beat = now + self.period
        self.ping.send_multipart([b"ping", str(self.beat).encode()])
        limit = self.period * self.max_missed
        dead = [u for u, t in self._last.items() if now - t > limit]
        for u in dead:
            del self._last[u]
        return dead
