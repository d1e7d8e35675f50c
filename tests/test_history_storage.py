"""Schema version 4: payloads stored once, the time bounds and the plans they allow,
the partial index of rare statuses, and the upgrade from version 3 (counted, never timed)."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from monq.hub import payloads
from monq.hub.store import TaskStore


def _count(path: Path, sql: str) -> Any:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchone()[0]


# -- payloads stored once ----------------------------------------------------------------


def test_the_same_payload_is_stored_once_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    fn = b"pickled function" * 30
    none = b"pickled None, as long as a shared payload must be" * 2
    with TaskStore(f"sqlite:///{path}") as s:
        s.write([{"msg_id": f"m{i}", "status": "pending", "submitted": float(i), "request": fn}
                 for i in range(100)], [])
        s.write([], [{"msg_id": f"m{i}", "status": "ok", "started": i + 0.1,
                      "completed": i + 0.2, "result": none if i % 2 else b"r%064d" % i}
                     for i in range(100)])
        assert _count(path, "SELECT COUNT(*) FROM payloads") == 1 + 1 + 50
        assert _count(path, "SELECT refs FROM payloads WHERE length(data) = 480") == 100
        assert _count(path, "SELECT COUNT(*) FROM tasks WHERE request IS NOT NULL") == 0
        got = s.get_task("m7", with_payload=True)
        assert got is not None and got["request"] == fn and got["result"] == none
        assert "request_key" not in got and "request_key" not in s.get_task("m7")  # type: ignore
        assert s.get_task("m8", with_payload=True)["result"] == b"r%064d" % 8  # type: ignore
        assert s.stored_total() == 100 * len(fn) + 50 * len(none) + 50 * 65
        # purge half: the shared payloads lose references, the unique ones of those go
        assert s.purge(msg_ids=[f"m{i}" for i in range(50)]) == 50
        assert _count(path, "SELECT refs FROM payloads WHERE length(data) = 480") == 50
        assert _count(path, "SELECT COUNT(*) FROM payloads") == 1 + 1 + 25
        # evict the rest's payloads: nothing is left in the payloads table
        s.purge(everything=True, payloads_only=True)
        assert _count(path, "SELECT COUNT(*) FROM payloads") == 0
        assert s.stored_total() == 0
        assert s.get_task("m77", with_payload=True)["request"] is None  # type: ignore[index]
        s.purge(everything=True)
        assert s.total_tasks() == 0


def test_a_new_payload_replaces_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with TaskStore(f"sqlite:///{path}") as s:
        first, second = b"1" * 100, b"2" * 100
        s.write([{"msg_id": "a", "status": "pending", "request": first},
                 {"msg_id": "b", "status": "pending", "request": first}], [])
        s.write([], [{"msg_id": "a", "status": "pending", "request": second}])  # a new try
        assert s.get_task("a", with_payload=True)["request"] == second  # type: ignore
        assert s.get_task("b", with_payload=True)["request"] == first  # type: ignore
        with sqlite3.connect(path) as conn:
            refs = dict(conn.execute("SELECT data, refs FROM payloads"))
        assert refs == {first: 1, second: 1}
        # an insert of a known msg_id (a relay copy seen twice) becomes an update
        s.write([{"msg_id": "b", "status": "pending", "request": second}], [])
        with sqlite3.connect(path) as conn:
            refs = dict(conn.execute("SELECT data, refs FROM payloads"))
        assert refs == {second: 2}
        # a short payload stays in its row, and replaces a shared one
        s.write([], [{"msg_id": "b", "status": "pending", "request": b"short"}])
        assert s.get_task("b", with_payload=True)["request"] == b"short"  # type: ignore
        with sqlite3.connect(path) as conn:
            refs = dict(conn.execute("SELECT data, refs FROM payloads"))
        assert refs == {second: 1}


def test_a_hash_collision_keeps_the_payload_inline(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "h.db"
    monkeypatch.setattr(payloads, "key_of", lambda data: 42)  # every payload collides
    with TaskStore(f"sqlite:///{path}") as s:
        one, two, three = b"1" * 64, b"2" * 64, b"3" * 64
        s.write([{"msg_id": "a", "status": "ok", "request": one},
                 {"msg_id": "b", "status": "ok", "request": two}], [])
        s.write([{"msg_id": "c", "status": "ok", "request": three},
                 {"msg_id": "d", "status": "ok", "request": one}], [])
        for m, want in (("a", one), ("b", two), ("c", three), ("d", one)):
            assert s.get_task(m, with_payload=True)["request"] == want  # type: ignore[index]
        # only the first payload holds the key; the others (a clash with the stored one,
        # or with another of their own batch) stay in their rows
        assert _count(path, "SELECT refs FROM payloads WHERE key = 42") == 1
        assert _count(path, "SELECT COUNT(*) FROM tasks WHERE request IS NOT NULL") == 3
        s.purge(msg_ids=["a", "b", "c", "d"])
        assert _count(path, "SELECT COUNT(*) FROM payloads") == 0


def test_a_payload_over_the_cap_keeps_its_size_only(tmp_path: Path) -> None:
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}", payload_cap=10) as s:
        s.write([{"msg_id": "a", "status": "pending", "request": b"x" * 11}], [])
        got = s.get_task("a", with_payload=True)
        assert got is not None and got["request"] is None and got["request_bytes"] == 11


# -- time bounds -----------------------------------------------------------------------------


def _rows(n: int, seed: int = 3) -> list[dict[str, Any]]:
    """Tasks with queue waits, a skewed engine clock, and a few without a submitted time."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        sub = 1000.0 + i * 0.5
        wait = rnd.choice([0.01, 0.2, 30.0]) if i % 7 else 400.0
        skew = -5.0 if i % 11 == 0 else 0.0  # an engine whose clock is behind
        started = sub + wait + skew
        row = {"msg_id": f"t{i:05d}", "status": "error" if i % 9 == 0 else "ok",
               "engine": i % 4, "label": ["a", "b", None][i % 3], "client": "c",
               "submitted": None if i % 97 == 5 else sub, "started": started,
               "completed": started + rnd.uniform(0, 3)}
        out.append(row)
    return out


