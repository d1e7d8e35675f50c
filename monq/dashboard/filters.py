"""The dashboard's task filters: what the HTTP API accepts, checked and typed.

The names are those of the history query API (status, engine, client, label,
msg_id, since, until, min_duration, max_duration, search, order, limit,
cursor), so the page and scripts keep them whatever answers the query
(see :mod:`monq.dashboard.data`).  A cursor is opaque here: only the reader
that made it can read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from monq.hub.store import STATUSES
from monq.records import to_epoch

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "SORT_KEYS", "QueryError", "TaskQuery",
           "parse_task_query"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: what a task list may be sorted by (prefix "-" for descending)
SORT_KEYS = ("submitted", "started", "completed", "received", "msg_id", "duration", "status",
             "engine", "label", "func", "client")


class QueryError(ValueError):
    """A filter the dashboard cannot read (the HTTP API answers 400 with the message)."""


@dataclass(frozen=True)
class TaskQuery:
    """Which tasks a list shows, in what order, and which page of them."""

    status: tuple[str, ...] = ()
    engine: tuple[int, ...] = ()
    client: str | None = None
    #: exact label, or a glob pattern when it holds * or ?
    label: str | None = None
    #: a prefix of the msg_id
    msg_id: str | None = None
    #: bounds on the submission time, epoch seconds; since inclusive, until exclusive
    since: float | None = None
    until: float | None = None
    #: bounds on the run time (completed - started), seconds, both inclusive
    min_duration: float | None = None
    max_duration: float | None = None
    #: case-insensitive substring of msg_id, label, func, error, traceback, stdout or stderr
    search: str | None = None
    order: str = "-submitted"
    limit: int = DEFAULT_LIMIT
    #: opaque position after which the page starts (from a previous page's next_cursor)
    cursor: str | None = None


def _many(params: Mapping[str, Any], name: str) -> list[str]:
    """A list filter given repeated (?status=a&status=b) or comma-separated (?status=a,b)."""
    getlist = getattr(params, "getlist", None)
    raw = getlist(name) if getlist is not None else [params[name]] if name in params else []
    out: list[str] = []
    for v in raw:
        out += [p.strip() for p in str(v).split(",") if p.strip()]
    return out


def _text(params: Mapping[str, Any], name: str, max_len: int = 500) -> str | None:
    v = params.get(name)
    if v is None or not str(v).strip():
        return None
    s = str(v).strip()
    if len(s) > max_len:
        raise QueryError(f"{name} is longer than {max_len} characters")
    return s


def _number(params: Mapping[str, Any], name: str) -> float | None:
    v = _text(params, name, 50)
    if v is None:
        return None
    try:
        x = float(v)
    except ValueError:
        raise QueryError(f"{name} must be a number of seconds, not {v!r}") from None
    if not math.isfinite(x) or x < 0:
        raise QueryError(f"{name} must be a non-negative number of seconds, not {v!r}")
    return x


def _time(params: Mapping[str, Any], name: str) -> float | None:
    v = _text(params, name, 100)
    if v is None:
        return None
    try:
        return to_epoch(float(v) if _is_float(v) else v)
    except ValueError as e:
        raise QueryError(f"{name}: {e}") from None


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def parse_task_query(params: Mapping[str, Any]) -> TaskQuery:
    """A :class:`TaskQuery` from HTTP query parameters; :class:`QueryError` if one is bad.

    Times (since, until) take epoch seconds, ISO 8601 or phrases like
    ``10 minutes ago``; durations take seconds.
    """
    known = {"status", "engine", "client", "label", "msg_id", "since", "until", "min_duration",
             "max_duration", "search", "order", "limit", "cursor"}
    unknown = sorted(set(params.keys()) - known)
    if unknown:
        raise QueryError(f"unknown filter(s): {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    status = _many(params, "status")
    bad = [s for s in status if s not in STATUSES]
    if bad:
        raise QueryError(f"unknown status {bad[0]!r}; one of {', '.join(STATUSES)}")
    engines: list[int] = []
    for e in _many(params, "engine"):
        try:
            engines.append(int(e))
        except ValueError:
            raise QueryError(f"engine must be an integer id, not {e!r}") from None
    order = _text(params, "order", 20) or "-submitted"
    if order.lstrip("-") not in SORT_KEYS:
        raise QueryError(f"cannot order by {order!r}; use one of {', '.join(SORT_KEYS)} "
                         "(prefix '-' for descending)")
    limit_s = _text(params, "limit", 10)
    try:
        limit = DEFAULT_LIMIT if limit_s is None else int(limit_s)
    except ValueError:
        raise QueryError(f"limit must be an integer, not {limit_s!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
    query = TaskQuery(
        status=tuple(dict.fromkeys(status)), engine=tuple(dict.fromkeys(engines)),
        client=_text(params, "client", 100), label=_text(params, "label", 200),
        msg_id=_text(params, "msg_id", 64), since=_time(params, "since"),
        until=_time(params, "until"), min_duration=_number(params, "min_duration"),
        max_duration=_number(params, "max_duration"), search=_text(params, "search", 200),
        order=order, limit=limit, cursor=_text(params, "cursor", 500),
    )
    return query
