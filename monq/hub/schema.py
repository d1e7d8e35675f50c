"""The history database's tables and indexes, the full-text index, and schema upgrades.

Schema versions (kept in the ``meta`` table):

1. tasks, engines, meta.
2. tasks gain ``duration`` (completed - started, written with the times so
   it can be indexed and filtered), ``stored_bytes`` (what the record keeps:
   payloads and captured text; what ``--max-bytes`` counts) and
   ``payload_evicted`` (when retention dropped the payloads); indexes for
   every history filter; on SQLite, an FTS5 index over the captured text.
3. maintained aggregates (:mod:`monq.hub.aggregates`): ``task_counts``
   (status, engine, label), ``duration_hist`` (engine, label, status,
   log-spaced duration bucket) and ``minute_counts`` (minute of
   submission, status), kept in step by every write and delete in the same
   transaction; an upgrade builds them once from the rows already there.
4. payloads are stored once per distinct content (SQLite): ``payloads(key,
   data, refs)`` keyed by a 64-bit hash of the bytes, with a reference
   count; a task keeps ``request_key``/``result_key`` (its ``request`` and
   ``result`` columns hold a payload inline only when it was written before
   version 4, on other databases, or on the rare hash collision).  A no-op
   sent a million times keeps its pickled function once instead of a million
   times: that was more than half of a no-op's bytes.  ``meta`` also keeps
   ``time_bounds``: how far ``submitted`` may lie from ``started`` and
   ``completed`` (the largest gap ever written each way), which turns a
   range on started/completed into an exact range on submitted for the
   default order (see :func:`monq.hub.query.implied_submitted`).  A
   partial index over the rare statuses (not "ok") carries engine and
   label, so that "status=error AND engine AND label" is answered from
   the index alone; the duration index carries submitted, for duration
   ranges in the default order.  The (engine, duration) and (label, duration) indexes
   are gone (see the note at the indexes).
5. ``duration_hist`` rows keep the exact smallest and largest duration of
   their tasks (``lo``, ``hi``), moved with the counts by every write and
   recomputed, for the rows whose bound a delete or update may have taken,
   in the same transaction (:mod:`monq.hub.aggregates`): percentiles by
   engine or label get their exact min and max from the histogram instead of
   seeks into the duration index filtered by a column it does not carry.
   The partial index of unusual statuses carries ``duration`` too (a few %
   of the rows: what recounts a rare status' lo/hi reads it alone).  The
   upgrade rebuilds ``duration_hist`` from the tasks (one GROUP BY).

An older database is upgraded in place when a store opens it (columns
added and filled, indexes built): a user's history survives an upgrade.  A
newer one is refused with a clear error.
"""

from __future__ import annotations

import json
import logging
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
    event,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from monq.errors import HubError

log = logging.getLogger(__name__)

SCHEMA_VERSION = "5"

metadata = MetaData()

