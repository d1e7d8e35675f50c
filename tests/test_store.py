"""The task store and its query translation, on real SQLite files (and in memory)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.dialects import postgresql

from monq.errors import HubError
from monq.hub import query as q
from monq.hub.store import TaskStore, tasks

# Inserted out of submitted order on purpose: sorting must happen in the DB.
ROWS: list[dict[str, Any]] = [
    {"msg_id": "d", "status": "running", "engine": 0, "client": "c2", "submitted": 400.0,
     "started": 401.0, "func": "mod.square_100%", "label": "p_q", "queue": "direct"},
    {"msg_id": "a", "status": "ok", "engine": 0, "client": "c1", "submitted": 100.0,
     "started": 101.0, "completed": 105.0, "func": "mod.square", "label": "x", "queue": "task",
     "request": b"req-a", "result": b"res-a"},
    {"msg_id": "e", "status": "timeout", "engine": 1, "client": "c1", "submitted": 250.0,
     "started": 251.0, "completed": 260.0, "func": "other", "queue": "task"},
    {"msg_id": "b", "status": "error", "engine": 1, "client": "c1", "submitted": 300.0,
     "started": 302.0, "completed": 310.0, "func": "mod.cube", "queue": "task",
     "ename": "ValueError", "evalue": "bad", "traceback": "Traceback..."},
    {"msg_id": "c", "status": "pending", "client": "c2", "submitted": 200.0, "label": "y",
     "queue": "task"},
]


@pytest.fixture
def store(tmp_path: Path):
    s = TaskStore(f"sqlite:///{tmp_path / 'sub' / 'history.db'}")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def filled(store: TaskStore) -> TaskStore:
    store.write([dict(r) for r in ROWS], [])
    return store


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["msg_id"] for r in rows]


# -- the database file ------------------------------------------------------------


def test_file_is_private_and_wal(store: TaskStore, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "history.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
        # a page cache of 32 MiB, not SQLite's 2 MiB: a long history's indexes outgrow it
        assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -32768


def test_existing_file_is_made_private_and_reopened(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with TaskStore(f"sqlite:///{path}") as s:
        s.write([{"msg_id": "x", "status": "ok"}], [])
    os.chmod(path, 0o644)
    with TaskStore(f"sqlite:///{path}") as s:
        assert ids(s.history()) == ["x"]  # history survives a restart
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    with TaskStore(url) as s, s.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(HubError, match="schema version 99"):
        TaskStore(url)


def test_close_twice() -> None:
    s = TaskStore("sqlite://")
    s.close()
    s.close()


def test_memory_store_is_shared_across_threads() -> None:
    # The Hub may create the store in one thread and use it in another.
    with TaskStore("sqlite://") as s:
        t = threading.Thread(target=s.write, args=([{"msg_id": "t", "status": "ok"}], []))
        t.start()
        t.join(10)
        assert ids(s.history()) == ["t"]


# -- writes -------------------------------------------------------------------------


def test_batch_write_is_one_transaction_of_few_statements(store: TaskStore) -> None:
    calls: list[tuple[str, bool]] = []
    begins: list[int] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        calls.append((statement.split()[0].upper(), executemany))

    event.listen(store.engine, "before_cursor_execute", count)
    event.listen(store.engine, "begin", lambda conn: begins.append(1))
    try:
        inserts = [{"msg_id": f"m{i}", "status": "pending", "submitted": float(i),
                    "client": "c"} for i in range(1000)]
        updates = [{"msg_id": f"m{i}", "status": "ok", "completed": i + 0.5}
                   for i in range(1000)]
        store.write(inserts, updates)
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    # one INSERT executemany, one UPDATE executemany, then at most one upsert per
    # maintained aggregate table (the updated rows were inserted in this batch:
    # their old state needs no SELECT)
    assert len(calls) <= 5, calls
    assert calls[:2] == [("INSERT", True), ("UPDATE", True)]
    assert all(c[0] == "INSERT" for c in calls[2:]), calls
    assert len(begins) == 1
    assert store.counts()["status"] == {"ok": 1000}
    assert store.get_task("m7")["completed"] == 7.5  # type: ignore[index]


def test_updates_with_different_key_sets(filled: TaskStore) -> None:
    filled.write([], [
        {"msg_id": "c", "status": "running", "engine": 2, "started": 201.0},
        {"msg_id": "d", "status": "ok", "completed": 405.0, "stdout": "hi"},
        {"msg_id": "c", "status": "ok", "completed": 209.0},  # later update wins
    ])
    c = filled.get_task("c")
    d = filled.get_task("d")
    assert c is not None and d is not None
    assert (c["status"], c["engine"], c["started"], c["completed"]) == ("ok", 2, 201.0, 209.0)
    assert (d["status"], d["completed"], d["stdout"], d["engine"]) == ("ok", 405.0, "hi", 0)


def test_inserts_with_different_key_sets_and_defaults(store: TaskStore) -> None:
    store.write([{"msg_id": "x", "status": "pending"},
                 {"msg_id": "y", "status": "ok", "engine": 3, "retries": 2}], [])
    x, y = store.get_task("x"), store.get_task("y")
    assert x is not None and y is not None
    assert x["retries"] == 0 and x["engine"] is None
    assert y["retries"] == 2 and y["engine"] == 3


def test_duplicate_insert_does_not_lose_the_batch(filled: TaskStore) -> None:
    filled.write([{"msg_id": "new", "status": "pending", "submitted": 500.0},
                  {"msg_id": "a", "status": "resubmitted"}], [])
    assert filled.get_task("new") is not None
    assert filled.get_task("a")["status"] == "resubmitted"  # type: ignore[index]


def test_bad_rows_are_refused(store: TaskStore) -> None:
    with pytest.raises(HubError, match="unknown columns nope"):
        store.write([{"msg_id": "x", "status": "ok", "nope": 1}], [])
    with pytest.raises(HubError, match="msg_id"):
        store.write([{"status": "ok"}], [])
    with pytest.raises(HubError, match="needs a status"):
        store.write([{"msg_id": "x"}], [])
    with pytest.raises(HubError, match="unknown status 'done'"):
        store.write([], [{"msg_id": "x", "status": "done"}])
    with pytest.raises(HubError, match="unknown status None"):
        store.write([{"msg_id": "x", "status": None}], [])
    store.write([], [])  # nothing to do is fine
    assert store.hub_history() == []


def test_payload_cap(tmp_path: Path) -> None:
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}", payload_cap=10) as s:
        big = b"x" * 11
        row = {"msg_id": "p", "status": "pending", "request": b"small", "result": big}
        s.write([row], [])
        assert row["result"] is big  # the caller's row is not touched
        got = s.get_task("p", with_payload=True)
        assert got is not None
        assert (got["request"], got["request_bytes"]) == (b"small", 5)
        assert (got["result"], got["result_bytes"]) == (None, 11)
        # updates too, and buffers that are not bytes
        s.write([], [{"msg_id": "p", "status": "ok", "result": memoryview(b"0123456789")}])
        got = s.get_task("p", with_payload=True)
        assert got is not None and (got["result"], got["result_bytes"]) == (b"0123456789", 10)
        s.write([], [{"msg_id": "p", "request": b"y" * 100}])
        got = s.get_task("p", with_payload=True)
        assert got is not None and (got["request"], got["request_bytes"]) == (None, 100)
        # a size the caller already knows (e.g. of all frames) is kept
        s.write([{"msg_id": "q", "status": "ok", "request": b"abc", "request_bytes": 42}], [])
        assert s.get_task("q")["request_bytes"] == 42  # type: ignore[index]


# -- engines ------------------------------------------------------------------------


def test_engines(store: TaskStore) -> None:
    assert store.max_engine_id() == -1
    assert store.engines() == []
    store.upsert_engine({"id": 1, "uuid": "u1", "hostname": "h", "pid": 11,
                         "registered": 1.0, "status": "alive"})
    store.upsert_engine({"id": 0, "uuid": "u0", "hostname": "h", "pid": 10,
                         "registered": 1.0, "status": "alive"})
    store.upsert_engine({"id": 1, "status": "dead", "unregistered": 5.0})
    engines = store.engines()
    assert [e["id"] for e in engines] == [0, 1]
    assert engines[1]["status"] == "dead" and engines[1]["uuid"] == "u1"
    assert engines[1]["unregistered"] == 5.0
    assert store.max_engine_id() == 1
    with pytest.raises(HubError):
        store.upsert_engine({"uuid": "x"})


# -- history ----------------------------------------------------------------------


def test_history_default_order_and_no_blobs(filled: TaskStore) -> None:
    rows = filled.history()
    assert ids(rows) == ["d", "b", "e", "c", "a"]
    a = rows[-1]
    assert "request" not in a and "result" not in a
    assert a["request_bytes"] == 5 and a["result_bytes"] == 5


@pytest.mark.parametrize("kwargs, expected", [
    ({"status": "ok"}, ["a"]),
    ({"status": ["ok", "error"]}, ["b", "a"]),
    ({"status": []}, []),
    ({"engine": 0}, ["d", "a"]),
    ({"engine": [1, 7]}, ["b", "e"]),
    ({"client": "c2"}, ["d", "c"]),
    ({"since": 200.0}, ["d", "b", "e", "c"]),  # inclusive
    ({"until": 300.0}, ["e", "c", "a"]),  # exclusive
    ({"since": 200, "until": 300}, ["e", "c"]),
    ({"client": "c1", "engine": 1, "status": "error"}, ["b"]),
])
def test_history_filters(filled: TaskStore, kwargs: dict[str, Any], expected: list[str]) -> None:
    assert ids(filled.history(**kwargs)) == expected


@pytest.mark.parametrize("order, expected", [
    ("submitted", ["a", "c", "e", "b", "d"]),
    ("-submitted", ["d", "b", "e", "c", "a"]),
    ("msg_id", ["a", "b", "c", "d", "e"]),
    ("-msg_id", ["e", "d", "c", "b", "a"]),
    ("started", ["c", "a", "e", "b", "d"]),  # SQLite puts NULL first ascending
    ("-completed", ["b", "e", "a", "d", "c"]),
])
def test_history_order(filled: TaskStore, order: str, expected: list[str]) -> None:
    got = ids(filled.history(order=order))
    if order in ("-completed",):  # rows with NULL completed tie: compare as a set
        assert got[:3] == expected[:3] and set(got[3:]) == set(expected[3:])
    else:
        assert got == expected


def test_history_limit_after_sort(filled: TaskStore) -> None:
    assert ids(filled.history(limit=2)) == ["d", "b"]
    assert ids(filled.history(limit=2, order="submitted")) == ["a", "c"]
    assert ids(filled.history(status=["ok", "timeout", "error"], limit=1,
                              order="completed")) == ["a"]
    assert filled.history(limit=0) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"order": "func"}, "cannot order by 'func'"),
    ({"order": "--submitted"}, "cannot order by"),
    ({"order": 3}, "order must be a string"),
    ({"limit": -1}, "limit must be a non-negative integer"),
    ({"limit": "10"}, "limit"),
    ({"limit": True}, "limit"),
    ({"status": 3}, "status must be a string"),
    ({"status": ["ok", 3]}, "every status must be a string"),
    ({"engine": "0"}, "engine must be an integer"),
    ({"engine": True}, "engine must be an integer"),
    ({"client": 5}, "client must be a string"),
    ({"since": "10 minutes ago"}, "since must be epoch seconds"),
    ({"until": None, "since": [1]}, "since must be epoch seconds"),
])
def test_history_bad_arguments(filled: TaskStore, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(HubError, match=match):
        filled.history(**kwargs)


@pytest.mark.slow
def test_history_uses_an_index_at_100k_rows(store: TaskStore) -> None:
    statuses = ("ok", "ok", "ok", "error", "pending")
    n = 100_000
    for start in range(0, n, 10_000):
        store.write([{"msg_id": f"m{i:06d}", "status": statuses[i % 5], "engine": i % 4,
                      "client": "c", "submitted": float((i * 7919) % n)}
                     for i in range(start, start + 10_000)], [])
    rows = store.history(status="error", limit=100)
    assert len(rows) == 100
    subs = [r["submitted"] for r in rows]
    assert subs == sorted(subs, reverse=True) and all(r["status"] == "error" for r in rows)

    stmt = (select(tasks.c.msg_id)
            .where(q.history_clause(tasks, status="error"))
            .order_by(*q.order_clause(tasks, "-submitted")).limit(100))
    sql = str(stmt.compile(store.engine, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
    assert "USING INDEX" in plan and "status" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # the index also gives the order
    # no bound on the write time: on a shared machine it measures the neighbours;
    # bench/history_queries.py reports the write rate


# -- db_query ---------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    ({}, ["a", "c", "e", "b", "d"]),
    ({"engine": 0}, ["a", "d"]),
    ({"engine": {"$eq": 1}}, ["e", "b"]),
    ({"engine": None}, ["c"]),
    ({"engine": {"$eq": None}}, ["c"]),
    ({"engine": {"$ne": None}}, ["a", "e", "b", "d"]),
    ({"engine": {"$ne": 0}}, ["c", "e", "b"]),  # NULL is "not 0"
    ({"label": None}, ["e", "b"]),
    ({"submitted": {"$lt": 250}}, ["a", "c"]),
    ({"submitted": {"$lte": 250}}, ["a", "c", "e"]),
    ({"submitted": {"$gt": 250}}, ["b", "d"]),
    ({"submitted": {"$gte": 250}}, ["e", "b", "d"]),
    ({"submitted": {"$gt": 100, "$lt": 300}}, ["c", "e"]),
    ({"completed": {"$gt": 0}}, ["a", "e", "b"]),  # NULLs never compare
    ({"status": {"$in": ["ok", "error"]}}, ["a", "b"]),
    ({"status": {"$in": []}}, []),
    ({"engine": {"$in": [1, None]}}, ["c", "e", "b"]),
    ({"engine": {"$in": [None]}}, ["c"]),
    ({"status": {"$nin": ["ok", "error"]}}, ["c", "e", "d"]),
    ({"label": {"$nin": ["x"]}}, ["c", "e", "b", "d"]),  # NULL is not in ["x"]
    ({"label": {"$nin": ["x", None]}}, ["c", "d"]),
    ({"engine": {"$nin": []}}, ["a", "c", "e", "b", "d"]),
    ({"func": {"$glob": "*square*"}}, ["a", "d"]),
    ({"func": {"$glob": "mod.?ube"}}, ["b"]),
    ({"func": {"$glob": "mod.[cs]*"}}, ["a", "b", "d"]),
    ({"func": {"$glob": "*%"}}, ["d"]),  # % is literal in a glob
    ({"func": {"$glob": "MOD.*"}}, []),  # and globs are case-sensitive
    ({"client": "c1", "status": {"$ne": "ok"}, "completed": {"$gte": 260}}, ["e", "b"]),
])
def test_db_query_operators(filled: TaskStore, query: dict[str, Any],
                            expected: list[str]) -> None:
    assert ids(filled.db_query(query)) == expected


@pytest.mark.parametrize("glob, expected", [
    ("*square*", ["a", "d"]),
    ("mod.?ube", ["b"]),
    ("*100%", ["d"]),
    ("mod_square", []),  # _ is literal, not "any character"
    ("*_100*", ["d"]),
])
def test_glob_as_like_elsewhere(filled: TaskStore, glob: str, expected: list[str]) -> None:
    # What other databases get: the escaped LIKE, run here on SQLite to check it.
    where = q.db_query_clause(tasks, {"func": {"$glob": glob}}, dialect="postgresql")
    stmt = select(tasks.c.msg_id).where(where).order_by(tasks.c.submitted)
    with filled.engine.connect() as conn:
        assert list(conn.execute(stmt).scalars()) == expected


def test_glob_to_like() -> None:
    assert q.glob_to_like("a*b?c%d_e\\f") == "a%b_c\\%d\\_e\\\\f"
    with pytest.raises(HubError, match="character classes"):
        q.glob_to_like("[ab]*")
    sql = str(q.db_query_clause(tasks, {"func": {"$glob": "x*"}}, "postgresql")
              .compile(dialect=postgresql.dialect()))
    assert "LIKE" in sql and "ESCAPE" in sql and "x%" not in sql  # value is a bound param


def test_db_query_values_are_bound_not_spliced(filled: TaskStore) -> None:
    evil = "x' OR '1'='1"
    assert filled.db_query({"label": evil}) == []
    assert filled.db_query({"func": {"$glob": evil}}) == []
    sql = str(q.db_query_clause(tasks, {"label": evil}).compile(filled.engine))
    assert evil not in sql
    assert len(filled.hub_history()) == 5


def test_db_query_keys(filled: TaskStore) -> None:
    rows = filled.db_query({"status": "ok"}, keys=["status", "engine"])
    assert rows == [{"msg_id": "a", "status": "ok", "engine": 0}]
    full = filled.db_query({"status": "ok"})[0]
    assert "request" not in full and "result" not in full and full["request_bytes"] == 5
    assert full["func"] == "mod.square"


@pytest.mark.parametrize("query, keys, match", [
    ({"nope": 1}, None, "unknown column 'nope'"),
    ({"engine": {"$regex": "x"}}, None, r"unknown operator '\$regex'"),
    ({"engine": {}}, None, "empty operator dict"),
    ({"status": {"$in": "ok"}}, None, "takes a list"),
    ({"engine": {"$lt": None}}, None, "cannot compare with None"),
    ({"engine": {"$gt": "3"}}, None, "needs a number"),
    ({"engine": True}, None, "needs a number"),
    ({"status": 3}, None, "needs a string"),
    ({"status": ["ok"]}, None, "needs a string"),
    ({"engine": {"$glob": "1*"}}, None, "needs a text column"),
    ({"func": {"$glob": 3}}, None, "string pattern"),
    ({"result": None}, None, "payload column"),
    ([("engine", 0)], None, "must be a dict"),
    ({}, ["result"], "get_result"),
    ({}, ["request"], "get_result"),
    ({}, ["nope"], "unknown column 'nope'"),
    ({}, "status", "keys must be a list"),
])
def test_db_query_bad_arguments(filled: TaskStore, query: Any, keys: Any, match: str) -> None:
    with pytest.raises(HubError, match=match):
        filled.db_query(query, keys=keys)


# -- other reads ----------------------------------------------------------------------


def test_hub_history_and_get_task(filled: TaskStore) -> None:
    assert filled.hub_history() == ["a", "c", "e", "b", "d"]
    a = filled.get_task("a")
    assert a is not None and "result" not in a and a["func"] == "mod.square"
    full = filled.get_task("a", with_payload=True)
    assert full is not None and full["request"] == b"req-a" and full["result"] == b"res-a"
    assert filled.get_task("zzz") is None


def test_counts(filled: TaskStore) -> None:
    assert filled.counts() == {
        "status": {"running": 1, "ok": 1, "timeout": 1, "error": 1, "pending": 1},
        "engine": {0: {"running": 1, "ok": 1}, 1: {"timeout": 1, "error": 1}},
    }


def test_counts_empty(store: TaskStore) -> None:
    assert store.counts() == {"status": {}, "engine": {}}


def _counted_in_sql(store: TaskStore) -> dict[str, Any]:
    with store.engine.connect() as c:
        status = dict(c.exec_driver_sql("SELECT status, count(*) FROM tasks GROUP BY 1").all())
        engine: dict[int, dict[str, int]] = {}
        for e, st, n in c.exec_driver_sql("SELECT engine, status, count(*) FROM tasks "
                                          "WHERE engine IS NOT NULL GROUP BY 1, 2"):
            engine.setdefault(e, {})[st] = n
    return {"status": status, "engine": engine}


def test_counts_come_from_the_aggregates_and_agree_with_the_tasks(filled: TaskStore) -> None:
    """cluster_status is polled: its counts are read from task_counts (a few rows), not
    counted over the tasks table, and stay equal to that count as tasks move on, change
    engine and are purged."""
    assert filled.aggregates
    filled.write([{"msg_id": f"n{i}", "status": "pending", "submitted": 1.0 + i,
                   "engine": None if i % 2 else 3} for i in range(40)], [])
    filled.write([], [{"msg_id": f"n{i}", "status": "ok" if i % 3 else "error",
                       "engine": 2, "started": 2.0, "completed": 3.0} for i in range(0, 40, 2)])
    filled.purge(status="error", engine=2)
    assert filled.counts() == _counted_in_sql(filled)
    statements: list[str] = []

    @event.listens_for(filled.engine, "before_cursor_execute")
    def seen(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        statements.append(statement)

    filled.counts()
    assert len(statements) == 1 and "task_counts" in statements[0], statements


# -- purge --------------------------------------------------------------------------


def test_purge_refuses_without_a_filter(filled: TaskStore) -> None:
    with pytest.raises(HubError, match="say what to purge"):
        filled.purge()
    with pytest.raises(HubError, match="cannot be purged"):
        filled.purge(status="pending")
    with pytest.raises(HubError, match="purge: engine must be an integer"):
        filled.purge(engine="0")
    assert len(filled.hub_history()) == 5


def test_purge_everything_keeps_unfinished(filled: TaskStore) -> None:
    assert filled.purge(everything=True) == 3
    assert sorted(filled.hub_history()) == ["c", "d"]


@pytest.mark.parametrize("kwargs, gone", [
    ({"msg_ids": ["a", "c", "d", "zzz"]}, ["a"]),  # c, d unfinished: kept
    ({"msg_ids": "b"}, ["b"]),
    ({"msg_ids": []}, []),
    ({"engine": 1}, ["b", "e"]),
    ({"engine": 0}, ["a"]),
    ({"status": "timeout"}, ["e"]),
    ({"status": ["ok", "error"]}, ["a", "b"]),
    ({"before": 260.0}, ["a"]),  # completed < before
    ({"before": 260.5}, ["a", "e"]),
    ({"engine": 1, "status": "error"}, ["b"]),  # all filters must match
    ({"engine": 1, "before": 300.0}, ["e"]),
    ({"msg_ids": ["a", "b"], "engine": 1}, ["b"]),
])
def test_purge_filters(filled: TaskStore, kwargs: dict[str, Any], gone: list[str]) -> None:
    assert filled.purge(**kwargs) == len(gone)
    left = set(filled.hub_history())
    assert left == {"a", "b", "c", "d", "e"} - set(gone)


def test_purge_many_msg_ids(store: TaskStore) -> None:
    # more ids than old SQLite builds allow bound variables in one statement
    store.write([{"msg_id": f"m{i}", "status": "ok"} for i in range(2500)], [])
    assert store.purge(msg_ids=[f"m{i}" for i in range(2000)]) == 2000
    assert len(store.hub_history()) == 500


# -- the full-text index kept in step by writes that skip rows without text ---------


def test_full_text_index_follows_updates_that_set_clear_or_keep_text(store: TaskStore) -> None:
    """The store forgets and indexes only rows that had or get text (most finished tasks
    come with empty stdout and stderr): what searches find is the rows' text."""
    store.write([
        {"msg_id": "had", "status": "running", "submitted": 1.0, "stdout": "alpha"},
        {"msg_id": "none", "status": "running", "submitted": 2.0},
        {"msg_id": "kept", "status": "error", "submitted": 3.0, "traceback": "boom"},
        {"msg_id": "new", "status": "running", "submitted": 4.0, "stdout": ""},
    ], [])
    store.write([{"msg_id": "late", "status": "running", "submitted": 5.0}], [
        {"msg_id": "had", "status": "ok", "stdout": "", "stderr": ""},  # text cleared
        {"msg_id": "none", "status": "ok", "stdout": "", "stderr": "gamma"},  # text set
        {"msg_id": "kept", "stdout": ""},  # its traceback stays
        {"msg_id": "new", "stdout": "delta"},
        {"msg_id": "new", "stderr": "epsilon"},  # twice in one batch
        {"msg_id": "late", "stdout": "zeta"},  # inserted in the same batch
        {"msg_id": "unknown", "stdout": "eta"},  # no such task: nothing
    ])
    for word, want in (("alpha", []), ("gamma", ["none"]), ("boom", ["kept"]),
                       ("delta", ["new"]), ("epsilon", ["new"]), ("zeta", ["late"]),
                       ("eta", [])):
        assert ids(store.history(search=word)) == want, word
    # the index holds exactly the rows with text (an external-content FTS5 table is
    # checked against its content by 'integrity-check')
    with store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks_fts(tasks_fts) VALUES ('integrity-check')")


