"""The cluster's state right now: engines with their state and load, queue depth, counts.

When a cluster runs for the profile, :class:`ClusterWatch` asks its Hub
through a monq :class:`~monq.client.Client` (``cluster_status()``, which holds
the engines, their queues and the task counts).  Without one — post-mortem,
or a cluster that stopped while the dashboard ran — the same overview is
built from the database's engines table and task counts, so the page looks
the same either way and says which it shows.

Resource handling: a :class:`ClusterWatch` owns the Client it opens and
closes it in :meth:`ClusterWatch.close` (safe to call twice).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monq.connection import load_connection_file
from monq.dashboard.data import HistoryReader, group_statuses
from monq.errors import MonqError

log = logging.getLogger(__name__)

__all__ = ["ClusterWatch", "overview"]

#: statuses that count as a failure in an engine's tally
_FAILED = ("error", "aborted", "timeout", "lost")


class ClusterWatch:
    """A Client of the profile's cluster, opened when one runs and reopened after a restart.

    Calls come from the web server's thread pool; one lock makes them take
    turns on the Client, and a status is reused for ``backoff`` times as long
    as the Hub took to answer (at least ``max_age`` seconds), so ten open tabs
    cost the Hub what one does, and a Hub slowed by a long history (its
    status counts every task) spends at most about 1/``backoff`` of its time
    answering the dashboard.
    """

    def __init__(self, connection_file: Path, db_url: str, *, max_age: float = 1.0,
                 backoff: float = 20.0, retry: float = 3.0, timeout: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.connection_file = connection_file
        self.db_url = db_url
        self.max_age = max_age
        self.backoff = backoff
        self.retry = retry
        self.timeout = timeout
        self.error: str | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._client: Any = None
        self._next_try = 0.0
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._closed = False

    def _connect(self) -> Any:
        info = load_connection_file(self.connection_file)  # NoClusterError when none runs
        if info.db_url and info.db_url != self.db_url:
            raise MonqError(f"the running cluster records into {info.db_url}, "
                            f"not this dashboard's database")
        from monq.client import Client  # only when a cluster runs: it is a heavy import

        return Client(connection_file=self.connection_file, timeout=self.timeout,
                      query_timeout=self.timeout)

    def status(self) -> dict[str, Any] | None:
        """The Hub's ``cluster_status()``, or None (and :attr:`error`) when none answers."""
        with self._lock:
            if self._closed:
                return None
            now = self._clock()
            if self._cached is not None and now < self._cached[0]:
                return self._cached[1]
            if self._client is None:
                if now < self._next_try:
                    return None
                try:
                    self._client = self._connect()
                except MonqError as e:
                    self._fail(now, e)
                    return None
                except Exception as e:  # a page must outlive whatever a cluster does
                    log.warning("cannot connect to the cluster", exc_info=True)
                    self._fail(now, e)
                    return None
            try:
                st = dict(self._client.cluster_status())
                took = self._clock() - now
            except Exception as e:
                if not isinstance(e, MonqError):
                    log.warning("cluster_status failed", exc_info=True)
                self._drop_client()
                self._fail(now, e)
                return None
            self.error = None
            self._cached = (now + max(self.max_age, self.backoff * took), st)
            return st

    def _fail(self, now: float, e: Exception) -> None:
        self._cached = None
        self._next_try = now + self.retry
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if msg != self.error:
            log.info("no live cluster: %s", msg)
        self.error = msg

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # a broken client must not break the page
                log.debug("closing the dashboard's client failed", exc_info=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_client()


def _engine_state(status: str, running: int, live: bool) -> str:
    if status != "alive":
        return status or "unknown"
    if not live:
        return "unknown"  # the database says alive, but no Hub is there to ask
    return "busy" if running else "idle"


def overview(reader: HistoryReader, watch: ClusterWatch | None) -> dict[str, Any]:
    """Engines, queue depth and task counts, live from the Hub when it answers."""
    st = watch.status() if watch is not None else None
    per_engine = {e["id"]: e.get("counts", {}) for e in reader.engines()}
    live = st is not None
    if st is not None:
        engine_rows = list(st.get("engines") or [])
        counts = dict(st.get("counts") or {})
        queue = {str(k): v for k, v in (st.get("queue") or {}).items()}
    else:
        engine_rows = [{k: v for k, v in e.items() if k != "counts"} for e in reader.engines()]
        counts = reader.status_counts()
        queue = {}
    engines = []
    for e in engine_rows:
        eid = e.get("id")
        qe = queue.get(str(eid), {}) if isinstance(queue.get(str(eid)), dict) else {}
        done = per_engine.get(eid, {})
        running = int(qe.get("tasks", 0)) if live else int(done.get("running", 0))
        queued = int(qe.get("queue", 0)) if live else 0
        status = str(e.get("status") or "")
        engines.append({
            "id": eid, "hostname": e.get("hostname"), "pid": e.get("pid"),
            "status": status, "state": _engine_state(status, running, live),
            "registered": e.get("registered"), "unregistered": e.get("unregistered"),
            "running": running, "queued": queued,
            "ok": int(done.get("ok", 0)),
            "failed": sum(int(done.get(s, 0)) for s in _FAILED),
        })
    unassigned = int(queue.get("unassigned", 0) or 0) if live else int(counts.get("pending", 0))
    return {
        "live": live,
        "cluster_error": None if live or watch is None else watch.error,
        "now": time.time(),
        "engines": engines,
        "queue": {
            "unassigned": unassigned,
            "queued": sum(e["queued"] for e in engines),
            "running": sum(e["running"] for e in engines) if live
            else int(counts.get("running", 0)),
        },
        "counts": group_statuses(counts),
        "last_completed": reader.last_completed(),
        "in_flight": st.get("in_flight") if st is not None else None,
    }
