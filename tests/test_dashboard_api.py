"""The dashboard's HTTP API on a history database made here: token, filters, order, paging."""

from __future__ import annotations

import re
import sqlite3
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the dashboard extra (starlette) is not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")

with warnings.catch_warnings():
    # newer Starlette would rather have httpx2 behind its TestClient; httpx still works
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.testclient import TestClient

from monq.dashboard.app import STATIC, DashboardConfig, create_app  # noqa: E402
from monq.dashboard.auth import cookie_name, random_token, token_for_key  # noqa: E402
from monq.dashboard.data import HistoryReader  # noqa: E402
from monq.dashboard.filters import QueryError  # noqa: E402
from monq.hub.store import TaskStore  # noqa: E402

TOKEN = token_for_key(b"k" * 32)
T0 = 1_700_000_000.0
XSS = "<script>alert('owned')</script>"


def _rows() -> list[dict[str, Any]]:
    """60 tasks over 60 s: every 5th fails, every 7th still runs, 3 labels, 2 engines."""
    rows = []
    for i in range(60):
        sub = T0 + i
        row: dict[str, Any] = {
            "msg_id": f"{i:02d}" + "ab%_" + f"{i:026d}", "client": "alice" if i % 2 else "bob",
            "engine": i % 2, "queue": "task", "label": ("fit", "plot", "load")[i % 3],
            "func": f"job_{i}", "submitted": sub, "retries": 0,
        }
        if i % 7 == 6:
            row.update(status="running", started=sub + 0.5)
        elif i % 5 == 4:
            row.update(status="error", started=sub + 0.5, completed=sub + 0.5 + i / 10,
                       received=sub + 0.6 + i / 10, ename="ValueError", evalue=f"bad {i}",
                       traceback=f"Traceback (most recent call last):\nValueError: bad {i}",
                       stdout=f"{XSS} run {i}\n", stderr="warn\n")
        else:
            row.update(status="ok", started=sub + 0.5, completed=sub + 0.5 + i / 10,
                       received=sub + 0.6 + i / 10, stdout=f"Result Line {i}\n")
        rows.append(row)
    return rows


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'history.db'}"
    with TaskStore(url) as store:
        store.write(_rows(), [])
        for eid in (0, 1):
            store.upsert_engine({"id": eid, "uuid": f"u{eid}", "hostname": "node", "pid": 100 + eid,
                                 "registered": T0 - 1, "status": "alive" if eid else "dead",
                                 "unregistered": None if eid else T0 + 61})
    return url


@pytest.fixture
def reader(db: str) -> Iterator[HistoryReader]:
    r = HistoryReader(db)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def http(reader: HistoryReader) -> Iterator[TestClient]:
    app = create_app(DashboardConfig(token=TOKEN, mode="post-mortem", db="test.db"), reader)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


def _tasks(http: TestClient, **params: Any) -> dict[str, Any]:
    r = http.get("/api/tasks", params=params)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _index(msg_id: str) -> int:
    return int(msg_id[:2])


# -- the token ---------------------------------------------------------------------------


def test_token_derives_from_the_key() -> None:
    assert TOKEN == token_for_key(b"k" * 32)
    assert TOKEN != token_for_key(b"j" * 32)
    assert len(TOKEN) == 32 and int(TOKEN, 16) >= 0
    assert random_token() != random_token()


@pytest.mark.parametrize("path", ["/", "/api/overview", "/api/tasks", "/api/tasks/x",
                                  "/api/throughput", "/static/app.js", "/static/style.css"])
def test_every_page_and_call_needs_the_token(reader: HistoryReader, path: str) -> None:
    app = create_app(DashboardConfig(token=TOKEN), reader)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get(path).status_code == 401
        assert c.get(path, headers={"Authorization": "Bearer " + "0" * 32}).status_code == 403
        assert c.get(path, params={"token": TOKEN[:-1] + "x"}).status_code == 403
        c.cookies.set(cookie_name(TOKEN), "nope" * 8)
        assert c.get(path).status_code == 403
        c.cookies.clear()
        ok = c.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code in (200, 404), ok.text  # 404: the task "x" is unknown
        assert "default-src 'self'" in ok.headers["content-security-policy"]


