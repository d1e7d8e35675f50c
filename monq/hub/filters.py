"""The one filter vocabulary of the history: what history, stats, export and purge accept.

``Client.history``, ``Client.task_stats``, ``Client.export``,
``Client.purge_results``, the Hub's query handlers and the ``monq history``,
``monq stats`` and ``monq purge`` commands all take the same keyword
filters; :meth:`TaskFilter.from_dict` checks them once, names the bad one,
and the store turns the result into bound SQL (:mod:`monq.hub.query`).

Times here are epoch seconds: the client (and the CLI) turn datetimes and
phrases such as ``"10 minutes ago"`` into numbers before a query leaves it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from monq.errors import HubError

__all__ = ["FILTER_KEYS", "TIME_FILTERS", "TaskFilter", "decode_cursor", "encode_cursor",
           "parse_duration", "parse_size"]

#: filters that bound a time column: (filter name, column, inclusive lower bound?)
TIME_FILTERS = {
    "since": ("submitted", True), "until": ("submitted", False),
    "submitted_since": ("submitted", True), "submitted_until": ("submitted", False),
    "started_since": ("started", True), "started_until": ("started", False),
    "completed_since": ("completed", True), "completed_until": ("completed", False),
}
#: longest text a filter value may be (labels are stored up to 200 characters)
_MAX_TEXT = 1000


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a query is about; every field set must match (AND).

    ``status``, ``engine``, ``client`` and ``label`` take one value or a
    list (any of them).  ``msg_id`` is a prefix.  The ``*_since`` bounds are
    inclusive and the ``*_until`` bounds exclusive; ``since``/``until``
    bound the submission time.  ``min_duration``/``max_duration`` (seconds,
    inclusive) bound ``completed - started``.  ``search`` finds tasks whose
    stdout, stderr, traceback or error message contains every word.
    """

    status: tuple[str, ...] | None = None
    engine: tuple[int, ...] | None = None
    client: tuple[str, ...] | None = None
    label: tuple[str, ...] | None = None
    msg_id: str | None = None
    since: float | None = None
    until: float | None = None
    started_since: float | None = None
    started_until: float | None = None
    completed_since: float | None = None
    completed_until: float | None = None
    min_duration: float | None = None
    max_duration: float | None = None
    search: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "history") -> TaskFilter:
        """Check a filter dict (as sent over the wire or given as keywords).

        Unknown names and values of the wrong type raise :class:`HubError`
        naming the filter; ``None`` means "not filtered".
        """
        if not isinstance(d, Mapping):
            raise HubError(f"{what}: filters must be a dict, not {type(d).__name__}")
        unknown = set(d) - set(FILTER_KEYS) - {"submitted_since", "submitted_until"}
        if unknown:
            raise HubError(f"{what}: unknown filter(s) {', '.join(sorted(map(str, unknown)))}; "
                           f"known: {', '.join(FILTER_KEYS)}")
        out: dict[str, Any] = {}
        for key in ("status", "client", "label"):
            if d.get(key) is not None:
                out[key] = _many(d[key], _is_str, what, key, "a string")
        if d.get("engine") is not None:
            out["engine"] = _many(d["engine"], _is_int, what, "engine", "an integer")
        if d.get("msg_id") is not None:
            m = d["msg_id"]
            if not _is_str(m) or not m or len(m) > 64:
                raise HubError(f"{what}: msg_id must be a non-empty string prefix "
                               f"(at most 64 characters), not {m!r:.80}")
            out["msg_id"] = m
        for key, (col, _) in TIME_FILTERS.items():
            if d.get(key) is None:
                continue
            name = key.replace("submitted_", "") if col == "submitted" else key
            if name in out and out[name] != _time(d[key], what, key):
                raise HubError(f"{what}: {key} and {name} disagree; give one of them")
            out[name] = _time(d[key], what, key)
        for key in ("min_duration", "max_duration"):
            if d.get(key) is not None:
                v = d[key]
                if not _is_num(v) or not math.isfinite(v) or v < 0:
                    raise HubError(f"{what}: {key} must be a number of seconds >= 0, "
                                   f"not {v!r:.80}")
                out[key] = float(v)
        if d.get("search") is not None:
            s = d["search"]
            if not _is_str(s) or not s.strip() or len(s) > _MAX_TEXT:
                raise HubError(f"{what}: search must be non-empty text (at most {_MAX_TEXT} "
                               f"characters), not {s!r:.80}")
            out["search"] = s.strip()
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        """The wire form: only the fields that are set, lists for the tuples."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def is_empty(self) -> bool:
        return not self.to_dict()


FILTER_KEYS: tuple[str, ...] = tuple(f.name for f in fields(TaskFilter))


def split_filters(d: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the filter keys of ``d``, everything else): for handlers with extra options."""
    known = set(FILTER_KEYS) | {"submitted_since", "submitted_until"}
    return ({k: v for k, v in d.items() if k in known},
            {k: v for k, v in d.items() if k not in known})


