"""Many tasks per message: apply_batch / apply_batch_reply (see monq.protocol), counted.

Batching is natural (tasks queued while another thread holds the client's
sockets are packed together), so to make the counts exact these tests hold
the sockets themselves while submitting (:func:`held`), as the I/O thread
does in a burst, and let go afterwards: everything queued then leaves in
batches.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import zmq

import monq
from monq.client.io import QueuedTask, pack
from monq.cluster import Cluster, ClusterConfig
from monq.connection import load_connection_file
from monq.errors import ProtocolError, SerializationError
from monq.protocol import (
    BATCH_REPLY,
    BATCH_REQUEST,
    MAX_BATCH_TASKS,
    BatchBuilder,
    Message,
    Session,
)
from monq.serialize import pack_apply
from tests.conftest import START_TIMEOUT, wait_until

KEY = b"k" * 32
# engines cannot import this module: its functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def noop() -> None:
    return None


@contextlib.contextmanager
def held(client: monq.Client) -> Iterator[None]:
    """Hold the client's sockets (as its I/O thread does in a burst): what is submitted
    meanwhile is queued, and sent in batches when they are let go."""
    io = client._io
    assert io.lock.acquire(timeout=10)
    try:
        yield
    finally:
        got = io.release()
        io.dispatch(got)
        io.activate_if_needed()


def received(client: monq.Client) -> collections.Counter[str]:
    return collections.Counter(client.cluster_status()["received"])


def rejected(client: monq.Client) -> collections.Counter[str]:
    return collections.Counter(client.cluster_status()["rejected"])


# -- the wire format alone ------------------------------------------------------------------


def _queued(session: Session, n: int, channel: str = "task") -> list[tuple[bytes, Any]]:
    items = []
    for i in range(n):
        buffers, raw = pack_apply(abs, (-i,), {})
        hdr = session.header("apply_request", channel)
        items.append((channel.encode(), QueuedTask(hdr, {"func": "abs"}, buffers, raw, [])))
    return items


def test_queued_tasks_are_packed_in_batches_split_back_as_single_requests() -> None:
    client, engine = Session(KEY), Session(KEY)
    items = _queued(client, 150)
    out = list(pack(items, client, engines=1))
    # at most MAX_BATCH_TASKS per message, in the order queued
    assert [len(ids) for _, _, ids in out] == [64, 64, 22]
    got = []
    for _, frames, _ in out:
        msg = engine.feed(frames)
        assert msg.msg_type == BATCH_REQUEST
        # the function's stream is sent once per batch, not once per task
        assert len(msg.buffers) == 1 + len(msg.content["tasks"])
        got += engine.split_batch(msg)
    assert [m.msg_id for m in got] == [t.header["msg_id"] for _, t in items]
    for m, (_, t) in zip(got, items):
        assert m.msg_type == "apply_request" and m.metadata == {"func": "abs"}
        assert m.header["date"] == t.header["date"]
        assert [bytes(b) for b in m.buffers] == [bytes(b) for b in t.buffers]
        assert m.header["buffers"] == [[len(b), r] for b, r in zip(t.buffers, t.raw)]


def test_a_small_run_is_spread_over_the_engines_and_a_lone_task_goes_alone() -> None:
    s = Session(KEY)
    assert [len(ids) for _, _, ids in pack(_queued(s, 4), s, engines=2)] == [2, 2]
    assert [len(ids) for _, _, ids in pack(_queued(s, 7), s, engines=3)] == [3, 3, 1]
    (_, frames, ids), = pack(_queued(s, 1), s, engines=2)
    assert Session(KEY).feed(frames).msg_type == "apply_request"


def test_a_batch_keeps_the_channel_order() -> None:
    """Signed messages queued between tasks stay in place, and numbers keep rising."""
    client, engine = Session(KEY), Session(KEY)
    items = _queued(client, 3)
    _, signed = client.serialize("apply_request", "task", {}, buffers=[b"x"])
    items += [(b"task", signed)] + _queued(client, 3)
    msgs = [engine.feed(f) for _, f, _ in pack(items, client, engines=1)]
    assert [m.msg_type for m in msgs] == [BATCH_REQUEST, "apply_request", BATCH_REQUEST]
    assert not engine.rejected  # the replay guard saw rising numbers


def _batch(session: Session, entries: Any, buffers: list[bytes], msg_type: str = BATCH_REQUEST
           ) -> list[Any]:
    _, frames = session.serialize(msg_type, "task", {"tasks": entries}, buffers=buffers)
    return frames


def test_malformed_batches_are_rejected_and_counted() -> None:
    sender, receiver = Session(KEY), Session(KEY)
    now = time.time()
    ok = {"msg_id": "a1", "date": now, "metadata": {}, "b": [0]}
    bad = [
        [{**ok, "b": [0, 5]}],                                   # an index past the frames
        [{**ok, "b": [-1]}],                                     # a negative index
        [],                                                      # no task
        [{**ok, "msg_id": f"m{i}"} for i in range(MAX_BATCH_TASKS + 1)],  # too many
        [ok, ok],                                                # the same task twice
        [{**ok, "msg_id": 7}],                                   # not an id
        [{**ok, "date": "soon"}],                                # not a date
        [{**ok, "metadata": []}],                                # not an object
        "tasks",                                                 # not a list
    ]
    for entries in bad:
        msg = receiver.feed(_batch(sender, entries, [b"f"]))
        with pytest.raises(ProtocolError):
            receiver.split_batch(msg)
    reply = receiver.feed(_batch(sender, [{"parent": {}, "metadata": {}, "content": {},
                                           "b": [0]}], [b"r"], BATCH_REPLY))
    with pytest.raises(ProtocolError):
        receiver.split_batch(reply)  # a reply without its request's msg_id
    assert receiver.rejected["malformed"] == len(bad) + 1
    # a batch whose signature does not match is refused before anything is read
    frames = _batch(sender, [ok], [b"f"])
    frames[5] = frames[5].replace(b'"a1"', b'"a2"')  # the content frame
    with pytest.raises(ProtocolError, match="signature"):
        receiver.feed(frames)
    # and a good one still goes through
    (m,) = receiver.split_batch(receiver.feed(_batch(sender, [ok], [b"f"])))
    assert m.msg_id == "a1" and [bytes(b) for b in m.buffers] == [b"f"]


def test_the_hub_records_a_batch_as_its_tasks_and_survives_a_bad_one(tmp_path: Path) -> None:
    from monq.hub.hub import Hub, HubConfig
    from monq.hub.store import TaskStore

    store = TaskStore(f"sqlite:///{tmp_path / 'hub.db'}")
    hub = Hub(zmq.Context.instance(), Session(KEY), store, HubConfig())
    try:
        client, engine = Session(KEY), Session(KEY)
        items = _queued(client, 10)
        (_, frames, ids), = pack(items, client, engines=1)
        hub._on_monitor([zmq.Frame(b"in.task"), zmq.Frame(b"cid"),
                         *(zmq.Frame(bytes(f)) for f in frames)])
        b = BatchBuilder()
        for _, t in items:
            b.add({"parent": {"msg_id": t.header["msg_id"], "session": client.session_id,
                              "date": t.header["date"]},
                   "metadata": {"engine": 0, "engine_uuid": "e0", "started": time.time(),
                                "completed": time.time(), "stdout": "", "stderr": ""},
                   "content": {"status": "ok"}}, [b"r"], [False])
        _, out = engine.serialize(BATCH_REPLY, "task", {"tasks": b.entries},
                                  buffers=b.buffers, raw=b.raw)
        assert len(b.buffers) == 1  # the same result frame object: sent once
        for where, bad in ((b"in.task", _batch(Session(KEY), [{"msg_id": "zz", "date": 1.0,
                                                          "b": [3]}], [b"f"])),
                           (b"out.task", _batch(Session(KEY), "x", [], BATCH_REPLY))):
            hub._on_monitor([zmq.Frame(where), zmq.Frame(b"cid"),
                             *(zmq.Frame(bytes(f)) for f in bad)])
        hub._on_monitor([zmq.Frame(b"out.task"), zmq.Frame(b"cid"),
                         *(zmq.Frame(bytes(f)) for f in out)])
        hub.flush()
        assert hub.rejected["malformed"] == 2
        assert hub.received["in.task apply_batch tasks"] == 10
        assert hub.received["out.task apply_batch_reply tasks"] == 10
        rows = {r["msg_id"]: r for r in store.db_query({})}
        assert set(rows) == set(ids)
        sizes = {t.header["msg_id"]: sum(len(x) for x in t.buffers) for _, t in items}
        for r in rows.values():
            assert r["status"] == "ok" and r["engine"] == 0 and r["completed"] is not None
            # each task's own request and result, not the batch's
            assert r["request_bytes"] == sizes[r["msg_id"]]
            assert r["result_bytes"] == 1
    finally:
        hub.close()


# -- a real cluster ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_burst_goes_in_few_messages_and_every_task_is_recorded(client: monq.Client) -> None:
    v = client.load_balanced_view()
    v.apply_sync(noop)  # warm up
    before = received(client)
    sent = collections.Counter(client._io.sent)
    with held(client):
        ars = [v.apply_async(abs, -i) for i in range(2000)]
    assert [ar.get(timeout=60) for ar in ars] == list(range(2000))
    d = received(client) - before
    d.pop("hub status_request", None)
    messages = d["in.task apply_request"] + d["in.task apply_batch"]
    print(f"\n2,000 tasks in {messages} request messages, replies {dict(d)}")
    assert messages <= 2000 // 4, d
    assert d["in.task apply_request"] + d["in.task apply_batch tasks"] == 2000
    assert d["out.task apply_reply"] + d["out.task apply_batch_reply tasks"] == 2000
    assert d["out.task apply_batch_reply"] + d["out.task apply_reply"] <= 2000 // 4, d
    assert client._io.sent["apply_batch"] - sent["apply_batch"] == messages
    # none was taken for lost and sent again (the first task of a batch needs a receipt)
    assert not any(ar.metadata.get("retries") for ar in ars)
    ids = {ar.msg_id for ar in ars}
    rows = client.db_query({"msg_id": {"$in": sorted(ids)}},
                           keys=["msg_id", "status", "engine", "started", "completed",
                                 "submitted", "result_bytes", "retries"])
    assert len(rows) == 2000 and {r["msg_id"] for r in rows} == ids
    for r in rows:
        assert r["status"] == "ok" and r["engine"] is not None and not r["retries"]
        assert r["submitted"] <= r["started"] <= r["completed"]
        assert r["result_bytes"] and r["result_bytes"] < 100  # one result, not a batch's


def test_a_lone_apply_sync_is_a_single_apply_request(client: monq.Client) -> None:
    v = client.load_balanced_view()
    v.apply_sync(noop)
    before, sent = received(client), collections.Counter(client._io.sent)
    assert v.apply_sync(abs, -3) == 3
    assert client[client.ids[0]].apply_sync(abs, -4) == 4

    def counts() -> collections.Counter[str]:
        d = received(client) - before
        for k in ("hub status_request", "hub engines_request"):
            d.pop(k, None)
        return d

    # the Hub may read a reply's copy after the client has the reply, and copies from the
    # two relays reach it fair-queued, not in time order: wait for both replies' copies
    d = wait_until(lambda: (lambda d: d if d["out.direct apply_reply"] and d["out.task apply_reply"]
                            else None)(counts()),
                   10, "the Hub to see both replies")
    assert d == {"in.task apply_request": 1, "out.task apply_reply": 1,
                 "in.direct apply_request": 1, "out.direct apply_reply": 1}, d
    assert collections.Counter(client._io.sent) - sent == {"apply_request": 2}


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("no pickling this")


def _fails(x: int) -> int:
    raise ValueError(f"bad {x}")


def _unpicklable() -> Any:
    return Unpicklable()


def test_each_task_of_a_batch_gets_its_own_error(client: monq.Client) -> None:
    v = client.load_balanced_view()
    dv = client[client.ids[0]]
    for view in (v, dv):  # load-balanced, and direct to one engine
        sent = collections.Counter(client._io.sent)
        with held(client):
            ars = [view.apply_async(abs, -1), view.apply_async(_fails, 2),
                   view.apply_async(_unpicklable), view.apply_async(abs, -4)]
        assert client._io.sent["apply_batch"] > sent["apply_batch"]
        assert ars[0].get(30) == 1 and ars[3].get(30) == 4
        with pytest.raises(monq.RemoteError, match="bad 2") as e:
            ars[1].get(30)
        assert e.value.ename == "ValueError"
        with pytest.raises(monq.RemoteError, match="cannot be sent back") as e:
            ars[2].get(30)
        statuses = {r["msg_id"]: r["status"] for r in client.db_query(
            {"msg_id": {"$in": [a.msg_id for a in ars]}}, keys=["msg_id", "status"])}
        assert [statuses[a.msg_id] for a in ars] == ["ok", "error", "error", "ok"]


def _nap(t: float) -> int:
    import os
    import time

    time.sleep(t)
    return os.getpid()


@pytest.mark.timeout(60)
def test_a_small_burst_of_long_tasks_is_spread_over_both_engines(client: monq.Client) -> None:
    v = client.load_balanced_view()
    assert len(client.ids) == 2
    sent = collections.Counter(client._io.sent)
    with held(client):
        ars = [v.apply_async(_nap, 0.3) for _ in range(4)]
    assert client._io.sent["apply_batch"] - sent["apply_batch"] == 2  # two tasks each
    assert len({ar.get(30) for ar in ars}) == 2
    assert len({ar.metadata["engine"] for ar in ars}) == 2


@pytest.mark.timeout(60)
def test_a_timeout_ends_one_task_of_a_batch_and_not_the_others(client: monq.Client) -> None:
    v = client.load_balanced_view(timeout=0.5)
    dv = client.direct_view(client.ids[0], timeout=0.5)
    for view in (v, dv):
        with held(client):
            ars = [view.apply_async(abs, -1), view.apply_async(_nap, 5.0),
                   view.apply_async(abs, -2)]
        assert ars[0].get(30) == 1 and ars[2].get(30) == 2
        with pytest.raises(monq.TaskTimeout):
            ars[1].get(30)


# -- engines that stop or die in the middle of a batch ----------------------------------------


@contextlib.contextmanager
def own_cluster(tmp_path: Path, n: int) -> Iterator[tuple[Cluster, monq.Client]]:
    with Cluster(ClusterConfig(n=n, home=tmp_path / "home", heartbeat_period=0.5)) as cl:
        cl.start(timeout=START_TIMEOUT)
        with monq.Client(connection_file=cl.connection_file, timeout=10) as c:
            c.wait_for_engines(n)
            yield cl, c


def _pid(client: monq.Client, engine: int) -> int:
    return next(int(e["pid"]) for e in client.cluster_status()["engines"]
                if e["id"] == engine and e["status"] == "alive")


def _outcomes(ars: list[Any]) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for ar in ars:
        exc = ar.exception(60)
        out["ok" if exc is None else type(exc).__name__] += 1
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_an_engine_stopped_or_killed_mid_batch_leaves_no_task_hanging(
        tmp_path: Path, how: signal.Signals) -> None:
    with own_cluster(tmp_path, 2) as (cl, c):
        victim = c.ids[0]
        pid = _pid(c, victim)
        dv = c[victim]
        with held(c):  # one direct batch of 20 to the victim
            ars = [dv.apply_async(_nap, 0.05) for _ in range(20)]
        wait_until(lambda: sum(a.done() for a in ars) >= 3, 30, "a few tasks done")
        os.kill(pid, how)
        got = _outcomes(ars)  # every one ends, within the 60 s each is given
        print(f"\n{how.name} mid-batch: {dict(got)}")
        assert sum(got.values()) == 20 and got["ok"] >= 3
        assert got["ok"] < 20  # the victim did not finish its batch
        # SIGTERM: answered aborted (a RemoteError), unless the engine's goodbye reached
        # the Hub before those answers (then reported lost, as for a single task)
        expected = {"RemoteError", "EngineDied"} if how == signal.SIGTERM else {"EngineDied"}
        assert set(got) - {"ok"} <= expected, got
        rows = c.db_query({"msg_id": {"$in": [a.msg_id for a in ars]}},
                          keys=["msg_id", "status"])
        db = collections.Counter(r["status"] for r in rows)
        assert sum(db.values()) == 20 and db["ok"] == got["ok"], db
        assert set(db) - {"ok"} <= ({"aborted", "lost"} if how == signal.SIGTERM
                                    else {"lost"}), db
        # load-balanced batches in flight on a killed engine: each ends too
        if how == signal.SIGKILL:
            v = c.load_balanced_view()
            assert v.apply_sync(abs, -5) == 5


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_load_balanced_batches_on_a_killed_engine_all_end(tmp_path: Path) -> None:
    with own_cluster(tmp_path, 2) as (cl, c):
        v = c.load_balanced_view()
        pid = _pid(c, c.ids[0])
        with held(c):
            ars = [v.apply_async(_nap, 0.05) for _ in range(40)]  # two batches of 20
        wait_until(lambda: sum(a.done() for a in ars) >= 6, 30, "a few tasks done")
        os.kill(pid, signal.SIGKILL)
        got = _outcomes(ars)
        print(f"\nSIGKILL under load-balanced batches: {dict(got)}")
        assert sum(got.values()) == 40 and set(got) <= {"ok", "EngineDied"}
        rows = c.db_query({"msg_id": {"$in": [a.msg_id for a in ars]}},
                          keys=["msg_id", "status"])
        db = collections.Counter(r["status"] for r in rows)
        assert db["ok"] == got["ok"] and db["lost"] == got["EngineDied"], (got, db)


# -- malformed batches through a live cluster --------------------------------------------------


@pytest.mark.timeout(60)
def test_malformed_batches_are_rejected_by_the_hub_and_engines_keep_working(
        cluster: Cluster, client: monq.Client) -> None:
    info = load_connection_file(cluster.connection_file)
    before, tasks_before = rejected(client), len(client.hub_history())
    session = Session(info.key)
    now = time.time()
    buffers, raw = pack_apply(abs, (-1,), {})
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.sndtimeo = 5000
    try:
        s.connect(info.url("task_client"))
        for entries in ([{"msg_id": "bad1", "date": now, "metadata": {}, "b": [0, 9]}],
                        [{"msg_id": "bad2", "date": now, "metadata": {}, "b": [0, 1]}] * 2,
                        {"not": "a list"}):
            _, frames = session.serialize(BATCH_REQUEST, "task", {"tasks": entries},
                                          buffers=buffers, raw=raw)
            s.send_multipart(frames)
        _, frames = session.serialize(BATCH_REQUEST, "task", {"tasks": [
            {"msg_id": "bad3", "date": now, "metadata": {}, "b": [0, 1]}]},
            buffers=buffers, raw=raw)
        frames[1] = b"0" * 64  # a signature that does not match
        s.send_multipart(frames)
        wait_until(lambda: rejected(client)["malformed"] >= before["malformed"] + 3, 10,
                   "the Hub to count the malformed batches")
        wait_until(lambda: rejected(client)["bad signature"] >= before["bad signature"] + 1,
                   10, "the Hub to count the forged batch")
        assert not s.poll(300, zmq.POLLIN), "a malformed batch got an answer"
    finally:
        s.close(linger=0)
        ctx.term()
    assert len(client.hub_history()) == tasks_before  # none of them became a task
    # the Hub and both engines serve as before, batches included
    v = client.load_balanced_view()
    with held(client):
        ars = [v.apply_async(abs, -i) for i in range(50)]
    assert [a.get(30) for a in ars] == list(range(50))


def test_a_message_object_per_task_is_what_single_handlers_expect() -> None:
    """split_batch's Messages carry the batch's idents and signature, and nothing shared
    that a handler could change for another task."""
    s = Session(KEY)
    items = _queued(s, 3)
    (_, frames, _), = pack(items, s, engines=1)
    msg = Session(KEY).feed([b"ident", *frames])
    tasks = Session(KEY).split_batch(msg)
    assert all(isinstance(m, Message) and m.idents == [b"ident"] for m in tasks)
    tasks[0].header["x"] = 1
    assert "x" not in tasks[1].header


def test_the_hub_takes_a_backlog_of_batches_a_few_thousand_tasks_a_turn(
        tmp_path: Path) -> None:
    """A backlog of batch copies is handled about MONITOR_TURN tasks per turn of the loop,
    rows written every flush_rows: never 100,000s of unwritten rows (nor a loop that stops
    beating) as when it took 5,000 *messages* a turn."""
    from monq.hub.hub import Hub, HubConfig
    from monq.hub.store import TaskStore

    client = Session(KEY)
    copies = []
    for _ in range(200):  # 200 batches of 64: 12,800 tasks
        (_, frames, _), = pack(_queued(client, 64), client, engines=1)
        copies.append([zmq.Frame(b"in.task"), zmq.Frame(b"cid"),
                       *(zmq.Frame(bytes(f)) for f in frames)])

    class Backlog:
        def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[Any]:
            if not copies:
                raise zmq.Again()
            return copies.pop(0)

        def get(self, option: int) -> int:  # ZMQ_EVENTS: whether another copy waits
            assert option == zmq.EVENTS
            return zmq.POLLIN if copies else 0

    store = TaskStore(f"sqlite:///{tmp_path / 'hub.db'}")
    hub = Hub(zmq.Context.instance(), Session(KEY), store, HubConfig())
    dirty: list[int] = []
    real_flush = hub._safe_flush

    def flush(hold: bool = False) -> None:
        dirty.append(len(hub._dirty) + len(hub._held))
        real_flush(hold)

    hub._safe_flush = flush  # type: ignore[method-assign]
    hub.monitor = Backlog()  # type: ignore[assignment]
    try:
        turns = 0
        while copies:
            seen = hub.monitor_tasks
            hub._drain_monitor()
            turns += 1
            assert hub.monitor_tasks - seen <= hub.MONITOR_TURN + hub.MONITOR_STEP * MAX_BATCH_TASKS
        assert hub.monitor_tasks == 12_800 and turns >= 12_800 // hub.MONITOR_TURN
        rows = hub.config.flush_rows
        # (and the rows of pending tasks a flush holds back, at most hold_rows)
        assert dirty and max(dirty) <= rows + hub.MONITOR_STEP * MAX_BATCH_TASKS + \
            hub.config.hold_rows, dirty
    finally:
        hub.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_first_task_of_a_batch_is_never_taken_for_lost(tmp_path: Path) -> None:
    """One engine reads a batch: its first task starts at once, the others wait with
    receipts.  Were the first one not in the receipts, those of the others could tell
    the Hub (before the first is running) that the engine has read past it, and the Hub
    would report it lost and the client send it again: it would run twice."""
    runs = tmp_path / "runs"
    runs.mkdir()

    def mark(i: int) -> int:
        import os
        import pathlib

        pathlib.Path(runs, f"{i}-{os.getpid()}").touch()
        return i

    with own_cluster(tmp_path, 1) as (cl, c):
        v = c.load_balanced_view()
        ars: list[Any] = []
        for r in range(10):
            with held(c):
                ars += [v.apply_async(mark, 100 * r + i) for i in range(40)]
            for ar in ars[-40:]:
                ar.get(30)
        assert not [ar.msg_id for ar in ars if ar.metadata.get("retries")]
        assert len(list(runs.iterdir())) == 400  # each ran once


def test_after_a_restart_a_task_whose_answer_was_dropped_is_fetched_later(
        client: monq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A controller's relay drops an answer for a client not yet reconnected to it (a
    batch's answer: many tasks), while its Hub records it: the client looks again at
    what the new Hub held as unfinished, and fetches what has finished since."""
    from monq.client.results import TaskFuture

    done = client.load_balanced_view().apply_async(abs, -7)
    assert done.get(30) == 7
    msg_id = done.msg_id
    fut = TaskFuture(msg_id, time.time(), "task")  # its answer "never came"
    client._tasks[msg_id] = fut
    real = client._query
    asked: list[dict[str, Any]] = []

    def query(msg_type: str, content: dict[str, Any], **kw: Any) -> dict[str, Any]:
        if msg_type == "tasks_status_request":
            asked.append(content)
            if len(asked) == 1:  # at the first look the new Hub still had it running
                return {"statuses": {m: "running" for m in content["msg_ids"]}}
        return real(msg_type, content, **kw)

    monkeypatch.setattr(client, "_query", query)
    monkeypatch.setattr(client, "RECONCILE_EVERY", 0.01)
    client._reconcile()
    assert fut.result(5) == 7 and len(asked) == 2


@pytest.mark.timeout(60)
def test_a_batch_that_cannot_be_signed_fails_its_tasks_and_the_client_goes_on(
        client: monq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    v = client.load_balanced_view()
    real = client.session.serialize

    def broken(msg_type: str, *a: Any, **kw: Any) -> Any:
        if msg_type == BATCH_REQUEST:
            raise ValueError("no signature today")
        return real(msg_type, *a, **kw)

    monkeypatch.setattr(client.session, "serialize", broken)
    with held(client):
        ars = [v.apply_async(noop) for _ in range(6)]
    for ar in ars:
        with pytest.raises(SerializationError, match="no signature today"):
            ar.get(timeout=20)
    monkeypatch.setattr(client.session, "serialize", real)
    # nothing was lost on the way: the same client keeps submitting, alone and in batches
    assert v.apply_sync(abs, -3) == 3
    with held(client):
        ars = [v.apply_async(abs, -i) for i in range(6)]
    assert [ar.get(timeout=20) for ar in ars] == list(range(6))
