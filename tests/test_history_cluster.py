"""The history as a product, end to end: the Client's query API, the CLI's history, show,
stats, purge and status --watch, retention in a running Hub, and progress bars."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import kill_cluster, monq_env, run_monq, wait_until

import monq
from monq.cluster import Cluster
from monq.hub.store import TaskStore
from monq.records import short_id


def _label() -> str:
    return f"h{time.monotonic_ns()}"


def _work(client: monq.Client, label: str, n: int = 12) -> list[Any]:
    """n tasks under ``label``: a few fail, some print, durations vary."""

    def job(i: int) -> int:
        import time as t

        print(f"job {i} says marmalade{i}")
        t.sleep(0.002 * (i % 4))
        if i % 5 == 4:
            raise ValueError(f"broken {i}")
        return i

    v = client.load_balanced_view(label=label)
    ars = [v.apply_async(job, i) for i in range(n)]
    for a in ars:
        a.wait(30)
    return ars


def test_client_query_api(client: monq.Client) -> None:
    label = _label()
    ars = _work(client, label)
    ids = [a.msg_id for a in ars]
    mine = client.history(label=label, order="submitted")
    assert [r.msg_id for r in mine] == ids and mine.next_cursor is None
    assert {r.status for r in client.history(label=label, status="error")} == {"error"}
    assert len(client.history(label=label, status="error")) == 2
    # cursor pages: same filters, same order, the next rows
    page = client.history(label=label, order="submitted", limit=5)
    got = list(page)
    while page.next_cursor is not None:
        page = client.history(label=label, order="submitted", limit=5, cursor=page.next_cursor)
        got += page
    assert [r.msg_id for r in got] == ids
    assert [r.msg_id for r in client.iter_history(label=label, order="submitted",
                                                  page_size=4)] == ids
    # prefix, search, durations, time ranges
    assert [r.msg_id for r in client.history(msg_id=ids[3][:20])] == [ids[3]]
    assert [r.msg_id for r in client.history(search="marmalade7")] == [ids[7]]
    assert [r.msg_id for r in client.history(search="broken", label=label,
                                             order="submitted")] == [ids[4], ids[9]]
    slow = client.history(label=label, min_duration="1ms")
    assert slow and all(r.duration is not None and r.duration >= 0.001 for r in slow)
    first = min(r.started for r in mine if r.started is not None)
    assert len(client.history(label=label, started_since=first)) == 12
    assert client.history(label=label, completed_until=first) == []
    # counts, groups, percentiles
    assert client.count(label=label) == 12
    assert client.task_stats("status", label=label) == {"ok": 10, "error": 2}
    assert sum(client.task_stats("engine", label=label).values()) == 12
    assert sum(client.task_stats("minute", label=label).values()) == 12
    pct = client.duration_percentiles(label=label)
    assert pct["n"] == 12 and pct["min"] <= pct["p50"] <= pct["p90"] <= pct["p99"] <= pct["max"]
    per_label = client.duration_percentiles(by="label", label=label)
    assert list(per_label) == [label] and per_label[label]["n"] == 12
    # one full record, by a prefix
    rec = client.task_record(short_id(ids[4]))
    assert rec.msg_id == ids[4] and rec.ename == "ValueError" and "broken 4" in rec.traceback


def test_client_bad_filters_are_clear_errors(client: monq.Client) -> None:
    with pytest.raises(monq.HubError, match="unknown filter.*colour"):
        client.history(colour="red")
    with pytest.raises(monq.HubError, match="label must be a string"):
        client.history(label=5)
    with pytest.raises(monq.HubError, match="cursor"):
        client.history(cursor="nonsense")
    with pytest.raises(monq.HubError, match="cannot group by"):
        client.task_stats("colour")
    with pytest.raises(ValueError, match="duration"):
        client.history(min_duration="a while")
    with pytest.raises(ValueError, match="time"):
        client.history(completed_since="the other day")
    assert client.load_balanced_view().apply_sync(lambda: 3) == 3  # the Hub carries on


def test_client_export(client: monq.Client, tmp_path: Path) -> None:
    label = _label()
    ars = _work(client, label, n=7)
    path = tmp_path / "out.csv"
    assert client.export(path, "csv", label=label, order="submitted") == 7
    rows = list(csv.DictReader(path.open()))
    assert [r["msg_id"] for r in rows] == [a.msg_id for a in ars]
    assert rows[4]["status"] == "error" and "broken 4" in rows[4]["traceback"]
    buf = io.StringIO()
    assert client.export(buf, "jsonl", label=label, status="ok") == 6
    docs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert {d["status"] for d in docs} == {"ok"} and all(d["label"] == label for d in docs)


def test_purge_with_filters_and_payloads_only(client: monq.Client) -> None:
    label = _label()
    ars = _work(client, label, n=6)
    assert client.purge_results(label=label, status="error") == 1
    assert client.count(label=label) == 5
    assert client.purge_results(label=label, payloads_only=True) == 5
    recs = client.history(label=label)
    assert len(recs) == 5 and all(r.payload_evicted is not None for r in recs)
    with pytest.raises(monq.HubError, match="was not kept .* evicted by the history's retention"):
        client.get_result(ars[0].msg_id).get(10)


def test_wait_interactive_shows_progress(client: monq.Client) -> None:
    v = client.load_balanced_view()
    ar = v.map_async(lambda x: __import__("time").sleep(0.05) or x, range(8), chunksize=1)
    out = io.StringIO()
    assert ar.wait_interactive(interval=0.02, file=out) is True
    text = out.getvalue()
    assert "8/8" in text and "100%" in text
    assert ar.get(1) == list(range(8))
    # a timeout returns False with the bar closed where it stood
    slow = v.apply_async(lambda: __import__("time").sleep(1.0))
    out = io.StringIO()
    assert slow.wait_interactive(interval=0.02, timeout=0.1, file=out) is False
    assert "0/1" in out.getvalue()
    slow.get(10)


# -- the CLI, against the session cluster --------------------------------------------------


def _cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return run_monq("--home", str(cluster.config.home), *args, timeout=60)


def test_cli_history_filters_formats_and_pages(client: monq.Client, cluster: Cluster) -> None:
    label = _label()
    ars = _work(client, label, n=9)
    ids = [a.msg_id for a in ars]
    r = _cli(cluster, "history", "--label", label, "--order", "submitted", "--json",
             "--limit", "0")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["msg_id"] for x in r.stdout.splitlines()] == ids
    r = _cli(cluster, "history", "--label", label, "--status", "error", "--csv")
    assert r.returncode == 0, r.stderr
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [t["msg_id"] for t in table] == [ids[4]]
    r = _cli(cluster, "history", "--label", label, "--search", "marmalade2", "--json")
    assert [json.loads(x)["msg_id"] for x in r.stdout.splitlines()] == [ids[2]]
    # a table page, then the next with the cursor it printed
    r = _cli(cluster, "history", "--label", label, "--order", "submitted", "--limit", "5")
    assert r.returncode == 0, r.stderr
    assert sum(1 for m in ids[:5] if short_id(m) in r.stdout) == 5
    assert not any(short_id(m) in r.stdout for m in ids[5:])
    cursor = r.stdout.strip().splitlines()[-1].split("--cursor ")[1]
    r = _cli(cluster, "history", "--label", label, "--order", "submitted", "--limit", "5",
             "--cursor", cursor, "--json")
    assert [json.loads(x)["msg_id"] for x in r.stdout.splitlines()] == ids[5:]
    r = _cli(cluster, "history", "--min-duration", "soon")
    assert r.returncode == 2 and "cannot read 'soon' as a duration" in r.stderr
    r = _cli(cluster, "history", "--cursor", "bogus")
    assert r.returncode == 1 and "cursor" in r.stderr and "Traceback" not in r.stderr


def test_cli_show_and_stats(client: monq.Client, cluster: Cluster) -> None:
    label = _label()
    ars = _work(client, label, n=10)
    r = _cli(cluster, "show", short_id(ars[4].msg_id))  # what tables show
    assert r.returncode == 0, r.stderr
    for piece in (ars[4].msg_id, "status:         error", "--- traceback ---",
                  "ValueError: broken 4", "--- stdout ---", "job 4 says marmalade4",
                  "duration:", "request:"):
        assert piece in r.stdout, (piece, r.stdout)
    r = _cli(cluster, "show", "zzzz")
    assert r.returncode == 1 and "no task 'zzzz'" in r.stderr
    r = _cli(cluster, "stats", "--label", label)
    assert r.returncode == 0, r.stderr
    assert "tasks: 10  (ok 8, error 2)" in r.stdout
    assert "throughput:" in r.stdout and "tasks/s" in r.stdout
    assert "duration by engine" in r.stdout and "duration by label" in r.stdout
    assert "p99" in r.stdout
    r = _cli(cluster, "stats", "--label", label, "--json")
    doc = json.loads(r.stdout)
    assert doc["tasks"] == 10 and doc["status"] == {"ok": 8, "error": 2}
    assert doc["duration"]["n"] == 10 and doc["throughput"] > 0
    assert sum(g["n"] for g in doc["engine"]) == 10
    assert {g["key"] for g in doc["engine"]} == {r.engine for r in client.history(label=label)}


def test_cli_purge_through_the_hub(client: monq.Client, cluster: Cluster) -> None:
    label = _label()
    _work(client, label, n=5)
    r = _cli(cluster, "purge")
    assert r.returncode == 1 and "say what to purge" in r.stderr
    r = _cli(cluster, "purge", "--label", label, "--payloads-only")
    assert r.returncode == 0 and "payloads of 5 finished tasks" in r.stdout, r.stderr
    r = _cli(cluster, "purge", "--label", label, "--status", "ok")
    assert r.returncode == 0 and "purged 4 finished tasks" in r.stdout, r.stderr
    assert [x.status for x in client.history(label=label)] == ["error"]


def test_status_watch_redraws_until_ctrl_c(cluster: Cluster) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "monq", "--home", str(cluster.config.home),
                             "status", "--watch", "0.2"], env=monq_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while sum(x.startswith("--- ") for x in lines) < 3:  # two whole frames
            line = proc.stdout.readline()  # bounded by pytest-timeout
            assert line, f"status --watch ended early: {lines}"
            lines.append(line)
        heads = [i for i, x in enumerate(lines) if x.startswith("--- ")]
        for a, b in zip(heads, heads[1:]):
            frame = "".join(lines[a:b])
            assert "engines (2):" in frame and "tasks:" in frame, frame
            assert "Ctrl-C to stop" in lines[a]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- without a cluster: the profile's database, or --db ---------------------------------------


def _fill(url: str) -> None:
    with TaskStore(url) as s:
        s.write([{"msg_id": f"abc{i:02d}", "status": "error" if i == 3 else "ok",
                  "engine": i % 2, "label": "offline", "submitted": 1000.0 + i,
                  "started": 1000.5 + i, "completed": 1001.0 + i * 1.5,
                  "stdout": f"line {i}", "request": b"q" * 50, "result": b"r" * 50,
                  **({"ename": "KeyError", "evalue": "'k'", "traceback": "Traceback...\n"
                      "KeyError: 'k'"} if i == 3 else {})} for i in range(6)], [])


def test_cli_without_a_cluster_uses_the_profile_database(monq_home: Path) -> None:
    _fill(f"sqlite:///{monq_home / 'default' / 'history.db'}")
    r = run_monq("history", "--label", "offline", "--json", "--limit", "0")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 6
    r = run_monq("show", "abc03")
    assert r.returncode == 0 and "KeyError: 'k'" in r.stdout and "line 3" in r.stdout
    r = run_monq("show", "abc")
    assert r.returncode == 1 and "several msg_ids" in r.stderr
    r = run_monq("stats")
    assert r.returncode == 0 and "tasks: 6  (ok 5, error 1)" in r.stdout, r.stdout
    r = run_monq("purge", "--status", "error")
    assert r.returncode == 0 and "purged 1 finished task" in r.stdout, r.stderr
    r = run_monq("purge", "--before", "1004.0", "--payloads-only")
    assert r.returncode == 0 and "payloads of 2" in r.stdout, r.stdout  # completed 1001, 1002.5
    r = run_monq("show", "abc00")
    assert "payloads:       evicted" in r.stdout
    r = run_monq("purge", "--all")
    assert r.returncode == 0 and "purged 5" in r.stdout
    r = run_monq("status", "--watch", "0")
    assert r.returncode == 2 and "--watch takes a period" in r.stderr


def test_cli_with_db_url(tmp_path: Path, monq_home: Path) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    _fill(url)
    r = run_monq("history", "--db", url, "--min-duration", "2s", "--csv")
    assert r.returncode == 0, r.stderr
    got = [row["msg_id"] for row in csv.DictReader(io.StringIO(r.stdout))]
    assert got == ["abc05", "abc04", "abc03"]  # 0.5 + 0.5 i >= 2
    r = run_monq("stats", "--db", url, "--engine", "1", "--json")
    assert json.loads(r.stdout)["tasks"] == 3
    r = run_monq("purge", "--db", url, "--msg-id", "abc0", "--engine", "0")
    assert r.returncode == 0 and "purged 3" in r.stdout


# -- retention in a running Hub ---------------------------------------------------------------


@pytest.mark.slow
def test_retention_in_a_running_cluster(monq_home: Path) -> None:
    r = run_monq("start", "--daemon", "-n", "1", "--profile", "ret", "--max-tasks", "25",
                 "--max-bytes", "20kB", timeout=90)
    try:
        assert r.returncode == 0, r.stderr
        assert "engines ready: 1/1" in r.stdout
        conn = monq_home / "ret" / "connection.json"
        with monq.Client(connection_file=conn) as c:
            v = c.load_balanced_view(label="ret")
            for a in [v.apply_async(lambda i=i: b"x" * 2000 + bytes([i])) for i in range(40)]:
                a.get(30)
            wait_until(lambda: c.count() <= 25, 30, "max-tasks retention")
            # the oldest finished went first; the newest payload is still there
            wait_until(lambda: any(x.payload_evicted for x in c.history()), 30,
                       "payload eviction")
            recs = c.history(order="completed")
            evicted = [x for x in recs if x.payload_evicted]
            kept = [x for x in recs if not x.payload_evicted]
            assert kept and max(x.completed for x in evicted) <= min(x.completed for x in kept)
            assert c.get_result(kept[-1].msg_id).get(10)[-1] == 39
            assert all(x.result_bytes for x in evicted)  # the sizes stay
        r = run_monq("history", "--profile", "ret", "--json", "--limit", "0")
        assert len(r.stdout.splitlines()) <= 25
        r = run_monq("start", "--profile", "x", "--retain", "forever")
        assert r.returncode == 2 and "as a duration" in r.stderr
    finally:
        run_monq("stop", "--profile", "ret", timeout=60)
        kill_cluster(monq_home, "ret")
