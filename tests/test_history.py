"""The Hub records every task that crosses a relay, and answers history queries."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone

import pytest

import monq
from monq.records import TaskRecord


def _label() -> str:
    return f"t{time.monotonic_ns()}"


def test_every_task_is_recorded(client: monq.Client) -> None:
    v = client.load_balanced_view(label=_label())
    ars = [v.apply_async(lambda i=i: i) for i in range(300)]
    d = client[:]
    ars += [d.apply_async(lambda: 1)]
    ids = [m for a in ars for m in a.msg_ids]
    for a in ars:
        a.get(30)
    rows = client.db_query({"msg_id": {"$in": ids}}, keys=["status", "queue", "engine",
                                                             "submitted", "started",
                                                             "completed"])
    assert len(rows) == len(ids) == 302
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["queue"] for r in rows} == {"task", "direct"}
    for r in rows:
        assert r["engine"] in client.ids
        assert r["submitted"] <= r["started"] <= r["completed"]
        assert isinstance(r["submitted"], datetime)


def test_history_record_fields(client: monq.Client) -> None:
    label = _label()

    def shout(x: int) -> int:
        print("hello", x)
        return x

    ar = client.load_balanced_view(label=label).apply_async(shout, 3)
    ar.get(10)
    recs = client.history(limit=5)
    assert recs and isinstance(recs[0], TaskRecord)
    rec = next(r for r in recs if r.msg_id == ar.msg_id)
    assert rec.status == "ok"
    assert rec.label == label
    assert rec.func and rec.func.endswith("shout")
    assert rec.stdout == "hello 3\n"
    assert rec.engine == ar.metadata["engine"]
    assert rec.client == client.session.session_id
    assert rec.duration is not None and rec.duration >= 0
    assert rec.request_bytes and rec.result_bytes
    assert rec.submitted.tzinfo is not None


def test_history_filters(client: monq.Client) -> None:
    start = datetime.now(timezone.utc)
    v = client.load_balanced_view()
    oks = [v.apply_async(lambda: 1) for _ in range(5)]
    bad = v.apply_async(lambda: {}["missing"])
    for a in oks:
        a.get(10)
    with pytest.raises(monq.RemoteError):
        bad.get(10)
    errors = client.history(status="error", since=start)
    assert [r.msg_id for r in errors] == [bad.msg_id]
    assert errors[0].ename == "KeyError" and "missing" in (errors[0].traceback or "")
    recent = client.history(since=start, order="submitted")
    assert [r.msg_id for r in recent] == [a.msg_id for a in oks] + [bad.msg_id]
    newest = client.history(since=start, limit=2)
    assert [r.msg_id for r in newest] == [bad.msg_id, oks[-1].msg_id]
    assert client.history(since=start, until=start - timedelta(seconds=1)) == []
    assert len(client.history(status=["ok", "error"], since=start)) == 6
    assert client.history(since="1 minute ago", limit=1)
    assert all(r.client == client.session.session_id
               for r in client.history(client=client.session.session_id, limit=10))
    e0 = client.history(engine=0, since=start)
    assert all(r.engine == 0 for r in e0)
    with pytest.raises(monq.HubError):
        client.history(order="bogus")
    with pytest.raises(ValueError):
        client.history(since="not a time")


def test_db_query_operators(client: monq.Client) -> None:
    label = _label()
    v = client.load_balanced_view(label=label)
    ars = [v.apply_async(lambda i=i: i) for i in range(4)]
    unlabeled = client.load_balanced_view().apply_async(lambda: 0)
    for a in [*ars, unlabeled]:
        a.get(10)
    ids = [a.msg_id for a in ars]
    q = {"label": label}
    assert {r["msg_id"] for r in client.db_query(q)} == set(ids)
    assert len(client.db_query({"label": {"$eq": label}})) == 4
    assert len(client.db_query({**q, "engine": {"$ne": 99}})) == 4
    assert len(client.db_query({"label": {"$in": [label, "other"]}})) == 4
    assert len(client.db_query({**q, "msg_id": {"$nin": ids[:1]}})) == 3
    assert len(client.db_query({"label": {"$glob": label[:-2] + "*"}})) >= 4
    t = client.db_query({"msg_id": ids[1]}, keys=["submitted"])[0]["submitted"]
    assert {r["msg_id"] for r in client.db_query({**q, "submitted": {"$lt": t}})} == {ids[0]}
    assert {r["msg_id"] for r in client.db_query({**q, "submitted": {"$lte": t}})} == set(ids[:2])
    assert {r["msg_id"] for r in client.db_query({**q, "submitted": {"$gt": t}})} == set(ids[2:])
    assert {r["msg_id"] for r in client.db_query({**q, "submitted": {"$gte": t}})} == set(ids[1:])
    nolabel = client.db_query({"msg_id": unlabeled.msg_id, "label": None})
    assert [r["msg_id"] for r in nolabel] == [unlabeled.msg_id]
    assert client.db_query({"msg_id": unlabeled.msg_id, "label": {"$ne": None}}) == []
    rows = client.db_query(q, keys=["status"])
    assert set(rows[0]) == {"msg_id", "status"}
    with pytest.raises(monq.HubError, match="nope"):
        client.db_query({"nope": 1})
    with pytest.raises(monq.HubError):
        client.db_query({"engine": {"$regex": 1}})


def test_hub_history_order(client: monq.Client) -> None:
    v = client.load_balanced_view()
    ars = [v.apply_async(lambda: None) for _ in range(5)]
    for a in ars:
        a.get(10)
    hist = client.hub_history()
    assert hist[-5:] == [a.msg_id for a in ars]


def test_get_result_from_a_new_process(cluster: object, tmp_path: object) -> None:
    """A result survives its client: another process fetches it from the Hub."""
    conn = cluster.connection_file  # type: ignore[attr-defined]
    submit = textwrap.dedent(f"""
        import monq, numpy as np
        c = monq.Client(connection_file={str(conn)!r})
        v = c.load_balanced_view()
        ok = v.apply_async(lambda: {{"answer": 42, "arr": np.arange(5)}})
        bad = v.apply_async(lambda: 1 / 0)
        ok.get(10)
        try:
            bad.get(10)
        except monq.RemoteError:
            pass
        print(ok.msg_id, bad.msg_id)
        c.close()
    """)
    out = subprocess.run([sys.executable, "-c", submit], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    ok_id, bad_id = out
    with monq.Client(connection_file=conn) as c:
        value = c.get_result(ok_id).get(10)
        assert value["answer"] == 42 and list(value["arr"]) == [0, 1, 2, 3, 4]
        ar = c.get_result(bad_id)
        with pytest.raises(monq.RemoteError, match="ZeroDivisionError"):
            ar.get(10)
        assert ar.metadata["status"] == "error"
        with pytest.raises(monq.HubError, match="no task"):
            c.get_result("0" * 32)


def test_get_result_of_running_task_resolves_later(client: monq.Client, cluster: object) -> None:
    ar = client.load_balanced_view().apply_async(lambda: __import__("time").sleep(0.5) or 9)
    with monq.Client(connection_file=cluster.connection_file) as other:  # type: ignore[attr-defined]
        late = other.get_result(ar.msg_id)
        assert late.get(10) == 9


def test_queue_status_and_counts(client: monq.Client) -> None:
    import time as _t

    v = client.load_balanced_view()
    running = [v.apply_async(_t.sleep, 1.0) for _ in range(2)]
    waiting = client[0].apply_async(lambda: 0)
    _t.sleep(0.3)
    q = client.queue_status()
    assert set(q) >= {*client.ids, "unassigned"}
    assert sum(q[i]["tasks"] for i in client.ids) + q["unassigned"] >= 1
    assert q[0]["queue"] + q[0]["tasks"] >= 1
    for a in [*running, waiting]:
        a.get(10)
    st = client.cluster_status()
    assert st["counts"]["ok"] >= 3
    assert {e["id"] for e in st["engines"] if e["status"] == "alive"} == set(client.ids)
    q = client.queue_status()
    assert q["unassigned"] == 0 and all(q[i]["completed"] > 0 for i in client.ids)


def test_purge_results(client: monq.Client) -> None:
    v = client.load_balanced_view()
    ars = [v.apply_async(lambda: 1) for _ in range(3)]
    for a in ars:
        a.get(10)
    with pytest.raises(monq.HubError):
        client.purge_results()  # nothing named: refused, nothing deleted
    assert client.purge_results(msg_ids=[ars[0].msg_id]) == 1
    assert client.db_query({"msg_id": ars[0].msg_id}) == []
    assert len(client.db_query({"msg_id": {"$in": [a.msg_id for a in ars[1:]]}})) == 2


def test_hub_memory_is_bounded_by_tasks_in_flight(client: monq.Client) -> None:
    """Once tasks finish and are written, the Hub keeps nothing of them in memory."""
    v = client.load_balanced_view()
    ars = [v.apply_async(lambda: None) for _ in range(2000)]
    assert client.cluster_status()["in_flight"] > 0 or all(a.done() for a in ars)
    for a in ars:
        a.get(60)
    assert client.cluster_status()["in_flight"] == 0
