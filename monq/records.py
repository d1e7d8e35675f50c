"""The typed task record the client hands back, and the time parsing behind ``since=``.

The Hub stores times as float epoch seconds (UTC); users write
``since="10 minutes ago"`` or pass a ``datetime``.  :func:`to_epoch` turns what
a user wrote into epoch seconds before a query leaves the client, and
:class:`TaskRecord` turns a store row back into timezone-aware datetimes.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

__all__ = ["TaskRecord", "from_epoch", "short_id", "to_epoch"]

#: characters of a msg_id shown where space is short (the CLI's table, the dashboard):
#: ids begin with their time in milliseconds (12 characters, monq.protocol), so a short
#: id needs the 8 random characters after it to tell tasks of the same moment apart; it
#: is still a prefix, which ``monq show`` and ``task_record`` accept
SHORT_ID = 20


def short_id(msg_id: str) -> str:
    """The prefix of ``msg_id`` shown in tables (see :data:`SHORT_ID`)."""
    return msg_id[:SHORT_ID]

_UNITS = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]+)\s+ago$")
_ACCEPTED = ("epoch seconds, a datetime, an ISO 8601 string such as '2024-05-01T12:00:00Z', "
             "'now', or a phrase such as '10 minutes ago', '2 h ago', '1 day ago', '30s ago'")


def to_epoch(value: Any, *, now: float | None = None) -> float | None:
    """Epoch seconds (UTC) for a time a user wrote; ``None`` stays ``None``.

    Naive datetimes and ISO strings without an offset are local time, as a
    user at a terminal means them.  ``now`` fixes the clock for relative
    phrases (tests).  Anything else raises :class:`ValueError`.
    """
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int, but True is never a time
        raise ValueError(f"cannot read {value!r} as a time; expected {_ACCEPTED}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"cannot read {value!r} as a time: not a finite number")
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day).timestamp()
    if isinstance(value, str):
        return _parse_string(value, time.time() if now is None else now)
    raise ValueError(f"cannot read {type(value).__name__} {value!r} as a time; "
                     f"expected {_ACCEPTED}")


def _parse_string(text: str, now: float) -> float:
    s = text.strip().lower()
    if s == "now":
        return now
    m = _RELATIVE.match(s)
    if m:
        amount, unit = m.groups()
        if unit not in _UNITS:
            raise ValueError(f"unknown time unit {unit!r} in {text!r}; "
                             f"use seconds, minutes, hours, days or weeks")
        return now - float(amount) * _UNITS[unit]
    try:
        # fromisoformat in 3.11 reads 'Z', offsets, a space or 'T' between date and time
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        pass
    raise ValueError(f"cannot read {text!r} as a time; expected {_ACCEPTED}")


def from_epoch(value: float | None) -> datetime | None:
    """A timezone-aware UTC datetime for epoch seconds; ``None`` stays ``None``."""
    if value is None:
        return None
    return datetime.fromtimestamp(float(value), tz=timezone.utc)


@dataclass(frozen=True)
class TaskRecord:
    """One task as the Hub recorded it: what ``Client.history()`` returns."""

    msg_id: str
    status: str
    client: str | None = None
    engine: int | None = None
    queue: str | None = None
    label: str | None = None
    func: str | None = None
    submitted: datetime | None = None
    started: datetime | None = None
    completed: datetime | None = None
    received: datetime | None = None
    ename: str | None = None
    evalue: str | None = None
    traceback: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    retries: int = 0
    request_bytes: int | None = None
    result_bytes: int | None = None
    #: when retention (or a payloads-only purge) dropped the request and result
    payload_evicted: datetime | None = None

    @property
    def duration(self) -> float | None:
        """Seconds the task ran on its engine (completed - started), if both are known."""
        if self.started is None or self.completed is None:
            return None
        return (self.completed - self.started).total_seconds()

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskRecord:
        """Build from a store row dict; unknown keys are ignored, missing ones become None/0.

        A history page decodes hundreds of these: the fields are set straight into
        the new record's ``__dict__`` (what the frozen dataclass's ``__init__`` does
        with one ``object.__setattr__`` per field, ~10x slower) and the times
        converted with positional arguments (``tz=`` by keyword costs 3x).
        """
        g = row.get
        engine = g("engine")
        status = g("status")
        retries = g("retries")
        rec = object.__new__(cls)
        rec.__dict__.update(
            msg_id=str(g("msg_id")),
            status=status if type(status) is str else str(status or ""),
            client=g("client"),
            engine=engine if engine is None or type(engine) is int else int(engine),
            queue=g("queue"),
            label=g("label"),
            func=g("func"),
            submitted=_when(g("submitted")),
            started=_when(g("started")),
            completed=_when(g("completed")),
            received=_when(g("received")),
            ename=g("ename"),
            evalue=g("evalue"),
            traceback=g("traceback"),
            stdout=g("stdout"),
            stderr=g("stderr"),
            retries=retries if type(retries) is int else int(retries or 0),
            request_bytes=g("request_bytes"),
            result_bytes=g("result_bytes"),
            payload_evicted=_when(g("payload_evicted")),
        )
        return rec


_fromtimestamp = datetime.fromtimestamp
_UTC = timezone.utc


def _when(value: Any) -> datetime | None:
    """:func:`from_epoch` for a number from the Hub (the common case first)."""
    if value is None:
        return None
    if type(value) is float:
        return _fromtimestamp(value, _UTC)
    return _fromtimestamp(float(value), _UTC)
