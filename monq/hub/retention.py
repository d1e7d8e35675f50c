"""Retention: how the Hub keeps its history within ``--retain``, ``--max-tasks``, ``--max-bytes``.

The Hub calls :meth:`Retention.tick` from its loop.  Each call does at most
one bounded chunk of work (a few thousand rows, one transaction) and says
when it wants to run again: soon while there is more to do, every
``interval`` seconds otherwise; so a history far over its limits is
brought back in small steps between messages and the loop never stalls.

What goes first: payloads before metadata.  Over ``max_bytes``, the
payloads (request and result) of the oldest finished tasks are dropped
first (their sizes stay, and ``payload_evicted`` says when); only when no
payload is left are whole records deleted, oldest first.  ``retain`` and
``max_tasks`` delete whole finished records, oldest completed first.
Pending and running tasks are never touched.

``--max-bytes`` compares a running total of the records' ``stored_bytes``:
counted once (one SUM over the table, the first time the limit is checked)
and then kept up to date by the store's own writes, evictions and deletes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from monq.hub.store import TaskStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    """Limits on the history; None means no limit."""

    #: delete finished tasks completed longer ago than this many seconds
    retain: float | None = None
    #: keep at most this many tasks (the oldest finished ones go)
    max_tasks: int | None = None
    #: keep the records' stored bytes (payloads and captured text) under this
    max_bytes: int | None = None
    #: rows per step
    chunk: int = 2000
    #: seconds between checks when within the limits
    interval: float = 2.0

    def __post_init__(self) -> None:
        for name in ("retain", "max_tasks", "max_bytes"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"retention: {name} must be >= 0, not {v}")
        if self.chunk < 1 or self.interval <= 0:
            raise ValueError("retention: chunk must be >= 1 and interval > 0")

    @property
    def active(self) -> bool:
        return not (self.retain is None and self.max_tasks is None and self.max_bytes is None)


@dataclass
class StepResult:
    evicted: int = 0
    deleted: int = 0
    more: bool = False


class Retention:
    """Applies a :class:`RetentionPolicy` to a store, one bounded step at a time."""

    def __init__(self, store: TaskStore, policy: RetentionPolicy,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock
        self.monotonic = monotonic
        self.next_run = 0.0  # at once: a restarted Hub catches up
        self.evicted = 0
        self.deleted = 0
        self._last = -1.0

    def tick(self) -> StepResult | None:
        """Run one step if it is due; None if it was not."""
        if not self.policy.active:
            return None
        now = self.monotonic()
        if now < self.next_run and not self._over_bytes():
            return None
        res = self.step()
        self.next_run = self.monotonic() + (0.02 if res.more else self.policy.interval)
        return res

    def _over_bytes(self) -> bool:
        """A big batch pushed the records over --max-bytes: act now, not at the next interval.

        In-memory only (the store's running total), so it costs nothing per loop;
        paced like any step so that a burst is trimmed between messages.
        """
        total = self.store.stored_total_if_known()
        return (self.policy.max_bytes is not None and total is not None
                and total > self.policy.max_bytes and self.monotonic() >= self._last + 0.02)

    def step(self) -> StepResult:
        """One chunk of work: the first limit that is exceeded gets it."""
        p, s, res = self.policy, self.store, StepResult()
        self._last = self.monotonic()
        if p.max_bytes is not None and s.stored_total() > p.max_bytes:
            over = s.stored_total() - p.max_bytes
            res.evicted = s.evict_oldest_payloads(p.chunk, free=over)
            if not res.evicted:  # no payload left: metadata goes, oldest first
                res.deleted = s.delete_oldest(p.chunk, free=over)
            res.more = (res.evicted or res.deleted) > 0 and s.stored_total() > p.max_bytes
        elif p.retain is not None and (n := s.delete_oldest(
                p.chunk, completed_before=self.clock() - p.retain)):
            res.deleted = n
            res.more = n == p.chunk
        elif p.max_tasks is not None:
            excess = s.total_tasks() - p.max_tasks
            if excess > 0:
                res.deleted = s.delete_oldest(min(p.chunk, excess))
                res.more = res.deleted > 0 and excess > res.deleted
        if res.evicted or res.deleted:
            self.evicted += res.evicted
            self.deleted += res.deleted
            log.info("retention: dropped %d payloads and %d records", res.evicted, res.deleted)
        # a step that found one limit satisfied lets the next look at the others
        if not res.more and (res.evicted or res.deleted):
            res.more = True
        return res
