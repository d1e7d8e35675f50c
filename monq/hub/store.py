"""The task store: the Hub's record of every task and engine, in SQLAlchemy Core.

The Hub thread is the only writer.  It hands :meth:`TaskStore.write` batches
of inserts and updates (a few ms or a few thousand rows' worth) and each
batch is one transaction of a handful of ``executemany`` calls, which is
what keeps SQLite ahead of a busy cluster.  Reads (history, db_query,
counts) filter, sort and limit in the database, so the Hub's memory is
bounded by what a query returns, never by the history.

Any SQLAlchemy URL works; SQLite gets WAL mode (readers, such as a dashboard
or ``monq history`` in another process, do not block the writer) and a
0600 database file (it holds payloads and tracebacks).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    select,
    true,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from monq.errors import HubError
from monq.hub import query as q

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
#: statuses a task can end in; only these are ever purged
FINISHED = ("ok", "error", "aborted", "timeout", "lost", "resubmitted")
UNFINISHED = ("pending", "running")
STATUSES = UNFINISHED + FINISHED
#: payload column -> the column that keeps its size when the payload is dropped
PAYLOADS = {"request": "request_bytes", "result": "result_bytes"}
#: rows per IN (...) list: SQLite builds before 3.32 allow only 999 bound variables
_CHUNK = 500

metadata = MetaData()

tasks = Table(
    "tasks", metadata,
    Column("msg_id", String(64), primary_key=True),
    Column("client", String(64), index=True),
    Column("engine", Integer, nullable=True, index=True),
    Column("engine_uuid", String(64), nullable=True),
    Column("queue", String(16)),
    Column("label", String(200), nullable=True),
    Column("func", String(300), nullable=True),
    # status is indexed by ix_tasks_status_submitted below (a status-only
    # index next to it would be redundant and slow every write)
    Column("status", String(16), nullable=False),
    Column("submitted", Float, nullable=True, index=True),
    Column("started", Float, nullable=True),
    Column("completed", Float, nullable=True, index=True),
    Column("received", Float, nullable=True),
    Column("ename", String(200), nullable=True),
    Column("evalue", Text, nullable=True),
    Column("traceback", Text, nullable=True),
    Column("stdout", Text, nullable=True),
    Column("stderr", Text, nullable=True),
    Column("retries", Integer, default=0, server_default="0"),
    Column("request", LargeBinary, nullable=True),
    Column("request_bytes", Integer, nullable=True),
    Column("result", LargeBinary, nullable=True),
    Column("result_bytes", Integer, nullable=True),
)
# history(status=...) sorted by submitted is the dashboard's and the CLI's
# everyday query: this index answers it without a sort over all of a status.
Index("ix_tasks_status_submitted", tasks.c.status, tasks.c.submitted)

engines_table = Table(
    "engines", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("uuid", String(64), unique=True),
    Column("hostname", String(200)),
    Column("pid", Integer),
    Column("registered", Float),
    Column("unregistered", Float, nullable=True),
    Column("status", String(16)),
)

meta_table = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text),
)

_TASK_COLUMNS = frozenset(c.name for c in tasks.columns)
_ENGINE_COLUMNS = frozenset(c.name for c in engines_table.columns)
_LISTED = [c for c in tasks.columns if c.name not in q.BLOB_COLUMNS]


class TaskStore:
    """The Hub's database of tasks and engines.

    Resource handling: whoever creates the store owns it and calls
    :meth:`close`; closing twice is safe.  Not meant to be shared between
    threads without care: the Hub thread writes, and reads go through the
    same thread (the engine's pool makes concurrent reads safe, but SQLite
    has one writer at a time).
    """

    def __init__(self, url: str, payload_cap: int = 1 << 20) -> None:
        if payload_cap < 0:
            raise ValueError(f"payload_cap must be >= 0, not {payload_cap}")
        self.url = url
        self.payload_cap = payload_cap
        self._closed = False
        self._lock = threading.Lock()
        self._engine = _make_engine(url)
        try:
            self.dialect = self._engine.dialect.name
            metadata.create_all(self._engine)
            self._check_schema()
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

    def _check_schema(self) -> None:
        with self._engine.begin() as conn:
            found = conn.execute(
                select(meta_table.c.value).where(meta_table.c.key == "schema_version")
            ).scalar()
            if found is None:
                conn.execute(meta_table.insert(),
                             {"key": "schema_version", "value": SCHEMA_VERSION})
            elif found != SCHEMA_VERSION:
                raise HubError(f"database {self.url} has schema version {found}; this monq "
                               f"reads version {SCHEMA_VERSION} (use another --db)")

    # -- writes ------------------------------------------------------------------

    def write(self, inserts: Sequence[dict[str, Any]], updates: Sequence[dict[str, Any]]) -> None:
        """Insert new tasks and update known ones, all in ONE transaction.

        ``inserts`` are rows (``msg_id`` required, any other columns);
        ``updates`` are ``msg_id`` plus the columns to change.  Payloads over
        ``payload_cap`` are stored as NULL with their size kept, so callers
        pass blobs blindly.  Rows are grouped by key set and each group is
        one ``executemany``: a batch costs a few statements, not one per row.
        """
        ins = [self._prepare(r, "insert") for r in inserts]
        ups = [self._prepare(r, "update") for r in updates]
        if not ins and not ups:
            return
        try:
            with self._engine.begin() as conn:
                self._write(conn, ins, ups)
        except IntegrityError:
            # A msg_id already stored (a relay copy seen twice, a controller
            # restart): a failed batch must not lose the other rows, so redo
            # it turning those inserts into updates.  Rare, so cost is fine.
            log.warning("task batch hit a duplicate msg_id; retrying as upserts", exc_info=True)
            with self._engine.begin() as conn:
                ins, extra = self._split_existing(conn, ins)
                self._write(conn, ins, extra + ups)

    def _write(self, conn: Connection, ins: list[dict[str, Any]],
               ups: list[dict[str, Any]]) -> None:
        for rows in _by_keys(ins):
            conn.execute(tasks.insert(), rows)
        for rows in _by_keys(ups):
            cols = [k for k in rows[0] if k != "msg_id"]
            if not cols:
                continue
            stmt = (tasks.update()
                    .where(tasks.c.msg_id == bindparam("b_msg_id"))
                    .values({k: bindparam(k) for k in cols}))
            conn.execute(stmt, [{"b_msg_id": r["msg_id"], **{k: r[k] for k in cols}}
                                for r in rows])

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
                again.append(r)
            else:
                existing.add(r["msg_id"])
                fresh.append(r)
        return fresh, again

    def _prepare(self, row: dict[str, Any], what: str) -> dict[str, Any]:
        if not isinstance(row, dict) or not isinstance(row.get("msg_id"), str):
            raise HubError(f"task {what} needs a dict with a string msg_id, got {row!r:.200}")
        unknown = row.keys() - _TASK_COLUMNS
        if unknown:
            raise HubError(f"task {what} for {row['msg_id']}: unknown columns "
                           f"{', '.join(sorted(unknown))}")
        if what == "insert" and "status" not in row:
            raise HubError(f"task insert for {row['msg_id']} needs a status")
        if "status" in row and row["status"] not in STATUSES:
            raise HubError(f"task {what} for {row['msg_id']}: unknown status "
                           f"{row['status']!r}; one of {', '.join(STATUSES)}")
        out = dict(row)  # never mutate the caller's row
        for blob, size_col in PAYLOADS.items():
            data = out.get(blob)
            if data is None:
                continue
            if not isinstance(data, bytes):
                data = bytes(memoryview(data))  # memoryviews and zmq frames, for the driver
            out.setdefault(size_col, len(data))
            out[blob] = data if len(data) <= self.payload_cap else None
        return out

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

    def history(
        self,
        *,
        status: str | Sequence[str] | None = None,
        engine: int | Sequence[int] | None = None,
        client: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        order: str = "-submitted",
    ) -> list[dict[str, Any]]:
        """Task rows without payloads (sizes kept), filtered and sorted, then limited."""
        where = q.history_clause(tasks, status=status, engine=engine, client=client,
                                 since=since, until=until)
        stmt = select(*_LISTED).where(where).order_by(*q.order_clause(tasks, order))
        n = q.check_limit(limit)
        if n is not None:
            stmt = stmt.limit(n)
        return self._rows(stmt)

    def db_query(self, query: dict[str, Any], keys: list[str] | None = None
                 ) -> list[dict[str, Any]]:
        """ipyparallel-style query (see :func:`monq.hub.query.db_query_clause`), by submitted."""
        cols = [tasks.c[k] for k in q.check_keys(tasks, keys)]
        where = q.db_query_clause(tasks, query, self.dialect)
        stmt = select(*cols).where(where).order_by(tasks.c.submitted.asc(), tasks.c.msg_id)
        return self._rows(stmt)

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
        cols = list(tasks.columns) if with_payload else _LISTED
        rows = self._rows(select(*cols).where(tasks.c.msg_id == msg_id))
        return rows[0] if rows else None

    def counts(self) -> dict[str, Any]:
        """``{"status": {status: n}, "engine": {engine_id: {status: n}}}``, counted in SQL."""
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

    def purge(
        self,
        *,
        msg_ids: Iterable[str] | None = None,
        engine: int | Sequence[int] | None = None,
        status: str | Sequence[str] | None = None,
        before: float | None = None,
        everything: bool = False,
    ) -> int:
        """Delete finished tasks matching ALL the given filters; return how many went.

        Pending and running tasks are never deleted: the Hub still owes them
        a record.  With no filter at all, ``everything=True`` must say so.
        """
        if msg_ids is None and engine is None and status is None and before is None \
                and not everything:
            raise HubError("purge: say what to purge (msg_ids, engine, status, before) "
                           "or pass everything=True")
        if status is not None:
            asked = [status] if isinstance(status, str) else list(status)
            live = [s for s in asked if s in UNFINISHED]
            if live:
                raise HubError(f"purge: {', '.join(live)} tasks cannot be purged "
                               "(only finished ones)")
        if before is not None:
            before = q.time_value("before", before)
        where = and_(
            tasks.c.status.in_(FINISHED),
            q.history_clause(tasks, status=status, engine=engine, what="purge"),
            tasks.c.completed < before if before is not None else true(),
        )
        with self._engine.begin() as conn:
            if msg_ids is None:
                return int(conn.execute(tasks.delete().where(where)).rowcount or 0)
            if isinstance(msg_ids, str):
                msg_ids = [msg_ids]
            ids = list(msg_ids)
            if not all(isinstance(m, str) for m in ids):
                raise HubError("purge: msg_ids must be strings")
            deleted = 0
            for chunk in _chunks(ids):
                res = conn.execute(tasks.delete().where(where, tasks.c.msg_id.in_(chunk)))
                deleted += int(res.rowcount or 0)
            return deleted

    def _rows(self, stmt: Any) -> list[dict[str, Any]]:
        try:
            with self._engine.connect() as conn:
                return [dict(r) for r in conn.execute(stmt).mappings()]
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e


def _by_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group rows by key set (executemany needs one shape), keeping each group's order."""
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(frozenset(r), []).append(r)
    # give every row of a group the same key order as the first
    out = []
    for group in groups.values():
        order = list(group[0])
        out.append([{k: r[k] for k in order} for r in group])
    return out


def _chunks(seq: list[Any]) -> Iterable[list[Any]]:
    for i in range(0, len(seq), _CHUNK):
        yield seq[i:i + _CHUNK]


# -- engine creation ----------------------------------------------------------------


def _make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        # WAL: readers in other processes (CLI, dashboard) never block the Hub.
        # synchronous=NORMAL: in WAL mode a power cut may lose the last
        # commits, never corrupt the file; the Hub's batches make that fine.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=10000")
    finally:
        cur.close()