def _ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["msg_id"] for r in rows]


def _expected(rows: list[dict[str, Any]], keep: Any, desc: bool = True) -> list[str]:
    kept = [(i, r) for i, r in enumerate(rows) if keep(r)]
    # SQLite: NULLs first ascending, last descending; ties by rowid (insertion order)
    nonnull = sorted((x for x in kept if x[1]["submitted"] is not None),
                     key=lambda x: (x[1]["submitted"], x[0]), reverse=desc)
    nulls = sorted((x for x in kept if x[1]["submitted"] is None), key=lambda x: x[0],
                   reverse=desc)
    return _ids([r for _, r in (nonnull + nulls if desc else nulls + nonnull)])


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("bounds") / "h.db"
    rows = _rows(3000)
    with TaskStore(f"sqlite:///{path}") as s:
        for i in range(0, len(rows), 500):
            s.write(rows[i:i + 500], [])
    return path, rows


def test_time_bounds_cover_every_gap_in_powers_of_two(bounded: Any) -> None:
    path, rows = bounded
    with sqlite3.connect(path) as conn:
        stored = json.loads(conn.execute(
            "SELECT value FROM meta WHERE key = 'time_bounds'").fetchone()[0])
    for name in ("started", "completed"):
        lead = max(r["submitted"] - r[name] for r in rows if r["submitted"] is not None)
        lag = max(r[name] - r["submitted"] for r in rows if r["submitted"] is not None)
        assert lead <= stored[name][0] < 2 * max(lead, 1.0)
        assert lag <= stored[name][1] < 2 * max(lag, 1.0)


