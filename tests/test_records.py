"""TaskRecord and the time parsing behind ``history(since=...)``."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest

from monq.records import TaskRecord, from_epoch, to_epoch

NOW = 1_700_000_000.0


@pytest.mark.parametrize("value, expected", [
    (None, None),
    (0, 0.0),
    (1_700_000_000, 1_700_000_000.0),
    (1.5, 1.5),
    ("now", NOW),
    (" Now ", NOW),
    ("10 minutes ago", NOW - 600),
    ("2 h ago", NOW - 7200),
    ("1 day ago", NOW - 86400),
    ("30s ago", NOW - 30),
    ("1.5 hours ago", NOW - 5400),
    ("1 week ago", NOW - 604800),
    ("2023-11-14T22:13:20Z", NOW),
    ("2023-11-14T22:13:20+00:00", NOW),
    ("2023-11-14 23:13:20+01:00", NOW),
    (datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc), NOW),
])
def test_to_epoch(value: Any, expected: float | None) -> None:
    assert to_epoch(value, now=NOW) == expected


def test_to_epoch_naive_is_local_time() -> None:
    naive = datetime(2024, 5, 1, 12, 0, 0)
    assert to_epoch(naive) == naive.timestamp()
    assert to_epoch("2024-05-01T12:00:00") == naive.timestamp()
    assert to_epoch(date(2024, 5, 1)) == datetime(2024, 5, 1).timestamp()


def test_to_epoch_relative_uses_the_clock() -> None:
    t = to_epoch("10 minutes ago")
    assert t is not None
    assert abs(t - (datetime.now(timezone.utc) - timedelta(minutes=10)).timestamp()) < 5


@pytest.mark.parametrize("value, match", [
    ("yesterday", "cannot read 'yesterday' as a time"),
    ("10 fortnights ago", "unknown time unit 'fortnights'"),
    ("ago", "cannot read"),
    ("", "cannot read"),
    (True, "cannot read True"),
    (float("nan"), "not a finite number"),
    ([1], "cannot read list"),
])
def test_to_epoch_refuses(value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        to_epoch(value, now=NOW)


def test_from_epoch() -> None:
    assert from_epoch(None) is None
    dt = from_epoch(NOW)
    assert dt == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert dt is not None and dt.tzinfo is timezone.utc


def test_task_record_from_row() -> None:
    row = {"msg_id": "m", "status": "ok", "client": "c", "engine": 2, "queue": "task",
           "label": "l", "func": "f", "submitted": NOW, "started": NOW + 1,
           "completed": NOW + 3.5, "received": NOW + 3.6, "ename": None, "evalue": None,
           "traceback": None, "stdout": "out", "stderr": "", "retries": 1,
           "request_bytes": 10, "result_bytes": None, "something_new": 1}
    r = TaskRecord.from_row(row)
    assert r.msg_id == "m" and r.engine == 2 and r.stdout == "out" and r.retries == 1
    assert r.submitted == from_epoch(NOW) and r.submitted is not None
    assert r.submitted.tzinfo is timezone.utc
    assert r.duration == 2.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.status = "error"  # type: ignore[misc]


def test_task_record_missing_keys() -> None:
    r = TaskRecord.from_row({"msg_id": "m", "status": "pending"})
    assert r.engine is None and r.submitted is None and r.retries == 0
    assert r.request_bytes is None and r.duration is None
    r = TaskRecord.from_row({"msg_id": "m", "status": "pending", "retries": None})
    assert r.retries == 0


@pytest.mark.parametrize("row", [
    {"msg_id": "m", "status": "ok", "client": "c", "engine": 2, "queue": "task", "label": "l",
     "func": "f", "submitted": NOW, "started": NOW + 1, "completed": NOW + 3.5,
     "received": NOW + 3.6, "ename": "E", "evalue": "v", "traceback": "tb", "stdout": "out",
     "stderr": "", "retries": 1, "request_bytes": 10, "result_bytes": 3,
     "payload_evicted": NOW + 9, "duration": 2.5, "_tie": 7},
    # what JSON may hand back: whole-second times as ints, a status-less row, strings
    {"msg_id": "m", "status": None, "engine": True, "submitted": 1_700_000_000,
     "completed": "1700000001.5", "retries": "2"},
    {"msg_id": 5},
])
def test_from_row_builds_what_the_constructor_builds(row: dict[str, Any]) -> None:
    # from_row fills the frozen record's __dict__ directly (a history page decodes
    # hundreds): it must give exactly the record the dataclass constructor gives
    g = row.get
    want = TaskRecord(
        msg_id=str(g("msg_id")), status=str(g("status") or ""), client=g("client"),
        engine=None if g("engine") is None else int(g("engine")), queue=g("queue"),
        label=g("label"), func=g("func"), submitted=from_epoch(g("submitted")),
        started=from_epoch(g("started")), completed=from_epoch(g("completed")),
        received=from_epoch(g("received")), ename=g("ename"), evalue=g("evalue"),
        traceback=g("traceback"), stdout=g("stdout"), stderr=g("stderr"),
        retries=int(g("retries") or 0), request_bytes=g("request_bytes"),
        result_bytes=g("result_bytes"), payload_evicted=from_epoch(g("payload_evicted")))
    got = TaskRecord.from_row(row)
    assert got == want and hash(got) == hash(want) and repr(got) == repr(want)
    assert vars(got) == vars(want)
    assert [type(getattr(got, f.name)) for f in dataclasses.fields(TaskRecord)] == \
        [type(getattr(want, f.name)) for f in dataclasses.fields(TaskRecord)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.msg_id = "x"  # type: ignore[misc]