tasks = Table(
    "tasks", metadata,
    Column("msg_id", String(64), primary_key=True),
    Column("client", String(64)),
    Column("engine", Integer, nullable=True),
    Column("engine_uuid", String(64), nullable=True),
    Column("queue", String(16)),
    Column("label", String(200), nullable=True),
    Column("func", String(300), nullable=True),
    Column("status", String(16), nullable=False),
    Column("submitted", Float, nullable=True, index=True),
    Column("started", Float, nullable=True, index=True),
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
    # -- version 2
    Column("duration", Float, nullable=True),
    Column("stored_bytes", Integer, nullable=True),
    Column("payload_evicted", Float, nullable=True),
    # -- version 4: the keys of payloads stored once in ``payloads``
    Column("request_key", Integer, nullable=True),
    Column("result_key", Integer, nullable=True),
)
# Each history filter gets an index that also gives the default order
# (newest submitted first), so "filter, sort, limit" reads only the rows it
# returns.  (Version 4 dropped the (engine|label, duration) indexes, 40 bytes a
# task: percentiles by engine and label come from the maintained histogram, and
# their exact min and max from one bucket's range of the duration index.)
Index("ix_tasks_status_submitted", tasks.c.status, tasks.c.submitted)
# Version 4: duration with submitted, so that a duration range in the default order
# sorts (submitted, rowid) from the index alone instead of reading every match's row
# (an order by duration sorts only ties, by rowid)
Index("ix_tasks_duration", tasks.c.duration, tasks.c.submitted)
Index("ix_tasks_engine_submitted", tasks.c.engine, tasks.c.submitted)
Index("ix_tasks_client_submitted", tasks.c.client, tasks.c.submitted)
Index("ix_tasks_label_submitted", tasks.c.label, tasks.c.submitted)
#: statuses other than "ok" are rare; a task's status is one of them (SQL)
UNUSUAL = text("status != 'ok'")
# Version 4: the rare statuses again, with engine and label: walking it for
# "status=error AND engine=3 AND label=x" tests engine and label on the index entry
# instead of reading each error's row (partial: a few % of the rows).
# label (version 5: and duration, so that the histogram's lo/hi of a rare status are
# recounted from this index alone, monq.hub.aggregates.refresh_bounds; a few % of the rows)
_UNUSUAL_INDEX = Index("ix_tasks_unusual", tasks.c.status, tasks.c.submitted, tasks.c.engine,
                       tasks.c.label, tasks.c.duration, sqlite_where=UNUSUAL)
#: retention evicts payloads oldest-completed first: only rows that still hold one
HAS_PAYLOAD = or_(tasks.c.request.is_not(None), tasks.c.result.is_not(None),
                  tasks.c.request_key.is_not(None), tasks.c.result_key.is_not(None))
_PAYLOAD_INDEX = Index("ix_tasks_payload_completed", tasks.c.completed, sqlite_where=HAS_PAYLOAD)
_PARTIAL = {_UNUSUAL_INDEX: UNUSUAL, _PAYLOAD_INDEX: HAS_PAYLOAD}


@event.listens_for(_UNUSUAL_INDEX, "before_create")
@event.listens_for(_PAYLOAD_INDEX, "before_create")
def _postgresql_where(index: Index, connection: Connection, **kw: Any) -> None:
    # set here, not as postgresql_where= above: naming a dialect's option makes SQLAlchemy
    # import that dialect to check it, ~50 ms of every controller's start-up
    if connection.dialect.name == "postgresql":
        index.dialect_options["postgresql"]["where"] = _PARTIAL[index]

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

# -- version 3: maintained aggregates (SQLite; see monq.hub.aggregates).  NULL engine
# and label are stored as sentinels (-1, NO_LABEL) so they can be part of a key.
task_counts = Table(
    "task_counts", metadata,
    Column("status", String(16), primary_key=True),
    Column("engine", Integer, primary_key=True, autoincrement=False),
    Column("label", String(200), primary_key=True),
    Column("n", Integer, nullable=False),
)
duration_hist = Table(
    "duration_hist", metadata,
    Column("engine", Integer, primary_key=True, autoincrement=False),
    Column("label", String(200), primary_key=True),
    Column("status", String(16), primary_key=True),
    Column("bucket", Integer, primary_key=True, autoincrement=False),
    Column("n", Integer, nullable=False),
    # -- version 5: the exact smallest and largest duration of the row's tasks
    # (NULL when it has none)
    Column("lo", Float, nullable=True),
    Column("hi", Float, nullable=True),
)
# covering indexes in each grouping's order: GROUP BY (engine|label|-), bucket reads
# one of them in order instead of sorting the table into a temp b-tree (version 5: with
# lo and hi, so min and max are read from the index too)
_h = duration_hist.c
Index("ix_duration_hist_engine", _h.engine, _h.bucket, _h.status, _h.label, _h.n, _h.lo, _h.hi)
Index("ix_duration_hist_label", _h.label, _h.bucket, _h.status, _h.engine, _h.n, _h.lo, _h.hi)
Index("ix_duration_hist_bucket", _h.bucket, _h.status, _h.engine, _h.label, _h.n, _h.lo, _h.hi)
minute_counts = Table(
    "minute_counts", metadata,
    Column("minute", Integer, primary_key=True, autoincrement=False),
    Column("status", String(16), primary_key=True),
    Column("n", Integer, nullable=False),
)
AGGREGATE_TABLES = (task_counts, duration_hist, minute_counts)