@pytest.mark.parametrize("kwargs", [
    {"started_since": 1500.0, "started_until": 1800.0},
    {"completed_since": 1500.0, "completed_until": 1510.0},
    {"started_since": 1500.0},
    {"completed_until": 1200.0},
    {"started_since": 1500.0, "started_until": 1800.0, "status": "error"},
    {"started_since": 1500.0, "completed_until": 1700.0, "engine": 2},
])
@pytest.mark.parametrize("order", ["-submitted", "submitted"])
def test_started_and_completed_ranges_page_exactly_in_submitted_order(
        bounded: Any, kwargs: dict[str, Any], order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import monq.hub.store as store_module

    monkeypatch.setattr(store_module, "_PROBE", 5)  # every range counts as "many matches"
    path, rows = bounded
    names = {"started_since": ("started", ">="), "started_until": ("started", "<"),
             "completed_since": ("completed", ">="), "completed_until": ("completed", "<")}

    def keep(r: dict[str, Any]) -> bool:
        for k, v in kwargs.items():
            if k in names:
                col, op = names[k]
                if not (r[col] >= v if op == ">=" else r[col] < v):
                    return False
            elif r[k] != v:
                return False
        return True

    want = _expected(rows, keep, desc=order.startswith("-"))
    if len(kwargs) == 1:  # the NULL submitted times are read too
        assert any(rows[int(m[1:])]["submitted"] is None for m in want)
    with TaskStore(f"sqlite:///{path}") as s:
        plan = s._plan(s_filter(kwargs), order)
        assert plan.bound is not None, plan
        got: list[str] = []
        cursor = None
        while True:
            page, cursor = s.history_page(limit=37, order=order, cursor=cursor, **kwargs)
            got += _ids(page)
            if cursor is None:
                break
        assert got == want
        if order == "-submitted" and set(kwargs) <= set(names):
            steps = s.explain(s.history_statement(limit=100, order=order, **kwargs))
            assert steps == ["SEARCH tasks USING INDEX ix_tasks_submitted "
                             "(submitted>? AND submitted<?)"] or \
                steps == ["SEARCH tasks USING INDEX ix_tasks_submitted (submitted>?)"] or \
                steps == ["SEARCH tasks USING INDEX ix_tasks_submitted (submitted<?)"], steps


def s_filter(kwargs: dict[str, Any]) -> Any:
    from monq.hub.filters import TaskFilter

    return TaskFilter.from_dict(kwargs)


def test_db_query_by_engine_and_completed_window_seeks(bounded: Any) -> None:
    path, rows = bounded
    query = {"engine": 1, "completed": {"$gte": 1500.0, "$lt": 1600.0}}
    want = _expected(rows, lambda r: r["engine"] == 1 and 1500.0 <= r["completed"] < 1600.0,
                     desc=False)
    with TaskStore(f"sqlite:///{path}") as s:
        got = s.db_query(query, keys=["msg_id", "completed"])
        # ties: db_query breaks them by msg_id, and these msg_ids grow with the rowid
        assert _ids(got) == want


def test_a_gap_larger_than_the_bounds_raises_them(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with TaskStore(f"sqlite:///{path}") as s:
        s.write([{"msg_id": "a", "status": "ok", "submitted": 10.0, "started": 10.5,
                  "completed": 11.0}], [])
        s.write([{"msg_id": "b", "status": "pending", "submitted": 20.0}], [])
        s.write([], [{"msg_id": "b", "status": "ok", "started": 5000.0, "completed": 5001.0}])
        got = s.history(started_since=4999.0, started_until=5002.0)
        assert _ids(got) == ["b"]
        with sqlite3.connect(path) as conn:
            stored = json.loads(conn.execute(
                "SELECT value FROM meta WHERE key = 'time_bounds'").fetchone()[0])
        assert stored["started"][1] == 8192.0 and stored["completed"][1] == 8192.0
    with TaskStore(f"sqlite:///{path}") as s:  # another store (process) reads them too
        assert _ids(s.history(started_since=4999.0, started_until=5002.0)) == ["b"]


# -- plans ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5,000 tasks: 10 % errors over 8 engines and 8 labels."""
    path = tmp_path_factory.mktemp("many") / "h.db"
    rnd = random.Random(5)
    rows = []
    for i in range(5000):
        sub = 1e6 + i
        rows.append({"msg_id": f"x{i:05d}", "status": "error" if rnd.random() < 0.1 else "ok",
                     "engine": rnd.randrange(8), "label": rnd.choice("abcdefgh") + "x",
                     "client": "c", "submitted": sub, "started": sub + 0.01,
                     "completed": sub + 0.01 + rnd.lognormvariate(-1.6, 1.2)})
    with TaskStore(f"sqlite:///{path}") as s:
        s.write(rows, [])
    return path


def test_rare_status_with_engine_and_label_walks_the_partial_index(many: Path) -> None:
    with TaskStore(f"sqlite:///{many}") as s:
        kw: dict[str, Any] = {"status": "error", "engine": 3, "label": "bx"}
        plan = s.explain(s.history_statement(limit=100, **kw))
        assert plan[0] == "SEARCH tasks USING INDEX ix_tasks_unusual (status=?)", plan
        got = s.history(limit=100, **kw)
        assert len(got) >= 3 and all((r["status"], r["engine"], r["label"]) == ("error", 3, "bx")
                           for r in got)
        subs = [r["submitted"] for r in got]
        assert subs == sorted(subs, reverse=True)
        cursor = s.history_page(limit=2, **kw)[1]
        assert s.explain(s.history_statement(limit=2, cursor=cursor, **kw))[0] == \
            "SEARCH tasks USING INDEX ix_tasks_unusual (status=? AND submitted<?)"
        # a common status: the planner's choice, as before
        plan = s.explain(s.history_statement(limit=100, status="ok", engine=3, label="bx"))
        assert not any("ix_tasks_unusual" in step for step in plan), plan


def test_a_selective_range_sorts_keys_then_reads_the_page(many: Path) -> None:
    with TaskStore(f"sqlite:///{many}") as s:
        plan = s.explain(s.history_statement(limit=100, min_duration=2.0))
        assert not any(step.startswith("SCAN tasks") for step in plan), plan
        assert any("ix_tasks_duration (duration>?)" in step for step in plan), plan
        got = s.history(limit=100, min_duration=2.0)
        want = s.history(limit=None, min_duration=2.0)[:100]
        assert _ids(got) == _ids(want) and got
        assert all(r["duration"] >= 2.0 for r in got)


# -- upgrade from version 3 ---------------------------------------------------------------


def test_a_version_3_history_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    with TaskStore(f"sqlite:///{path}") as s:
        s.write([{"msg_id": f"o{i}", "status": "ok", "submitted": 100.0 + i,
                  "started": 101.0 + i + (50.0 if i == 3 else 0.0), "completed": 102.0 + i,
                  "stdout": f"old output {i}"} for i in range(10)], [])
    with sqlite3.connect(path) as conn:  # what the version-3 code left: payloads inline
        conn.executescript("""
            DROP INDEX ix_tasks_unusual; DROP INDEX ix_tasks_payload_completed;
            DROP TABLE payloads;
            ALTER TABLE tasks DROP COLUMN request_key; ALTER TABLE tasks DROP COLUMN result_key;
            CREATE INDEX ix_tasks_payload_completed ON tasks (completed)
              WHERE request IS NOT NULL OR result IS NOT NULL;
            DELETE FROM meta WHERE key = 'time_bounds';
            UPDATE meta SET value = '3' WHERE key = 'schema_version';
            UPDATE tasks SET request = x'0102', request_bytes = 2, result = x'03',
              result_bytes = 1, stored_bytes = stored_bytes + 3;
        """)
    with TaskStore(f"sqlite:///{path}") as s:
        old = s.get_task("o3", with_payload=True)
        assert old is not None and (old["request"], old["result"]) == (b"\x01\x02", b"\x03")
        assert _ids(s.history(search="output", limit=3)) == ["o9", "o8", "o7"]
        assert _ids(s.history(started_since=150.0, started_until=160.0)) == ["o3"]
        s.write([{"msg_id": "n", "status": "ok", "submitted": 200.0, "request": b"\x01\x02"}],
                [])
        assert s.get_task("n", with_payload=True)["request"] == b"\x01\x02"  # type: ignore
        assert s.stored_total() == 10 * 3 + sum(len(f"old output {i}") for i in range(10)) + 2
        assert s.purge(everything=True, payloads_only=True) == 11
        assert s.stored_total() == sum(len(f"old output {i}") for i in range(10))
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                            ).fetchone() == ("5",)
        bounds = json.loads(conn.execute(
            "SELECT value FROM meta WHERE key = 'time_bounds'").fetchone()[0])
        assert bounds["started"] == [1.0, 64.0]
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"ix_tasks_unusual", "ix_tasks_payload_completed"} <= names
        assert conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 0


