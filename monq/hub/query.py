"""Translation of history filters and ``db_query`` dicts into SQLAlchemy clauses.

Everything a user sends becomes a bound parameter: no SQL is ever built from
a user's strings.  Values are checked against the column's type here, so a
bad query fails with a :class:`HubError` that says what is wrong instead of a
driver error (or, worse, a silent string-versus-number comparison in SQLite).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Table,
    and_,
    bindparam,
    false,
    func,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy import types as sqltypes
from sqlalchemy.sql.expression import ColumnClause

from monq.errors import HubError
from monq.hub.filters import TaskFilter

__all__ = [
    "BLOB_COLUMNS", "ORDER_KEYS", "db_query_clause", "filter_clause", "glob_to_like",
    "history_clause", "keyset_stages", "order_clause", "search_terms", "tiebreak_column",
]

#: columns that hold payloads (or their keys, schema version 4): never filtered on, never
#: returned by history/db_query
BLOB_COLUMNS = ("request", "result", "request_key", "result_key")
#: what ``history(order=...)`` may sort by (with an optional leading "-")
ORDER_KEYS = ("submitted", "started", "completed", "duration", "msg_id")
_TIME_COLUMNS = ("submitted", "started", "completed", "received")
_OPERATORS = ("$lt", "$gt", "$lte", "$gte", "$eq", "$ne", "$in", "$nin", "$glob")


# -- history ----------------------------------------------------------------------


def history_clause(
    table: Table,
    *,
    status: str | Sequence[str] | None = None,
    engine: int | Sequence[int] | None = None,
    client: str | None = None,
    since: float | None = None,
    until: float | None = None,
    what: str = "history",
) -> ColumnElement[bool]:
    """The WHERE clause for ``history()``; ``since`` is inclusive, ``until`` exclusive.

    ``what`` names the caller in error messages.
    """
    c = table.c
    conds: list[ColumnElement[bool]] = []
    if status is not None:
        conds.append(_one_or_many(c.status, status, _is_str, what, "status", "a string"))
    if engine is not None:
        conds.append(_one_or_many(c.engine, engine, _is_int, what, "engine", "an integer"))
    if client is not None:
        if not _is_str(client):
            raise HubError(f"{what}: client must be a string, not {_tname(client)}")
        conds.append(c.client == client)
    if since is not None:
        conds.append(c.submitted >= time_value("since", since))
    if until is not None:
        conds.append(c.submitted < time_value("until", until))
    return and_(true(), *conds)


def parse_order(order: Any) -> tuple[str, bool]:
    """(column name, descending?) of an ``order`` like ``"-submitted"``."""
    if not isinstance(order, str):
        raise HubError(f"history: order must be a string, not {_tname(order)}")
    desc = order.startswith("-")
    key = order[1:] if desc else order
    if key not in ORDER_KEYS:
        raise HubError(f"history: cannot order by {order!r}; use one of "
                       f"{', '.join(ORDER_KEYS)} (prefix '-' for descending)")
    return key, desc


def tiebreak_column(table: Table, dialect: str) -> Any:
    """What breaks ties between equal sort values, making the order total.

    SQLite: the rowid, which every index already ends with, so "filter on
    an indexed column, sort by submitted, limit" reads the index in order
    with no sort step.  Elsewhere: msg_id.
    """
    if dialect == "sqlite":
        return literal_column(f"{table.name}.rowid")
    return table.c.msg_id


def order_clause(table: Table, order: str, dialect: str = "sqlite") -> list[Any]:
    """ORDER BY for ``history()``: ``"submitted"`` ascending, ``"-submitted"`` descending.

    A tie-breaker (:func:`tiebreak_column`) follows, so a keyset cursor can
    resume the order.  NULLs come first ascending and last descending
    (SQLite's own order, which its indexes give for free; other databases
    are told so).
    """
    key, desc = parse_order(order)
    tie = tiebreak_column(table, dialect)
    cols = [table.c[key]] if key == "msg_id" else [table.c[key], tie]
    out = []
    for col in cols:
        term = col.desc() if desc else col.asc()
        if dialect != "sqlite" and getattr(col, "nullable", False):
            term = term.nulls_last() if desc else term.nulls_first()
        out.append(term)
    return out


def keyset_stages(table: Table, order: str, value: Any, last: Any, dialect: str = "sqlite"
                  ) -> list[ColumnElement[bool]]:
    """The rows after (``value``, ``last``) in ``order``, as WHERE clauses to read in turn.

    A cursor page reads the first stage and, if it runs short, the next:
    NULL sort values sit apart from the others (first ascending, last
    descending), and an OR across them would keep the database from
    seeking into the index.  Each stage is a plain range on the sort
    column's index (``col <= v AND (col < v OR tie < t)``).
    """
    key, desc = parse_order(order)
    if key == "msg_id":
        if not isinstance(value, str):
            raise HubError("history: the cursor does not fit this order")
        mid = table.c.msg_id
        return [mid < value if desc else mid > value]
    tie = tiebreak_column(table, dialect)
    col = table.c[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise HubError("history: the cursor does not fit this order")
    if desc:  # ... v, v, NULL, NULL
        if value is None:
            return [and_(col.is_(None), tie < last)]
        return [and_(col <= value, or_(col < value, tie < last)), col.is_(None)]
    if value is None:  # NULL, NULL, v, v ...
        return [and_(col.is_(None), tie > last), col.is_not(None)]
    return [and_(col >= value, or_(col > value, tie > last))]


def filter_clause(table: Table, f: TaskFilter, dialect: str = "sqlite",
                  fts: Table | None = None, rowid: ColumnClause[Any] | None = None,
                  selective: frozenset[str] = frozenset()) -> ColumnElement[bool]:
    """The WHERE clause of a :class:`TaskFilter`; every value a bound parameter.

    ``fts`` is the full-text table (SQLite FTS5, external content keyed by
    the tasks' ``rowid``), which matches whole words (a trailing ``*``: a
    prefix); without it ``search`` falls back to escaped LIKE over the text
    columns, which matches each word anywhere (a superset: "15" is in "150").

    ``selective`` names range-filtered columns (started, completed,
    duration) known to match few rows: on SQLite their terms carry a
    ``likelihood`` hint, so the planner seeks into their index rather than
    walking the sort order's index past rows that do not match.
    "search:common" in it means the words match many tasks: then the sort
    order's index drives the query and each row is tested against the
    matches (else the matches drive it, best when they are few).
    """
    c = table.c
    conds: list[ColumnElement[bool]] = []
    for name in ("status", "engine", "client", "label"):
        values = getattr(f, name)
        if values is not None:
            vcol = c[name]
            conds.append(vcol == values[0] if len(values) == 1 else vcol.in_(list(values)))
    if f.msg_id is not None:
        # a range, not LIKE: the primary key's index answers it on every database
        conds.append(and_(c.msg_id >= f.msg_id, c.msg_id < f.msg_id + "\U0010ffff"))
    def hint(name: str, cond: ColumnElement[bool]) -> ColumnElement[bool]:
        if name in selective and dialect == "sqlite":
            return func.likelihood(cond, literal_column("0.001"))  # type: ignore[no-any-return]
        return cond

    for tcol, lo, hi in ((c.submitted, f.since, f.until),
                         (c.started, f.started_since, f.started_until),
                         (c.completed, f.completed_since, f.completed_until)):
        # "demote:x": x's range is answered through the range it implies on submitted
        # (implied_submitted); `x + 0` keeps the planner off x's own index
        term: Any = tcol + 0 if "demote:" + tcol.name in selective else tcol
        if lo is not None:
            conds.append(hint(tcol.name, term >= lo))
        if hi is not None:
            conds.append(hint(tcol.name, term < hi))
    if f.min_duration is not None:
        conds.append(hint("duration", c.duration >= f.min_duration))
    if f.max_duration is not None:
        conds.append(hint("duration", c.duration <= f.max_duration))
    if f.search is not None:
        conds.append(_search(table, f.search, fts, rowid, common="search:common" in selective))
    return and_(true(), *conds)


def implied_submitted(f: TaskFilter, bounds: dict[str, list[float]]
                      ) -> tuple[float | None, float | None] | None:
    """The range of ``submitted`` that the started/completed ranges of ``f`` imply.

    ``bounds`` are the database's time bounds (:mod:`monq.hub.aggregates`):
    for every row with both times, ``submitted - x <= lead`` and
    ``x - submitted <= lag``.  So ``lo <= x < hi`` implies
    ``lo - lag <= submitted <= hi + lead`` exactly (with a millisecond to spare
    for rounding); rows without a submitted time are not covered (the caller
    reads them apart).  None if ``f`` has no such range.
    """
    lo: float | None = None
    hi: float | None = None
    for name, a, b in (("started", f.started_since, f.started_until),
                       ("completed", f.completed_since, f.completed_until)):
        if a is None and b is None:
            continue
        lead, lag = bounds.get(name, (math.inf, math.inf))
        if a is not None and math.isfinite(lag):
            v = a - lag - _slack(a)
            lo = v if lo is None else max(lo, v)
        if b is not None and math.isfinite(lead):
            v = b + lead + _slack(b)
            hi = v if hi is None else min(hi, v)
    if lo is None and hi is None:
        return None
    return lo, hi


def _slack(v: float) -> float:
    return 1e-3 + abs(v) * 1e-12


def submitted_range(table: Table, bound: tuple[float | None, float | None]
                    ) -> ColumnElement[bool]:
    """``lo <= submitted <= hi`` (either side may be open)."""
    col = table.c.submitted
    lo, hi = bound
    return and_(col >= lo if lo is not None else true(), col <= hi if hi is not None else true())


def bounded_stages(table: Table, order: str, cursor: tuple[Any, Any] | None,
                   bound: tuple[float | None, float | None], dialect: str = "sqlite"
                   ) -> list[ColumnElement[bool]]:
    """The stages of a page by submitted (:func:`keyset_stages`; ``cursor`` None: the
    first page) with an implied range on submitted added to every stage that reads
    non-NULL submitted times; the NULL ones get a stage of their own, where NULLs sort.
    """
    _, desc = parse_order(order)
    col = table.c.submitted
    rng = submitted_range(table, bound)
    if cursor is None:
        return [rng, col.is_(None)] if desc else [col.is_(None), rng]
    value, last = cursor
    stages = keyset_stages(table, order, value, last, dialect)
    # where keyset_stages reads NULLs only: descending, after the values (or from a NULL
    # cursor on); ascending from a NULL cursor, before the values
    nulls = {1} if desc and value is not None else {0} if value is None else set()
    return [st if i in nulls else and_(st, rng) for i, st in enumerate(stages)]


#: the text columns ``search`` looks in
SEARCH_COLUMNS = ("stdout", "stderr", "traceback", "evalue")


def range_probes(table: Table, f: TaskFilter) -> dict[str, ColumnElement[bool]]:
    """The range filters on started, completed and duration, by column (to probe)."""
    c = table.c
    out: dict[str, ColumnElement[bool]] = {}
    for name, lo, hi, strict in (("started", f.started_since, f.started_until, True),
                                 ("completed", f.completed_since, f.completed_until, True),
                                 ("duration", f.min_duration, f.max_duration, False)):
        conds = []
        if lo is not None:
            conds.append(c[name] >= lo)
        if hi is not None:
            conds.append(c[name] < hi if strict else c[name] <= hi)
        if conds:
            out[name] = and_(*conds)
    return out


def search_terms(text: str) -> list[str]:
    """The words of a search (whitespace-separated; a trailing ``*`` is a prefix)."""
    return [w for w in text.split() if w.strip("*")]


def _search(table: Table, text: str, fts: Table | None, rowid: ColumnClause[Any] | None,
            common: bool = False) -> ColumnElement[bool]:
    terms = search_terms(text)
    if not terms:
        raise HubError("history: search needs at least one word")
    if fts is not None and rowid is not None:
        # every word quoted: user text is never FTS5 query syntax (no column filters,
        # no NEAR, no syntax errors), a trailing * stays a prefix search
        match = fts.c.tasks_fts.op("MATCH", is_comparison=True)(fts_query(text))
        if common:
            # many matches: `rowid + 0` keeps SQLite from fetching every match and
            # sorting them; it walks the order's index and tests each row against
            # the (materialised) matches until the page is full
            return (rowid + 0).in_(select(fts.c.rowid).where(match))
        return rowid.in_(select(fts.c.rowid).where(match))
    conds = []
    for w in terms:
        pattern = "%" + like_escape(w.rstrip("*")) + "%"
        conds.append(or_(*[table.c[name].like(pattern, escape="\\")
                           for name in SEARCH_COLUMNS]))
    return and_(*conds)


def fts_query(text: str) -> Any:
    """The bound FTS5 query for a search: every word quoted (a trailing * kept as a prefix).

    User text never becomes FTS5 query syntax: no column filters, no NEAR,
    no syntax errors.
    """
    terms = search_terms(text)
    if not terms:
        raise HubError("history: search needs at least one word")
    query = " ".join('"' + w.rstrip("*").replace('"', '""') + '"' +
                     ("*" if w.endswith("*") else "") for w in terms)
    return bindparam("fts_q", query)


def like_escape(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern whose escape character is backslash."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def check_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if not _is_int(limit) or limit < 0:
        raise HubError(f"history: limit must be a non-negative integer or None, not {limit!r}")
    return int(limit)


def _one_or_many(col: Column[Any], value: Any, ok: Callable[[Any], bool], caller: str,
                 name: str, what: str) -> ColumnElement[bool]:
    if ok(value):
        return col == value
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [v for v in value if not ok(v)]
        if bad:
            raise HubError(f"{caller}: every {name} must be {what}; got {bad[0]!r}")
        return col.in_(list(value))
    raise HubError(f"{caller}: {name} must be {what} or a list of them, not {_tname(value)}")


def time_value(name: str, value: Any) -> float:
    """Epoch seconds from a number or a datetime (the client converts phrases)."""
    if isinstance(value, datetime):
        return value.timestamp()
    if not _is_num(value):
        raise HubError(f"{name} must be epoch seconds (a number), not {_tname(value)}")
    return float(value)


# -- db_query -------------------------------------------------------------------------


def db_query_clause(table: Table, query: Any, dialect: str = "sqlite") -> ColumnElement[bool]:
    """The WHERE clause for an ipyparallel-style query dict.

    ``{"engine": 0, "status": {"$in": ["ok", "error"]}, "label": None}``: a
    plain value means ``$eq``; ``None`` with ``$eq`` means IS NULL and with
    ``$ne`` IS NOT NULL.  ``$ne`` and ``$nin`` follow MongoDB (which ipyparallel
    imitates): a NULL column *is* "not equal to 'ok'", so NULL rows match them
    unless None is among the excluded values.  ``$glob`` is GLOB on SQLite and
    an escaped LIKE elsewhere (``dialect`` is the engine's dialect name).
    """
    if not isinstance(query, dict):
        raise HubError(f"db_query: the query must be a dict, not {_tname(query)}")
    conds: list[ColumnElement[bool]] = []
    for name, spec in query.items():
        col = _query_column(table, name)
        if isinstance(spec, dict):
            if not spec:
                raise HubError(f"db_query: empty operator dict for column {name!r}")
            for op, value in spec.items():
                conds.append(_operator(col, op, value, dialect))
        else:
            conds.append(_operator(col, "$eq", spec, dialect))
    return and_(true(), *conds)


def check_keys(table: Table, keys: Any) -> list[str]:
    """The columns ``db_query(keys=...)`` returns: msg_id first, never a blob."""
    if keys is None:
        return [c.name for c in table.columns if c.name not in BLOB_COLUMNS]
    if isinstance(keys, str) or not isinstance(keys, (list, tuple)):
        raise HubError(f"db_query: keys must be a list of column names, not {_tname(keys)}")
    out = ["msg_id"]
    for k in keys:
        if k in BLOB_COLUMNS:
            raise HubError(f"db_query: {k!r} cannot be returned by a query; "
                           "fetch payloads one task at a time with get_result")
        if not isinstance(k, str) or k not in table.c:
            raise HubError(f"db_query: unknown column {k!r} in keys")
        if k not in out:
            out.append(k)
    return out


def _query_column(table: Table, name: Any) -> Column[Any]:
    if name in BLOB_COLUMNS:
        raise HubError(f"db_query: cannot filter on payload column {name!r}; "
                       f"filter on {name}_bytes instead")
    if not isinstance(name, str) or name not in table.c:
        known = ", ".join(c.name for c in table.columns if c.name not in BLOB_COLUMNS)
        raise HubError(f"db_query: unknown column {name!r}; known columns: {known}")
    return table.c[name]


def _operator(col: Column[Any], op: Any, value: Any, dialect: str) -> ColumnElement[bool]:
    if op not in _OPERATORS:
        raise HubError(f"db_query: unknown operator {op!r} for column {col.name!r}; "
                       f"use one of {' '.join(_OPERATORS)}")
    where = f"{col.name!r} {op}"
    if op == "$eq":
        return col.is_(None) if value is None else col == _value(col, value, where)
    if op == "$ne":
        if value is None:
            return col.is_not(None)
        return or_(col != _value(col, value, where), col.is_(None))
    if op in ("$in", "$nin"):
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
            raise HubError(f"db_query: {where} takes a list, not {_tname(value)}")
        vals = [_value(col, v, where) for v in value if v is not None]
        has_null = any(v is None for v in value)
        if op == "$in":
            matched = col.in_(vals) if vals else false()
            return or_(matched, col.is_(None)) if has_null else matched
        kept = col.not_in(vals) if vals else true()
        return and_(kept, col.is_not(None)) if has_null else or_(kept, col.is_(None))
    if op == "$glob":
        if not _is_text(col):
            raise HubError(f"db_query: {where} needs a text column")
        if not _is_str(value):
            raise HubError(f"db_query: {where} takes a string pattern, not {_tname(value)}")
        if dialect == "sqlite":
            return col.op("GLOB", is_comparison=True)(value)
        return col.like(glob_to_like(value), escape="\\")
    if value is None:
        raise HubError(f"db_query: {where} cannot compare with None; use $eq/$ne None")
    v = _value(col, value, where)
    if op == "$lt":
        return col < v
    if op == "$gt":
        return col > v
    if op == "$lte":
        return col <= v
    return col >= v  # $gte


def db_query_time_filter(query: dict[str, Any]) -> TaskFilter | None:
    """The ranges a (checked) db_query dict puts on started and completed, as a filter.

    Bounds are widened to inclusive ones (what :func:`implied_submitted` needs);
    None if the query has no such range.
    """
    out: dict[str, float] = {}
    for name in ("started", "completed"):
        spec = query.get(name)
        ops = spec if isinstance(spec, dict) else {"$eq": spec} if spec is not None else {}
        for op, value in ops.items():
            if value is None or op not in ("$gt", "$gte", "$lt", "$lte", "$eq"):
                continue
            v = time_value(name, value) if isinstance(value, datetime) else value
            if not _is_num(v):
                continue
            v = float(v)
            if op in ("$gt", "$gte", "$eq"):
                out[f"{name}_since"] = max(out.get(f"{name}_since", -math.inf), v)
            if op in ("$lt", "$lte", "$eq"):
                out[f"{name}_until"] = min(out.get(f"{name}_until", math.inf), v)
    return TaskFilter(**out) if out else None  # type: ignore[arg-type]


def glob_to_like(pattern: str) -> str:
    """A LIKE pattern (escape character backslash) matching what GLOB would match.

    ``*`` -> ``%``, ``?`` -> ``_``; literal ``%``, ``_`` and ``\\`` are escaped.
    Character classes (``[abc]``) have no LIKE equivalent and are refused.
    """
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "[":
            raise HubError(f"db_query: $glob character classes ('[...]' in {pattern!r}) "
                           "are supported on SQLite only")
        else:
            out.append(ch)
    return "".join(out)


def _value(col: Column[Any], value: Any, where: str) -> Any:
    """Check ``value`` fits the column's type (SQLite would compare anything silently)."""
    if _is_text(col):
        if not _is_str(value):
            raise HubError(f"db_query: {where} needs a string, not {_tname(value)} {value!r}")
        return value
    if col.name in _TIME_COLUMNS and isinstance(value, datetime):
        return value.timestamp()
    if isinstance(col.type, (sqltypes.Integer, sqltypes.Float)):
        if not _is_num(value):
            raise HubError(f"db_query: {where} needs a number, not {_tname(value)} {value!r}")
        return value
    raise HubError(f"db_query: column {col.name!r} cannot be queried")


def _is_text(col: Column[Any]) -> bool:
    return isinstance(col.type, sqltypes.String)  # Text is a String


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _tname(v: Any) -> str:
    return type(v).__name__
