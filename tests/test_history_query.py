"""The history's query API on the store itself: filters, cursor pages, stats, search, purge,
retention and schema upgrades, on real SQLite files (no cluster needed)."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from monq.errors import HubError
from monq.export import write_records
from monq.hub.filters import TaskFilter, parse_duration, parse_size
from monq.hub.retention import Retention, RetentionPolicy
from monq.hub.store import TaskStore
from monq.records import TaskRecord

LABELS = ["etl", "train", None]


def make_rows(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        sub = 1000.0 + i
        dur = round(rnd.uniform(0.0, 10.0), 3)
        status = "error" if i % 10 == 3 else "ok"
        row: dict[str, Any] = {
            "msg_id": f"{i:04x}{rnd.getrandbits(64):016x}", "status": status,
            "engine": i % 4, "client": f"c{i % 3}", "label": LABELS[i % 3],
            "submitted": sub, "started": sub + 0.5, "completed": sub + 0.5 + dur,
            "request": b"r" * 10, "result": b"s" * 20 if status == "ok" else None,
        }
        if status == "error":
            row.update(ename="ValueError", evalue=f"bad value {i}",
                       traceback=f"Traceback (most recent call last):\nValueError: bad value {i}")
        if i % 5 == 0:
            row["stdout"] = f"processed chunk {i} of alpha beta\n"
        rows.append(row)
    rows[7]["stdout"] = "progress 100% done_now\n"  # LIKE's wildcards, literally
    return rows


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database of 300 finished tasks, written once; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "h.db"
    with TaskStore(f"sqlite:///{path}") as s:
        s.write(make_rows(300), [])
        with s.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture(params=["fts", "like"])
def store(request: pytest.FixtureRequest, template: Path, tmp_path: Path):
    """A store with 300 finished tasks, searching with FTS5 or (forced) with LIKE."""
    shutil.copy(template, tmp_path / "h.db")
    s = TaskStore(f"sqlite:///{tmp_path / 'h.db'}", fts=request.param == "fts")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return make_rows(300)


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["msg_id"] for r in rows]


def newest_first(rows: list[dict[str, Any]]) -> list[str]:
    return ids(sorted(rows, key=lambda r: r["submitted"], reverse=True))


# -- filters ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, keep", [
    ({"label": "etl"}, lambda r: r["label"] == "etl"),
    ({"label": ["etl", "train"]}, lambda r: r["label"] in ("etl", "train")),
    ({"client": ["c0", "c2"], "engine": 1}, lambda r: r["client"] in ("c0", "c2")
     and r["engine"] == 1),
    ({"msg_id": "00"}, lambda r: r["msg_id"].startswith("00")),
    ({"msg_id": "012"}, lambda r: r["msg_id"].startswith("012")),
    ({"since": 1100, "until": 1150}, lambda r: 1100 <= r["submitted"] < 1150),
    ({"started_since": 1100.5, "started_until": 1110}, lambda r: 1100.5 <= r["started"] < 1110),
    ({"completed_since": 1200}, lambda r: r["completed"] >= 1200),
    ({"completed_until": 1010}, lambda r: r["completed"] < 1010),
    ({"min_duration": 9.5}, lambda r: r["completed"] - r["started"] >= 9.5 - 1e-9),
    ({"max_duration": 0.2, "status": "ok"}, lambda r: r["completed"] - r["started"] <= 0.2
     and r["status"] == "ok"),
    ({"status": "error", "label": "train", "engine": 3},
     lambda r: r["status"] == "error" and r["label"] == "train" and r["engine"] == 3),
])
def test_filters_match_a_python_filter(store: TaskStore, rows: list[dict[str, Any]],
                                       kwargs: dict[str, Any], keep: Any) -> None:
    expected = newest_first([r for r in rows if keep(r)])
    assert expected, "the case must select something"
    assert ids(store.history(**kwargs)) == expected
    assert store.count(**kwargs) == len(expected)


def test_duration_is_written_with_the_times_even_across_updates(tmp_path: Path) -> None:
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as s:
        s.write([{"msg_id": "a", "status": "pending", "submitted": 1.0},
                 {"msg_id": "b", "status": "pending", "submitted": 2.0}], [])
        s.write([], [{"msg_id": "a", "status": "running", "started": 10.0}])
        assert s.get_task("a")["duration"] is None  # type: ignore[index]
        # the reply brings only `completed`: timed against the stored `started`
        s.write([], [{"msg_id": "a", "status": "ok", "completed": 12.5},
                     {"msg_id": "b", "status": "ok", "started": 3.0, "completed": 3.25}])
        assert s.get_task("a")["duration"] == 2.5  # type: ignore[index]
        assert s.get_task("b")["duration"] == 0.25  # type: ignore[index]
        assert ids(s.history(min_duration=1)) == ["a"]
        with pytest.raises(HubError, match="computed by the store"):
            s.write([{"msg_id": "c", "status": "ok", "duration": 3.0}], [])


# -- cursor pages -----------------------------------------------------------------


@pytest.mark.parametrize("order", ["-submitted", "submitted", "-duration", "duration",
                                   "msg_id", "-msg_id", "-completed"])
def test_cursor_pages_walk_the_whole_order_once(store: TaskStore, order: str) -> None:
    everything = ids(store.history(order=order, label=["etl", "train"]))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = store.history_page(limit=17, order=order, cursor=cursor,
                                          label=["etl", "train"])
        seen += ids(page)
        pages += 1
        if cursor is None:
            break
        assert len(page) == 17
    assert seen == everything and len(seen) == 200
    assert pages == math.ceil(200 / 17)


def test_cursor_pages_with_ties_and_nulls(tmp_path: Path) -> None:
    rows = [{"msg_id": f"m{i:02d}", "status": "ok" if i % 3 else "pending",
             "submitted": float(i // 4),  # four of each: ties
             **({"started": 100.0, "completed": 100.0 + (i % 5)} if i % 3 else {})}
            for i in range(40)]
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as s:
        s.write(rows, [])
        for order in ("-submitted", "submitted", "duration", "-duration", "-completed",
                      "completed", "started"):
            full = ids(s.history(order=order))
            got: list[str] = []
            cursor = None
            while True:
                page, cursor = s.history_page(limit=3, order=order, cursor=cursor)
                got += ids(page)
                if cursor is None:
                    break
            assert got == full, order
            assert len(set(got)) == 40


def test_cursor_is_keyset_not_offset(store: TaskStore) -> None:
    """Rows written after page 1 at the top of the order do not shift page 2."""
    page1, cursor = store.history_page(limit=10)
    page2 = store.history_page(limit=10, cursor=cursor)[0]
    store.write([{"msg_id": f"new{i}", "status": "ok", "submitted": 99999.0 + i}
                 for i in range(5)], [])
    assert ids(store.history_page(limit=10, cursor=cursor)[0]) == ids(page2)
    assert store.history_page(limit=300, cursor=cursor)[1] is None


@pytest.mark.parametrize("cursor, order, match", [
    ("garbage!!", "-submitted", "not one a page returned"),
    (12, "-submitted", "cursor must be the string"),
])
def test_bad_cursors(store: TaskStore, cursor: Any, order: str, match: str) -> None:
    with pytest.raises(HubError, match=match):
        store.history_page(limit=5, order=order, cursor=cursor)


def test_a_cursor_belongs_to_its_order(store: TaskStore) -> None:
    cursor = store.history_page(limit=5, order="-submitted")[1]
    with pytest.raises(HubError, match="continues order '-submitted', not 'duration'"):
        store.history_page(limit=5, order="duration", cursor=cursor)


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"lable": "x"}, "unknown filter.*lable"),
    ({"label": 3}, "label must be a string"),
    ({"msg_id": ""}, "msg_id must be a non-empty string prefix"),
    ({"msg_id": 5}, "msg_id must be"),
    ({"min_duration": -1}, "min_duration must be a number of seconds >= 0"),
    ({"max_duration": "2s"}, "max_duration must be a number"),
    ({"min_duration": float("nan")}, "min_duration"),
    ({"started_since": "yesterday"}, "started_since must be epoch seconds"),
    ({"completed_until": float("inf")}, "completed_until must be epoch seconds"),
    ({"search": "  "}, "search must be non-empty text"),
    ({"search": "*"}, "search needs at least one word"),
    ({"order": "label"}, "cannot order by 'label'"),
])
def test_bad_filters_name_the_filter(store: TaskStore, kwargs: dict[str, Any],
                                     match: str) -> None:
    with pytest.raises(HubError, match=match):
        store.history(**kwargs)


def test_bad_stats_arguments(store: TaskStore) -> None:
    with pytest.raises(HubError, match="cannot group by 'func'"):
        store.task_stats("func")
    with pytest.raises(HubError, match="by must be None, 'engine' or 'label'"):
        store.duration_percentiles(by="status")
    with pytest.raises(HubError, match="percentile 101"):
        store.duration_percentiles(percentiles=[50, 101])
    with pytest.raises(HubError, match="unknown filter"):
        store.count(nope=1)


def test_values_are_bound_never_spliced(store: TaskStore) -> None:
    evil = "x'); DROP TABLE tasks; --"
    for kw in ({"label": evil}, {"msg_id": evil}, {"client": evil}, {"search": evil}):
        assert store.history(**kw) == []
    assert store.count() == 300


def test_units() -> None:
    assert parse_duration("7d") == 7 * 86400 and parse_duration("12h") == 43200
    assert parse_duration("30m") == 1800 and parse_duration("250ms") == 0.25
    assert parse_duration(5) == 5.0 and parse_duration("1.5s") == 1.5
    assert parse_size("500MB") == 500_000_000 and parse_size("2GiB") == 2 << 30
    assert parse_size("10k") == 10_000 and parse_size(123) == 123
    for bad in ("7 days", "-1s", "soon"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")
    assert TaskFilter.from_dict({"submitted_since": 5}).since == 5.0


# -- search -----------------------------------------------------------------------------


def test_search(store: TaskStore, rows: list[dict[str, Any]]) -> None:
    assert store.fts == (store.count() > 0 and store.fts)  # fixture param decides
    errors = [r for r in rows if r["status"] == "error"]
    assert ids(store.history(search="ValueError")) == newest_first(errors)
    # every word must appear, in any of the text columns, whatever the case
    both = [r for r in rows if "alpha beta" in (r.get("stdout") or "")]
    assert ids(store.history(search="ALPHA beta")) == newest_first(both)
    # FTS5 matches words; the LIKE fallback matches substrings ("15" is in "150")
    fifteen = [r for r in rows if "chunk" in (r.get("stdout") or "") and "15" in r["stdout"]]
    assert ids(store.history(search="chunk 15")) == (
        [rows[15]["msg_id"]] if store.fts else newest_first(fifteen))
    assert rows[13]["msg_id"] in ids(store.history(search="bad value 13", status="error"))
    assert store.history(search="nowhere") == []
    assert store.count(search="processed") == len([r for r in rows if r.get("stdout")]) - 1
    assert ids(store.history(search="process*")) == ids(store.history(search="processed"))


def test_like_fallback_escapes_wildcards(tmp_path: Path) -> None:
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}", fts=False) as s:
        s.write(make_rows(30), [])
        assert not s.fts
        assert [r["stdout"] for r in s.history(search="100%")] == ["progress 100% done_now\n"]
        assert s.history(search="1%0") == []  # % is no wildcard
        assert len(s.history(search="done_now")) == 1
        assert s.history(search="done_nox") == []
        assert s.history(search="e_now") != s.history(search="e-now")  # _ is literal


def test_search_index_follows_updates_and_deletes(tmp_path: Path) -> None:
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as s:
        assert s.fts
        s.write([{"msg_id": "a", "status": "pending"}, {"msg_id": "b", "status": "pending",
                                                         "stdout": "first words"}], [])
        assert ids(s.history(search="first")) == ["b"]
        s.write([], [{"msg_id": "a", "status": "error", "traceback": "KeyError: zebra"},
                     {"msg_id": "b", "status": "ok", "stdout": "second words"}])
        assert ids(s.history(search="zebra")) == ["a"]
        assert s.history(search="first") == []  # the old text left the index
        assert ids(s.history(search="second")) == ["b"]
        assert s.purge(msg_ids=["a"]) == 1
        assert s.history(search="zebra") == []
        with s.engine.connect() as conn:  # the index itself is consistent
            conn.exec_driver_sql("INSERT INTO tasks_fts(tasks_fts, rank) "
                                 "VALUES ('integrity-check', 1)")


# -- stats ---------------------------------------------------------------------------------


def test_task_stats(store: TaskStore, rows: list[dict[str, Any]]) -> None:
    by_status = dict(store.task_stats("status"))
    assert by_status == {"ok": 270, "error": 30}
    assert dict(store.task_stats("engine", status="error")) == {
        e: sum(1 for r in rows if r["engine"] == e and r["status"] == "error")
        for e in range(4) if any(r["engine"] == e and r["status"] == "error" for r in rows)}
    assert dict(store.task_stats("label")) == {"etl": 100, "train": 100, None: 100}
    minutes = store.task_stats("minute")
    assert [k for k, _ in minutes] == [960, 1020, 1080, 1140, 1200, 1260]
    assert sum(n for _, n in minutes) == 300 and dict(minutes)[1020] == 60
    assert store.task_stats("hour", since=1100) == [(0, 200)]


def nearest_rank(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


@pytest.mark.parametrize("exact", [True, False])
def test_duration_percentiles(store: TaskStore, rows: list[dict[str, Any]], exact: bool) -> None:
    # without exact=True these filters read the duration histogram: within one bucket
    def approx(v: float) -> Any:
        return pytest.approx(v) if exact else pytest.approx(v, rel=0.13)

    durs = [r["completed"] - r["started"] for r in rows]
    (all_,) = store.duration_percentiles(percentiles=[0, 50, 90, 99, 99.9, 100], exact=exact)
    assert all_["n"] == 300
    for p, name in ((0, "p0"), (50, "p50"), (90, "p90"), (99, "p99"), (99.9, "p99.9"),
                    (100, "p100")):
        assert all_[name] == approx(nearest_rank(durs, p)), name
        assert all_[name] >= nearest_rank(durs, p) - 1e-9, name
    assert all_["min"] == pytest.approx(min(durs)) and all_["max"] == pytest.approx(max(durs))
    per_label = {g["key"]: g for g in store.duration_percentiles(by="label", exact=exact)}
    assert set(per_label) == {"etl", "train", None}
    for label, g in per_label.items():
        mine = [r["completed"] - r["started"] for r in rows if r["label"] == label]
        assert g["n"] == 100 and g["p90"] == approx(nearest_rank(mine, 90))
    per_engine = store.duration_percentiles(by="engine", status="error", exact=exact)
    for g in per_engine:
        mine = [r["completed"] - r["started"] for r in rows
                if r["engine"] == g["key"] and r["status"] == "error"]
        assert g["n"] == len(mine) and g["p50"] == approx(nearest_rank(mine, 50))
    assert store.duration_percentiles(label="nothing", exact=exact) == []


def _min_max(store: TaskStore, by: str | None, **f: Any) -> dict[Any, tuple[Any, Any, int]]:
    return {g["key"]: (g["min"], g["max"], g["n"])
            for g in store.duration_percentiles(by, [0, 100], **f)}


def _exact_min_max(store: TaskStore, by: str | None, **f: Any) -> dict[Any, Any]:
    return {g["key"]: (g["min"], g["max"], g["n"])
            for g in store.duration_percentiles(by, [0, 100], exact=True, **f)}


@pytest.mark.parametrize("by", [None, "engine", "label"])
def test_min_and_max_stay_exact_when_their_tasks_are_purged(store: TaskStore,
                                                            by: str | None) -> None:
    # min and max come from the histogram's lo/hi (schema 5): deleting the tasks that
    # held them must move them to the next ones, in the same transaction
    for _ in range(3):
        for key, (lo, hi, _n) in _min_max(store, by).items():
            gone = [r["msg_id"] for r in store.history(min_duration=lo, max_duration=lo)
                    + store.history(min_duration=hi, max_duration=hi)
                    if by is None or r[by] == key]
            assert gone
            assert store.purge(msg_ids=gone) == len(set(gone))
        assert _min_max(store, by) == _exact_min_max(store, by)
    assert _min_max(store, by, status="error") == _exact_min_max(store, by, status="error")
    # a whole group's tasks gone: its histogram rows keep no bound
    store.purge(label="etl")
    assert "etl" not in _min_max(store, "label")
    assert _min_max(store, by) == _exact_min_max(store, by)


def test_min_and_max_without_kept_bounds_are_sought(store: TaskStore) -> None:
    # a histogram row without lo/hi (a write between the two reads emptied it) falls back
    # to seeks into the duration index: the same exact answer
    want = {by: _exact_min_max(store, by) for by in (None, "engine", "label")}
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE duration_hist SET lo = NULL, hi = NULL")
    for by, groups in want.items():
        assert _min_max(store, by) == groups


def test_min_and_max_stay_exact_through_retention(store: TaskStore) -> None:
    # retention deletes the oldest-completed tasks; make those the shortest and longest
    store.write([], [{"msg_id": r["msg_id"], "completed": r["started"] + (
        0.0001 * (i + 1) if i % 2 else 50.0 + i)} for i, r in enumerate(
            store.history(order="submitted", limit=20))])
    before = _exact_min_max(store, "engine")
    assert _min_max(store, "engine") == before
    ret = Retention(store, RetentionPolicy(max_tasks=250, chunk=7))
    while ret.step().more:
        pass
    assert store.total_tasks() == 250
    after = _exact_min_max(store, "engine")
    assert after != before and _min_max(store, "engine") == after
    assert _min_max(store, None) == _exact_min_max(store, None)


def test_time_span(store: TaskStore, rows: list[dict[str, Any]]) -> None:
    span = store.time_span(label="etl")
    etl = [r for r in rows if r["label"] == "etl"]
    assert span["first_submitted"] == min(r["submitted"] for r in etl)
    assert span["last_completed"] == pytest.approx(max(r["completed"] for r in etl))


# -- query plans: every indexed filter is a SEARCH, never a full SCAN of tasks ---------------


@pytest.mark.parametrize("kwargs", [
    {"status": "error"}, {"engine": 2}, {"label": "etl"}, {"client": "c1"},
    {"msg_id": "01"}, {"since": 1100, "until": 1110},
    {"started_since": 1100, "started_until": 1110},
    {"completed_since": 1100, "completed_until": 1110},
    {"min_duration": 9.0}, {"status": ["error", "lost"], "label": "train"},
    {"search": "alpha"},
])
def test_indexed_filters_use_an_index(store: TaskStore, kwargs: dict[str, Any]) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    plan = store.explain(store.history_statement(limit=100, **kwargs))
    assert not any(step.startswith("SCAN tasks") and "INDEX" not in step for step in plan), plan
    if "search" not in kwargs:
        assert any("USING INDEX" in step or "PRIMARY KEY" in step for step in plan), plan
        assert not any("SCAN tasks USING INDEX ix_tasks_submitted" == step for step in plan) \
            or "since" in kwargs, plan


def test_cursor_pages_seek_into_the_index(store: TaskStore) -> None:
    cursor = store.history_page(limit=10, status="ok")[1]
    plan = store.explain(store.history_statement(limit=10, status="ok", cursor=cursor))
    assert plan == ["SEARCH tasks USING INDEX ix_tasks_status_submitted "
                    "(status=? AND submitted<?)"], plan


# -- export -------------------------------------------------------------------------------


def test_export_csv_and_jsonl(store: TaskStore) -> None:
    recs = [TaskRecord.from_row(r) for r in store.iter_history(page=7, status="error")]
    assert len(recs) == 30
    buf = io.StringIO()
    assert write_records(recs, buf, "jsonl") == 30
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["msg_id"] for x in lines] == [r.msg_id for r in recs]
    assert lines[0]["traceback"].startswith("Traceback") and lines[0]["duration"] > 0
    assert lines[0]["submitted"].endswith("+00:00")
    buf = io.StringIO()
    write_records(recs, buf, "csv")
    import csv

    table = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert len(table) == 30 and table[0]["msg_id"] == recs[0].msg_id
    assert "ValueError: bad value" in table[0]["traceback"]  # multi-line text survives
    with pytest.raises(ValueError, match="export format"):
        write_records(recs, buf, "xml")


# -- purge ---------------------------------------------------------------------------------


def test_purge_with_history_filters(store: TaskStore, rows: list[dict[str, Any]]) -> None:
    with pytest.raises(HubError, match="say what to purge"):
        store.purge()
    gone = [r for r in rows if r["label"] == "etl" and r["status"] == "error"]
    assert store.purge(label="etl", status="error") == len(gone)
    assert store.count() == 300 - len(gone)
    assert store.purge(search="alpha", min_duration=5) == len(
        [r for r in rows if "alpha" in (r.get("stdout") or "")
         and r["completed"] - r["started"] >= 5 and r not in gone])


def test_purge_payloads_only(store: TaskStore) -> None:
    target = store.history(engine=1)
    n = store.purge(engine=1, payloads_only=True)
    assert n == len(target)
    full = store.get_task(target[0]["msg_id"], with_payload=True)
    assert full is not None
    assert full["request"] is None and full["result"] is None
    assert full["request_bytes"] == 10 and full["payload_evicted"] is not None
    assert store.count() == 300  # the records stay
    assert store.purge(engine=1, payloads_only=True) == 0  # nothing left to drop


def test_purge_never_touches_unfinished(tmp_path: Path) -> None:
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as s:
        s.write([{"msg_id": "p", "status": "pending", "label": "x", "request": b"1"},
                 {"msg_id": "r", "status": "running", "label": "x", "request": b"1"},
                 {"msg_id": "o", "status": "ok", "label": "x", "completed": 1.0}], [])
        assert s.purge(label="x") == 1
        assert s.purge(everything=True, payloads_only=True) == 0
        assert sorted(s.hub_history()) == ["p", "r"]
        assert s.get_task("p", with_payload=True)["request"] == b"1"  # type: ignore[index]


def test_find_task_by_prefix(store: TaskStore, rows: list[dict[str, Any]]) -> None:
    full = rows[100]["msg_id"]
    assert store.find_task(full[:8])["msg_id"] == full
    assert store.find_task(full)["msg_id"] == full
    with pytest.raises(HubError, match="several msg_ids"):
        store.find_task("0")
    with pytest.raises(HubError, match="no task"):
        store.find_task("zzzz")


# -- retention ------------------------------------------------------------------------------


def test_retention_max_bytes_evicts_payloads_oldest_first_then_records(tmp_path: Path) -> None:
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as s:
        s.write([{"msg_id": f"m{i:03d}", "status": "ok", "completed": float(i),
                  "request": b"x" * 100, "result": b"y" * 100} for i in range(50)]
                + [{"msg_id": "live", "status": "running", "request": b"z" * 100}], [])
        assert s.stored_total() == 50 * 200 + 100
        r = Retention(s, RetentionPolicy(max_bytes=3000, chunk=7), monotonic=lambda: 0.0)
        steps = 0
        while r.step().more:
            steps += 1
            assert steps < 100
        assert s.stored_total() <= 3000
        kept = [x for x in s.history(order="completed") if x["payload_evicted"] is None]
        # the newest payloads stayed, the oldest went; no record was deleted
        assert [x["msg_id"] for x in kept][-1] == "m049" and s.total_tasks() == 51
        # it stopped once under the limit: 36 evicted ((10100 - 3000) / 200), 14 + "live" kept
        assert len(kept) == 15
        evicted = [x for x in s.history(order="completed") if x["payload_evicted"]]
        assert max(x["completed"] for x in evicted) < min(x["completed"] for x in kept
                                                          if x["completed"] is not None)
        assert evicted[0]["result_bytes"] == 100  # sizes stay
        # below what payloads alone can free: whole records go, oldest first
        r2 = Retention(s, RetentionPolicy(max_bytes=50, chunk=7))
        while r2.step().more:
            pass
        assert s.hub_history() == ["live"]  # never the running task
        assert s.get_task("live", with_payload=True)["request"] == b"z" * 100  # type: ignore


def test_retention_walks_the_completed_index_without_sorting(store: TaskStore) -> None:
    # "status IN (finished)" made SQLite take the status index and sort every finished
    # task to find the oldest 2,000 (580 ms of CPU per retention step at 1M tasks)
    for before in (None, 1100.0):
        plan = store.explain(store.oldest_statement(2000, before))
        assert plan[0].startswith("SEARCH tasks USING INDEX ix_tasks_completed"), plan
        assert not any("TEMP B-TREE" in step for step in plan), plan
    want = [r["msg_id"] for r in sorted(store.history(), key=lambda r: r["completed"])][:5]
    assert store.delete_oldest(5) == 5
    assert not {r["msg_id"] for r in store.history()} & set(want)


def test_retention_retain_and_max_tasks(tmp_path: Path) -> None:
    now = 10_000.0
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as s:
        s.write([{"msg_id": f"m{i:03d}", "status": "ok", "completed": now - 1000 + i * 10}
                 for i in range(100)] + [{"msg_id": "old-pending", "status": "pending",
                                          "submitted": 0.0}], [])
        r = Retention(s, RetentionPolicy(retain=500, chunk=8), clock=lambda: now)
        while r.step().more:
            pass
        left = s.history(order="completed")
        assert [x["msg_id"] for x in left][0] == "old-pending"
        assert min(x["completed"] for x in left[1:]) >= now - 500
        assert s.total_tasks() == 51
        r = Retention(s, RetentionPolicy(max_tasks=10, chunk=8), clock=lambda: now)
        while r.step().more:
            pass
        assert s.total_tasks() == 10 and "old-pending" in s.hub_history()
        assert r.deleted == 41


def test_retention_tick_is_paced(tmp_path: Path) -> None:
    clock = [0.0]
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as s:
        s.write([{"msg_id": f"m{i}", "status": "ok", "completed": 1.0} for i in range(30)], [])
        r = Retention(s, RetentionPolicy(max_tasks=0, chunk=10, interval=5.0),
                      monotonic=lambda: clock[0])
        assert r.tick() is not None and s.total_tasks() == 20
        assert r.tick() is None  # more to do, but not before 20 ms
        clock[0] += 0.03
        assert r.tick() is not None and s.total_tasks() == 10
        clock[0] += 0.03
        r.tick()
        clock[0] += 0.03
        r.tick()
        assert s.total_tasks() == 0
        clock[0] += 0.03
        assert r.tick() is None  # within limits: next look after `interval`
        assert Retention(s, RetentionPolicy()).tick() is None  # no limits, no work
    with pytest.raises(ValueError, match="max_tasks must be >= 0"):
        RetentionPolicy(max_tasks=-1)


# -- schema upgrade ---------------------------------------------------------------------------

V1_DDL = """
CREATE TABLE tasks (msg_id VARCHAR(64) NOT NULL, client VARCHAR(64), engine INTEGER,
  engine_uuid VARCHAR(64), queue VARCHAR(16), label VARCHAR(200), func VARCHAR(300),
  status VARCHAR(16) NOT NULL, submitted FLOAT, started FLOAT, completed FLOAT, received FLOAT,
  ename VARCHAR(200), evalue TEXT, traceback TEXT, stdout TEXT, stderr TEXT,
  retries INTEGER DEFAULT '0', request BLOB, request_bytes INTEGER, result BLOB,
  result_bytes INTEGER, PRIMARY KEY (msg_id));