# -- version 4: payloads stored once per distinct content (SQLite; see monq.hub.payloads).
# ``key`` is the row id (no separate index): a 64-bit hash of ``data``.
payloads_table = Table(
    "payloads", metadata,
    Column("key", Integer, primary_key=True, autoincrement=False),
    Column("data", LargeBinary, nullable=False),
    Column("refs", Integer, nullable=False),
)

#: the full-text index (SQLite FTS5), external content: it stores no copy of the text
fts_table = Table(
    "tasks_fts", MetaData(),  # not in ``metadata``: created by _FTS_DDL, SQLite only
    Column("rowid", Integer),
    Column("tasks_fts", Text),
)

#: the text columns the full-text index covers
FTS_COLUMNS = ("stdout", "stderr", "traceback", "evalue")
_COLS = ", ".join(FTS_COLUMNS)
# The store keeps the index in step itself, in each write's transaction
# (monq.hub.store), rather than with triggers: a trigger that touches a
# virtual table makes SQLite open a savepoint on it for every row of an
# executemany, which measured 2-3x slower batch writes even for rows
# without text (most of them).
_FTS_DDL = f"CREATE VIRTUAL TABLE IF NOT EXISTS tasks_fts USING fts5({_COLS}, " \
    "content='tasks', content_rowid='rowid')"
_V2_COLUMNS = {"duration": "FLOAT", "stored_bytes": "INTEGER", "payload_evicted": "FLOAT"}
#: version-1 single-column indexes that the version-2 composite ones replace
_V1_INDEXES = ("ix_tasks_engine", "ix_tasks_client")
_V4_COLUMNS = {"request_key": "INTEGER", "result_key": "INTEGER"}
#: version-3 indexes that version 4 does without
_V3_INDEXES = ("ix_tasks_engine_duration", "ix_tasks_label_duration",
               "ix_tasks_duration")  # the last one comes back with submitted


def prepare(conn: Connection, url: str, dialect: str, want_fts: bool) -> bool:
    """Create or upgrade the schema in ``conn``'s transaction; return whether FTS5 is on.

    The full-text table is created on SQLite whenever FTS5 is available, so
    that every writer keeps it in step; ``want_fts`` only says whether this
    store searches with it.

    ``metadata.create_all`` has already run (new tables carry every column).
    """
    found = conn.execute(
        select(meta_table.c.value).where(meta_table.c.key == "schema_version")).scalar()
    if found is None:
        conn.execute(meta_table.insert(), {"key": "schema_version", "value": SCHEMA_VERSION})
        if dialect == "sqlite":  # no rows yet: no gaps (monq.hub.aggregates)
            from monq.hub.aggregates import INITIAL_TIME_BOUNDS

            conn.execute(meta_table.insert(), {"key": "time_bounds",
                                               "value": json.dumps(INITIAL_TIME_BOUNDS)})
    elif found in ("1", "2", "3", "4"):
        if found == "1":
            _upgrade_1_to_2(conn, url)
        if found in ("1", "2"):
            _upgrade_2_to_3(conn, url, dialect)
        if found in ("1", "2", "3"):
            _upgrade_3_to_4(conn, url, dialect)
        # versions 1 and 2 had no histogram: the 2-to-3 upgrade built it with lo and hi
        _upgrade_4_to_5(conn, url, dialect, rebuild=found in ("3", "4"))
    elif found != SCHEMA_VERSION:
        raise HubError(f"database {url} has schema version {found}; this monq "
                       f"reads versions 1 to {SCHEMA_VERSION} (use another --db, or a newer "
                       "monq)")
    for idx in (*tasks.indexes, *duration_hist.indexes):
        idx.create(conn, checkfirst=True)
    if dialect != "sqlite":
        return False
    return _ensure_fts(conn, rebuild=found == "1")