def test_float_columns_still_convert_other_types(store: TaskStore) -> None:
    """Type processors are skipped only for columns already holding floats (or bytes);
    a value of another type is converted as SQLAlchemy would (the driver itself
    would refuse a Decimal)."""
    from decimal import Decimal

    store.write([{"msg_id": "a", "status": "ok", "submitted": 1.5, "received": Decimal("4.5")},
                 {"msg_id": "b", "status": "ok", "submitted": 1.5, "received": 4.0}], [])
    store.write([], [{"msg_id": "a", "status": "ok", "received": Decimal("5.25")},
                     {"msg_id": "b", "status": "ok", "received": 6.0}])
    got = {m: store.get_task(m) for m in "ab"}
    assert [(t["received"], type(t["received"])) for t in got.values() if t] == [
        (5.25, float), (6.0, float)]


# -- msg_ids and the pages a write touches -------------------------------------------


def _frames_of_a_write(path: Path, new_id: Any) -> int:
    """WAL frames (pages) one 500-task write adds to a 20,000-task history whose ids
    come from ``new_id``."""
    import random
    import time

    rng = random.Random(7)

    def rows(n: int, t0: float) -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            t = t0 + i * 1e-3
            out.append({"msg_id": new_id(), "status": "ok", "client": "c", "queue": "task",
                        "engine": i % 2, "submitted": t, "started": t + 1e-4,
                        "completed": t + 1e-4 + rng.uniform(5e-5, 5e-4), "func": "noop",
                        "request": b"same", "result": b"N."})
        return out

    store = TaskStore(f"sqlite:///{path}")
    try:
        t0 = time.time()
        for k in range(10):
            store.write(rows(2000, t0 + k * 2), [])
        with store.engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            store.write(rows(500, t0 + 30), [])
            _, frames, _ = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(frames)
    finally:
        store.close()


def test_msg_ids_sort_by_creation_so_a_write_touches_few_pages(tmp_path: Path) -> None:
    """Session msg_ids start with the time: new rows go to the end of the history's
    msg_id index instead of a random page each (one page read and written more per
    task at every commit)."""
    import time

    from monq.protocol import Session

    s = Session(b"k" * 32)
    first = [s.new_msg_id() for _ in range(1000)]
    time.sleep(0.002)
    later = s.new_msg_id()
    assert all(len(m) == 32 and int(m, 16) >= 0 for m in first)
    assert len(set(first)) == 1000
    assert later > max(first)  # ids made in a later millisecond sort after
    ordered = _frames_of_a_write(tmp_path / "ordered.db", s.new_msg_id)
    random_ids = _frames_of_a_write(tmp_path / "random.db", lambda: os.urandom(16).hex())
    print(f"\nWAL frames of a 500-task write: {ordered} with session ids, "
          f"{random_ids} with random ones")
    assert ordered < 0.7 * random_ids, (ordered, random_ids)