def test_token_in_the_url_becomes_a_strict_httponly_cookie(reader: HistoryReader) -> None:
    app = create_app(DashboardConfig(token=TOKEN), reader)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.get("/", params={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == "/"  # the token leaves the address bar
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{cookie_name(TOKEN)}={TOKEN};")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        # the client keeps the cookie: the page, its assets and the API now open
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert c.get("/static/app.js").status_code == 200
        assert c.get("/api/overview").status_code == 200
        # the API takes ?token= as it is (scripts), without a redirect, and no filter
        c.cookies.clear()
        assert c.get("/api/overview", params={"token": TOKEN}).status_code == 200
        r = c.get("/api/tasks", params={"token": TOKEN, "status": "error", "limit": 2})
        assert r.status_code == 200 and len(r.json()["tasks"]) == 2


def test_only_get_is_served(http: TestClient, db: str) -> None:
    con = sqlite3.connect(db.removeprefix("sqlite:///"))
    try:
        before = con.execute("select count(*), total(completed) from tasks").fetchone()
    finally:
        con.close()
    for path in ("/", "/api/overview", "/api/tasks", "/api/tasks/x", "/api/throughput",
                 "/static/app.js"):
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            r = http.request(method, path)
            assert r.status_code == 405, (method, path, r.status_code)
    con = sqlite3.connect(db.removeprefix("sqlite:///"))
    try:
        assert con.execute("select count(*), total(completed) from tasks").fetchone() == before
    finally:
        con.close()


def test_the_database_opens_read_only(tmp_path: Path, reader: HistoryReader) -> None:
    with pytest.raises(Exception, match="readonly"):
        with reader._store.engine.begin() as conn:  # noqa: SLF001
            conn.exec_driver_sql("delete from tasks")
    missing = tmp_path / "nope.db"
    with pytest.raises(QueryError, match="no database file"):
        HistoryReader(f"sqlite:///{missing}")
    assert not missing.exists()  # a typo must not leave an empty history behind


def test_assets_are_local_and_never_inject_html() -> None:
    page = (STATIC / "index.html").read_text()
    script = (STATIC / "app.js").read_text()
    for text in (page, script, (STATIC / "style.css").read_text()):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "//cdn" not in text
    code = re.sub(r"//[^\n]*", "", script)  # the comments may name what the code avoids
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in code


# -- filters -----------------------------------------------------------------------------


def test_status_engine_client_and_label(http: TestClient) -> None:
    rows = _tasks(http, status="error", limit=500)["tasks"]
    assert rows and {r["status"] for r in rows} == {"error"}
    assert {_index(r["msg_id"]) for r in rows} == {i for i in range(60)
                                                   if i % 5 == 4 and i % 7 != 6}
    both = _tasks(http, status="error,running", limit=500)
    assert {r["status"] for r in both["tasks"]} == {"error", "running"}
    assert both["total"] == len(both["tasks"])
    assert {r["engine"] for r in _tasks(http, engine=1, limit=500)["tasks"]} == {1}
    assert {r["client"] for r in _tasks(http, client="alice", limit=500)["tasks"]} == {"alice"}
    fit = _tasks(http, label="fit", limit=500)
    assert fit["total"] == 20 and {r["label"] for r in fit["tasks"]} == {"fit"}
    assert _tasks(http, label="pl*")["total"] == 20  # a glob
    assert _tasks(http, label="pl")["total"] == 0  # exact otherwise


def test_msg_id_prefix_is_literal(http: TestClient) -> None:
    one = _tasks(http, msg_id="07ab%_")
    assert [_index(r["msg_id"]) for r in one["tasks"]] == [7]
    assert _tasks(http, msg_id="0")["total"] == 10
    # % and _ are text, not wildcards
    assert _tasks(http, msg_id="%")["total"] == 0
    assert _tasks(http, msg_id="0_")["total"] == 0


def test_time_and_duration_ranges(http: TestClient) -> None:
    r = _tasks(http, since=T0 + 10, until=T0 + 20, limit=500)
    assert sorted(_index(t["msg_id"]) for t in r["tasks"]) == list(range(10, 20))
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(T0 + 50))
    assert _tasks(http, since=iso)["total"] == 10
    assert _tasks(http, since="1 minute ago")["total"] == 0  # T0 is long past
    d = _tasks(http, min_duration=2, max_duration=3, limit=500)["tasks"]
    assert d and all(2 <= t["duration"] <= 3 for t in d)
    assert sorted(_index(t["msg_id"]) for t in d) == [i for i in range(20, 31) if i % 7 != 6]


def test_search_finds_text_in_output_and_errors(http: TestClient) -> None:
    assert _tasks(http, search="result line 12")["total"] == 1  # case-insensitive, stdout
    assert _tasks(http, search="ValueError: bad 9")["total"] == 1  # the traceback
    assert _tasks(http, search="JOB_3", limit=500)["total"] == 11  # func: job_3, job_30..39
    assert _tasks(http, search="100%")["total"] == 0  # % is no wildcard
    combined = _tasks(http, search="<script>", engine=0, label="load", limit=500)
    assert combined["total"] == len(combined["tasks"]) > 0
    assert all(t["status"] == "error" and t["engine"] == 0 and t["label"] == "load"
               for t in combined["tasks"])


@pytest.mark.parametrize("params, why", [
    ({"colour": "red"}, "unknown filter"),
    ({"status": "nope"}, "unknown status"),
    ({"engine": "x"}, "engine must be an integer"),
    ({"limit": "0"}, "limit must be between"),
    ({"limit": "9999"}, "limit must be between"),
    ({"order": "payload"}, "cannot order by"),
    ({"since": "yesterday-ish"}, "since"),
    ({"min_duration": "-1"}, "non-negative"),
    ({"cursor": "garbage!"}, "cursor"),
])
def test_bad_filters_are_a_400_that_says_why(http: TestClient, params: dict[str, str],
                                             why: str) -> None:
    r = http.get("/api/tasks", params=params)
    assert r.status_code == 400
    assert why in r.json()["error"]


# -- order and paging --------------------------------------------------------------------


def test_sorting(http: TestClient) -> None:
    newest = [_index(t["msg_id"]) for t in _tasks(http, limit=5)["tasks"]]
    assert newest == [59, 58, 57, 56, 55]
    oldest = [_index(t["msg_id"]) for t in _tasks(http, order="submitted", limit=3)["tasks"]]
    assert oldest == [0, 1, 2]
    longest = _tasks(http, order="-duration", limit=500)["tasks"]
    durations = [t["duration"] for t in longest]
    known = [d for d in durations if d is not None]
    assert known == sorted(known, reverse=True)
    assert durations[len(known):] == [None] * (len(durations) - len(known))  # running: last
    shortest = _tasks(http, order="duration", limit=500)["tasks"]
    assert [t["duration"] for t in shortest][:len(known)] == sorted(known)
    assert [t["status"] for t in _tasks(http, order="status", limit=500)["tasks"]] == sorted(
        t["status"] for t in longest)


@pytest.mark.parametrize("order", ["-submitted", "duration", "-completed", "label", "msg_id"])
def test_cursor_pages_cover_everything_once(http: TestClient, order: str) -> None:
    seen: list[str] = []
    cursor = None
    for _ in range(20):
        page = _tasks(http, order=order, limit=7, cursor=cursor)
        assert page["total"] == 60
        seen += [t["msg_id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 60
    whole = [t["msg_id"] for t in _tasks(http, order=order, limit=500)["tasks"]]
    assert seen == whole


def test_pages_hold_still_while_tasks_arrive(http: TestClient, db: str) -> None:
    first = _tasks(http, limit=10)
    with TaskStore(db) as store:  # the Hub records new tasks meanwhile
        store.write([{"msg_id": f"new{i}", "status": "pending", "submitted": T0 + 100 + i}
                     for i in range(5)], [])
    second = _tasks(http, limit=10, cursor=first["next_cursor"])
    assert [_index(t["msg_id"]) for t in second["tasks"]] == list(range(49, 39, -1))
    assert second["total"] == 65
    other = http.get("/api/tasks", params={"cursor": first["next_cursor"], "order": "duration"})
    assert other.status_code == 400 and "another sort order" in other.json()["error"]


# -- one task, overview, throughput ---------------------------------------------------------


def test_task_view_has_timings_traceback_and_output(http: TestClient) -> None:
    failed = _tasks(http, status="error", limit=1)["tasks"][0]
    assert "traceback" not in failed and "stdout" not in failed  # lists stay light
    r = http.get(f"/api/tasks/{failed['msg_id']}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    t = r.json()["task"]
    i = _index(t["msg_id"])
    assert t["traceback"].endswith(f"ValueError: bad {i}")
    assert t["stdout"] == f"{XSS} run {i}\n"  # data stays data: the page sets it as text
    assert t["stderr"] == "warn\n"
    for k in ("submitted", "started", "completed", "received"):
        assert isinstance(t[k], float)
    assert t["duration"] == pytest.approx(i / 10)
    assert "request" not in t and "result" not in t
    missing = http.get("/api/tasks/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_overview_post_mortem_comes_from_the_database(http: TestClient) -> None:
    ov = http.get("/api/overview").json()
    assert ov["mode"] == "post-mortem" and ov["live"] is False
    by_id = {e["id"]: e for e in ov["engines"]}
    assert by_id[0]["state"] == "dead"
    assert by_id[1]["state"] == "unknown"  # "alive" in a database nobody updates any more
    assert by_id[0]["ok"] + by_id[0]["failed"] + by_id[1]["ok"] + by_id[1]["failed"] == \
        ov["counts"]["ok"] + ov["counts"]["error"]
    assert ov["counts"]["running"] == ov["queue"]["running"] == 8
    assert ov["last_completed"] == pytest.approx(T0 + 58 + 0.5 + 5.8)


def test_throughput_ends_at_the_last_task_post_mortem(http: TestClient) -> None:
    r = http.get("/api/throughput", params={"window": 60}).json()
    assert r["bucket"] == 1 and r["live"] is False
    assert len(r["points"]) in (60, 61)
    assert sum(p["ok"] + p["failed"] for p in r["points"]) > 0
    whole = http.get("/api/throughput", params={"window": 3600}).json()
    statuses = [r["status"] for r in _rows()]
    assert sum(p["ok"] for p in whole["points"]) == statuses.count("ok") == 41
    assert sum(p["failed"] for p in whole["points"]) == statuses.count("error") == 11
    assert http.get("/api/throughput", params={"window": 7}).status_code == 400


def test_no_websocket_gets_in(http: TestClient) -> None:
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect):
        with http.websocket_connect("/", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            ws.receive_text()


def test_counts_are_reused_for_a_while_on_a_long_history(db: str) -> None:
    now = [0.0]
    r = HistoryReader(db, min_count_age=2.0, clock=lambda: now[0])
    try:
        assert r.status_counts()["ok"] == 41
        with TaskStore(db) as store:
            store.write([{"msg_id": "late", "status": "ok", "submitted": T0 + 99}], [])
        now[0] = 1.0
        assert r.status_counts()["ok"] == 41  # still the first count
        now[0] = 2.5
        assert r.status_counts()["ok"] == 42
    finally:
        r.close()
