"""How fast the history answers at 1,000,000 tasks: every kind of query, median of runs.

Fills a SQLite history database through ``TaskStore.write`` (batches, as the
Hub writes them) with realistic rows: 16 engines, 5 clients, 8 labels (and
unlabelled tasks), ~3% errors and a few other endings, log-normal
durations, a day of submissions, output on one task in five, small
payloads.  Then times each query kind (median of ``--runs``) and prints a
Markdown table; ``--plans`` adds SQLite's EXPLAIN QUERY PLAN of the history
queries.

    python bench/history_queries.py                 # 1,000,000 rows in a temp dir
    python bench/history_queries.py --rows 100000 --db /tmp/h.db --keep

The database is reused when ``--db`` names an existing file with enough rows.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monq.hub.store import TaskStore

ENGINES = 16
CLIENTS = [f"client-{i:02d}" for i in range(5)]
LABELS = ["etl", "train", "score", "render", "fetch", "report", "clean", "index", None]
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega batch item "
         "loaded wrote rows file cache retry warmup").split()
T0 = 1_700_000_000.0
DAY = 86_400.0


def fill(store: TaskStore, n: int, batch: int = 5000, seed: int = 1) -> float:
    """Write ``n`` finished tasks (and a few unfinished); return rows/s."""
    rnd = random.Random(seed)
    t = time.perf_counter()
    for start in range(0, n, batch):
        rows = [_row(rnd, i, n) for i in range(start, min(n, start + batch))]
        store.write(rows, [])
    return n / (time.perf_counter() - t)


def _row(rnd: random.Random, i: int, n: int) -> dict[str, Any]:
    submitted = T0 + DAY * i / n + rnd.random() * 0.01
    started = submitted + rnd.expovariate(50)
    duration = rnd.lognormvariate(math.log(0.2), 1.2)  # median 0.2 s, 1% over ~3.3 s
    r = rnd.random()
    status = ("error" if r < 0.03 else "timeout" if r < 0.035 else "aborted" if r < 0.037
              else "lost" if r < 0.038 else "ok")
    row: dict[str, Any] = {
        "msg_id": f"{rnd.getrandbits(128):032x}", "status": status,
        "client": rnd.choice(CLIENTS), "engine": rnd.randrange(ENGINES),
        "queue": "task", "label": rnd.choice(LABELS), "func": "jobs.step",
        "submitted": submitted, "started": started, "completed": started + duration,
        "received": started + duration + 0.001, "request": rnd.randbytes(32),
        "result": rnd.randbytes(32) if status == "ok" else None,
    }
    if i >= n - 20:  # the tail still runs
        row.update(status="running", completed=None, received=None, result=None)
    if rnd.random() < 0.2:
        row["stdout"] = (f"processed item {i} in batch {i // 1000}: "
                         + " ".join(rnd.choices(WORDS, k=8)) + "\n")
    if status == "error":
        ename = rnd.choice(["ValueError", "KeyError", "ZeroDivisionError"])
        row.update(ename=ename, evalue=f"bad input {i}",
                   traceback=f"Traceback (most recent call last):\n  File \"jobs.py\", "
                             f"line {rnd.randrange(1, 300)}, in step\n{ename}: bad input {i}")
    if i == n // 2:
        row["stdout"] = "needle: xylophone-quartz happened here\n"
    return row


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float, Any]:
    """Median milliseconds of ``runs`` calls (after one warm-up), wall-clock and this
    process's CPU (what a shared machine's neighbours do not inflate as much), and the
    last answer."""
    out = fn()
    times, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return statistics.median(times), statistics.median(cpu), out


def queries(s: TaskStore) -> list[tuple[str, Callable[[], Any]]]:
    hour = T0 + DAY / 2
    page2 = s.history_page(limit=100)[1]
    deep: Any = None
    for _ in range(50):
        deep = s.history_page(limit=100, cursor=deep)[1]
    dur_cursor = s.history_page(limit=100, order="-duration")[1]
    search_cursor = s.history_page(limit=100, search="sigma omega")[1]
    listing = _Listing(s, since=hour, until=hour + 60)
    return [
        ("history, no filter, limit 100", lambda: s.history(limit=100)),
        ("status=error, limit 100", lambda: s.history(status="error", limit=100)),
        ("status in (timeout, lost), limit 100",
         lambda: s.history(status=["timeout", "lost"], limit=100)),
        ("engine=3, limit 100", lambda: s.history(engine=3, limit=100)),
        ("client, limit 100", lambda: s.history(client=CLIENTS[2], limit=100)),
        ("label=train, limit 100", lambda: s.history(label="train", limit=100)),
        ("status+engine+label, limit 100",
         lambda: s.history(status="error", engine=3, label="train", limit=100)),
        ("msg_id prefix 'ab1', limit 100", lambda: s.history(msg_id="ab1", limit=100)),
        ("submitted in one hour, limit 100",
         lambda: s.history(since=hour, until=hour + 3600, limit=100)),
        ("started in one hour, limit 100",
         lambda: s.history(started_since=hour, started_until=hour + 3600, limit=100)),
        ("started in one hour, order -started, limit 100",
         lambda: s.history(started_since=hour, started_until=hour + 3600, order="-started",
                           limit=100)),
        # the whole-cluster benchmark's c.history(since=t, until=t + 60): every full record
        # of a minute, as the Hub answers it (query, reply content, signed JSON frames)
        # and as the client reads the reply (verify, decode, TaskRecords)
        ("submitted in one minute, all rows: Hub reply", listing.hub),
        ("submitted in one minute, all rows: client decode", listing.client),
        ("completed in one hour, limit 100",
         lambda: s.history(completed_since=hour, completed_until=hour + 3600, limit=100)),
        ("completed in one minute, limit 100",
         lambda: s.history(completed_since=hour, completed_until=hour + 60, limit=100)),
        ("duration >= 5 s, limit 100", lambda: s.history(min_duration=5.0, limit=100)),
        ("duration >= 5 s, order -duration, limit 100",
         lambda: s.history(min_duration=5.0, order="-duration", limit=100)),
        ("duration <= 1 ms, limit 100", lambda: s.history(max_duration=0.001, limit=100)),
        ("cursor page 2 (100 rows)", lambda: s.history_page(limit=100, cursor=page2)),
        ("cursor page 51 (100 rows)", lambda: s.history_page(limit=100, cursor=deep)),
        ("cursor page 2, order -duration",
         lambda: s.history_page(limit=100, order="-duration", cursor=dur_cursor)),
        ("count all", lambda: s.count()),
        ("count status=error", lambda: s.count(status="error")),
        ("count label=train in one hour",
         lambda: s.count(label="train", since=hour, until=hour + 3600)),
        ("group by status", lambda: s.task_stats("status")),
        ("group by engine", lambda: s.task_stats("engine")),
        ("group by label", lambda: s.task_stats("label")),
        ("group by minute, one hour", lambda: s.task_stats("minute", since=hour,
                                                            until=hour + 3600)),
        ("group by minute, whole day", lambda: s.task_stats("minute")),
        ("percentiles p50/p90/p99, all", lambda: s.duration_percentiles()),
        ("percentiles per engine (16)", lambda: s.duration_percentiles(by="engine")),
        ("percentiles per label (9)", lambda: s.duration_percentiles(by="label")),
        ("percentiles, status=error", lambda: s.duration_percentiles(status="error")),
        ("search rare word (FTS5), limit 100",
         lambda: s.history(search="xylophone", limit=100)),
        ("search 2 words (FTS5), limit 100",
         lambda: s.history(search="sigma omega", limit=100)),
        ("search + status=error (FTS5), limit 100",
         lambda: s.history(search="ZeroDivisionError", status="error", limit=100)),
        ("count search rare word (FTS5)", lambda: s.count(search="xylophone")),
        ("search 2 words (FTS5), cursor page 2",
         lambda: s.history_page(limit=100, search="sigma omega", cursor=search_cursor)),
        # what bench/measure.py's hist_db_query_engine_ms asks (through a Client there)
        ("db_query engine=0, completed in 10 min",
         lambda: s.db_query({"engine": 0, "completed": {"$gte": hour, "$lt": hour + 600}},
                            keys=["msg_id", "status", "completed"])),
    ]


class _Listing:
    """A history_request answered the Hub's way (monq.hub.hub.Hub._q_history and _reply)
    and read the client's way (monq.client.Client.history), timed apart."""

    def __init__(self, s: TaskStore, **filters: Any) -> None:
        from monq.protocol import Session

        self.s, self.filters = s, filters
        self.hub_session, self.client_session = Session(b"k" * 32), Session(b"k" * 32)
        self.frames = self.hub()

    def hub(self) -> list[Any]:
        records, cursor = self.s.history_page(limit=None, order="-submitted", **self.filters)
        content = {"status": "ok", "records": records, "next_cursor": cursor}
        self.frames = self.hub_session.serialize("history_reply", "hub", content,
                                                 parent={"msg_id": "q"})[1]
        return records

    def client(self) -> list[Any]:
        from monq.protocol import ReplayGuard
        from monq.records import TaskRecord

        self.client_session.replay = ReplayGuard()  # the same reply, read again
        msg = self.client_session.feed([bytes(f) for f in self.frames])
        return [TaskRecord.from_row(r) for r in msg.content["records"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--db", type=Path, default=None, help="database file (default: a temp dir)")
    p.add_argument("--plans", action="store_true", help="print the query plans")
    p.add_argument("--like", action="store_true", help="also time the LIKE search fallback")
    a = p.parse_args(argv)
    tmp = None
    if a.db is None:
        tmp = tempfile.TemporaryDirectory()
        a.db = Path(tmp.name) / "history.db"
    url = f"sqlite:///{a.db}"
    with TaskStore(url) as s:
        have = s.total_tasks()
        if have < a.rows:
            if have:
                print(f"{a.db} has {have} rows, fewer than {a.rows}: use another --db",
                      file=sys.stderr)
                return 2
            print(f"writing {a.rows:,} tasks to {a.db} ...", file=sys.stderr, flush=True)
            rate = fill(s, a.rows)
            print(f"write rate: {rate:,.0f} rows/s (batches of 5000, FTS5 on)", file=sys.stderr)
        size = a.db.stat().st_size / 1e6
        print(f"\n{s.total_tasks():,} tasks, {size:,.0f} MB, SQLite, median of {a.runs} runs\n")
        print("| query | ms | CPU ms | rows |")
        print("|---|---:|---:|---:|")
        slow = []
        for name, fn in queries(s):
            ms, cpu, out = timed(fn, a.runs)
            n = len(out[0]) if isinstance(out, tuple) else (
                len(out) if isinstance(out, list) else out)
            print(f"| {name} | {ms:.1f} | {cpu:.1f} | {n} |", flush=True)
            if ms > 50:
                slow.append(name)
        if a.plans:
            print()
            for label, kw in [("status", {"status": "error"}), ("engine", {"engine": 3}),
                              ("label", {"label": "train"}), ("client", {"client": CLIENTS[0]}),
                              ("msg_id", {"msg_id": "ab1"}),
                              ("started", {"started_since": T0, "started_until": T0 + 60}),
                              ("started, 1 h", {"started_since": T0 + DAY / 2,
                                                "started_until": T0 + DAY / 2 + 3600}),
                              ("status+engine+label", {"status": "error", "engine": 3,
                                                       "label": "train"}),
                              ("min_duration", {"min_duration": 5.0}),
                              ("search", {"search": "xylophone"})]:
                print(label, s.explain(s.history_statement(**kw)))
    if a.like:
        with TaskStore(url, fts=False) as s:
            ms, cpu, out = timed(lambda: s.history(search="xylophone", limit=100), a.runs)
            print(f"| search rare word (LIKE fallback), limit 100 | {ms:.1f} | {cpu:.1f} | "
                  f"{len(out)} |")
    if tmp is not None:
        tmp.cleanup()
    if slow:
        print(f"\nover 50 ms: {', '.join(slow)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