def _upgrade_1_to_2(conn: Connection, url: str) -> None:
    log.warning("upgrading history database %s from schema version 1 to %s",
                url, SCHEMA_VERSION)
    have = {c["name"] for c in _inspect_columns(conn)}
    for name, sqltype in _V2_COLUMNS.items():
        if name not in have:
            conn.execute(text(f"ALTER TABLE tasks ADD COLUMN {name} {sqltype}"))
    c = tasks.c
    conn.execute(tasks.update().where(c.started.is_not(None), c.completed.is_not(None))
                 .values(duration=c.completed - c.started))
    conn.execute(tasks.update().values(stored_bytes=stored_bytes_expr()))
    for name in _V1_INDEXES:
        conn.execute(text(f"DROP INDEX IF EXISTS {name}"))


def _upgrade_2_to_3(conn: Connection, url: str, dialect: str) -> None:
    from monq.hub import aggregates

    log.warning("upgrading history database %s to schema version %s (building the "
                "history's aggregates)", url, SCHEMA_VERSION)
    if dialect == "sqlite":  # elsewhere the aggregates are neither kept nor read
        aggregates.rebuild(conn)


def _upgrade_3_to_4(conn: Connection, url: str, dialect: str) -> None:
    """Key columns for shared payloads, the time bounds, the two widened indexes.

    Payloads already stored stay inline in their rows (read as before);
    new ones are stored once.  The history is kept as it was.
    """
    from monq.hub import aggregates

    log.warning("upgrading history database %s to schema version %s", url, SCHEMA_VERSION)
    have = {c["name"] for c in _inspect_columns(conn)}
    for name, sqltype in _V4_COLUMNS.items():
        if name not in have:
            conn.execute(text(f"ALTER TABLE tasks ADD COLUMN {name} {sqltype}"))
    for name in _V3_INDEXES:
        conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
    # the partial index's condition now names the key columns too
    conn.execute(text("DROP INDEX IF EXISTS ix_tasks_payload_completed"))
    if dialect == "sqlite":
        aggregates.rebuild_time_bounds(conn)
    conn.execute(meta_table.update().where(meta_table.c.key == "schema_version")
                 .values(value=SCHEMA_VERSION))


def _upgrade_4_to_5(conn: Connection, url: str, dialect: str, rebuild: bool) -> None:
    """``lo``/``hi`` in ``duration_hist``: the table is rebuilt from the tasks (SQLite)."""
    from monq.hub import aggregates

    log.warning("upgrading history database %s to schema version %s (the duration "
                "histogram's min and max)", url, SCHEMA_VERSION)
    have = {c["name"] for c in _inspect_columns(conn, "duration_hist")}
    for name in ("lo", "hi"):
        if name not in have:
            conn.execute(text(f"ALTER TABLE duration_hist ADD COLUMN {name} FLOAT"))
    # they now carry lo and hi, and duration: made again by prepare()
    for name in [str(idx.name) for idx in duration_hist.indexes] + ["ix_tasks_unusual"]:
        conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
    if dialect == "sqlite" and rebuild:
        aggregates.rebuild_hist(conn)
    conn.execute(meta_table.update().where(meta_table.c.key == "schema_version")
                 .values(value=SCHEMA_VERSION))


def stored_bytes_expr() -> Any:
    """SQL for what a row keeps: its payloads and its captured text."""
    from sqlalchemy import func

    c = tasks.c
    parts = [func.coalesce(func.length(col), 0)
             for col in (c.request, c.result, c.stdout, c.stderr, c.traceback, c.evalue)]
    total: Any = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _inspect_columns(conn: Connection, table: str = "tasks") -> list[dict[str, object]]:
    from sqlalchemy import inspect

    return list(inspect(conn).get_columns(table))  # type: ignore[arg-type]


def _ensure_fts(conn: Connection, rebuild: bool) -> bool:
    exists = conn.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE name = 'tasks_fts'").first() is not None
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(_FTS_DDL)
            if rebuild or not exists:
                # an upgraded (or pre-FTS) database: index the text already there
                conn.exec_driver_sql("INSERT INTO tasks_fts(tasks_fts) VALUES ('rebuild')")
    except OperationalError as e:
        log.warning("SQLite without FTS5 (%s): search falls back to LIKE", e)
        return False
    return True
