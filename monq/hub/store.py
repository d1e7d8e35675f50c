"""The task store: the Hub's record of every task and engine, in SQLAlchemy Core.

The Hub thread is the only writer.  It hands :meth:`TaskStore.write` batches
of inserts and updates (a few ms or a few thousand rows' worth) and each
batch is one transaction of a handful of ``executemany`` calls, which is
what keeps SQLite ahead of a busy cluster.  Reads (history, db_query,
counts) filter, sort and limit in the database, so the Hub's memory is
bounded by what a query returns, never by the history.  History pages are
keyset pages; the aggregates live in :mod:`monq.hub.stats`, the schema and
its upgrades in :mod:`monq.hub.schema`, the filters in :mod:`monq.hub.filters`
and :mod:`monq.hub.query`.

Any SQLAlchemy URL works; SQLite gets WAL mode (readers, such as a dashboard
or ``monq history`` in another process, do not block the writer) and a
0600 database file (it holds payloads and tracebacks).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    create_engine,
    event,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import sqltypes

from monq.errors import HubError
from monq.hub import aggregates, payloads, schema
from monq.hub import query as q
from monq.hub.filters import TaskFilter, decode_cursor, encode_cursor
from monq.hub.schema import (
    HAS_PAYLOAD,
    SCHEMA_VERSION,
    engines_table,
    fts_table,
    metadata,
    payloads_table,
    tasks,
)
from monq.hub.stats import TaskStats

log = logging.getLogger(__name__)

__all__ = ["FINISHED", "SCHEMA_VERSION", "STATUSES", "TaskStore", "metadata", "tasks"]

#: statuses a task can end in; only these are ever purged
FINISHED = ("ok", "error", "aborted", "timeout", "lost", "resubmitted")
UNFINISHED = ("pending", "running")
STATUSES = UNFINISHED + FINISHED
#: payload column -> the column that keeps its size when the payload is dropped
PAYLOADS = {"request": "request_bytes", "result": "result_bytes"}
_PAYLOAD_ITEMS = tuple(PAYLOADS.items())
#: captured text: counted in a record's stored_bytes, searched by ``search=``
TEXTS = ("stdout", "stderr", "traceback", "evalue")
#: computed by the store, never written by callers
DERIVED = frozenset({"duration", "stored_bytes", "payload_evicted", "request_key",
                     "result_key"})
_TEXTS = frozenset(TEXTS)
#: payload key column -> its place in a row's state before a batch (aggregates.read_states)
_KEY_AT = (("request_key", aggregates.REQUEST_KEY), ("result_key", aggregates.RESULT_KEY))
#: rows per IN (...) list: SQLite builds before 3.32 allow only 999 bound variables
_CHUNK = 500
#: rows a purge deletes per transaction (retention's default step): each delete recounts
#: the histogram bounds it took (monq.hub.aggregates.refresh_bounds), a walk over the
#: rare statuses' index entries, so fewer, larger chunks cost less
_PURGE_CHUNK = 2000 if sqlite3.sqlite_version_info >= (3, 32) else _CHUNK
#: a range filter matching at most this many rows is read through its own index
_PROBE = 20_000

_TASK_COLUMNS = frozenset(c.name for c in tasks.columns)
_ENGINE_COLUMNS = frozenset(c.name for c in engines_table.columns)
_LISTED = [c for c in tasks.columns if c.name not in q.BLOB_COLUMNS]
_ROWID: Any = literal_column("tasks.rowid")


def _kept(col: str) -> Any:
    """SQL: the bytes of a payload a row keeps, inline or shared (0 if none)."""
    p = payloads_table.c
    shared = select(func.length(p.data)).where(p.key == tasks.c[payloads.KEYS[col]])
    return func.coalesce(func.length(tasks.c[col]), shared.scalar_subquery(), 0)


#: SQL: the payload bytes a row keeps
_KEPT_SIZE = _kept("request") + _kept("result")


class TaskStore(TaskStats):
    """The Hub's database of tasks and engines.

    Resource handling: whoever creates the store owns it and calls
    :meth:`close`; closing twice is safe.  Not meant to be shared between
    threads without care: the Hub thread writes, and reads go through the
    same thread (the engine's pool makes concurrent reads safe, but SQLite
    has one writer at a time).

    ``fts=False`` turns SQLite's full-text index off for this store's
    searches (they use LIKE, as on other databases).
    """

    def __init__(self, url: str, payload_cap: int = 1 << 20, fts: bool = True) -> None:
        if payload_cap < 0:
            raise ValueError(f"payload_cap must be >= 0, not {payload_cap}")
        self.url = url
        self.payload_cap = payload_cap
        self._closed = False
        self._lock = threading.Lock()
        #: write statements compiled once per column set (see _Positional)
        self._statements: dict[tuple[str, frozenset[str]], _Positional | None] = {}
        #: (insert or update, *columns) of rows already checked (see _prepare_all)
        self._shapes: dict[tuple[str, ...], tuple[Any, ...]] = {}
        self._engine = _make_engine(url)
        #: bytes the records keep (payloads and text), once counted; kept up to date by writes
        self._stored_total: int | None = None
        try:
            self.dialect = self._engine.dialect.name
            metadata.create_all(self._engine)
            with self._engine.begin() as conn:
                #: the full-text table exists: every write keeps it in step
                self.fts_table = schema.prepare(conn, url, self.dialect, fts)
            #: searches use it (else escaped LIKE)
            self.fts = self.fts_table and fts
            #: the maintained aggregates (monq.hub.aggregates) are kept and read, payloads
            #: are stored once (monq.hub.payloads) and the time bounds kept: SQLite
            self.aggregates = self.dialect == "sqlite"
            #: the time bounds this store last read or wrote (it is the only writer)
            self._bounds: aggregates.TimeBounds | None = None
            #: the newest submitted time written; see _rowid_slack
            self._top_submitted: float | None = None
            self._pending_top: float | None = None
            if self.aggregates:
                with self._engine.connect() as conn:
                    self._bounds = aggregates.read_time_bounds(conn)
                    top = conn.execute(select(func.max(tasks.c.submitted))).scalar()
                    self._top_submitted = -math.inf if top is None else float(top)
        except SQLAlchemyError as e:
            self._engine.dispose()
            raise HubError(f"cannot open the history database {url}: {e}") from e
        except BaseException:
            self._engine.dispose()
            raise
        log.info("task store open at %s", self._engine.url.render_as_string(hide_password=True))

    def close(self) -> None:
        """Release every pooled connection; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._engine.dispose()

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tests and tools; the store owns and disposes it)."""
        return self._engine

    # -- writes ------------------------------------------------------------------

    def write(self, inserts: Sequence[dict[str, Any]], updates: Sequence[dict[str, Any]]) -> None:
        """Insert new tasks and update known ones, all in ONE transaction.

        ``inserts`` are rows (``msg_id`` required, any other columns);
        ``updates`` are ``msg_id`` plus the columns to change.  Payloads over
        ``payload_cap`` are stored as NULL with their size kept, so callers
        pass blobs blindly.  Rows are grouped by key set and each group is
        one ``executemany``: a batch costs a few statements, not one per row.
        ``duration`` and ``stored_bytes`` are computed here, and the
        maintained aggregates (:mod:`monq.hub.aggregates`) move in the same
        transaction: one SELECT of the updated rows' old keys per 5,000 of them,
        one upsert executemany per aggregate table.
        """
        ins = self._prepare_all(inserts, "insert")
        ups = self._prepare_all(updates, "update")
        if not ins and not ups:
            return
        try:
            with self._engine.begin() as conn:
                bounds = self._write(conn, ins, ups)
        except IntegrityError:
            # A msg_id already stored (a relay copy seen twice, a controller
            # restart): a failed batch must not lose the other rows, so redo
            # it turning those inserts into updates.  Rare, so cost is fine.
            # (_write changed the prepared rows in place: prepare them again)
            # (expected, e.g. an engine's "aborted" reply read after its stop had the task
            # recorded lost: one line, no traceback)
            log.info("task batch hit a msg_id already stored; writing it as updates")
            ins = self._prepare_all(inserts, "insert")
            ups = self._prepare_all(updates, "update")
            with self._engine.begin() as conn:
                ins, extra = self._split_existing(conn, ins)
                bounds = self._write(conn, ins, extra + ups)
        self._bounds = bounds  # committed: only now are they what the database holds
        if self._pending_top is not None:
            self._top_submitted, self._pending_top = self._pending_top, None
        if self._stored_total is not None:
            self._stored_total += sum(r["stored_bytes"] for r in ins) + \
                sum(r["stored_bytes"] for r in ups)

    def _write(self, conn: Connection, ins: list[dict[str, Any]],
               ups: list[dict[str, Any]]) -> aggregates.TimeBounds | None:
        """One batch in ``conn``'s transaction; the time bounds once it commits."""
        bounds = self._bounds
        if self.aggregates:
            # payloads stored once: the rows get keys (in place: they are this batch's
            # own copies, and a retried batch prepares new ones)
            set_payload = [r for r in ups if "request" in r or "result" in r]
            payloads.store_refs(conn, ins + set_payload)
            for r in set_payload:  # what the row held before goes, inline or shared
                for col, kcol in payloads.KEYS.items():
                    if col in r:
                        r.setdefault(kcol, None)
        groups = _by_keys(ups)
        ins_groups = _by_keys(ins)
        deltas = aggregates.batch_deltas(conn, ins_groups, groups) if self.aggregates \
            else None
        # full-text index: forget the old text of rows whose text changes, and
        # index the new text once the rows are written (only rows with text)
        forget, index = self._fts_rows(ins_groups, ups, deltas)
        if forget:
            self._fts_forget(conn, forget)
        if deltas is not None:  # before the rows are in: it reads the newest submitted time
            self._rowid_slack(conn, ins_groups, ups, deltas)
        for rows in ins_groups:
            self._insert(conn, rows)
        self._update(conn, groups)
        if deltas is not None:
            deltas.apply(conn)
            before = deltas.before
            old: list[int | None] = []
            if before:
                released: set[tuple[str, int]] = set()
                for r in ups:
                    b = before.get(r["msg_id"])
                    if b is None:
                        continue
                    for kcol, at in _KEY_AT:
                        k = b[at]
                        if k is not None and kcol in r and (r["msg_id"], at) not in released:
                            released.add((r["msg_id"], at))  # each old reference once
                            old.append(k)
            payloads.forget(conn, old)
            if deltas.gaps:
                bounds = aggregates.merge_time_bounds(conn, deltas.gaps, bounds)
        if index:
            self._fts_index(conn, index)
        return bounds

    def _fts_rows(self, ins_groups: list[list[dict[str, Any]]], ups: list[dict[str, Any]],
                  deltas: aggregates.Deltas | None) -> tuple[list[str], list[str]]:
        """The msg_ids whose full-text entries go before the batch, and those (re)indexed
        after it.

        An update names text columns whenever a task ends (mostly empty
        stdout and stderr): only rows that had text lose their entries, and
        only rows that have text after the batch (had it, or get some) are
        indexed; both statements select exactly those rows anyway, so
        skipping them for the others changes nothing but their cost.
        """
        if not self.fts_table:
            return [], []
        # (inserts come grouped by columns: a group without text columns is skipped whole)
        texted: list[str] = []
        for g in ins_groups:
            cols = [c for c in TEXTS if c in g[0]]
            if cols:  # the group's text columns, read at once per row (this runs per row)
                get = itemgetter(*cols, *cols[:1])  # two at least: a tuple
                texted += [r["msg_id"] for r in g if any(get(r))]
        changed = [r for r in ups if not _TEXTS.isdisjoint(r)]
        if deltas is None:  # no state read: every changed row, as the statements select
            ids = [r["msg_id"] for r in changed]
            return ids, texted + ids
        before = deltas.before
        forget: list[str] = []
        index = texted
        for r in changed:
            msg_id = r["msg_id"]
            b = before.get(msg_id)
            if b is not None and b[aggregates.HAS_TEXT]:
                forget.append(msg_id)
                index.append(msg_id)
            elif _has_text(r):
                index.append(msg_id)
        return forget, index

    def _rowid_slack(self, conn: Connection, ins_groups: list[list[dict[str, Any]]],
                     ups: list[dict[str, Any]], deltas: aggregates.Deltas) -> None:
        """How much later than a task written after it a task may have been submitted.

        Rows get rowids in the order they are written, and submission times
        follow that order up to a slack: for rows a before b (by rowid),
        ``submitted(a) - submitted(b) <= slack``.  Kept in the time bounds
        (key "rowid") and used by searches, whose full-text matches come in
        rowid order (:meth:`_search_walk`).  The newest submitted time is
        read when the store opens and then followed here (it is the one writer); an
        update that moves a submitted time counts against every row.
        """
        top = -math.inf if self._top_submitted is None else self._top_submitted
        slack = -math.inf
        for rows in ins_groups:  # in the order they got their rowids
            if not rows or "submitted" not in rows[0]:
                continue  # (a group's rows have the same columns)
            for r in rows:
                sub = r["submitted"]
                if sub is not None:  # max(slack, top - sub), max(top, sub): this runs per row
                    if top - sub > slack:
                        slack = top - sub
                    if sub > top:
                        top = sub
        moved = [r["submitted"] for r in ups if r.get("submitted") is not None]
        if moved:
            low = conn.execute(select(func.min(tasks.c.submitted))).scalar()
            for sub in moved:
                slack = max(slack, top - sub, sub - (sub if low is None else low))
                top = max(top, sub)
        self._pending_top = top
        if slack > -math.inf:
            deltas.gaps["rowid"] = [slack, 0.0]

    def _fts_forget(self, conn: Connection, ids: list[str]) -> None:
        for chunk in _chunks(ids):
            conn.execute(_FTS_DELETE, {"ids": chunk})

    def _fts_index(self, conn: Connection, ids: list[str]) -> None:
        for chunk in _chunks(ids):
            conn.execute(_FTS_INSERT, {"ids": chunk})

    def _insert(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """One executemany of rows that have the same columns."""
        stmt = self._compiled("insert", rows[0])
        if stmt is None:
            conn.execute(tasks.insert(), rows)
        else:
            stmt.executemany(conn, rows)

    def _update(self, conn: Connection, groups: list[list[dict[str, Any]]]) -> None:
        for rows in groups:
            stmt = self._compiled("update", rows[0])
            if stmt is not None:
                stmt.executemany(conn, rows)
                continue
            cols = _update_columns(rows[0])
            conn.execute(_update_statement(cols), [
                {"b_msg_id": r["msg_id"], "b_stored": r["stored_bytes"],
                 **{k: r[k] for k in cols}} for r in rows])

    def _compiled(self, what: str, row: dict[str, Any]) -> _Positional | None:
        """The statement for rows with ``row``'s columns, compiled once (None: this
        dialect takes SQLAlchemy's own path)."""
        key = (what, frozenset(row))
        try:
            return self._statements[key]
        except KeyError:
            pass
        if what == "insert":
            cols = [c.name for c in tasks.columns if c.name in row]
            stmt: Any = tasks.insert()
            compiled = _Positional.compile(stmt, self._engine.dialect, cols, set(cols))
        else:
            cols = _update_columns(row)
            compiled = _Positional.compile(_update_statement(cols), self._engine.dialect,
                                           None, {*cols, "b_msg_id", "b_stored"},
                                           _UPDATE_KEYS)
        if len(self._statements) >= 256:  # a bound: callers' column sets are few
            self._statements.clear()
        self._statements[key] = compiled
        return compiled

    def _split_existing(self, conn: Connection, ins: list[dict[str, Any]]
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Split inserts into (new rows, updates for msg_ids already in the table or batch)."""
        ids = [r["msg_id"] for r in ins]
        existing: set[str] = set()
        for chunk in _chunks(ids):
            existing.update(conn.execute(
                select(tasks.c.msg_id).where(tasks.c.msg_id.in_(chunk))).scalars())
        fresh: list[dict[str, Any]] = []
        again: list[dict[str, Any]] = []
        for r in ins:
            if r["msg_id"] in existing:
                again.append({k: v for k, v in r.items() if k != "duration"})
            else:
                existing.add(r["msg_id"])
                fresh.append(r)
        return fresh, again

    def _prepare_all(self, rows: Iterable[dict[str, Any]], what: str
                     ) -> list[dict[str, Any]]:
        """Checked copies of ``rows`` (never the caller's), with their sizes and
        ``stored_bytes`` (and an insert's ``duration``).  One call for a batch: this
        runs for every row the Hub writes."""
        shapes = self._shapes
        cap = self.payload_cap
        prepared: list[dict[str, Any]] = []
        append = prepared.append
        last: tuple[str, ...] = ()
        plan: Any = None
        for row in rows:
            if type(row) is not dict or type(row.get("msg_id")) is not str:
                if not isinstance(row, dict) or not isinstance(row.get("msg_id"), str):
                    raise HubError(f"task {what} needs a dict with a string msg_id, "
                                   f"got {row!r:.200}")
            # the columns are checked once per shape of row (the Hub's rows have a few),
            # and what the loop below looks at is the columns this shape has.  Rows come
            # in runs of one shape: the same keys as the row before (the same strings:
            # compared without hashing) need no lookup
            keys = tuple(row)
            if keys != last:
                shape = (what, *keys)
                plan = shapes.get(shape)
                if plan is None:
                    plan = shapes[shape] = self._plan_shape(row, what)
                last = keys
            blobs, texts, has_status, timed = plan
            if has_status and row["status"] not in STATUSES:
                raise HubError(f"task {what} for {row['msg_id']}: unknown status "
                               f"{row['status']!r}; one of {', '.join(STATUSES)}")
            out = dict(row)  # never mutate the caller's row
            stored = 0  # what the row adds to the database: kept payloads and captured text
            for blob, size_col in blobs:
                data = out[blob]
                if data is None:
                    continue
                if type(data) is not bytes:
                    data = bytes(memoryview(data))  # memoryviews and zmq frames, for the driver
                n = len(data)
                if size_col not in out:
                    out[size_col] = n
                if n <= cap:
                    out[blob] = data
                    stored += n
                else:
                    out[blob] = None
            for col in texts:
                text = out[col]
                if text:
                    stored += len(text)
            if timed:
                started, completed = out["started"], out["completed"]
                if started is not None and completed is not None:
                    out["duration"] = completed - started
            # (an update's is added to what the row had), counted before its payloads move
            # to the payloads table
            out["stored_bytes"] = stored
            append(out)
        return prepared

    def _plan_shape(self, row: dict[str, Any], what: str
                    ) -> tuple[list[tuple[str, str]], list[str], bool, bool]:
        """Check a new shape of row (its columns); what :meth:`_prepare_all` does with rows of
        it: (payload columns, text columns, has a status, an insert with both times)."""
        unknown = row.keys() - _TASK_COLUMNS
        if unknown:
            raise HubError(f"task {what} for {row['msg_id']}: unknown columns "
                           f"{', '.join(sorted(unknown))}")
        derived = row.keys() & DERIVED
        if derived:
            raise HubError(f"task {what} for {row['msg_id']}: "
                           f"{', '.join(sorted(derived))} are computed by the store, "
                           "not written")
        if what == "insert" and "status" not in row:
            raise HubError(f"task insert for {row['msg_id']} needs a status")
        if len(self._shapes) >= 256:
            self._shapes.clear()
        return ([(b, size) for b, size in _PAYLOAD_ITEMS if b in row],
                [c for c in TEXTS if c in row], "status" in row,
                what == "insert" and "started" in row and "completed" in row)

    def upsert_engine(self, row: dict[str, Any]) -> None:
        """Insert an engine row, or update the one with the same ``id``."""
        if not isinstance(row.get("id"), int):
            raise HubError(f"engine row needs an integer id, got {row!r:.200}")
        unknown = row.keys() - _ENGINE_COLUMNS
        if unknown:
            raise HubError(f"engine row: unknown columns {', '.join(sorted(unknown))}")
        with self._engine.begin() as conn:
            found = conn.execute(select(engines_table.c.id)
                                 .where(engines_table.c.id == row["id"])).first()
            if found is None:
                conn.execute(engines_table.insert(), row)
            else:
                values = {k: v for k, v in row.items() if k != "id"}
                if values:
                    conn.execute(engines_table.update()
                                 .where(engines_table.c.id == row["id"]).values(values))

    # -- reads --------------------------------------------------------------------

    def engines(self) -> list[dict[str, Any]]:
        """Every engine ever registered, ordered by id."""
        return self._rows(select(engines_table).order_by(engines_table.c.id))

    def max_engine_id(self) -> int:
        """The highest engine id ever handed out, -1 if none (ids are never reused)."""
        with self._engine.connect() as conn:
            found = conn.execute(select(func.max(engines_table.c.id))).scalar()
        return -1 if found is None else int(found)

    def where(self, f: TaskFilter, selective: frozenset[str] = frozenset()) -> Any:
        """The WHERE clause of a filter, for this database (FTS5 or LIKE search)."""
        return q.filter_clause(tasks, f, self.dialect, fts_table if self.fts else None,
                               _ROWID, selective)

    def _selective(self, f: TaskFilter, order: str, search: bool = True,
                   skip: frozenset[str] = frozenset()) -> frozenset[str]:
        """Which range filters match few rows (their index beats the sort order's).

        A bounded count on each one's own index (at most :data:`_PROBE` + 1
        rows stepped): SQLite's planner cannot tell "took more than 5 s"
        (rare) from "took more than 1 ms" (most), and walking the submitted
        index past a million rows to find none is the slow case.
        """
        if self.dialect != "sqlite":
            return frozenset()
        key, _ = q.parse_order(order)
        out = set()
        for name, cond in q.range_probes(tasks, f).items():
            if name == key or name in skip:
                continue  # sorting by it already reads its index; or the caller knows
            probe = select(func.count()).select_from(
                select(tasks.c[name]).where(cond).limit(_PROBE + 1).subquery())
            if int(self._scalar(probe) or 0) <= _PROBE:
                out.add(name)
        if f.search is not None and self.fts and search:
            match = fts_table.c.tasks_fts.op("MATCH", is_comparison=True)(
                q.fts_query(f.search))
            probe = select(func.count()).select_from(
                select(fts_table.c.rowid).where(match).limit(_PROBE + 1).subquery())
            if int(self._scalar(probe) or 0) > _PROBE:
                out.add("search:common")
        return frozenset(out)

    def _plan(self, f: TaskFilter, order: str) -> _Plan:
        """How a history page reads the database (SQLite; elsewhere the planner decides).

        - A range filter matching few rows (:meth:`_selective`) drives through
          its own index; the matches are sorted on (rowid, sort key) only, and
          just the page's rows are read whole.
        - A started/completed range matching many rows, in an order by
          submitted: the range it implies on submitted (the time bounds,
          :func:`monq.hub.query.implied_submitted`) lets the submitted-led
          indexes seek to it and walk it in order.
        - "status in (rare ones) AND engine/label": the partial index of rare
          statuses, which carries engine and label, when the maintained counts
          say those statuses are the smaller set to walk.
        """
        plan = _Plan()
        if self.dialect != "sqlite":
            plan.selective = self._selective(f, order)
            return plan
        key, _ = q.parse_order(order)
        # newest first, a search walks its matches by rowid whether they are many or
        # few (few: it reads them all, as the rare-word plan would): no need to count them
        walk = f.search is not None and self.fts and order == "-submitted"
        ranges = set(q.range_probes(tasks, f))
        timed = ranges & {"started", "completed"}
        bounds = self._time_bounds() if key == "submitted" and timed else None
        implied = q.implied_submitted(f, bounds) if bounds is not None else None
        # a window on submitted hardly wider than the range itself: walk it in order,
        # whatever the range matches (no need to count)
        tight = implied is not None and bounds is not None and _tight(f, bounds)
        sel = set(self._selective(f, order, search=not walk,
                                  skip=frozenset(timed) if tight else frozenset()))
        driven = ranges & sel
        if implied is not None and not driven:
            plan.bound = implied
            sel |= {"demote:started", "demote:completed"}
        if walk and not driven and plan.bound is None:
            bounds = self._time_bounds()
            if bounds is not None and "rowid" in bounds:
                plan.search_slack = bounds["rowid"][0]
        plan.narrow = bool(driven)
        if not driven and self._rare_status_first(f):
            plan.index = "ix_tasks_unusual"
        plan.selective = frozenset(sel)
        return plan

    def _time_bounds(self) -> aggregates.TimeBounds | None:
        """The stored time bounds (read each time: another process may be the writer)."""
        try:
            with self._engine.connect() as conn:
                return aggregates.read_time_bounds(conn)
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e

    def _rare_status_first(self, f: TaskFilter) -> bool:
        """Whether "status AND engine/label" is best read through ix_tasks_unusual."""
        if f.status is None or "ok" in f.status or (f.engine is None and f.label is None) \
                or f.client is not None or f.msg_id is not None or not self.aggregates:
            return False
        from monq.hub.aggregates import engine_key, label_key
        from monq.hub.schema import task_counts

        n = func.coalesce(func.sum(task_counts.c.n), 0)
        by_status = int(self._scalar(select(n).where(task_counts.c.status.in_(f.status))) or 0)
        others = []
        if f.engine is not None:
            others.append(select(n).where(task_counts.c.engine.in_(
                [engine_key(e) for e in f.engine])))
        if f.label is not None:
            others.append(select(n).where(task_counts.c.label.in_(
                [label_key(lab) for lab in f.label])))
        smallest = min(int(self._scalar(o) or 0) for o in others)
        # an entry of the partial index is tested without reading its row: several
        # times cheaper than a step of another index, which reads the row
        return by_status <= 4 * smallest

    def history(self, *, limit: int | None = None, order: str = "-submitted",
                cursor: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Task rows without payloads (sizes kept), filtered and sorted, then limited.

        ``filters`` are those of :class:`~monq.hub.filters.TaskFilter`;
        ``cursor`` continues after the last row of a page from :meth:`history_page`.
        """
        return self.history_page(limit=limit, order=order, cursor=cursor, **filters)[0]

    def history_page(self, *, limit: int | None = 100, order: str = "-submitted",
                     cursor: str | None = None, **filters: Any
                     ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of :meth:`history` and the cursor of the next (None on the last page).

        Keyset pagination on (order column, msg_id): a page costs the same
        however deep it is, and rows written meanwhile neither repeat nor
        vanish across pages.
        """
        f = TaskFilter.from_dict(filters)
        key, _ = q.parse_order(order)
        n = q.check_limit(limit)
        plan = self._plan(f, order)
        rows: list[dict[str, Any]] = []
        if plan.search_slack is not None and n is not None:
            rows = self._search_walk(f, order, cursor, n + 1, plan.search_slack)
            ties = [r.pop("_tie") for r in rows]
            if len(rows) <= n or n == 0:
                return rows[:n], None
            rows = rows[:n]
            return rows, encode_cursor(order, rows[-1][key], ties[n - 1])
        for stage in self._stages(order, cursor, plan):
            want = None if n is None else n + 1 - len(rows)  # one more: is there a next page?
            if want == 0:
                break
            rows += self._rows(self._page_stmt(f, order, stage, want, plan))
        ties = [r.pop("_tie") for r in rows]
        if n is None or len(rows) <= n or n == 0:
            return rows[:n] if n is not None else rows, None
        rows = rows[:n]
        return rows, encode_cursor(order, rows[-1][key], ties[n - 1])

    def _search_walk(self, f: TaskFilter, order: str, cursor: str | None, want: int,
                     slack: float) -> list[dict[str, Any]]:
        """A page of a search, newest submitted first (its words matching many tasks or few).

        FTS5 hands its matches out newest rowid first, cheaply, a few at a
        time; rowid order is submitted order up to ``slack`` (a row written
        before another was submitted at most ``slack`` seconds after it, see
        :meth:`_rowid_slack`).  So matches are read by rowid, newest first,
        in growing chunks, each tested against the other filters, until
        the page's rows are known: ``want`` candidates, and every row not yet
        read was submitted (at most ``slack`` after the earliest read) before
        the last of them.  Only the page's rows are then read whole.
        """
        import dataclasses

        assert f.search is not None
        rest = dataclasses.replace(f, search=None)
        stages: list[Any] = [true()]
        decoded = decode_cursor(cursor, order) if cursor is not None else None
        if decoded is not None:
            stages = q.keyset_stages(tasks, order, *decoded, self.dialect)
        passes = case((and_(self.where(rest), or_(*stages)), 1), else_=0)
        fr = fts_table.c.rowid
        match = fts_table.c.tasks_fts.op("MATCH", is_comparison=True)(q.fts_query(f.search))
        sub = tasks.c.submitted
        found: list[tuple[float | None, int]] = []  # (submitted, rowid) of the candidates
        earliest = math.inf  # the earliest submitted time read
        edge: int | None = None  # the oldest rowid read
        chunk = max(4 * want, 256)
        with self._engine.connect() as conn:
            if decoded is not None and decoded[0] is not None:
                edge = self._search_start(conn, float(decoded[0]), slack)
            start = edge
            exhausted = False
            while True:
                got = conn.execute(_walk_chunk(match, passes, edge, chunk)).all()
                for rowid, when, ok in got:
                    edge = rowid if edge is None else min(edge, rowid)
                    if when is not None:
                        earliest = min(earliest, when)
                    if ok:
                        found.append((when, rowid))
                if len(got) < chunk:
                    exhausted = True  # every match read
                    break
                timed = sorted((x[0] for x in found if x[0] is not None), reverse=True)
                if len(timed) >= want and earliest + slack <= timed[want - 1]:
                    break  # no match left unread can make the page
                chunk = min(chunk * 4, 16_384)
            if exhausted and start is not None:
                # rows without a submitted time sort last, wherever they were written: those
                # above the start of the walk, one full-text test each (they are few)
                hit = select(literal_column("1")).select_from(fts_table).where(
                    match, fr == _ROWID).exists()
                found += [(None, rowid) for rowid in conn.execute(
                    select(_ROWID).where(sub.is_(None), _ROWID >= start, passes == 1, hit)
                ).scalars()]
            found.sort(key=lambda x: (x[0] is not None, x[0] or 0.0, x[1]), reverse=True)
            page = [rowid for _, rowid in found[:want]]
            if not page:
                return []
            tie = q.tiebreak_column(tasks, self.dialect).label("_tie")
            stmt = select(*_LISTED, tie).where(_ROWID.in_(page)).order_by(
                *q.order_clause(tasks, order, self.dialect))
            return _dicts(conn.execute(stmt))

    def _search_start(self, conn: Connection, value: float, slack: float) -> int | None:
        """The rowid a cursor page's walk can start below (None: from the newest).

        The page wants rows submitted at or before the cursor's time ``value``;
        every row written after one submitted later than ``value + slack`` was
        submitted after ``value``: the walk starts below such a row (the one
        submitted first after that time, found by the submitted index).
        """
        sub = tasks.c.submitted
        found = conn.execute(select(_ROWID).where(sub > value + slack)
                             .order_by(sub.asc()).limit(1)).scalar()
        return None if found is None else int(found)

    def _stages(self, order: str, cursor: str | None, plan: _Plan) -> list[Any]:
        """The WHERE clauses a page reads in turn (see :func:`monq.hub.query.keyset_stages`)."""
        decoded = decode_cursor(cursor, order) if cursor is not None else None
        if plan.bound is not None:
            return q.bounded_stages(tasks, order, decoded, plan.bound, self.dialect)
        if decoded is None:
            return [true()]
        return q.keyset_stages(tasks, order, *decoded, self.dialect)

    def _page_stmt(self, f: TaskFilter, order: str, stage: Any, limit: int | None,
                   plan: _Plan | None = None) -> Any:
        plan = plan or _Plan()
        tie = q.tiebreak_column(tasks, self.dialect).label("_tie")
        where = [self.where(f, plan.selective), stage]
        if plan.index == "ix_tasks_unusual":
            where.append(schema.UNUSUAL)  # the partial index's own condition, as written
        sort = q.order_clause(tasks, order, self.dialect)
        if plan.narrow and limit is not None:
            # the range's index drives and its matches must be sorted: sort only
            # (key, rowid), then read the page's rows whole
            inner = select(_ROWID).where(*where).order_by(*sort).limit(limit)
            return select(*_LISTED, tie).where(_ROWID.in_(inner.scalar_subquery())) \
                .order_by(*sort)
        stmt = select(*_LISTED, tie).where(*where).order_by(*sort)
        if plan.index is not None:
            stmt = stmt.with_hint(tasks, f"INDEXED BY {plan.index}", "sqlite")
        return stmt if limit is None else stmt.limit(limit)

    def iter_history(self, *, order: str = "-submitted", page: int = 1000,
                     **filters: Any) -> Iterator[dict[str, Any]]:
        """Every matching row, fetched a page at a time (exports never hold them all)."""
        cursor: str | None = None
        while True:
            rows, cursor = self.history_page(limit=page, order=order, cursor=cursor, **filters)
            yield from rows
            if cursor is None:
                return

    def db_query(self, query: dict[str, Any], keys: list[str] | None = None
                 ) -> list[dict[str, Any]]:
        """ipyparallel-style query (see :func:`monq.hub.query.db_query_clause`), by submitted."""
        cols = [tasks.c[k] for k in q.check_keys(tasks, keys)]
        where = q.db_query_clause(tasks, query, self.dialect)
        sort = (tasks.c.submitted.asc(), tasks.c.msg_id)
        implied = q.db_query_time_filter(query)
        bounds = self._time_bounds() if implied is not None and self.aggregates else None
        bound = q.implied_submitted(implied, bounds) \
            if implied is not None and bounds is not None else None
        if bound is None:
            return self._rows(select(*cols).where(where).order_by(*sort))
        # a range on started/completed implies one on submitted (the time bounds): the
        # submitted-led indexes seek to it; rows without a submitted time come first
        sub = tasks.c.submitted
        return (self._rows(select(*cols).where(where, sub.is_(None)).order_by(*sort))
                + self._rows(select(*cols).where(where, q.submitted_range(tasks, bound))
                             .order_by(*sort)))

    def hub_history(self) -> list[str]:
        """Every msg_id the Hub knows, oldest submission first."""
        stmt = select(tasks.c.msg_id).order_by(tasks.c.submitted.asc(), tasks.c.msg_id)
        with self._engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def unfinished(self) -> list[dict[str, Any]]:
        """msg_id, status, queue, engine and client of every task not finished yet."""
        t = tasks
        stmt = select(t.c.msg_id, t.c.status, t.c.queue, t.c.engine, t.c.client).where(
            t.c.status.in_(UNFINISHED))
        return self._rows(stmt)

    def get_task(self, msg_id: str, with_payload: bool = False) -> dict[str, Any] | None:
        """One task row (payloads included only if asked), or None if unknown."""
        if not isinstance(msg_id, str):
            raise HubError(f"msg_id must be a string, not {type(msg_id).__name__}")
        if not with_payload:
            rows = self._rows(select(*_LISTED).where(tasks.c.msg_id == msg_id))
            return rows[0] if rows else None
        try:
            with self._engine.connect() as conn:
                found = conn.execute(select(tasks).where(tasks.c.msg_id == msg_id)
                                     ).mappings().first()
                if found is None:
                    return None
                row = dict(found)
                keys = {row[k] for col, k in payloads.KEYS.items()
                        if row[col] is None and row[k] is not None}
                shared = payloads.load(conn, keys) if keys else {}
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e
        for col, k in payloads.KEYS.items():
            key = row.pop(k)
            if row[col] is None and key is not None:
                row[col] = shared.get(key)
        return row

    def statuses(self, msg_ids: Sequence[str]) -> dict[str, str]:
        """The status of each of ``msg_ids`` in the history (unknown ones left out)."""
        out: dict[str, str] = {}
        try:
            with self._engine.connect() as conn:
                for i in range(0, len(msg_ids), 500):
                    stmt = select(tasks.c.msg_id, tasks.c.status).where(
                        tasks.c.msg_id.in_(list(msg_ids[i:i + 500])))
                    out.update((r[0], r[1]) for r in conn.execute(stmt))
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e
        return out

    def find_task(self, prefix: str) -> dict[str, Any]:
        """The one task whose msg_id is or starts with ``prefix`` (HubError if none or several)."""
        exact = self.get_task(prefix) if isinstance(prefix, str) else None
        if exact is not None:
            return exact
        f = TaskFilter.from_dict({"msg_id": prefix}, "show")
        rows = self._rows(select(*_LISTED).where(self.where(f)).order_by(tasks.c.msg_id)
                          .limit(6))
        if not rows:
            raise HubError(f"no task {prefix!r} in the history")
        if len(rows) > 1:
            more = ", ".join(r["msg_id"] for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
            raise HubError(f"{prefix!r} is the start of several msg_ids ({more}); "
                           "give more of it")
        return rows[0]

    def counts(self) -> dict[str, Any]:
        """``{"status": {status: n}, "engine": {engine_id: {status: n}}}``.

        Read from the maintained ``task_counts`` (a few rows) where the store keeps
        it: counting the tasks table took 130-190 ms at 144,000 tasks (a second at a
        million), and ``cluster_status`` is polled (``monq status --watch``, a client
        waiting for a burst to be recorded).  Other databases count in SQL.
        """
        if self.aggregates:
            return self._counts_from_aggregates()
        n = func.count()
        by_status = select(tasks.c.status, n).group_by(tasks.c.status)
        by_engine = (select(tasks.c.engine, tasks.c.status, n)
                     .where(tasks.c.engine.is_not(None))
                     .group_by(tasks.c.engine, tasks.c.status))
        with self._engine.connect() as conn:
            status = {s: int(c) for s, c in conn.execute(by_status)}
            per_engine: dict[int, dict[str, int]] = {}
            for eid, s, c in conn.execute(by_engine):
                per_engine.setdefault(int(eid), {})[s] = int(c)
        return {"status": status, "engine": per_engine}

    def _counts_from_aggregates(self) -> dict[str, Any]:
        from monq.hub.schema import task_counts

        c = task_counts.c
        stmt = select(c.status, c.engine, func.sum(c.n)).group_by(c.status, c.engine)
        status: dict[str, int] = {}
        per_engine: dict[int, dict[str, int]] = {}
        with self._engine.connect() as conn:
            for s, eid, total in conn.execute(stmt):
                k = int(total or 0)
                if not k:
                    continue  # every task of that key has gone (purged, or moved on)
                status[s] = status.get(s, 0) + k
                engine = aggregates.unkey_engine(int(eid))
                if engine is not None:
                    per_engine.setdefault(engine, {})[s] = k
        return {"status": status, "engine": per_engine}

    # -- purge and retention -----------------------------------------------------

    def purge(self, *, msg_ids: Iterable[str] | None = None, before: float | None = None,
              everything: bool = False, payloads_only: bool = False,
              **filters: Any) -> int:
        """Delete finished tasks matching ALL the given filters; return how many went.

        ``filters`` are history's (:class:`~monq.hub.filters.TaskFilter`);
        ``before`` means completed before.  Pending and running tasks are
        never touched: the Hub still owes them a record.  With no filter at
        all, ``everything=True`` must say so.  ``payloads_only`` keeps the
        records and drops their request and result (marked evicted).
        """
        f = TaskFilter.from_dict(filters, "purge")
        if msg_ids is None and f.is_empty() and before is None and not everything:
            raise HubError("purge: say what to purge (msg_ids, a history filter such as "
                           "status, engine or since, before) or pass everything=True")
        if f.status is not None:
            live = [s for s in f.status if s in UNFINISHED]
            if live:
                raise HubError(f"purge: {', '.join(live)} tasks cannot be purged "
                               "(only finished ones)")
        if before is not None:
            before = q.time_value("before", before)
        where = and_(
            tasks.c.status.in_(FINISHED),
            self.where(f),
            tasks.c.completed < before if before is not None else true(),
        )
        if msg_ids is not None:
            if isinstance(msg_ids, str):
                msg_ids = [msg_ids]
            ids = list(msg_ids)
            if not all(isinstance(m, str) for m in ids):
                raise HubError("purge: msg_ids must be strings")
            done = 0
            for chunk in _chunks(ids):
                done += self._purge_where(and_(where, tasks.c.msg_id.in_(chunk)),
                                          payloads_only)
            return done
        return self._purge_where(where, payloads_only)

    def _purge_where(self, where: Any, payloads_only: bool) -> int:
        """Delete (or evict) every row matching, a bounded chunk per transaction."""
        if payloads_only:
            where = and_(where, HAS_PAYLOAD)
        done = 0
        while True:
            with self._engine.begin() as conn:
                ids = list(conn.execute(select(tasks.c.msg_id).where(where)
                                        .limit(_PURGE_CHUNK)).scalars())
                if not ids:
                    return done
                if payloads_only:
                    self._evict(conn, ids)
                else:
                    self._delete(conn, ids)
            done += len(ids)

    def _delete(self, conn: Connection, ids: list[str]) -> int:
        """Delete rows by msg_id (one chunk); keep the stored-bytes total right."""
        which = tasks.c.msg_id.in_(ids)
        freed = conn.execute(select(func.coalesce(func.sum(tasks.c.stored_bytes), 0))
                             .where(which)).scalar()
        if self.fts_table:
            self._fts_forget(conn, ids)
        deltas = aggregates.delete_deltas(conn, ids) if self.aggregates else None
        n = int(conn.execute(tasks.delete().where(which)).rowcount or 0)
        if deltas is not None:
            deltas.apply(conn)
            payloads.forget(conn, [r[at] for r in deltas.before.values()
                                   for _, at in _KEY_AT])
        if self._stored_total is not None:
            self._stored_total -= int(freed or 0)
        return n

    def _evict(self, conn: Connection, ids: list[str], now: float | None = None) -> int:
        """Drop the payloads of rows by msg_id (one chunk); their sizes stay, dated."""
        which = tasks.c.msg_id.in_(ids)
        c = tasks.c
        size = _KEPT_SIZE
        held = conn.execute(select(size, c.request_key, c.result_key)
                            .where(which, HAS_PAYLOAD)).all()
        freed = sum(int(r[0] or 0) for r in held)
        stamp = time.time() if now is None else now
        conn.execute(tasks.update().where(which, HAS_PAYLOAD).values(
            request=None, result=None, request_key=None, result_key=None,
            payload_evicted=stamp,
            stored_bytes=func.max(func.coalesce(c.stored_bytes, 0) - size, 0)
            if self.dialect == "sqlite" else
            func.greatest(func.coalesce(c.stored_bytes, 0) - size, 0)))
        payloads.forget(conn, [k for r in held for k in r[1:]])  # after: sizes read them
        if self._stored_total is not None:
            self._stored_total -= int(freed or 0)
        return len(ids)

    def stored_total_if_known(self) -> int | None:
        """The running total of :meth:`stored_total` if it was counted yet (free), else None."""
        return self._stored_total

    def stored_total(self) -> int:
        """Bytes the records keep (payloads and captured text); counted once, then tracked."""
        if self._stored_total is None:
            total = self._scalar(select(func.coalesce(func.sum(tasks.c.stored_bytes), 0)))
            self._stored_total = int(total or 0)
        return self._stored_total

    def evict_oldest_payloads(self, n: int, free: int | None = None,
                              now: float | None = None) -> int:
        """Drop the payloads of the oldest-completed finished tasks that have one.

        At most ``n`` tasks, and no more than it takes to free ``free`` bytes.
        """
        c = tasks.c
        stmt = (select(c.msg_id, _KEPT_SIZE).where(HAS_PAYLOAD, c.completed.is_not(None),
                                             c.status.in_(FINISHED))
                .order_by(c.completed.asc()).limit(n))
        with self._engine.begin() as conn:
            ids = _enough(conn.execute(stmt).all(), free)
            return self._evict(conn, ids, now) if ids else 0

    def delete_oldest(self, n: int, completed_before: float | None = None,
                      free: int | None = None) -> int:
        """Delete the oldest-completed finished tasks: at most ``n``, completed before a
        time if given, and no more than it takes to free ``free`` bytes."""
        stmt = self.oldest_statement(n, completed_before)
        with self._engine.begin() as conn:
            ids = _enough(conn.execute(stmt).all(), free)
            return self._delete(conn, ids) if ids else 0

    def oldest_statement(self, n: int, completed_before: float | None = None) -> Any:
        """The SELECT of :meth:`delete_oldest`: msg_id and stored bytes, oldest completed first."""
        c = tasks.c
        stmt = select(c.msg_id, func.coalesce(c.stored_bytes, 0)).where(
            c.completed.is_not(None), c.status.in_(FINISHED))
        if completed_before is not None:
            stmt = stmt.where(c.completed < completed_before)
        # the completed index, in order: the planner would take the status index ("status
        # IN (finished ones)") and sort every finished task (580 ms at 1M tasks, not 8 ms)
        return stmt.order_by(c.completed.asc()).limit(n).with_hint(
            tasks, "INDEXED BY ix_tasks_completed", "sqlite")

    def total_tasks(self) -> int:
        return int(self._scalar(select(func.count()).select_from(tasks)) or 0)

    # -- helpers --------------------------------------------------------------------

    def explain(self, stmt: Any) -> list[str]:
        """SQLite's query plan for a statement (tests and the benchmark check index use)."""
        compiled = stmt.compile(self._engine, compile_kwargs={"render_postcompile": True})
        with self._engine.connect() as conn:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled),
                                        tuple(compiled.params[k] for k in compiled.positiontup
                                              or ()))
            return [str(r[-1]) for r in rows]

    def history_statement(self, *, limit: int | None = 100, order: str = "-submitted",
                          cursor: str | None = None, **filters: Any) -> Any:
        """The (first) SELECT :meth:`history_page` runs (for EXPLAIN)."""
        f = TaskFilter.from_dict(filters)
        plan = self._plan(f, order)
        if plan.search_slack is not None and f.search is not None:
            # a search walk: its first chunk of matches
            match = fts_table.c.tasks_fts.op("MATCH", is_comparison=True)(
                q.fts_query(f.search))
            return _walk_chunk(match, literal_column("1"), None, 256)
        stage = self._stages(order, cursor, plan)[0]
        return self._page_stmt(f, order, stage, None if limit is None else limit + 1, plan)

    def _scalar(self, stmt: Any) -> Any:
        try:
            with self._engine.connect() as conn:
                return conn.execute(stmt).scalar()
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e

    def _rows(self, stmt: Any) -> list[dict[str, Any]]:
        try:
            with self._engine.connect() as conn:
                return _dicts(conn.execute(stmt))
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e


def _tight(f: TaskFilter, bounds: aggregates.TimeBounds) -> bool:
    """Whether the window on submitted that the started/completed ranges imply is at
    most a minute (or the range's own width) wider than each range: then walking it
    in submitted order reads little besides matches, however many or few they are."""
    for name, a, b in (("started", f.started_since, f.started_until),
                       ("completed", f.completed_since, f.completed_until)):
        if a is None and b is None:
            continue
        lead, lag = bounds.get(name, (math.inf, math.inf))
        width = b - a if a is not None and b is not None else 0.0
        if lead + lag > max(60.0, width):
            return False
    return True


def _walk_chunk(match: Any, passes: Any, edge: int | None, chunk: int) -> Any:
    """The next ``chunk`` full-text matches below rowid ``edge``, newest first: their
    rowid, submitted time and whether they pass the other filters."""
    fr = fts_table.c.rowid
    ids = select(fr).where(match, fr < edge if edge is not None else true()) \
        .order_by(fr.desc()).limit(chunk)
    return select(_ROWID, tasks.c.submitted, passes).where(_ROWID.in_(ids.scalar_subquery()))


@dataclass
class _Plan:
    """How a history page reads (:meth:`TaskStore._plan`)."""

    #: filter_clause's hints: selective ranges, "search:common", "demote:<column>"
    selective: frozenset[str] = frozenset()
    #: the range on submitted that the started/completed ranges imply (lo, hi)
    bound: tuple[float | None, float | None] | None = None
    #: INDEXED BY this index
    index: str | None = None
    #: sort (rowid, key) of the matches, then read the page's rows
    narrow: bool = False
    #: a common search by newest submitted: walk the matches by rowid (this slack)
    search_slack: float | None = None


_HAS_TEXT_SQL = " OR ".join(f"COALESCE({c}, '') != ''" for c in schema.FTS_COLUMNS)
_FTS_COLS = ", ".join(schema.FTS_COLUMNS)
# statements of our own making with one bound, expanding list of msg_ids
_FTS_DELETE = text(
    f"INSERT INTO tasks_fts(tasks_fts, rowid, {_FTS_COLS}) "
    f"SELECT 'delete', rowid, {_FTS_COLS} FROM tasks "
    f"WHERE msg_id IN :ids AND ({_HAS_TEXT_SQL})").bindparams(bindparam("ids", expanding=True))
_FTS_INSERT = text(
    f"INSERT INTO tasks_fts(rowid, {_FTS_COLS}) SELECT rowid, {_FTS_COLS} FROM tasks "
    f"WHERE msg_id IN :ids AND ({_HAS_TEXT_SQL})").bindparams(bindparam("ids", expanding=True))


def _dicts(result: Any) -> list[dict[str, Any]]:
    """A result's rows as dicts: plain tuples zipped with the column names read once
    (``.mappings()`` builds a RowMapping per row: 2-3x the CPU for a page of 700 rows)."""
    keys = list(result.keys())
    return [dict(zip(keys, r)) for r in result.fetchall()]


_T0, _T1, _T2, _T3 = TEXTS


def _has_text(row: dict[str, Any]) -> bool:
    """Whether a row has captured text (TEXTS, spelled out: this runs per row)."""
    get = row.get
    return bool(get(_T0) or get(_T1) or get(_T2) or get(_T3))


def _stored_size(row: dict[str, Any]) -> int:
    """What a (prepared) row adds to the database: kept payloads and captured text."""
    n = 0
    for blob in PAYLOADS:
        data = row.get(blob)
        if data is not None:
            n += len(data)
    for col in TEXTS:
        s = row.get(col)
        if s:
            n += len(s)
    return n


def _enough(rows: Sequence[Any], free: int | None) -> list[str]:
    """The msg_ids of the first (msg_id, size) rows whose sizes add up to ``free`` (all: None)."""
    if free is None:
        return [r[0] for r in rows]
    out, total = [], 0
    for msg_id, size in rows:
        if total >= free:
            break
        out.append(msg_id)
        total += int(size or 0)
    return out


def _by_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group rows by key set (executemany needs one shape), keeping each group's order."""
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    order: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    last: tuple[str, ...] = ()
    group: list[dict[str, Any]] = []
    for r in rows:
        # rows mostly come with their keys in the same order: a tuple of them is
        # cheaper to hash than a frozenset, which is built once per distinct order; and
        # in runs of one order: the same keys as the row before are compared, not hashed
        k = tuple(r)
        if k != last:
            group = order.get(k)  # type: ignore[assignment]
            if group is None:
                group = order[k] = groups.setdefault(frozenset(k), [])
            last = k
        group.append(r)
    return list(groups.values())


def _update_columns(row: dict[str, Any]) -> list[str]:
    """The columns an update row sets, in table order."""
    return [c.name for c in tasks.columns if c.name in row and c.name not in
            ("msg_id", "stored_bytes")]


#: an update statement's own parameters -> the row keys that fill them
_UPDATE_KEYS = {"b_msg_id": "msg_id", "b_stored": "stored_bytes"}


def _update_statement(cols: list[str]) -> Any:
    c = tasks.c
    values: dict[str, Any] = {k: bindparam(k) for k in cols}
    if "started" in cols or "completed" in cols:
        # SET expressions see the row as it was: a reply that brings only
        # `completed` is timed against the `started` stored earlier
        done = bindparam("completed") if "completed" in cols else c.completed
        began = bindparam("started") if "started" in cols else c.started
        values["duration"] = done - began
    # (a literal 0, not a bound one: a constant parameter would be filled in every row)
    values["stored_bytes"] = func.coalesce(c.stored_bytes, literal_column("0")) + \
        bindparam("b_stored")
    return tasks.update().where(c.msg_id == bindparam("b_msg_id")).values(values)


class _Positional:
    """A write statement compiled once, run as an executemany of plain tuples.

    SQLAlchemy builds and compiles the statement; every value stays a bound
    parameter.  What is skipped is SQLAlchemy's per-row work at execution (a
    parameter dict per row, built from the row dict): the Hub writes every
    task once or twice, and that work was as much as SQLite's own.  Type
    processors and Python-side column defaults are applied as SQLAlchemy
    would; a statement needing anything else takes SQLAlchemy's path (None).

    The rows' tuples are taken with one ``itemgetter`` each (``keys`` maps
    the statement's own parameter names to the row keys that fill them).
    A type processor runs only on a column holding values it would change:
    Float's and LargeBinary's give back a float or bytes-like value the same
    as a float or bytes one, and a column's value types are checked for the
    whole batch at once (:meth:`executemany`).
    """

    __slots__ = ("consts", "get", "procs", "sql")

    def __init__(self, sql: str, names: list[str], consts: dict[str, Any],
                 procs: list[tuple[int, Any, frozenset[type]]]) -> None:
        self.sql = sql
        self.consts = consts
        self.procs = procs
        get = itemgetter(*names)
        self.get = get if len(names) > 1 else (lambda r: (get(r),))

    @classmethod
    def compile(cls, stmt: Any, dialect: Any, column_keys: list[str] | None,
                provided: set[str], keys: dict[str, str] | None = None
                ) -> _Positional | None:
        if not dialect.positional:
            return None
        compiled = stmt.compile(dialect=dialect, column_keys=column_keys)
        names = compiled.positiontup
        if names is None:
            return None
        base = compiled.construct_params(_check=False)
        consts: dict[str, Any] = {}
        for col in getattr(compiled, "insert_prefetch", ()):
            if col.key in provided:
                continue
            if col.default is None or not col.default.is_scalar:
                return None
            consts[col.key] = col.default.arg
        for name in names:
            if name not in provided and name not in consts:
                value = base.get(name)
                if not isinstance(value, (int, float, str, bytes)):
                    return None  # not a literal of the statement: not ours to fill
                consts[name] = value
        processors = getattr(compiled, "_bind_processors", None)
        if processors is None:
            return None
        procs = [(i, processors[n], _unchanged(compiled, dialect, n, processors[n]))
                 for i, n in enumerate(names) if n in processors]
        keys = keys or {}
        return cls(compiled.string, [keys.get(n, n) for n in names], consts, procs)

    def executemany(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        get, consts = self.get, self.consts
        if consts:
            for r in rows:
                r.update(consts)
        params: list[Any] = list(map(get, rows))
        # the columns whose values a processor would change: any type outside the ones it
        # leaves as they are (a set of the column's types, built at C speed)
        procs = [(i, p) for i, p, same in self.procs
                 if not same.issuperset(map(type, map(itemgetter(i), params)))]
        if procs:
            for j, v in enumerate(params):
                v = list(v)
                for i, p in procs:
                    v[i] = p(v[i])
                params[j] = tuple(v)
        conn.exec_driver_sql(self.sql, params)


#: value types a bind processor gives back as they are, by the SQLAlchemy type it serves
_UNCHANGED: dict[type, frozenset[type]] = {
    sqltypes.Float: frozenset({float, type(None)}),  # to_float(x) == x
    # the DBAPI's Binary(x): the same bytes, bound as the same BLOB
    sqltypes.LargeBinary: frozenset({bytes, type(None)}),
}


def _unchanged(compiled: Any, dialect: Any, name: str, proc: Any) -> frozenset[type]:
    """The value types that parameter ``name``'s processor ``proc`` need not see (none
    if unsure): found by the type of the bound parameter that gave ``proc`` (a name
    bound twice, as ``started`` in an update's SET and its duration, has two).  SQLite's
    driver only: it binds bytes and float as its Binary and to_float results."""
    if dialect.name != "sqlite":
        return frozenset()
    for bind, bound in compiled.bind_names.items():
        t = bind.type
        if bound != name or t._cached_bind_processor(dialect) is not proc:
            continue
        if type(t) is sqltypes.Float and not t.asdecimal:
            return _UNCHANGED[sqltypes.Float]
        if type(t) is sqltypes.LargeBinary:
            return _UNCHANGED[sqltypes.LargeBinary]
    return frozenset()


def _chunks(seq: list[Any]) -> Iterable[list[Any]]:
    for i in range(0, len(seq), _CHUNK):
        yield seq[i:i + _CHUNK]


# -- engine creation ----------------------------------------------------------------


def _bind_as_is() -> None:
    """Have Python's sqlite3 module bind ``None`` and ``bytes`` parameters without
    looking for an adapter.

    The module binds only int, float, str and bytearray at once: for any other
    value (a task row's many NULLs, its payloads) it looks for an adapter, then
    asks its ``PrepareProtocol`` type for ``__adapt__``, whose failure builds an
    AttributeError with its message each time (~2,000 instructions; ~6 times
    per task the Hub writes: 3 % of its CPU in a burst, callgrind).  An adapter
    registered for the type is found first: these give the value back as it
    is, with one C call (``bytes(b)`` is ``b``; an empty dict's ``get`` of None
    is None), so what is bound is exactly what was.  Process-wide, and the
    same for every other user of sqlite3.
    """
    sqlite3.register_adapter(bytes, bytes)
    sqlite3.register_adapter(type(None), {}.get)  # type: ignore[arg-type]


def _make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    _bind_as_is()
    db = u.database
    if not db or db == ":memory:" or "mode=memory" in db:
        # One shared connection: the default pool would give each thread its
        # own, empty, in-memory database.
        engine = create_engine(url, poolclass=StaticPool,
                               connect_args={"check_same_thread": False})
    else:
        if not u.query.get("uri"):  # a file: URI is the caller's business
            _touch_private(Path(db))
        engine = create_engine(url, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _sqlite_pragmas)
    # SQLAlchemy renders no table hints for SQLite; this engine's compiler renders
    # ``with_hint(tasks, "INDEXED BY ...", "sqlite")`` after the table name
    base = engine.dialect.statement_compiler

    class _HintingCompiler(base):  # type: ignore[valid-type, misc]
        def get_from_hint_text(self, table: Any, text: str | None) -> str | None:
            return text

    engine.dialect.statement_compiler = _HintingCompiler  # type: ignore[misc]
    return engine


def _touch_private(path: Path) -> None:
    """Create the SQLite file 0600 (payloads and tracebacks are private) before it opens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    try:
        os.chmod(path, 0o600)
    except OSError as e:  # someone else's file: use it, but say so
        log.warning("cannot make %s private (mode 0600): %s", path, e)


#: SQLite's page cache per connection, KiB (as a negative cache_size)
_CACHE_KIB = -32768
#: WAL pages written between automatic checkpoints (SQLite's default: 1000)
_CHECKPOINT_PAGES = 10_000


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        # WAL: readers in other processes (CLI, dashboard) never block the Hub.
        # synchronous=NORMAL: in WAL mode a power cut may lose the last
        # commits, never corrupt the file; the Hub's batches make that fine.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=10000")
        # a page cache of up to 32 MiB (SQLite's default is 2 MiB), filled only as pages
        # are read: the tasks' indexes of a long history (random msg_ids in the primary
        # key's) outgrow 2 MiB soon, and every page read again from the OS cost a
        # system call; at 300,000 tasks a burst's writes took ~9 % less CPU (sys time
        # 42 -> 27 us per task, bench/PROFILE.md)
        cur.execute(f"PRAGMA cache_size={_CACHE_KIB}")
        # checkpoint the WAL into the database every ~40 MB of it rather than SQLite's
        # default 4 MB: a checkpoint copies each page once however often the commits
        # since the last one rewrote it, and a burst's commits rewrite the same pages
        # (the indexes' newest leaves, the msg_id index's pages, the aggregates):
        # writing 20,000 tasks into a 300,000-task history took ~10 % less CPU, a third
        # less of it in the kernel (bench/PROFILE.md).  Durability is the same (WAL,
        # synchronous=NORMAL); readers look pages up in a longer WAL, through its index.
        cur.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
    finally:
        cur.close()
