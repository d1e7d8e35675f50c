"""Maintained aggregates of the history: counts, a duration histogram, counts per minute.

Three small tables (schema version 3, SQLite only) that the store keeps in
step with ``tasks`` in the SAME transaction as each write batch and each
delete, so they are never out of step:

* ``task_counts(status, engine, label, n)``
* ``duration_hist(engine, label, status, bucket, n, lo, hi)``: tasks with a duration,
  by log-spaced bucket (:data:`PER_DECADE` buckets per decade from 1 µs;
  the last one is open-ended, the first takes everything below 1.12 µs)
* ``minute_counts(minute, status, n)``: tasks by ``floor(submitted / 60)``

A batch's changes are worked out in Python as deltas: an insert adds its
row's keys, an update moves the row from its old keys (read in one SELECT
per 5,000 updated msg_ids, before the batch is applied) to its new ones, a
delete removes the old ones.  The deltas are applied with one
``INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n`` executemany per
table.  Rows whose count has gone to 0 stay (readers skip them).

The same pass keeps the history's *time bounds* (schema version 4): the
largest gap ever written between ``submitted`` and each of ``started`` and
``completed``, both ways (``meta`` row ``time_bounds``).  Only ever raised,
never lowered (a delete leaves them valid bounds), they let a range on
started or completed imply an exact range on submitted
(:func:`monq.hub.query.implied_submitted`).

Schema version 5: each ``duration_hist`` row also keeps the exact smallest and
largest duration of its tasks (``lo``, ``hi``), so that percentiles by engine
or label get their exact min and max from the histogram.  The upsert moves
them with ``min()``/``max()`` of what comes in; a row that loses a task at
one of its bounds (a delete, or an update of a finished task) is recounted in
the same transaction from the tasks left (:func:`refresh_bounds`).

The stats queries (:mod:`monq.hub.stats`) read these tables when a query's
filters are ones the table is keyed by, and the exact SQL over ``tasks``
otherwise.  Percentiles from the histogram are exact to within the width of
one bucket (a bucket's upper bound is ~12 % above its lower one).
"""

from __future__ import annotations

import json
import math
import sqlite3
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import bindparam, func, literal_column, select, text, tuple_
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from monq.hub.schema import (
    FTS_COLUMNS,
    duration_hist,
    meta_table,
    minute_counts,
    task_counts,
    tasks,
)

__all__ = ["NO_ENGINE", "NO_LABEL", "PER_DECADE", "Deltas", "bucket", "bucket_upper",
           "engine_key", "label_key", "minute_of", "rebuild", "unkey_engine", "unkey_label"]

#: the key of a task without an engine / without a label
NO_ENGINE = -1
NO_LABEL = "\x00"
#: histogram buckets per decade of duration, from 1 µs up to past a day
PER_DECADE = 20
_LOWEST = 1e-6
_BUCKETS = 220  # 1 µs * 10 ** (219 / 20) = 89,000 s, more than a day
#: the last (open-ended) bucket
LAST_BUCKET = _BUCKETS - 1
#: _UPPER[b] is bucket b's upper bound (exclusive); the last bucket has none
_UPPER = [_LOWEST * 10 ** (i / PER_DECADE) for i in range(1, _BUCKETS)]
#: the columns of a task that the aggregates are keyed by
STATE_COLUMNS = ("status", "engine", "label", "submitted", "started", "completed",
                 "duration")


def bucket(duration: float) -> int:
    """The histogram bucket of a duration (seconds): 0 .. 219."""
    return bisect_right(_UPPER, duration)


def bucket_upper(b: int) -> float:
    """The upper bound of bucket ``b`` (inf for the last one)."""
    return _UPPER[b] if b < len(_UPPER) else math.inf


def minute_of(submitted: float) -> int:
    """floor(submitted / 60), agreeing with ``60 * m <= submitted < 60 * (m + 1)`` exactly."""
    m = math.floor(submitted / 60)
    if m * 60 > submitted:
        m -= 1
    elif (m + 1) * 60 <= submitted:
        m += 1
    return m


def engine_key(engine: int | None) -> int:
    return NO_ENGINE if engine is None else engine


def label_key(label: str | None) -> str:
    return NO_LABEL if label is None else label


def unkey_engine(k: int) -> int | None:
    return None if k == NO_ENGINE else k