CREATE INDEX ix_tasks_client ON tasks (client);
CREATE INDEX ix_tasks_engine ON tasks (engine);
CREATE INDEX ix_tasks_submitted ON tasks (submitted);
CREATE INDEX ix_tasks_completed ON tasks (completed);
CREATE INDEX ix_tasks_status_submitted ON tasks (status, submitted);
CREATE TABLE engines (id INTEGER NOT NULL, uuid VARCHAR(64), hostname VARCHAR(200), pid INTEGER,
  registered FLOAT, unregistered FLOAT, status VARCHAR(16), PRIMARY KEY (id), UNIQUE (uuid));
CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT, PRIMARY KEY ("key"));
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO tasks (msg_id, status, engine, submitted, started, completed, stdout, request,
  request_bytes) VALUES ('old1', 'ok', 0, 1.0, 2.0, 5.0, 'legacy output here', x'0102', 2);
INSERT INTO tasks (msg_id, status, submitted) VALUES ('old2', 'pending', 3.0);
INSERT INTO engines VALUES (0, 'u0', 'h', 1, 1.0, NULL, 'dead');
"""


def test_a_version_1_history_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_DDL)
    with TaskStore(f"sqlite:///{path}") as s:
        old = s.get_task("old1")
        assert old is not None and old["duration"] == 3.0 and old["stored_bytes"] == 2 + 18
        assert ids(s.history(search="legacy")) == ["old1"]  # existing text is indexed
        assert ids(s.history(min_duration=2)) == ["old1"]
        assert s.max_engine_id() == 0 and len(s.hub_history()) == 2
        s.write([{"msg_id": "new", "status": "ok", "label": "l", "submitted": 9.0}], [])
        assert ids(s.history(label="l")) == ["new"]
        assert dict(s.task_stats("status")) == {"ok": 2, "pending": 1}  # aggregates built
        assert s.task_stats("minute") == [(0, 3)]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                            ).fetchone() == ("5",)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "ix_tasks_engine" not in names and "ix_tasks_engine_submitted" in names
    with TaskStore(f"sqlite:///{path}") as s:  # and it opens again as version 4
        assert len(s.hub_history()) == 3


def test_common_search_words_walk_the_order_index(store: TaskStore,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Words matching many tasks: the sort order drives (no sort of every match)."""
    if not store.fts:
        pytest.skip("FTS5 plans only")
    rare = store.explain(store.history_statement(search="processed"))
    expected = ids(store.history(search="processed", limit=10))
    import monq.hub.store as store_module

    monkeypatch.setattr(store_module, "_PROBE", 5)  # 60 matches are now "many"
    common = store.explain(store.history_statement(search="processed"))
    assert any("USING INTEGER PRIMARY KEY" in step for step in rare), rare
    # newest first, a search walks the matches by rowid a chunk at a time (schema version
    # 4): no sort of every match, whether they are many or few
    assert any("USING INTEGER PRIMARY KEY" in step for step in common), common
    assert not any("TEMP B-TREE" in step for step in common), common
    assert ids(store.history(search="processed", limit=10)) == expected
    # in another order, many matches: the order's index drives
    common = store.explain(store.history_statement(search="processed", order="submitted"))
    assert common[0] == "SCAN tasks USING INDEX ix_tasks_submitted", common
    assert not any("TEMP B-TREE" in step for step in common), common


def test_time_buckets_refuse_too_many(store: TaskStore) -> None:
    with pytest.raises(HubError, match="buckets of 60 s is more than"):
        store.task_stats("minute", since=0.0, until=1e9)


def test_retention_acts_on_a_big_batch_before_its_interval(tmp_path: Path) -> None:
    clock = [0.0]
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as s:
        r = Retention(s, RetentionPolicy(max_bytes=1000, interval=60.0),
                      monotonic=lambda: clock[0])
        assert r.tick() is not None  # the first look; within limits
        assert r.tick() is None
        s.write([{"msg_id": f"m{i}", "status": "ok", "completed": float(i),
                  "result": b"x" * 100} for i in range(30)], [])
        clock[0] += 0.05  # far before the 60 s interval
        assert r.tick() is not None and s.stored_total() <= 1000
