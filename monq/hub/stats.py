"""The history's aggregates: counts, counts by group or time bucket, duration percentiles.

A mixin of :class:`monq.hub.store.TaskStore` (which owns the connection);
every aggregate is computed by the database from indexes, filtered by the
same :class:`~monq.hub.filters.TaskFilter` as history pages.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, and_, func, literal, literal_column, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from monq.errors import HubError
from monq.hub.filters import TaskFilter
from monq.hub.schema import tasks

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

    if TYPE_CHECKING:
        def where(self, f: TaskFilter, selective: frozenset[str] = frozenset()) -> Any: ...
        def _scalar(self, stmt: Any) -> Any: ...

    def count(self, **filters: Any) -> int:
        """How many tasks match, counted in SQL."""
        f = TaskFilter.from_dict(filters, "count")
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
        else:
            col = tasks.c[by]
            stmt = select(col, n).where(self.where(f)).group_by(col).order_by(n.desc(), col)
        try:
            with self._engine.connect() as conn:
                return [(k, int(c)) for k, c in conn.execute(stmt)]
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

    def duration_percentiles(self, by: str | None = None,
                             percentiles: Sequence[float] = (50, 90, 99),
                             **filters: Any) -> list[dict[str, Any]]:
        """Duration percentiles (nearest rank) of the matching finished tasks.

        One dict per group (``by`` = "engine" or "label"; None: one group):
        ``{"key": group, "n": tasks with a duration, "min", "max", "p50": ...}``.
        Each percentile (and min, max) is one seek into the duration
        index (``ORDER BY duration LIMIT 1 OFFSET k``, from whichever end is
        nearer), so nothing is sorted or fetched but the answers.  At most
        :data:`MAX_GROUPS` groups, the largest.
        """
        if by not in (None, "engine", "label"):
            raise HubError(f"duration_percentiles: by must be None, 'engine' or 'label', "
                           f"not {by!r}")
        ps = _check_percentiles(percentiles)
        f = TaskFilter.from_dict(filters, "duration_percentiles")
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

    def time_span(self, **filters: Any) -> dict[str, Any]:
        """First submission and last completion among the matching tasks (for throughput)."""
        f = TaskFilter.from_dict(filters, "stats")
        w = self.where(f)
        first = select(tasks.c.submitted).where(w, tasks.c.submitted.is_not(None)) \
            .order_by(tasks.c.submitted.asc()).limit(1)
        last = select(tasks.c.completed).where(w, tasks.c.completed.is_not(None)) \
            .order_by(tasks.c.completed.desc()).limit(1)
        return {"first_submitted": self._scalar(first), "last_completed": self._scalar(last)}


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
