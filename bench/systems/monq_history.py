"""monq's history at scale: a database of ``rows`` tasks, queried through a live controller.

How the database is made (fast, and honest about what a row holds):

1. The running bench cluster runs 200 no-ops and 20 failing tasks; their
   rows, as its Hub wrote them (request and result payloads included), are
   the templates.
2. Those rows are copied ``rows`` times into a fresh SQLite file through
   :meth:`monq.hub.store.TaskStore.write` in batches of 10,000, with new
   msg_ids, 1 % errors, 8 engines, 50 clients and submission times spread
   evenly over 24 hours (about 11.6 tasks/s).
3. A controller with no engines is started on that file
   (``ClusterConfig(db_url=...)``) and a Client times the queries through it:
   the Hub reads the database, serialises the answer and signs it, as it
   would for any user.  Its RSS is sampled during the queries, and its
   VmHWM read at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import RSSSampler, timed

import monq
from monq.cluster import Cluster, ClusterConfig
from monq.hub.store import DERIVED, TaskStore

if TYPE_CHECKING:
    from systems.monq import Adapter

BATCH = 10_000
ENGINES = 8
CLIENTS = 50
SPAN = 24 * 3600.0
ERROR_EVERY = 100


def templates(adapter: Adapter) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(ok rows, error rows) as the bench cluster's Hub recorded them."""
    ok = [adapter.lb.apply_async(adapter.noop) for _ in range(200)]
    bad = [adapter.lb.apply_async(adapter.fail, 0) for _ in range(20)]
    for ar in ok + bad:
        ar.wait(60)
    assert adapter.client is not None
    adapter.client.cluster_status()  # the Hub flushes before it answers
    ids = [ar.msg_ids[0] for ar in ok + bad]
    with TaskStore(f"sqlite:///{adapter.db_path}") as store:
        # as a caller writes them: payloads as bytes (the store may keep them shared), and
        # without the columns the store computes
        found = [store.get_task(i, with_payload=True) for i in ids]
    rows = [{k: v for k, v in r.items() if k not in DERIVED} for r in found if r is not None]
    return ([r for r in rows if r["status"] == "ok"], [r for r in rows if r["status"] == "error"])


def fill(path: Path, rows: int, ok: list[dict[str, Any]], err: list[dict[str, Any]],
         t_end: float) -> float:
    """Write ``rows`` tasks into a new database at ``path``; seconds it took."""
    dt = SPAN / rows
    t0 = time.perf_counter()
    with TaskStore(f"sqlite:///{path}") as store:
        for start in range(0, rows, BATCH):
            batch = []
            for i in range(start, min(rows, start + BATCH)):
                tpl = err[i % len(err)] if i % ERROR_EVERY == ERROR_EVERY - 1 else ok[i % len(ok)]
                shift = (t_end - SPAN + i * dt) - tpl["submitted"]
                row = dict(tpl, msg_id=secrets.token_hex(16), engine=i % ENGINES,
                           engine_uuid=f"engine-{i % ENGINES:04d}-uuid",
                           client=f"client-{(i * CLIENTS) // rows:04d}-session")
                for k in ("submitted", "started", "completed", "received"):
                    if row.get(k) is not None:
                        row[k] += shift
                batch.append(row)
            store.write(batch, [])
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.perf_counter() - t0


def db_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


def run_history(adapter: Adapter, rows: int, repeat: int) -> dict[str, Any]:
    ok, err = templates(adapter)
    home = Path(tempfile.mkdtemp(prefix="monq-bench-history-"))
    path = home / "history.db"
    t_end = time.time()
    out: dict[str, Any] = {"rows": rows, "how": "controller on a filled DB, queried by a Client"}
    cluster = None
    try:
        out["fill_s"] = fill(path, rows, ok, err, t_end)
        out["db_bytes_per_task"] = db_bytes(path) / rows
        cluster = Cluster(ClusterConfig(n=0, home=home, db_url=f"sqlite:///{path}",
                                        log_level="WARNING"))
        cluster.start(timeout=120)
        mid = t_end - SPAN / 2
        with RSSSampler(cluster.pids["controller"]) as rss, \
                monq.Client(connection_file=cluster.connection_file) as c:
            queries: dict[str, Callable[[], Sized]] = {
                "error_limit100": lambda: c.history(status="error", limit=100),
                "time_range_60s": lambda: c.history(since=mid, until=mid + 60),
                "db_query_engine": lambda: c.db_query(
                    {"engine": 0, "completed": {"$gte": mid, "$lt": mid + 600}},
                    keys=["msg_id", "status", "completed"]),
            }
            for name, q in queries.items():
                out[f"{name}_rows"] = len(q())  # warm-up, and what it returns
                out[f"{name}_s"] = statistics.median(timed(q) for _ in range(repeat))
            out["hub_rss"] = rss.stop()
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(home, ignore_errors=True)
    return out
