"""The dashboard beside a running cluster, and `monq dashboard` as a process.

Resource handling: :func:`dashboard_process` stops the server it starts
(SIGTERM, then SIGKILL after a deadline) in its ``finally``; the browser
tests use it too.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the dashboard extra (starlette) is not installed")
httpx = pytest.importorskip("httpx", reason="the dashboard tests need httpx")

from conftest import monq_env, wait_until  # noqa: E402

import monq  # noqa: E402
from monq.cli import ExitCode  # noqa: E402
from monq.cluster import Cluster  # noqa: E402
from monq.connection import load_connection_file  # noqa: E402
from monq.dashboard.app import DashboardConfig, create_app  # noqa: E402
from monq.dashboard.auth import token_for_key  # noqa: E402
from monq.dashboard.data import HistoryReader  # noqa: E402
from monq.dashboard.live import ClusterWatch  # noqa: E402
from monq.hub.store import TaskStore  # noqa: E402

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.testclient import TestClient

START_TIMEOUT = 30.0


@contextlib.contextmanager
def dashboard_process(*args: str, home: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``monq dashboard --port 0 ARGS`` in a subprocess; yields it and the URL it printed."""
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "monq", "--home", str(home), "dashboard", "--port", "0", *args],
        env=monq_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # keeps the pipe drained; reads end when the process does
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True, name="dashboard-stdout")
    reader.start()
    try:
        url = None
        with contextlib.suppress(queue.Empty):
            while url is None:
                line = lines.get(timeout=START_TIMEOUT)
                if line is None:
                    break
                if line.startswith("open http"):
                    url = line.split()[1]
        if url is None:
            proc.kill()
            proc.wait(10)
            err.seek(0)
            pytest.fail(f"monq dashboard printed no URL within {START_TIMEOUT}s "
                        f"(exit {proc.poll()}): {err.read()[-2000:]}")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        err.close()


def _base_and_token(url: str) -> tuple[str, str]:
    base, token = url.split("/?token=")
    return base, token


def _run_tasks(client: monq.Client, label: str, ok: int = 6, failing: int = 3) -> list[str]:
    """Run ``ok`` good and ``failing`` bad tasks under ``label``; return the failures' ids."""

    def good(i: int) -> int:
        print(f"square of {i}")
        return i * i

    def bad(i: int) -> None:
        print(f"about to fail <script>alert('x{i}')</script>")
        raise ValueError(f"bad input {i}")

    v = client.load_balanced_view(label=label)
    assert v.map(good, range(ok), chunksize=1).get(30) == [i * i for i in range(ok)]
    failed = []
    for i in range(failing):
        ar = v.apply_async(bad, i)
        with pytest.raises(monq.RemoteError):
            ar.get(30)
        failed += ar.msg_ids
    return failed


def _recorded(db_url: str, label: str, n: int) -> bool:
    with TaskStore(f"{db_url}") as s:
        rows = s.db_query({"label": label}, keys=["status"])
    return len(rows) >= n and all(r["status"] in ("ok", "error") for r in rows)


# -- in process, against the session cluster ---------------------------------------------------


def test_live_overview_and_tasks_from_the_running_cluster(cluster: Cluster,
                                                          client: monq.Client) -> None:
    info = load_connection_file(cluster.connection_file)
    label = f"dash-live-{id(client)}"
    failed = _run_tasks(client, label)
    wait_until(lambda: _recorded(info.db_url, label, 9), 10, "the Hub to record the tasks")
    token = token_for_key(info.key)
    reader = HistoryReader(info.db_url)
    watch = ClusterWatch(cluster.connection_file, info.db_url)
    try:
        app = create_app(DashboardConfig(token=token), reader, watch)
        with TestClient(app, base_url="http://127.0.0.1",
                        headers={"Authorization": f"Bearer {token}"}) as http:
            ov = http.get("/api/overview").json()
            assert ov["live"] is True and ov["mode"] == "live"
            alive = [e for e in ov["engines"] if e["status"] == "alive"]
            assert sorted(e["id"] for e in alive) == sorted(client.ids)
            assert {e["state"] for e in alive} <= {"idle", "busy"}
            assert ov["counts"]["error"] >= 3
            page = http.get("/api/tasks", params={"label": label, "status": "error"}).json()
            assert sorted(t["msg_id"] for t in page["tasks"]) == sorted(failed)
            one = http.get(f"/api/tasks/{failed[0]}").json()["task"]
            assert "ValueError: bad input" in one["traceback"]
            assert "<script>" in one["stdout"]
            tp = http.get("/api/throughput", params={"window": 300}).json()
            assert tp["live"] is True and sum(p["ok"] + p["failed"] for p in tp["points"]) >= 9
    finally:
        watch.close()
        reader.close()