# -- cursors ------------------------------------------------------------------------


def encode_cursor(order: str, value: Any, tie: Any) -> str:
    """An opaque cursor: where the next page starts (sort value, tie-breaker), for one order."""
    raw = json.dumps([order, value, tie], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: Any, order: str) -> tuple[Any, Any]:
    """(last sort value, last tie-breaker) of a cursor made for ``order``; HubError otherwise."""
    if not _is_str(cursor) or len(cursor) > 1000:
        raise HubError(f"history: cursor must be the string a previous page returned, "
                       f"not {cursor!r:.80}")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        made_for, value, tie = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise HubError(f"history: cursor {cursor!r:.80} is not one a page returned") from None
    if made_for != order:
        raise HubError(f"history: this cursor continues order {made_for!r}, not {order!r}; "
                       "ask again with the same order")
    if not (_is_str(tie) or _is_int(tie)) or not (value is None or _is_num(value)
                                                   or _is_str(value)):
        raise HubError(f"history: cursor {cursor!r:.80} is not one a page returned")
    return value, tie


# -- units the CLI and the controller read --------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
                   "d": 86400.0, "w": 604800.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def parse_duration(text: str | float) -> float:
    """Seconds from ``"7d"``, ``"12h"``, ``"30m"``, ``"1.5s"``, ``"250ms"`` or a number."""
    if _is_num(text):
        if not math.isfinite(float(text)) or float(text) < 0:  # type: ignore[arg-type]
            raise ValueError(f"a duration must be a finite number >= 0, not {text!r}")
        return float(text)  # type: ignore[arg-type]
    m = _DURATION.match(str(text).lower())
    if not m:
        raise ValueError(f"cannot read {text!r} as a duration; use e.g. 7d, 12h, 30m, 10s, "
                         "250ms or seconds")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str | int) -> int:
    """Bytes from ``"500MB"``, ``"2GiB"``, ``"10k"`` or a number (K/M/G/T are powers of 1000,
    KiB/MiB/GiB/TiB powers of 1024)."""
    if _is_int(text):
        if int(text) < 0:
            raise ValueError(f"a size must be >= 0, not {text!r}")
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 500MB, 2GiB, 10k or bytes")
    unit = m.group(2).lower().rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = " kmgt".index(unit[:1]) if unit else 0
    return int(float(m.group(1)) * base ** power)


# -- checks ---------------------------------------------------------------------------


def _many(value: Any, ok: Any, what: str, name: str, kind: str) -> tuple[Any, ...]:
    if ok(value):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [v for v in value if not ok(v)]
        if bad:
            raise HubError(f"{what}: every {name} must be {kind}; got {bad[0]!r:.80}")
        return tuple(value)
    raise HubError(f"{what}: {name} must be {kind} or a list of them, "
                   f"not {type(value).__name__}")


def _time(value: Any, what: str, name: str) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if not _is_num(value) or not math.isfinite(value):
        raise HubError(f"{what}: {name} must be epoch seconds (a number), "
                       f"not {type(value).__name__}")
    return float(value)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
