"""Every read the dashboard makes of the history database, in one place.

The dashboard reads the database directly (SQLite in WAL mode lets a reader
sit beside the Hub's writer), never through the Hub's socket, so a dashboard
can neither slow the Hub down nor need a cluster at all (post-mortem mode).

It answers a :class:`~monq.dashboard.filters.TaskQuery`, whose filters are
named as in the history query API, so switching to that richer API (full-text
search, its own cursors) changes only this file.  Until then, the filters are
built here from :mod:`monq.hub.query`'s clauses and the store's tables, run
on the store's SQLAlchemy engine with LIMIT in the database, so a page costs
the same with ten tasks or ten million.

Resource handling: :class:`HistoryReader` owns its :class:`TaskStore` and
closes it in :meth:`HistoryReader.close` (safe to call twice).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, and_, cast, func, literal, or_, select, true
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql import ColumnElement

from monq.dashboard.filters import QueryError, TaskQuery
from monq.errors import HubError
from monq.hub import query as q
from monq.hub.store import FINISHED, STATUSES, TaskStore, tasks

log = logging.getLogger(__name__)

__all__ = ["HistoryReader", "TaskPage", "group_statuses", "read_only_url"]

#: the longest error value a task list carries (the task view has it whole)
_EVALUE_CHARS = 300
#: full-text search looks in these columns
_SEARCH_COLUMNS = ("msg_id", "label", "func", "ename", "evalue", "traceback", "stdout", "stderr")
_DURATION = (tasks.c.completed - tasks.c.started).label("duration")
_LIST_COLUMNS = [
    tasks.c.msg_id, tasks.c.status, tasks.c.client, tasks.c.engine, tasks.c.queue,
    tasks.c.label, tasks.c.func, tasks.c.submitted, tasks.c.started, tasks.c.completed,
    tasks.c.received, tasks.c.ename, func.substr(tasks.c.evalue, 1, _EVALUE_CHARS).label("evalue"),
    tasks.c.retries, _DURATION,
]
_TASK_COLUMNS = [c for c in tasks.columns
                 if c.name not in q.BLOB_COLUMNS and c.name != "duration"] + [_DURATION]


@dataclass(frozen=True)
class TaskPage:
    """One page of a task list; ``next_cursor`` is None on the last page."""

    tasks: list[dict[str, Any]]
    total: int
    next_cursor: str | None = None
    query: TaskQuery = field(default_factory=TaskQuery)


# -- cursors --------------------------------------------------------------------------
#
# Keyset pagination: a cursor is the sort value and msg_id of a page's last row, so the
# next page starts right after it however many tasks arrive meanwhile (an offset would
# shift under a live cluster and show rows twice).  Rows whose sort value is NULL (a
# pending task has no started time) come last in both directions.


def _encode_cursor(order: str, value: Any, msg_id: str) -> str:
    raw = json.dumps([order, value, msg_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, order: str) -> tuple[Any, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        c_order, value, msg_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise QueryError("cursor is not one this dashboard made") from None
    if c_order != order:
        raise QueryError("cursor belongs to another sort order; start from the first page")
    if not isinstance(msg_id, str) or not (value is None or isinstance(value, (str, int, float))):
        raise QueryError("cursor is not one this dashboard made")
    return value, msg_id


def _sort_expr(key: str) -> Any:
    return _DURATION.element if key == "duration" else tasks.c[key]


def _after(expr: Any, desc: bool, value: Any, msg_id: str) -> ColumnElement[bool]:
    """Rows after (value, msg_id) in the order (expr IS NULL, expr, msg_id), asc or desc."""
    tie = tasks.c.msg_id < msg_id if desc else tasks.c.msg_id > msg_id
    if value is None:
        return and_(expr.is_(None), tie)
    beyond = expr < value if desc else expr > value
    return or_(expr.is_(None), beyond, and_(expr == value, tie))


def _order_by(expr: Any, desc: bool) -> list[Any]:
    # NULLS LAST in both directions, said outright (databases differ in their default);
    # SQLite still walks the column's index for it, so a page of the newest costs a
    # few rows however long the history (an "expr IS NULL" sort key would sort it all)
    if desc:
        return [expr.desc().nulls_last(), tasks.c.msg_id.desc()]
    return [expr.asc().nulls_last(), tasks.c.msg_id.asc()]


# -- the WHERE clause -------------------------------------------------------------------


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _where(query: TaskQuery, dialect: str) -> ColumnElement[bool]:
    try:
        conds: list[ColumnElement[bool]] = [q.history_clause(
            tasks, status=list(query.status) or None, engine=list(query.engine) or None,
            client=query.client, since=query.since, until=query.until, what="dashboard")]
        spec: dict[str, Any] = {}
        if query.label is not None:
            has_glob = any(ch in query.label for ch in "*?")
            spec["label"] = {"$glob": query.label} if has_glob else query.label
        conds.append(q.db_query_clause(tasks, spec, dialect))
    except HubError as e:
        raise QueryError(str(e)) from None
    if query.msg_id is not None:
        # a prefix: LIKE says what matches, the range lets the primary key's index find it
        prefix = query.msg_id
        conds += [tasks.c.msg_id.like(_like_escape(prefix) + "%", escape="\\"),
                  tasks.c.msg_id >= prefix, tasks.c.msg_id < prefix + "\U0010ffff"]
    dur = _DURATION.element
    if query.min_duration is not None:
        conds.append(dur >= query.min_duration)
    if query.max_duration is not None:
        conds.append(dur <= query.max_duration)
    if query.search is not None:
        pattern = "%" + _like_escape(query.search) + "%"
        # SQLite's LIKE ignores ASCII case by itself; elsewhere ILIKE (lower() on both sides)
        match = "like" if dialect == "sqlite" else "ilike"
        conds.append(or_(*(getattr(tasks.c[c], match)(pattern, escape="\\")
                           for c in _SEARCH_COLUMNS)))
    return and_(true(), *conds)


# -- the reader ---------------------------------------------------------------------------


def read_only_url(url: str) -> str:
    """The URL of the same database opened read-only, where the driver allows it.

    A SQLite file opens with ``mode=ro``: the dashboard cannot write to a
    history, and a mistyped path fails instead of creating an empty database.
    Other databases are returned as they are (grant the dashboard a read-only
    role there).
    """
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.query.get("uri"):
        return url
    db = u.database
    if not db or db == ":memory:":
        return url
    path = Path(db).expanduser().resolve()
    if not path.is_file():
        raise QueryError(f"no database file at {path}")
    return f"sqlite:///file:{urllib.parse.quote(str(path))}?mode=ro&uri=true"


class HistoryReader:
    """Read-only access to a history database: task pages, one task, counts, throughput.

    Thread-safe: the web server calls it from a pool of threads, and each
    call takes its own pooled connection.

    Counting every task by status and engine reads the whole history, so a
    count is reused for ``count_backoff`` times as long as it took (at least
    ``min_count_age`` seconds): on a long history the page's tallies lag a
    little rather than keep a core busy.
    """

    def __init__(self, url: str, *, read_only: bool = True, min_count_age: float = 2.0,
                 count_backoff: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.min_count_age = min_count_age
        self.count_backoff = count_backoff
        self._clock = clock
        self._counts: tuple[float, dict[str, Any]] | None = None
        self._counts_lock = threading.Lock()
        try:
            self._store = TaskStore(read_only_url(url) if read_only else url)
        except (HubError, SQLAlchemyError) as e:
            raise QueryError(f"cannot open the history database {url}: "
                             f"{str(e).splitlines()[0]}") from e
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._store.close()

    def __enter__(self) -> HistoryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, stmt: Any) -> list[dict[str, Any]]:
        try:
            with self._store.engine.connect() as conn:
                return [dict(r) for r in conn.execute(stmt).mappings()]
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e

    def _scalar(self, stmt: Any) -> Any:
        try:
            with self._store.engine.connect() as conn:
                return conn.execute(stmt).scalar()
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e

    def tasks(self, query: TaskQuery) -> TaskPage:
        """One page of the tasks that match ``query`` (no payloads, error values shortened)."""
        where = _where(query, self._store.dialect)
        desc = query.order.startswith("-")
        key = query.order.lstrip("-")
        expr = _sort_expr(key)
        stmt = select(*_LIST_COLUMNS).where(where)
        if query.cursor is not None:
            value, msg_id = _decode_cursor(query.cursor, query.order)
            stmt = stmt.where(_after(expr, desc, value, msg_id))
        stmt = stmt.order_by(*_order_by(expr, desc)).limit(query.limit + 1)
        rows = self._rows(stmt)
        total = int(self._scalar(select(func.count()).select_from(tasks).where(where)) or 0)
        next_cursor = None
        if len(rows) > query.limit:
            rows = rows[: query.limit]
            last = rows[-1]
            next_cursor = _encode_cursor(query.order, last[key], last["msg_id"])
        return TaskPage(rows, total, next_cursor, query)

    def task(self, msg_id: str) -> dict[str, Any] | None:
        """Everything recorded about one task but its payloads (their sizes are kept)."""
        rows = self._rows(select(*_TASK_COLUMNS).where(tasks.c.msg_id == msg_id))
        return rows[0] if rows else None

    def counts(self) -> dict[str, Any]:
        """``{"status": {status: n}, "engine": {id: {status: n}}}``, recent enough (see above)."""
        with self._counts_lock:
            now = self._clock()
            if self._counts is not None and now < self._counts[0]:
                return self._counts[1]
            found = self._store.counts()
            took = self._clock() - now
            self._counts = (now + max(self.min_count_age, self.count_backoff * took), found)
            return found

    def engines(self) -> list[dict[str, Any]]:
        """Every engine the database knows, with its task counts by status."""
        counts = self.counts().get("engine", {})
        out = []
        for e in self._store.engines():
            done = counts.get(e["id"], {})
            out.append({**e, "counts": done})
        return out

    def status_counts(self) -> dict[str, int]:
        """How many tasks are in each status."""
        return dict(self.counts().get("status", {}))

    def last_completed(self) -> float | None:
        """When the latest task finished (post-mortem charts end there), or None."""
        found = self._scalar(select(func.max(tasks.c.completed)))
        return None if found is None else float(found)

    def throughput(self, end: float, window: float, bucket: float) -> list[dict[str, Any]]:
        """Tasks finished per bucket of ``bucket`` seconds in [end - window, end).

        One point per bucket, oldest first, empty buckets included:
        ``{"t": bucket start, "ok": n, "failed": n}`` (failed: any other end).
        """
        if bucket <= 0 or window <= 0 or window / bucket > 2000:
            raise QueryError("throughput: window / bucket must give 1 to 2000 buckets")
        first = math.floor((end - window) / bucket)
        last = math.floor(end / bucket)
        # CAST truncates; completed times are positive, so that is floor()
        b = cast(tasks.c.completed / literal(bucket), Integer).label("b")
        ok = (tasks.c.status == "ok").label("ok")
        stmt = (select(b, ok, func.count().label("n"))
                .where(tasks.c.completed >= first * bucket, tasks.c.completed < (last + 1) * bucket,
                       tasks.c.status.in_(FINISHED), tasks.c.status != "resubmitted")
                .group_by(b, ok))
        points = {i: {"t": i * bucket, "ok": 0, "failed": 0} for i in range(first, last + 1)}
        for r in self._rows(stmt):
            p = points.get(int(r["b"]))
            if p is not None:
                p["ok" if r["ok"] else "failed"] += int(r["n"])
        return [points[i] for i in sorted(points)]


def group_statuses(counts: Mapping[str, int], names: Sequence[str] = STATUSES) -> dict[str, int]:
    """Counts for every known status, zeros included, in the lifecycle's order."""
    return {s: int(counts.get(s, 0)) for s in names}
