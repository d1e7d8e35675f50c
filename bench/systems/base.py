"""The interface every system adapter implements; None means "this system cannot do that".

A measuring process (bench/measure.py) drives one adapter: ``start(n)``,
then the measurements, then ``stop()`` in ``finally``.  Timings that need
care (what counts as "done") are taken inside the adapter; the adapter
returns seconds, and bench/measure.py turns them into the reported figures.

Resource handling: the adapter owns every process, client and socket its
``start`` creates and ends them all in ``stop``, which is safe to call twice
and also when ``start`` failed half-way.
"""

from __future__ import annotations

from typing import Any


class System:
    """Defaults: everything unsupported."""

    name = "?"

    def start(self, n: int) -> None:
        """Start ``n`` engines (workers) and connect; return once all are ready."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        """Package versions that matter for this system."""
        return {}

    def hub_pid(self) -> int | None:
        """The process that plays the Hub/scheduler role, for its peak RSS (None: not separate)."""
        return None

    def noop_latency(self, kind: str, n: int) -> list[float] | None:
        """Seconds of each of ``n`` sequential no-op round trips; kind is "lb" or "direct"."""
        return None

    def throughput(self, n: int) -> dict[str, Any] | None:
        """Submit ``n`` no-ops at once and wait for all: {"seconds", "recorded"}."""
        return None

    def map(self, n: int) -> float | None:
        """Seconds to map a trivial function over ``n`` items, end to end."""
        return None

    def roundtrip(self, nbytes: int, repeat: int) -> float | None:
        """Median seconds of an array of ``nbytes`` through an identity function and back."""
        return None

    def pair_roundtrip(self, nbytes: int, repeat: int) -> float | None:
        """The same through a bare zmq pair, no relay (the floor only)."""
        return None

    def history(self, rows: int, repeat: int) -> dict[str, Any] | None:
        """Query latencies over a history of about ``rows`` tasks (see each adapter)."""
        return None
