"""Heartbeats: the Hub pings every engine and declares dead those that stop answering.

The Hub publishes ``[b"ping", <beat number>]`` on a PUB socket every
``period`` seconds.  Each engine forwards every ping, in a C proxy thread
(so a task holding the GIL does not silence it), to the Hub's pong ROUTER,
where it arrives prefixed with the engine's uuid.  An engine that has not
answered the last ``max_missed`` pings sent, for at least ``period *
max_missed`` seconds, is reported dead.  Counting pings *sent* matters: a Hub
that was itself too busy to ping (a flood to drain) must not blame the
engines for the pings it did not send.
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
        #: uuid -> (monotonic time, beat) of its last answer
        self._last: dict[bytes, tuple[float, int]] = {}

    def add(self, uuid: bytes) -> None:
        self._last[uuid] = (time.monotonic(), self.beat)

    def remove(self, uuid: bytes) -> None:
        self._last.pop(uuid, None)

    def __contains__(self, uuid: bytes) -> bool:
        return uuid in self._last

    def handle_pong(self, frames: list[bytes]) -> bool:
        """Record one pong: ``[uuid, b"ping", beat]``; False if from an unknown engine
        (or not a pong at all)."""
        if len(frames) != 3 or frames[1] != b"ping":
            return False
        uuid = frames[0]
        if uuid not in self._last:
            return False
        try:
            beat = min(int(frames[2]), self.beat)
        except ValueError:
            return True
        self._last[uuid] = (time.monotonic(), max(beat, self._last[uuid][1]))
        return True

    def tick(self, now: float | None = None) -> Iterable[bytes]:
        """Send a ping when one is due; return the uuids of engines now dead."""
        now = time.monotonic() if now is None else now
        if now < self.next_beat:
            return ()
        self.beat += 1
        self.next_beat = now + self.period
        self.ping.send_multipart([b"ping", str(self.beat).encode()])
        limit = self.period * self.max_missed
        dead = [u for u, (t, b) in self._last.items()
                if now - t > limit and self.beat - b > self.max_missed]
        for u in dead:
            del self._last[u]
        return dead