def unkey_label(k: str) -> str | None:
    return None if k == NO_LABEL else k


#: a task's state as the aggregates see it: a tuple of its STATE_COLUMNS, in that order
State = tuple[Any, ...]
_STATUS, _ENGINE, _LABEL, _SUBMITTED, _STARTED, _COMPLETED, _DURATION = range(7)
#: (status, engine, label) of a state: what task_counts is keyed by (before the sentinels)
_COUNT_KEY = itemgetter(_STATUS, _ENGINE, _LABEL)


class Deltas:
    """What a batch changes in the three tables, summed per key."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int, str], int] = defaultdict(int)
        self.hist: dict[tuple[int, str, str, int], int] = defaultdict(int)
        #: smallest and largest duration counted in (out) per histogram row
        self.hist_in: dict[tuple[int, str, str, int], list[float]] = {}
        self.hist_out: dict[tuple[int, str, str, int], list[float]] = {}
        self.minutes: dict[tuple[int, str], int] = defaultdict(int)
        #: largest (submitted - x, x - submitted) of the rows counted in, x: started, completed
        self.gaps: dict[str, list[float]] = {}
        #: the stored rows before the batch, by msg_id (updates only): :data:`BEFORE_COLUMNS`
        self.before: dict[str, State] = {}

    def add(self, row: dict[str, Any], sign: int) -> None:
        """Count a task (its state: :data:`STATE_COLUMNS`) in (+1) or out (-1)."""
        self.add_states([tuple(row.get(k) for k in STATE_COLUMNS)], sign)

    def add_states(self, states: Sequence[State], sign: int) -> None:
        """Count tasks (tuples of :data:`STATE_COLUMNS`) in (+1) or out (-1), all at once.

        Rows are counted by their raw keys first (a C-level Counter over tuples,
        or one pass that touches each row once), and only the few distinct keys
        are then mapped to the tables' keys (sentinels for no engine or label).
        """
        if not states:
            return
        counts = self.counts
        for (status, eng, lab), n in Counter(map(_COUNT_KEY, states)).items():
            counts[(status, NO_ENGINE if eng is None else eng,
                    NO_LABEL if lab is None else lab)] += sign * n
        minutes = self.minutes
        lo = hi = math.inf  # the minute [lo, hi) last computed (its number: m)
        m = 0
        for st in states:
            s = st[_SUBMITTED]
            if s is None:
                continue
            if not lo <= s < hi:  # a batch's tasks mostly share a minute or two
                m = minute_of(s)
                lo, hi = 60 * m, 60 * (m + 1)
            minutes[(m, st[_STATUS])] += sign
        # durations: [lo, hi, n] per raw histogram key
        ends: dict[tuple[Any, Any, str, int], list[Any]] = {}
        upper = _UPPER
        for st in states:
            d = st[_DURATION]
            if d is None:
                continue
            k = (st[_ENGINE], st[_LABEL], st[_STATUS], bisect_right(upper, d))
            e = ends.get(k)
            if e is None:
                ends[k] = [d, d, 1]
            else:
                e[2] += 1
                if d < e[0]:
                    e[0] = d
                elif d > e[1]:
                    e[1] = d
        if ends:
            hist = self.hist
            extremes = self.hist_in if sign > 0 else self.hist_out
            for (eng, lab, status, b), (dlo, dhi, n) in ends.items():
                key = (NO_ENGINE if eng is None else eng, NO_LABEL if lab is None else lab,
                       status, b)
                hist[key] += sign * n
                have = extremes.get(key)
                if have is None:
                    extremes[key] = [dlo, dhi]
                else:  # counted by an earlier call, or two raw keys for one table key
                    have[0], have[1] = min(have[0], dlo), max(have[1], dhi)
        if sign > 0:
            self._gaps(states)

    def _gaps(self, states: Sequence[State]) -> None:
        """The largest (submitted - x, x - submitted) of rows counted in, x: started,
        completed (as ``max``: a NaN gap is kept only if it comes first)."""
        for name, col in (("started", _STARTED), ("completed", _COMPLETED)):
            g = self.gaps.get(name)
            for st in states:
                s, x = st[_SUBMITTED], st[col]
                if s is None or x is None:
                    continue
                if g is None:
                    g = self.gaps[name] = [s - x, x - s]
                    continue
                a, b = s - x, x - s
                if a > g[0]:
                    g[0] = a
                if b > g[1]:
                    g[1] = b

    def apply(self, conn: Connection) -> None:
        """One upsert executemany per table that changes.

        ``duration_hist``'s ``lo``/``hi`` take the min/max of what comes in, in
        the same upsert; a row that lost a task whose duration was its ``lo`` or
        ``hi`` (what goes out reaches a bound) has them recomputed from the tasks
        left: :func:`refresh_bounds`, only when a batch removes durations
        (deletes, and updates of finished tasks).
        """
        for stmt, keys, deltas in (
                (_COUNTS_UPSERT, _COUNTS_KEYS, self.counts),
                (_MINUTES_UPSERT, _MINUTES_KEYS, self.minutes)):
            rows = [{**dict(zip(keys, k)), "n": n} for k, n in deltas.items() if n]
            if rows:
                conn.execute(stmt, rows)
        ins, none = self.hist_in, (None, None)
        rows = [{"engine": k[0], "label": k[1], "status": k[2], "bucket": k[3], "n": n,
                 "lo": ends[0], "hi": ends[1]}
                for k, n in self.hist.items()
                if n or k in ins for ends in (ins.get(k, none),)]
        if rows:
            conn.execute(_HIST_UPSERT, rows)
        if self.hist_out:
            refresh_bounds(conn, self.hist_out)


def _count_upsert(table: Any, keys: tuple[str, ...]) -> Any:
    """Add ``n`` to a counter row, or insert it.  Built once: building the statement
    (its ``excluded`` alias, columns and cache key) for every write had cost more than
    the write itself when tasks come one at a time (~1/3 of the Hub's CPU in a loop of
    sequential round trips, py-spy --gil)."""
    stmt = sqlite_insert(table)
    return stmt.on_conflict_do_update(index_elements=list(keys),
                                      set_={"n": table.c.n + stmt.excluded.n})


_COUNTS_KEYS = ("status", "engine", "label")
_MINUTES_KEYS = ("minute", "status")
_COUNTS_UPSERT = _count_upsert(task_counts, _COUNTS_KEYS)
_MINUTES_UPSERT = _count_upsert(minute_counts, _MINUTES_KEYS)


def _hist_upsert() -> Any:
    h = duration_hist.c
    stmt = sqlite_insert(duration_hist)
    x = stmt.excluded
    # SQLite's min(a, b) is NULL if either is: a row without a bound takes the other
    return stmt.on_conflict_do_update(
        index_elements=["engine", "label", "status", "bucket"],
        set_={"n": h.n + x.n,
              "lo": func.min(func.coalesce(h.lo, x.lo), func.coalesce(x.lo, h.lo)),
              "hi": func.max(func.coalesce(h.hi, x.hi), func.coalesce(x.hi, h.hi))})


_HIST_UPSERT = _hist_upsert()


#: recount one histogram row's lo/hi from its tasks: seeks from each end of its bucket's
#: range of the duration index, testing each entry's row for the status, engine and label
_REFRESH_SEEK = text(
    "UPDATE duration_hist SET "
    + ", ".join(f"{b} = (SELECT duration FROM tasks INDEXED BY ix_tasks_duration "
                "WHERE status = :status AND engine IS :e AND label IS :l "
                f"AND duration >= :blo AND duration < :bhi ORDER BY duration {d} LIMIT 1)"
                for b, d in (("lo", "ASC"), ("hi", "DESC")))
    + " WHERE engine = :engine AND label = :label AND status = :status AND bucket = :bucket")
#: the duration, engine and label of every task of one unusual status: from the partial index
#: of unusual statuses alone (it carries them, schema version 5)
_STATUS_SCAN = text(
    "SELECT engine, label, status, duration FROM tasks INDEXED BY ix_tasks_unusual "
    "WHERE status != 'ok' AND status IN :statuses AND duration >= :dlo AND duration < :dhi"
).bindparams(bindparam("statuses", expanding=True))
#: tasks in each of some histogram buckets, and of some statuses
_SIZES = text(
    "SELECT 'b', bucket, sum(n) FROM duration_hist WHERE bucket IN :buckets GROUP BY bucket "
    "UNION ALL SELECT 's', status, sum(n) FROM task_counts WHERE status IN :statuses "
    "GROUP BY status").bindparams(bindparam("buckets", expanding=True),
                                  bindparam("statuses", expanding=True))
_SET_BOUNDS = text(
    "UPDATE duration_hist SET lo = :lo, hi = :hi "
    "WHERE engine = :engine AND label = :label AND status = :status AND bucket = :bucket")
#: histogram rows read per statement (4 bound values each)
_KEYS_PER_READ = 2000

HistKey = tuple[int, str, str, int]


def refresh_bounds(conn: Connection, out: dict[HistKey, list[float]]) -> None:
    """Recompute ``lo``/``hi`` of the histogram rows that lost a task at a bound.

    ``out``: (engine, label, status, bucket) -> [smallest, largest] duration
    removed from it.  Run after the tasks and the upsert are written, so it
    reads what is left.  The rows are read first (one SELECT): a row left
    without tasks gets NULL bounds, one whose bounds lie strictly outside
    what went keeps them, and the others are recounted, each the cheaper of
    two ways by the histogram's own counts:

    * seeks from each end of the row's bucket range of the duration index,
      reading about (tasks in the bucket) / (the row's tasks) rows: cheap for
      ok rows, which are a share of every bucket;
    * one walk over all the entries of the row's status in the partial index
      of unusual statuses, which carries engine, label and duration (one
      SELECT per status for all its rows, no task read): cheaper for rare
      statuses, a few tasks per row lost among thousands in a bucket.
    """
    h = duration_hist.c
    keys = list(out)
    held: dict[HistKey, tuple[int, Any, Any]] = {}
    for i in range(0, len(keys), _KEYS_PER_READ):
        part = keys[i:i + _KEYS_PER_READ]
        for e, lab, st, b, n, lo, hi in conn.execute(
                select(h.engine, h.label, h.status, h.bucket, h.n, h.lo, h.hi).where(
                    tuple_(h.engine, h.label, h.status, h.bucket).in_(part))):
            held[(e, lab, st, b)] = (n, lo, hi)
    emptied, stale = [], []
    for key, (out_lo, out_hi) in out.items():
        n, lo, hi = held.get(key, (0, None, None))
        if n <= 0:
            if lo is not None or hi is not None:
                emptied.append(key)
        elif lo is None or hi is None or lo >= out_lo or hi <= out_hi:
            stale.append((key, n))
    sets = [{"engine": k[0], "label": k[1], "status": k[2], "bucket": k[3],
             "lo": None, "hi": None} for k in emptied]
    seek: list[HistKey] = []
    if stale:
        # tasks per bucket (all statuses) and per status: one statement
        buckets = sorted({k[3] for k, _ in stale})
        statuses = sorted({k[2] for k, _ in stale})
        sizes: dict[tuple[str, Any], int] = {
            (what, v): int(n or 0) for what, v, n in conn.execute(_SIZES, {
                "buckets": buckets, "statuses": statuses})}
        # rows read by seeks, per status; and by a walk: the status' tasks
        by_status: dict[str, list[tuple[HistKey, float]]] = defaultdict(list)
        for key, n in stale:
            by_status[key[2]].append((key, sizes.get(("b", key[3]), 0) / (n + 1)))
        walk: set[HistKey] = set()
        for st, rows in by_status.items():
            way = _refresh_choice(st, sum(c for _, c in rows), sizes.get(("s", st), 0))
            if way == "seek":
                seek += [k for k, _ in rows]
            else:
                walk.update(k for k, _ in rows)
        if walk:
            sets += _walk_statuses(conn, walk)
    if sets:
        conn.execute(_SET_BOUNDS, sets)
    if seek:
        conn.execute(_REFRESH_SEEK, [
            {"engine": k[0], "label": k[1], "status": k[2], "bucket": k[3],
             "e": unkey_engine(k[0]), "l": unkey_label(k[1]),
             "blo": _bucket_lower(k[3]), "bhi": _bucket_upper_or_inf(k[3])} for k in seek])


def _refresh_choice(status: str, seeks: float, walk: int) -> str:
    """"seek" or "walk": how to recount a status' rows, by the rows each reads (about).

    ``seeks``: the rows one seek per row would step over (two seeks each: from
    either end of the bucket); ``walk``: the status' tasks.  A walk step reads
    an entry of the partial index of unusual statuses (no task row) but goes
    through Python; a seek step reads a task row in SQLite: about the same
    CPU each (measured at 1M tasks, ~1 us).
    """
    return "seek" if status == "ok" or 2 * seeks <= walk else "walk"


def _walk_statuses(conn: Connection, keys: set[HistKey]) -> list[dict[str, Any]]:
    """The exact lo/hi of histogram rows of unusual statuses, from one walk of their
    tasks' entries in the partial index of unusual statuses (one statement)."""
    found: dict[HistKey, list[float]] = {}
    buckets = {k[3] for k in keys}
    rows = conn.execute(_STATUS_SCAN, {
        "statuses": sorted({k[2] for k in keys}), "dlo": _bucket_lower(min(buckets)),
        "dhi": _bucket_upper_or_inf(max(buckets))}).all()
    upper = _UPPER
    for eng, lab, st, d in rows:
        key = (NO_ENGINE if eng is None else eng, NO_LABEL if lab is None else lab, st,
               bisect_right(upper, d))
        if key in keys:
            ends = found.get(key)
            if ends is None:
                found[key] = [d, d]
            elif d < ends[0]:
                ends[0] = d
            elif d > ends[1]:
                ends[1] = d
    none = (None, None)
    return [{"engine": k[0], "label": k[1], "status": k[2], "bucket": k[3],
             "lo": ends[0], "hi": ends[1]} for k in keys for ends in (found.get(k, none),)]


def _bucket_lower(b: int) -> float:
    return -math.inf if b == 0 else _UPPER[b - 1]


def _bucket_upper_or_inf(b: int) -> float:
    return math.inf if b >= LAST_BUCKET else _UPPER[b]


#: the columns whose gap to ``submitted`` is bounded (meta row ``time_bounds``)
TIME_BOUND_COLUMNS = ("started", "completed")
#: {column: [lead, lag]}: submitted - column <= lead, column - submitted <= lag, every row
TimeBounds = dict[str, list[float]]


def read_time_bounds(conn: Connection) -> TimeBounds | None:
    """The stored time bounds; None if this database does not keep them."""
    found = conn.execute(select(meta_table.c.value)
                         .where(meta_table.c.key == "time_bounds")).scalar()
    if found is None:
        return None
    out = json.loads(found)
    return {k: [float(v[0]), float(v[1])] for k, v in out.items()}


def merge_time_bounds(conn: Connection, gaps: TimeBounds, known: TimeBounds | None
                      ) -> TimeBounds | None:
    """Raise the stored bounds to cover ``gaps`` if they do not already; the new bounds.

    ``known`` is what the caller last read or wrote (the store is the only
    writer): when it covers the gaps already this costs no statement.
    """
    if known is not None and _covers(known, gaps):
        return known
    stored = read_time_bounds(conn)
    if stored is None:
        return None  # a database without bounds (never used: nothing to keep)
    if _covers(stored, gaps):
        return stored
    merged = {k: list(v) for k, v in stored.items()}
    for k, (lead, lag) in gaps.items():
        old = merged.get(k, [_MIN_BOUND, _MIN_BOUND])
        merged[k] = [max(old[0], _headroom(lead)), max(old[1], _headroom(lag))]
    conn.execute(meta_table.update().where(meta_table.c.key == "time_bounds")
                 .values(value=json.dumps(merged)))
    return merged


#: bounds start at 1 s and grow by powers of two: raising them is rare (a statement each time)
_MIN_BOUND = 1.0
#: what a new database starts with: submitted after started (clock skew only) by up to
#: 1 s, before it (queue wait, run time) by up to 64 s; wider gaps raise them (one
#: statement each time they double)
INITIAL_TIME_BOUNDS = {**{k: [_MIN_BOUND, 64.0] for k in ("started", "completed")},
                       "rowid": [_MIN_BOUND, _MIN_BOUND]}


def _headroom(gap: float) -> float:
    """The bound kept for a gap: the next power of two seconds, at least 1 s."""
    if not gap <= _MIN_BOUND:  # NaN and inf too
        return 2.0 ** math.ceil(math.log2(gap)) if math.isfinite(gap) else math.inf
    return _MIN_BOUND


def _covers(bounds: TimeBounds, gaps: TimeBounds) -> bool:
    for k, (lead, lag) in gaps.items():
        b = bounds.get(k)
        if b is None or lead > b[0] or lag > b[1]:
            return False
    return True


def rebuild_time_bounds(conn: Connection) -> None:
    """Compute the time bounds from every row (an upgrade; one scan of ``tasks``)."""
    c = tasks.c
    out: TimeBounds = {}
    for name in TIME_BOUND_COLUMNS:
        x = c[name]
        lead, lag = conn.execute(select(func.max(c.submitted - x), func.max(x - c.submitted))
                                 ).one()
        out[name] = [_MIN_BOUND, _MIN_BOUND] if lead is None else \
            [_headroom(float(lead)), _headroom(float(lag))]
    # rowid order against submitted order: how much later than a row written after it a
    # row was submitted (the running maximum of the rows before it, minus its own)
    prev = func.max(c.submitted).over(order_by=literal_column("tasks.rowid"),
                                      rows=(None, -1))
    inner = select((prev - c.submitted).label("late")).subquery()
    late = conn.execute(select(func.max(inner.c.late))).scalar()
    out["rowid"] = [_MIN_BOUND if late is None else _headroom(float(late)), _MIN_BOUND]
    conn.execute(meta_table.delete().where(meta_table.c.key == "time_bounds"))
    conn.execute(meta_table.insert(), {"key": "time_bounds", "value": json.dumps(out)})


#: msg_ids per IN (...) list: SQLite before 3.32 binds at most 999 variables, later 32,766
_CHUNK = 5000 if sqlite3.sqlite_version_info >= (3, 32) else 500


#: read with the state of an updated row: the payloads it references (monq.hub.payloads)
KEY_COLUMNS = ("request_key", "result_key")
#: SQL: the row has text to index (some text column neither NULL nor empty)
HAS_TEXT_SQL = " OR ".join(f"COALESCE({c}, '') != ''" for c in FTS_COLUMNS)
#: what :func:`read_states` gives per row, in this order: the state, the payload keys and
#: whether the row has text in the full-text index
BEFORE_COLUMNS = (*STATE_COLUMNS, *KEY_COLUMNS, "has_text")
#: positions in a :data:`BEFORE_COLUMNS` tuple
REQUEST_KEY, RESULT_KEY, HAS_TEXT = range(len(STATE_COLUMNS), len(BEFORE_COLUMNS))
_READ_STATES = (f"SELECT msg_id, {', '.join(STATE_COLUMNS + KEY_COLUMNS)}, "
                f"({HAS_TEXT_SQL}) FROM tasks WHERE msg_id IN ({{}})")


def read_states(conn: Connection, ids: Iterable[str], chunk: int = _CHUNK
                ) -> dict[str, State]:
    """The aggregate-keyed columns, payload keys and whether the row has indexed text
    (:data:`BEFORE_COLUMNS`) of the stored rows among ``ids``, by msg_id.

    Plain SQL with one placeholder per id, run as is: SQLAlchemy's expanding IN
    renders its 5,000 parameters again on every call, which cost more than
    the SELECT.
    """
    ids = list(ids)
    out: dict[str, State] = {}
    for i in range(0, len(ids), chunk):
        part = ids[i:i + chunk]
        rows = conn.exec_driver_sql(_READ_STATES.format(", ".join("?" * len(part))),
                                    tuple(part)).fetchall()
        out.update(zip(map(itemgetter(0), rows), (r[1:] for r in rows)))
    return out


def _state_getter(row: dict[str, Any]) -> Any:
    """A function giving the state tuple of rows with ``row``'s columns (one shape)."""
    present = [k for k in STATE_COLUMNS if k in row]
    n = len(present)
    if present == list(STATE_COLUMNS[:n]) and n > 1:  # the usual shapes: a prefix
        get = itemgetter(*present)
        pad = (None,) * (len(STATE_COLUMNS) - n)
        return (lambda r: get(r) + pad) if pad else get
    return lambda r: tuple(r.get(k) for k in STATE_COLUMNS)


def batch_deltas(conn: Connection, insert_groups: Sequence[Sequence[dict[str, Any]]],
                 update_groups: Sequence[Sequence[dict[str, Any]]]) -> Deltas:
    """The deltas of a write batch, read before it is applied.

    ``insert_groups`` are the inserts, grouped by key set; ``update_groups``
    the updates in the order the store executes them (one executemany per
    key set), so that two updates of one task in one batch end where the
    database ends.  Rows are turned into state tuples a group at a time and
    counted in bulk (:meth:`Deltas.add_states`); only updated rows go through
    Python one by one.
    """
    deltas = Deltas()
    ins: list[State] = []
    for group in insert_groups:
        if group:
            ins += map(_state_getter(group[0]), group)
    if not any(update_groups):
        deltas.add_states(ins, +1)
        return deltas
    by_id = itemgetter("msg_id")
    inserted = {by_id(r): i for i, r in enumerate(r for g in insert_groups for r in g)}
    updated = {by_id(r) for g in update_groups for r in g}
    stored_ids = updated - inserted.keys()
    before = read_states(conn, stored_ids) if stored_ids else {}
    deltas.before = before
    # the states updates move: lists, changed in place
    state: dict[str, list[Any]] = {k: list(v[:_DURATION + 1]) for k, v in before.items()}
    for msg_id in updated & inserted.keys():
        state[msg_id] = list(ins[inserted[msg_id]])
    for group in update_groups:
        if not group:
            continue
        first = group[0]
        sets = [(i, k) for i, k in enumerate(STATE_COLUMNS[:_DURATION]) if k in first]
        timed = "started" in first or "completed" in first
        for r in group:
            row = state.get(r["msg_id"])
            if row is None:
                continue  # an update of an unknown task changes nothing
            for i, k in sets:
                row[i] = r[k]
            if timed:
                s, c = row[_STARTED], row[_COMPLETED]
                row[_DURATION] = None if s is None or c is None else c - s
    for msg_id in updated & inserted.keys():  # counted in as they end the batch
        ins[inserted[msg_id]] = tuple(state[msg_id])
    # a stored task whose keys did not change moves nothing (and, taking nothing
    # out of its histogram row, never makes its lo/hi recounted)
    gone: list[State] = []
    for msg_id, old in before.items():
        new = tuple(state[msg_id])
        old = old[:_DURATION + 1]
        if new != old:
            gone.append(old)
            ins.append(new)
    deltas.add_states(ins, +1)
    deltas.add_states(gone, -1)
    return deltas


def delete_deltas(conn: Connection, ids: Sequence[str]) -> Deltas:
    """The deltas of deleting the rows ``ids`` (read before they go)."""
    deltas = Deltas()
    deltas.before = read_states(conn, ids)
    deltas.add_states([r[:_DURATION + 1] for r in deltas.before.values()], -1)
    return deltas


def rebuild(conn: Connection) -> None:
    """Fill the three tables from ``tasks`` (SQLite): one INSERT ... SELECT ... GROUP BY each.

    The bucket and minute are the Python functions above, registered on the
    connection, so a rebuilt table is exactly what the writes keep.
    """
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    dbapi.create_function("monq_bucket", 1, bucket, deterministic=True)
    dbapi.create_function("monq_minute", 1, minute_of, deterministic=True)
    c = tasks.c
    eng = func.coalesce(c.engine, NO_ENGINE)
    lab = func.coalesce(c.label, NO_LABEL)
    n = func.count()
    for table in (task_counts, minute_counts):
        conn.execute(table.delete())
    conn.execute(task_counts.insert().from_select(
        ["status", "engine", "label", "n"],
        select(c.status, eng, lab, n).group_by(c.status, eng, lab)))
    _rebuild_hist(conn)
    m = func.monq_minute(c.submitted)
    conn.execute(minute_counts.insert().from_select(
        ["minute", "status", "n"],
        select(m, c.status, n).where(c.submitted.is_not(None)).group_by(m, c.status)))


def rebuild_hist(conn: Connection) -> None:
    """Fill ``duration_hist`` (counts, lo and hi) from ``tasks``: one INSERT ... SELECT."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    dbapi.create_function("monq_bucket", 1, bucket, deterministic=True)
    _rebuild_hist(conn)


def _rebuild_hist(conn: Connection) -> None:
    c = tasks.c
    eng = func.coalesce(c.engine, NO_ENGINE)
    lab = func.coalesce(c.label, NO_LABEL)
    b = func.monq_bucket(c.duration)
    conn.execute(duration_hist.delete())
    conn.execute(duration_hist.insert().from_select(
        ["engine", "label", "status", "bucket", "n", "lo", "hi"],
        select(eng, lab, c.status, b, func.count(), func.min(c.duration),
               func.max(c.duration)).where(c.duration.is_not(None))
        .group_by(eng, lab, c.status, b)))