def test_watch_without_a_cluster_says_why_and_waits_before_trying_again(tmp_path: Path) -> None:
    now = [100.0]
    watch = ClusterWatch(tmp_path / "connection.json", "sqlite://", retry=3.0,
                         clock=lambda: now[0])
    try:
        assert watch.status() is None
        assert watch.error is not None and "no cluster running" in watch.error
        watch.error = "unchanged"
        now[0] += 1.0
        assert watch.status() is None and watch.error == "unchanged"  # not tried yet
        now[0] += 3.0
        assert watch.status() is None and "no cluster running" in watch.error
    finally:
        watch.close()
        watch.close()  # twice is safe


# -- `monq dashboard` as a process ------------------------------------------------------------


def test_dashboard_command_live_prints_a_token_url_and_stops_on_sigterm(
        cluster: Cluster) -> None:
    info = load_connection_file(cluster.connection_file)
    home = cluster.config.home
    assert home is not None
    with dashboard_process(home=home) as (proc, url):
        base, token = _base_and_token(url)
        assert base.startswith("http://127.0.0.1:")  # loopback unless --ip says otherwise
        assert token == token_for_key(info.key)
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/api/overview").status_code == 401
            ov = http.get("/api/overview", headers={"Authorization": f"Bearer {token}"})
            assert ov.status_code == 200 and ov.json()["live"] is True
            assert http.post("/api/tasks", headers={"Authorization": f"Bearer {token}"}
                             ).status_code == 405
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == ExitCode.OK


def test_dashboard_command_post_mortem_on_a_file(tmp_path: Path, monq_home: Path) -> None:
    db = tmp_path / "old.db"
    with TaskStore(f"sqlite:///{db}") as s:
        s.write([{"msg_id": "m1", "status": "ok", "submitted": 1.0, "completed": 2.0}], [])
    with dashboard_process("--db", f"sqlite:///{db}", home=monq_home) as (proc, url):
        base, token = _base_and_token(url)
        assert len(token) == 32
        with httpx.Client(base_url=base, timeout=10,
                          headers={"Authorization": f"Bearer {token}"}) as http:
            ov = http.get("/api/overview").json()
            assert ov["mode"] == "post-mortem" and ov["live"] is False
            assert [t["msg_id"] for t in http.get("/api/tasks").json()["tasks"]] == ["m1"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == ExitCode.OK


def test_dashboard_command_without_cluster_or_history(run_monq: Any, monq_home: Path,
                                                      tmp_path: Path) -> None:
    r = run_monq("--home", str(monq_home), "dashboard", "--port", "0", timeout=60)
    assert r.returncode == ExitCode.NO_CLUSTER
    assert "no cluster running" in r.stderr and "--db" in r.stderr
    missing = tmp_path / "typo.db"
    r = run_monq("--home", str(monq_home), "dashboard", "--port", "0", "--db",
                 f"sqlite:///{missing}", timeout=60)
    assert r.returncode == ExitCode.ERROR
    assert "no database file" in r.stderr
    assert not missing.exists()


def test_watch_asks_a_slow_hub_less_often(tmp_path: Path) -> None:
    """A Hub that took 0.5 s to answer is asked again only after backoff * 0.5 s."""
    now = [0.0]
    calls: list[float] = []

    class SlowClient:
        def cluster_status(self) -> dict[str, Any]:
            calls.append(now[0])
            now[0] += 0.5
            return {"engines": [], "counts": {}, "queue": {}}

        def close(self) -> None:
            pass

    class Watch(ClusterWatch):
        def _connect(self) -> Any:
            return SlowClient()

    watch = Watch(tmp_path / "c.json", "sqlite://", max_age=1.0, backoff=20.0,
                  clock=lambda: now[0])
    try:
        assert watch.status() is not None and calls == [0.0]
        now[0] = 9.0
        assert watch.status() is not None and calls == [0.0]  # reused: 10 s not yet up
        now[0] = 10.5
        watch.status()
        assert calls == [0.0, 10.5]
    finally:
        watch.close()
