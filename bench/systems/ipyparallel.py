"""ipyparallel 9: ``ipp.Cluster`` with its Hub on the SQLite backend, lview / dview.

The controller runs with ``--sqlitedb`` (``IPController.db_class = SQLiteDB``;
its default is an in-memory DictDB), so that, like monq's, its Hub records
every task in SQLite.  ipyparallel has no ``history()``: its equivalents
are ``db_query`` calls, and what it cannot do in the database (sort and
limit) the client does, as a user would have to.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import ipyparallel as ipp
import numpy as np
from common import RSSSampler, chunks, make_funcs, median_time, time_calls, timed

from systems.base import System

#: history at ipyparallel's pace: at least 1/50 of monq's rows in its DB (20,000 for 1M;
#: the count actually used is reported)
HISTORY_FRACTION = 50
#: rows the time-range query and the per-engine query return, as monq's do at 1M tasks/day
RANGE_ROWS = 700
ENGINE_ROWS = 870


class Adapter(System):
    name = "ipyparallel"

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.cluster: Any = None
        self.rc: Any = None
        self.noop, self.ident, self.fail = make_funcs()

    def start(self, n: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ipp-bench-"))
        self.n = n
        self.cluster = ipp.Cluster(
            n=n, profile_dir=str(self.dir), cluster_id="bench", log_level=logging.WARNING,
            controller_args=["--sqlitedb", f"--SQLiteDB.location={self.dir}"])
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(n, timeout=120)
        # the task bodies are made in a function: ship them by value, as monq does
        self.rc[:].use_cloudpickle().get(60)
        self.lb = self.rc.load_balanced_view()
        self.direct = self.rc[self.rc.ids[0]]

    def stop(self) -> None:
        try:
            if self.rc is not None:
                self.rc.close()
            if self.cluster is not None:
                self.cluster.stop_cluster_sync()
        finally:
            self.rc = self.cluster = None
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)

    def versions(self) -> dict[str, str]:
        return {"ipyparallel": version("ipyparallel"), "pyzmq": version("pyzmq")}

    def hub_pid(self) -> int | None:
        return getattr(self.cluster.controller, "pid", None) if self.cluster else None

    def noop_latency(self, kind: str, n: int) -> list[float]:
        view = self.lb if kind == "lb" else self.direct
        return time_calls(lambda: view.apply_sync(self.noop), n)

    def _recorded_since(self, since: datetime, n: int) -> int:
        """Tasks submitted since ``since`` that the Hub has recorded as completed."""
        q = {"submitted": {"$gte": since}, "completed": {"$ne": None}}
        deadline = time.monotonic() + 30
        while True:  # the Hub records results as its monitor sees them: let it catch up
            found = len(self.rc.db_query(q, keys=["completed"]))
            if found >= n or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def throughput(self, n: int) -> dict[str, Any]:
        since = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        ars = [self.lb.apply_async(self.noop) for _ in range(n)]
        for ar in ars:
            ar.get(600)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "recorded": self._recorded_since(since, n)}

    def map(self, n: int) -> float:
        size = len(chunks(n, self.n)[0])
        t0 = time.perf_counter()
        out = self.lb.map_async(abs, range(n), chunksize=size).get(600)
        seconds = time.perf_counter() - t0
        assert len(out) == n
        return seconds

    def roundtrip(self, nbytes: int, repeat: int) -> float:
        arr = np.ones(nbytes // 8)
        assert self.lb.apply_sync(self.ident, arr).shape == arr.shape
        return median_time(lambda: self.lb.apply_sync(self.ident, arr), repeat)

    def history(self, rows: int, repeat: int) -> dict[str, Any]:
        """db_query over the Hub's SQLite DB after every task this run sent (topped up to
        rows / HISTORY_FRACTION no-ops, 1 % of them failing)."""
        want = max(1000, rows // HISTORY_FRACTION)
        have = len(self.rc.hub_history())
        bad = [self.lb.apply_async(self.fail, 0) for _ in range(max(20, want // 100))]
        ok = [self.lb.apply_async(self.noop) for _ in range(max(0, want - have - len(bad)))]
        for ar in ok + bad:
            ar.wait(600)
        total = len(self.rc.hub_history())
        self._recorded_since(datetime.fromtimestamp(0, timezone.utc), total)
        every = {"msg_id": {"$ne": None}}  # an empty query is an SQL error in ipyparallel
        subs = sorted(r["submitted"] for r in self.rc.db_query(every, keys=["submitted"]))
        done = sorted(r["completed"] for r in self.rc.db_query(
            {"completed": {"$ne": None}}, keys=["completed"]))
        mid = len(subs) // 2
        s_lo, s_hi = subs[mid], subs[min(len(subs) - 1, mid + RANGE_ROWS)]
        span = ENGINE_ROWS * self.n
        c_lo, c_hi = done[len(done) // 2], done[min(len(done) - 1, len(done) // 2 + span)]
        engine0 = self.rc._engines[self.rc.ids[0]]
        listed = ["msg_id", "client_uuid", "engine_uuid", "queue", "submitted", "started",
                  "completed", "received", "error", "stdout", "stderr", "label"]

        def errors_newest_100() -> list[dict[str, Any]]:
            found = self.rc.db_query({"error": {"$ne": None}}, keys=listed)
            return sorted(found, key=lambda r: r["submitted"], reverse=True)[:100]

        queries = {
            "error_limit100": errors_newest_100,
            "time_range_60s": lambda: self.rc.db_query(
                {"submitted": {"$gte": s_lo, "$lt": s_hi}}, keys=listed),
            "db_query_engine": lambda: self.rc.db_query(
                {"engine_uuid": engine0, "completed": {"$gte": c_lo, "$lt": c_hi}},
                keys=["msg_id", "completed"]),
        }
        out: dict[str, Any] = {"rows": total, "how": f"db_query over ipyparallel's SQLite DB "
                               f"after the {total} tasks of this run"}
        time.sleep(2.5)  # its SQLiteDB commits every 2 s: let the file hold everything
        db = Path(self.dir or ".") / "tasks.db"
        out["db_bytes_per_task"] = os.path.getsize(db) / total if db.exists() else None
        with RSSSampler(self.hub_pid() or os.getpid()) as rss:
            for name, q in queries.items():
                out[f"{name}_rows"] = len(q())
                out[f"{name}_s"] = statistics.median(timed(q) for _ in range(repeat))
            out["hub_rss"] = rss.stop()
        return out
