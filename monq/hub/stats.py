"""The history's aggregates: counts, counts by group or time bucket, duration percentiles.

A mixin of :class:`monq.hub.store.TaskStore` (which owns the connection);
every aggregate is filtered by the same :class:`~monq.hub.filters.TaskFilter`
as history pages.  When a query's filters are only ones a maintained
aggregate table is keyed by (:mod:`monq.hub.aggregates`: status, engine and
label for counts and percentiles; status and submission time for counts by
minute and hour) it is read from that table, in a few ms whatever the size of
the history; otherwise it is computed by the database from indexes over
``tasks`` (exact).  Percentiles from the histogram are exact to within one
bucket (~12 %).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, and_, func, literal, literal_column, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from monq.errors import HubError
from monq.hub import aggregates as agg
from monq.hub.filters import TaskFilter
from monq.hub.schema import duration_hist, minute_counts, task_counts, tasks

__all__ = ["GROUP_BY", "MAX_GROUPS", "TaskStats"]

#: what task_stats may group by
GROUP_BY = ("status", "engine", "label", "client", "queue", "minute", "hour")
#: most time buckets a task_stats query counts
_MAX_BUCKETS = 100_000
#: most groups a percentile query answers (the biggest ones)
MAX_GROUPS = 100


class TaskStats:
    """Aggregate queries over the tasks table (mixed into TaskStore)."""

    _engine: Engine
    dialect: str
    #: the maintained aggregate tables are kept in step (SQLite) and may be read
    aggregates: bool

    if TYPE_CHECKING:
        def where(self, f: TaskFilter, selective: frozenset[str] = frozenset()) -> Any: ...
        def _scalar(self, stmt: Any) -> Any: ...

    def count(self, **filters: Any) -> int:
        """How many tasks match, counted in SQL."""
        f = TaskFilter.from_dict(filters, "count")
        if self._by_aggregate(f, _KEYED):
            stmt = select(func.coalesce(func.sum(task_counts.c.n), 0)).where(
                *_agg_where(task_counts, f))
            return int(self._scalar(stmt) or 0)
        stmt = select(func.count()).select_from(tasks)
        if not f.is_empty():  # without WHERE, SQLite counts a b-tree without reading rows
            stmt = stmt.where(self.where(f))
        return int(self._scalar(stmt) or 0)

    def task_stats(self, by: str = "status", **filters: Any) -> list[tuple[Any, int]]:
        """``[(group, count), ...]`` of the matching tasks, by ``by``, counted in SQL.

        ``by`` is a column (status, engine, label, client, queue) or a time
        bucket of submission (minute, hour: the bucket's start in epoch
        seconds, oldest first).  Groups are largest first for columns.
        """
        if by not in GROUP_BY:
            raise HubError(f"task_stats: cannot group by {by!r}; use one of "
                           f"{', '.join(GROUP_BY)}")
        f = TaskFilter.from_dict(filters, "task_stats")
        n = func.count().label("n")
        if by in ("minute", "hour"):
            return self._time_buckets(f, 60 if by == "minute" else 3600)
        if by in _KEYED and self._by_aggregate(f, _KEYED):
            col = task_counts.c[by]
            total = func.sum(task_counts.c.n).label("n")
            stmt = (select(col, total).where(*_agg_where(task_counts, f)).group_by(col)
                    .having(total > 0).order_by(total.desc(), col))
            unkey: Callable[[Any], Any] = _UNKEY.get(by, _same)
        else:
            col = tasks.c[by]
            stmt = select(col, n).where(self.where(f)).group_by(col).order_by(n.desc(), col)
            unkey = _same
        try:
            with self._engine.connect() as conn:
                return [(unkey(k), int(c)) for k, c in conn.execute(stmt)]
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e

    def _time_buckets(self, f: TaskFilter, size: int) -> list[tuple[Any, int]]:
        """Counts per ``size``-second bucket of submission, oldest first (empty ones left out).

        A recursive CTE walks the buckets and counts each with a range on an
        index ending in ``submitted`` (the filter's own, or submitted's):
        the rows are stepped through once and never sorted, which a GROUP BY
        on ``submitted / 60`` would have to do.
        """
        c = tasks.c
        where = self.where(f)
        lo = f.since if f.since is not None else self._scalar(
            select(c.submitted).where(where, c.submitted.is_not(None))
            .order_by(c.submitted.asc()).limit(1))
        hi = f.until if f.until is not None else self._scalar(
            select(c.submitted).where(where, c.submitted.is_not(None))
            .order_by(c.submitted.desc()).limit(1))
        if lo is None or hi is None or hi < lo:
            return []
        start = math.floor(lo / size) * size
        if (hi - start) / size > _MAX_BUCKETS:
            raise HubError(f"task_stats: {int((hi - start) / size) + 1} buckets of {size} s is "
                           f"more than {_MAX_BUCKETS}; narrow since/until or use a larger "
                           "bucket")
        if self._by_aggregate(f, ("status", "since", "until")):
            return self._time_buckets_aggregate(f, size, lo, hi)
        b = select(literal(float(start), Float).label("t")).cte("buckets", recursive=True)
        b = b.union_all(select(b.c.t + size).where(b.c.t + size <= hi))
        # since/until clip the first and last bucket instead of sitting beside the
        # bucket's bounds, where the planner might take them for the index range
        inner = self.where(dataclasses.replace(f, since=None, until=None))
        bigger, smaller = (func.max, func.min) if self.dialect == "sqlite" else \
            (func.greatest, func.least)
        b_lo: Any = b.c.t if f.since is None else bigger(b.c.t, f.since)
        b_hi: Any = b.c.t + size if f.until is None else smaller(b.c.t + size, f.until)
        n = (select(func.count()).select_from(tasks)
             .where(inner, c.submitted >= b_lo, c.submitted < b_hi)
             .correlate(b).scalar_subquery())
        try:
            with self._engine.connect() as conn:
                return [(int(t), int(k)) for t, k in conn.execute(select(b.c.t, n)) if k]
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e

    def _time_buckets_aggregate(self, f: TaskFilter, size: int, lo: float, hi: float
                                ) -> list[tuple[Any, int]]:
        """:meth:`_time_buckets` from ``minute_counts``: whole minutes from the table, a
        since/until that cuts a minute counted exactly over that part of it."""
        c, mc = tasks.c, minute_counts.c
        first, last = math.ceil(lo / 60), math.floor(hi / 60)  # whole minutes: [first, last)
        if f.since is None:
            first = agg.minute_of(lo)  # the oldest task's minute is whole
        if f.until is None:
            last = agg.minute_of(hi) + 1  # the newest task's minute is whole
        counts: dict[int, int] = {}
        conds = [mc.minute >= first, mc.minute < last, mc.n != 0]
        if f.status is not None:
            conds.append(mc.status.in_(f.status))
        stmt = select(mc.minute, func.sum(mc.n)).where(*conds).group_by(mc.minute)
        status = [] if f.status is None else [c.status.in_(f.status)]
        parts = []  # exact counts of the cut minutes: [from, to)
        if first > last:  # since and until inside one minute
            parts.append((lo, hi))
        else:
            if lo < first * 60:
                parts.append((lo, first * 60.0))
            if f.until is not None and hi > last * 60:
                parts.append((last * 60.0, hi))
        try:
            with self._engine.connect() as conn:
                for m, k in conn.execute(stmt):
                    t = int(m) * 60 // size * size
                    counts[t] = counts.get(t, 0) + int(k)
                for a, b in parts:
                    k = conn.execute(select(func.count()).select_from(tasks).where(
                        *status, c.submitted >= a, c.submitted < b)).scalar()
                    t = math.floor(a / size) * size
                    counts[t] = counts.get(t, 0) + int(k or 0)
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e
        return [(t, k) for t, k in sorted(counts.items()) if k]

    def _by_aggregate(self, f: TaskFilter, keys: Sequence[str]) -> bool:
        """Whether a query with filter ``f`` may read an aggregate keyed by ``keys``."""
        return self.aggregates and all(k in keys for k in f.to_dict())

    def duration_percentiles(self, by: str | None = None,
                             percentiles: Sequence[float] = (50, 90, 99),
                             exact: bool = False, **filters: Any) -> list[dict[str, Any]]:
        """Duration percentiles (nearest rank) of the matching finished tasks.

        One dict per group (``by`` = "engine" or "label"; None: one group):
        ``{"key": group, "n": tasks with a duration, "min", "max", "p50": ...}``.
        Each percentile (and min, max) is one seek into the duration
        index (``ORDER BY duration LIMIT 1 OFFSET k``, from whichever end is
        nearer), so nothing is sorted or fetched but the answers.  At most
        :data:`MAX_GROUPS` groups, the largest.

        When the filters are only status, engine and label, the counts and
        percentiles come from the maintained duration histogram
        (:mod:`monq.hub.aggregates`, 20 log-spaced buckets per decade): each
        percentile is the upper bound of the bucket holding the nearest-rank
        task (clipped to the exact min and max, which the histogram keeps per
        row: schema version 5), so it is exact to within one bucket's width
        (~12 %) and never below the exact value (p0 and p100 are min and max,
        exact).  ``exact=True`` always takes the exact path.
        """
        if by not in (None, "engine", "label"):
            raise HubError(f"duration_percentiles: by must be None, 'engine' or 'label', "
                           f"not {by!r}")
        ps = _check_percentiles(percentiles)
        f = TaskFilter.from_dict(filters, "duration_percentiles")
        if not exact and self._by_aggregate(f, _KEYED):
            return self._percentiles_aggregate(f, by, ps)
        d = tasks.c.duration
        where = and_(self.where(f), d.is_not(None))
        n = func.count(d)
        group = tasks.c[by] if by else None
        # counts only: with no other filter they read the (engine|label, duration)
        # or duration index alone, never the table
        if group is not None:
            stmt = (select(group, n).where(where).group_by(group).order_by(n.desc())
                    .limit(MAX_GROUPS))
        elif f.is_empty():
            # every task: all rows (a b-tree count) minus those without a duration
            # (unfinished ones: a short range at the start of the duration index)
            nulls = select(func.count()).select_from(tasks).where(d.is_(None)).scalar_subquery()
            stmt = select(literal_column("NULL"),
                          select(func.count()).select_from(tasks).scalar_subquery() - nulls)
        else:
            stmt = select(literal_column("NULL"), n).where(where)
        out: list[dict[str, Any]] = []
        try:
            with self._engine.connect() as conn:
                for key, count in conn.execute(stmt).all():
                    if not count:
                        continue
                    gwhere = where if group is None else and_(
                        where, group.is_(None) if key is None else group == key)
                    rec: dict[str, Any] = {"key": key, "n": int(count)}
                    rec["min"] = _nth(conn, gwhere, d, int(count), 0)
                    rec["max"] = _nth(conn, gwhere, d, int(count), 100)
                    for p in ps:
                        rec[_pname(p)] = _nth(conn, gwhere, d, int(count), p)
                    out.append(rec)
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e
        return out

    def _percentiles_aggregate(self, f: TaskFilter, by: str | None, ps: list[float]
                               ) -> list[dict[str, Any]]:
        """Percentiles from ``duration_hist``: counts per bucket (one read of a covering
        index of the histogram), then the exact min and max from ``lo``/``hi`` (schema
        version 5) of each group's first and last bucket (one more read of a few
        entries of that index); no seek into ``tasks``."""
        h = duration_hist.c
        d = tasks.c.duration
        group = h[by] if by else None
        keys = [group] if group is not None else []
        conds = _agg_where(duration_hist, f)
        stmt = (select(*keys, h.bucket, func.sum(h.n)).where(*conds)
                .group_by(*keys, h.bucket))
        hists: dict[Any, dict[int, int]] = {}  # stored group key -> bucket -> count
        out: list[dict[str, Any]] = []
        unkey: Callable[[Any], Any] = _UNKEY.get(by or "", _same)
        try:
            with self._engine.connect() as conn:
                for row in conn.execute(stmt):
                    if row[-1]:
                        k = row[0] if group is not None else None
                        hist = hists.get(k)
                        if hist is None:
                            hists[k] = hist = {}
                        hist[row[-2]] = int(row[-1])
                sizes = sorted(((sum(v.values()), k) for k, v in hists.items()),
                               key=lambda nk: -nk[0])[:MAX_GROUPS]
                # the lo of each group's first bucket and the hi of its last
                cums = {k: _cumulative(hists[k]) for _, k in sizes}
                ends = {(k, c[i][1]) for k, c in cums.items() for i in (0, -1)}
                bounds: dict[tuple[Any, int], tuple[Any, Any]] = {}
                if ends:
                    # "key IN (...) AND bucket IN (...)": seeks into the covering index for
                    # each pair (a row-value IN list made SQLite scan all of it); pairs of a
                    # key and another key's end bucket are read too, and left
                    which = [h.bucket.in_(sorted({b for _, b in ends}))]
                    if group is not None:
                        which.append(group.in_(sorted({k for k, _ in ends})))
                    for row in conn.execute(
                            select(*keys, h.bucket, func.min(h.lo), func.max(h.hi))
                            .where(*conds, *which, h.n > 0).group_by(*keys, h.bucket)):
                        k = row[0] if group is not None else None
                        bounds[(k, row[-3])] = (row[-2], row[-1])
                where = None
                for count, k in sizes:
                    key = unkey(k) if group is not None else None
                    cum = cums[k]
                    lo = bounds.get((k, cum[0][1]), (None, None))[0]
                    hi = bounds.get((k, cum[-1][1]), (None, None))[1]
                    if lo is None or hi is None:  # a write came between, or never kept: seek
                        if where is None:
                            where = and_(self.where(f), d.is_not(None))
                        gwhere = where if by is None else and_(
                            where, tasks.c[by].is_(None) if key is None else tasks.c[by] == key)
                        if lo is None:
                            lo = _edge(conn, gwhere, d, cum[0][1], False, True)
                            if lo is None:
                                lo = _nth(conn, gwhere, d, count, 0)
                        if hi is None:
                            hi = _edge(conn, gwhere, d, cum[-1][1], True, True)
                            if hi is None:
                                hi = _nth(conn, gwhere, d, count, 100)
                    rec: dict[str, Any] = {"key": key, "n": count, "min": lo, "max": hi}
                    for p in ps:
                        rank = max(1, math.ceil(p / 100 * count))
                        if rank in (1, count):
                            rec[_pname(p)] = lo if rank == 1 else hi
                        else:
                            b = _bucket_at(cum, rank)
                            rec[_pname(p)] = min(max(agg.bucket_upper(b), lo), hi)
                    out.append(rec)
        except SQLAlchemyError as e:
            raise HubError(f"database query failed: {type(e).__name__}: {e}") from e
        return out

    def time_span(self, **filters: Any) -> dict[str, Any]:
        """First submission and last completion among the matching tasks (for throughput)."""
        f = TaskFilter.from_dict(filters, "stats")
        w = self.where(f)
        first = select(tasks.c.submitted).where(w, tasks.c.submitted.is_not(None)) \
            .order_by(tasks.c.submitted.asc()).limit(1)
        last = select(tasks.c.completed).where(w, tasks.c.completed.is_not(None)) \
            .order_by(tasks.c.completed.desc()).limit(1)
        return {"first_submitted": self._scalar(first), "last_completed": self._scalar(last)}


#: the filters that the counts and the duration histogram are keyed by
_KEYED = ("status", "engine", "label")


def _same(k: Any) -> Any:
    return k


_UNKEY: dict[str, Callable[[Any], Any]] = {"engine": agg.unkey_engine,
                                          "label": agg.unkey_label}


def _agg_where(table: Any, f: TaskFilter) -> list[Any]:
    """WHERE terms of an aggregate table for a filter of status, engine and label only."""
    out = []
    if f.status is not None:
        out.append(table.c.status.in_(f.status))
    if f.engine is not None:
        out.append(table.c.engine.in_([agg.engine_key(e) for e in f.engine]))
    if f.label is not None:
        out.append(table.c.label.in_([agg.label_key(v) for v in f.label]))
    return out


def _edge(conn: Connection, where: Any, col: Any, b: int, desc: bool, hint: bool) -> Any:
    """The smallest (largest: ``desc``) duration in histogram bucket ``b`` matching ``where``.

    ``hint``: read the duration index (the filter has no index ending in
    duration; SQLite would otherwise take the status index and sort).
    """
    conds = [where]
    if b > 0:
        conds.append(col >= agg.bucket_upper(b - 1))
    if b < agg.LAST_BUCKET:
        conds.append(col < agg.bucket_upper(b))
    stmt = select(col).where(*conds).order_by(col.desc() if desc else col.asc()).limit(1)
    if hint:
        # the store's SQLite engine renders table hints (monq.hub.store._make_engine);
        # a cached statement, unlike one compiled by hand each time
        stmt = stmt.with_hint(tasks, "INDEXED BY ix_tasks_duration", "sqlite")
    return conn.execute(stmt).scalar()


def _cumulative(hist: dict[int, int]) -> list[tuple[int, int]]:
    out, total = [], 0
    for b in sorted(hist):
        total += hist[b]
        out.append((total, b))
    return out


def _bucket_at(cum: list[tuple[int, int]], rank: int) -> int:
    """The bucket holding the ``rank``-th (1-based) smallest value."""
    i = bisect.bisect_left(cum, (rank, -1))
    return cum[min(i, len(cum) - 1)][1]


def _check_percentiles(ps: Any) -> list[float]:
    if isinstance(ps, (str, bytes)) or not isinstance(ps, (list, tuple)) or not ps:
        raise HubError("duration_percentiles: percentiles must be a list of numbers in [0, 100]")
    out = []
    for p in ps:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
            raise HubError(f"duration_percentiles: percentile {p!r} is not a number in "
                           "[0, 100]")
        out.append(float(p))
    return out


def _pname(p: float) -> str:
    return f"p{int(p)}" if p == int(p) else f"p{p:g}"


def _nth(conn: Connection, where: Any, col: Any, n: int, p: float) -> Any:
    """The nearest-rank ``p``-th percentile of ``col`` over ``n`` rows: one index seek."""
    k = max(0, math.ceil(p / 100 * n) - 1)  # 0-based rank
    if k <= n // 2:
        stmt = select(col).where(where).order_by(col.asc()).limit(1).offset(k)
    else:  # nearer the top: seek from that end
        stmt = select(col).where(where).order_by(col.desc()).limit(1).offset(n - 1 - k)
    return conn.execute(stmt).scalar()
