"""Which load-balanced tasks went to an engine that can no longer run them.

The task relay is a ROUTER->DEALER ``monitored_queue``: the DEALER hands each
request to one of its engine connections and tells nobody which.  When an
engine dies, the requests still sitting in its socket (sent, never read) are
invisible to everyone but the Hub, which can work them out from two facts:

1. the monitor copies reach the Hub in the order the relay sent the requests
   (the relay sends a request, then its copy, in one thread), so the Hub
   numbers them: ``seq``;
2. each engine reads its connection in that same order (one FIFO pipe per
   engine), and says what it read: its replies, its ``task_started`` notices
   and its ``tasks_received`` receipts name the msg_ids it has read.

So once an engine has read request ``t``, every request numbered below ``t``
that went to that engine has been read too.  Keep, for each live engine,
``horizon``: a number such that nothing up to it is still unread in that
engine's pipe (the highest seq it has read; for a new engine, the last seq
seen before it registered, since engines join the task channel only after
registering).  Then a request that no engine has read and whose seq is at or
below every live engine's horizon is in no live engine's pipe: it went to one
that died (or left), and it never started.  Those are the orphans.

When an engine is idle, its horizon stops moving and nothing above it can be
decided.  The Hub then sends *probes* through the relay (cheap signed
messages engines only acknowledge): each probe lands in some live engine's
pipe and, once read, moves that engine's horizon.

This class is the bookkeeping only, with no sockets, so it is tested alone.
"""

from __future__ import annotations

import bisect
import time

#: seconds between the times kept of when requests were seen (see LoadTracker.seen)
_SEEN_STEP = 0.01


class LoadTracker:
    """Numbers load-balanced requests, tracks what engines read, finds orphans."""

    def __init__(self) -> None:
        self.seq = 0
        #: msg_id -> seq of requests no engine has read yet, in seq order
        self.unread: dict[str, int] = {}
        #: when requests were seen: (first seq, monotonic time), one entry per
        #: _SEEN_STEP seconds rather than one per request (a burst holds 100,000s of
        #: them; the probe delay they decide is 0.25 s): seqs and times, in order
        self._seen_seq: list[int] = []
        self._seen_at: list[float] = []
        #: engine uuid -> horizon (see the module's docstring)
        self.horizon: dict[str, int] = {}
        #: engines whose horizon is not known yet (re-registered after a controller restart)
        self.unknown: set[str] = set()
        #: receipts that arrived before the monitor copy of their request
        self._early: dict[str, str] = {}

    # -- events ----------------------------------------------------------------

    def sent(self, msg_id: str, now: float | None = None) -> int:
        """A request's copy came off the monitor; returns its seq."""
        self.seq += 1
        # a new try of a request seen before goes to the end: ``unread`` stays in seq order
        self.unread.pop(msg_id, None)
        reader = self._early.pop(msg_id, None)
        if reader is not None:
            self._advance(reader, self.seq)
        else:
            self.unread[msg_id] = self.seq
            now = time.monotonic() if now is None else now
            if not self._seen_at or now - self._seen_at[-1] >= _SEEN_STEP:
                self._seen_seq.append(self.seq)
                self._seen_at.append(now)
        return self.seq

    def read(self, uuid: str, msg_id: str, seq: int | None) -> None:
        """Engine ``uuid`` has read request ``msg_id`` (numbered ``seq``, None if not seen)."""
        if seq is None:
            entry = self.unread.get(msg_id)
            if entry is None:
                # the copy is still on its way (or was never ours): apply it when it comes
                if len(self._early) < 100_000:
                    self._early[msg_id] = uuid
                return
            seq = entry
        self.unread.pop(msg_id, None)
        self._advance(uuid, seq)

    def advance(self, uuid: str, seq: int) -> None:
        """Engine ``uuid`` has read every request up to ``seq`` that went to it (what
        reads of requests numbered up to ``seq`` tell, in one call: a batch's replies)."""
        self._advance(uuid, seq)

    def _advance(self, uuid: str, seq: int) -> None:
        if uuid in self.horizon:
            if seq > self.horizon[uuid]:
                self.horizon[uuid] = seq
        elif uuid in self.unknown:
            self.unknown.discard(uuid)
            self.horizon[uuid] = seq

    def engine_added(self, uuid: str, fresh: bool = True) -> None:
        """An engine registered.  ``fresh``: it joins the task channel only now."""
        if fresh:
            self.horizon[uuid] = self.seq
        else:
            self.unknown.add(uuid)

    def engine_removed(self, uuid: str) -> None:
        self.horizon.pop(uuid, None)
        self.unknown.discard(uuid)

    def forget(self, msg_id: str) -> None:
        """The request is settled some other way (e.g. answered): stop tracking it."""
        self.unread.pop(msg_id, None)

    # -- decisions ---------------------------------------------------------------

    def orphans(self) -> list[str]:
        """Unread requests that are in no live engine's pipe; they are forgotten here."""
        if not self.unread or self.unknown:
            return []
        floor = min(self.horizon.values()) if self.horizon else self.seq
        out: list[str] = []
        for msg_id, seq in self.unread.items():
            if seq > floor:
                break
            out.append(msg_id)
        for msg_id in out:
            del self.unread[msg_id]
        return out

    def needs_probe(self, older_than: float, now: float | None = None) -> bool:
        """True when the oldest unread request is older than ``older_than`` seconds and
        undecided: some live engine has to read further before it can be settled."""
        if not self.unread:
            self._seen_seq.clear()
            self._seen_at.clear()
            return False
        seq = next(iter(self.unread.values()))
        # when the oldest unread request was seen: the time kept for the last seq at or
        # below its own (up to _SEEN_STEP before it); the entries before that one go
        i = bisect.bisect_right(self._seen_seq, seq) - 1
        if i > 0:
            del self._seen_seq[:i], self._seen_at[:i]
            i = 0
        if not (self.horizon or self.unknown):
            return False
        seen = self._seen_at[i] if i >= 0 else -float("inf")
        now = time.monotonic() if now is None else now
        return now - seen > older_than