# -- common searches walk the full-text matches by rowid -----------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"status": "error"}, {"engine": 1, "until": 2500.0}])
def test_a_common_search_pages_exactly_when_rows_come_out_of_order(
        tmp_path: Path, kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import monq.hub.store as store_module

    monkeypatch.setattr(store_module, "_PROBE", 5)  # every search counts as common
    rnd = random.Random(11)
    rows = []
    for i in range(1200):
        # written in batches whose submission times overlap: rowid order is submitted
        # order up to ~40 s, and a few rows have no submitted time at all
        sub = 1000.0 + i + rnd.uniform(-40.0, 40.0)
        rows.append({"msg_id": f"s{i:05d}", "status": "error" if i % 4 == 0 else "ok",
                     "engine": i % 3, "submitted": None if i % 101 == 7 else sub,
                     "stdout": "alpha beta" if i % 3 else "gamma"})
    path = tmp_path / "h.db"
    with TaskStore(f"sqlite:///{path}") as s:
        for i in range(0, len(rows), 200):
            s.write(rows[i:i + 200], [])
        slack = json.loads(_count(path, "SELECT value FROM meta WHERE key = 'time_bounds'"))
        assert 64.0 <= slack["rowid"][0] <= 128.0
        assert s._plan(s_filter({"search": "alpha", **kwargs}), "-submitted").search_slack
        got: list[str] = []
        cursor = None
        while True:
            page, cursor = s.history_page(limit=23, cursor=cursor, search="alpha beta",
                                          **kwargs)
            got += _ids(page)
            if cursor is None:
                break

        def keep(r: dict[str, Any]) -> bool:
            return "alpha" in r["stdout"] and all(
                (r["submitted"] is not None and r["submitted"] < v) if k == "until"
                else r[k] == v for k, v in kwargs.items())

        assert got == _expected(rows, keep)


# -- upgrade from version 4 ---------------------------------------------------------------


def test_a_version_4_history_gets_the_histograms_min_and_max(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    rows = [{"msg_id": f"d{i}", "status": "error" if i % 7 == 0 else "ok",
             "engine": i % 3, "label": ["a", None][i % 2], "submitted": 100.0 + i,
             "started": 101.0 + i, "completed": 101.0 + i + (i % 13) * 0.37 + 0.001 * i}
            for i in range(200)]
    with TaskStore(f"sqlite:///{path}") as s:
        s.write(rows, [])
        want = {by: s.duration_percentiles(by, [0, 50, 100], exact=True)
                for by in (None, "engine", "label")}
    with sqlite3.connect(path) as conn:  # what the version-4 code left: no lo, hi
        conn.executescript("""
            DROP INDEX ix_duration_hist_engine; DROP INDEX ix_duration_hist_label;
            DROP INDEX ix_duration_hist_bucket;
            ALTER TABLE duration_hist DROP COLUMN lo; ALTER TABLE duration_hist DROP COLUMN hi;
            CREATE INDEX ix_duration_hist_engine ON duration_hist (engine, bucket, status,
              label, n);
            UPDATE meta SET value = '4' WHERE key = 'schema_version';
        """)
    with TaskStore(f"sqlite:///{path}") as s:
        with s.engine.connect() as conn:
            got = conn.exec_driver_sql("SELECT count(*), count(lo), count(hi) FROM "
                                       "duration_hist WHERE n > 0").one()
        assert got[0] > 10 and got[0] == got[1] == got[2]
        for by, groups in want.items():
            mine = {g["key"]: g for g in s.duration_percentiles(by, [0, 50, 100])}
            for g in groups:
                assert (mine[g["key"]]["min"], mine[g["key"]]["max"]) == (g["min"], g["max"])
        assert s.total_tasks() == 200
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                            ).fetchone() == ("5",)
        cols = {r[0] for r in conn.execute(
            "SELECT name FROM pragma_index_info('ix_duration_hist_engine')")}
        assert {"lo", "hi", "n"} <= cols
