"""Writing task records out: CSV and JSON Lines, streamed (one page in memory at a time).

Used by :meth:`monq.Client.export` and ``monq history --csv/--json``.
Times are ISO 8601 in UTC; ``duration`` is seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable
from datetime import datetime
from typing import IO, Any

from monq.records import TaskRecord

__all__ = ["COLUMNS", "FORMATS", "record_dict", "write_records"]

FORMATS = ("csv", "jsonl")
#: the columns of an export, in order
COLUMNS = [f.name for f in dataclasses.fields(TaskRecord)] + ["duration"]


def record_dict(r: TaskRecord) -> dict[str, Any]:
    """A record as plain JSON-able values (times ISO 8601, duration in seconds)."""
    d: dict[str, Any] = {}
    for name in COLUMNS:
        v = getattr(r, name)
        d[name] = v.isoformat() if isinstance(v, datetime) else v
    return d


def write_records(records: Iterable[TaskRecord], out: IO[str], format: str = "csv") -> int:
    """Write records to a text file as they come; return how many were written."""
    if format not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, not {format!r}")
    n = 0
    if format == "csv":
        w = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in records:
            w.writerow(record_dict(r))
            n += 1
    else:
        for r in records:
            out.write(json.dumps(record_dict(r), ensure_ascii=False) + "\n")
            n += 1
    return n
