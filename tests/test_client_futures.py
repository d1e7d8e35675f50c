"""The client's futures in a burst, counted (never timed).

A burst of ``apply_async`` holds an AsyncResult and a TaskFuture per task
until the replies come, and the I/O thread resolves them while the caller
goes on submitting, so what a future costs is paid per task:

- a future makes its Condition only when a thread waits on it: a burst whose
  results are read once they are done makes none;
- a pending task is a few objects for the cyclic garbage collector;
- creating, resolving and reading a task's futures is a few Python calls;
- a task's metadata mapping is made when first read, with the same content
  whether the reply came before or after;
- a batch reply's tasks share its header and are dispatched as one entry.

And the futures still behave as ``concurrent.futures`` futures: waiting
threads wake, ``wait``, ``as_completed``, asyncio, callbacks and cancel work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import sys
import threading
import time
from typing import Any

import cloudpickle
import pytest

import monq
import monq.client.futures as futures
from monq.client.io import IOThread
from monq.client.results import AsyncResult, TaskFuture
from monq.errors import ProtocolError
from monq.protocol import BATCH_REPLY, BatchBuilder, Session
from tests.conftest import wait_until
from tests.test_batching import held

KEY = b"k" * 32
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def noop() -> None:
    return None


def _count_conditions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    made: list[Any] = []

    class Counted(futures._Condition):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(futures, "_Condition", Counted)
    return made


# -- in a real burst -------------------------------------------------------------------


def test_a_burst_makes_no_condition_and_few_objects_per_pending_task(
        client: monq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    v = client.load_balanced_view()
    v.apply_sync(noop)  # warm up: the function's stream is cached
    made = _count_conditions(monkeypatch)
    n = 500
    ars: list[AsyncResult] = []
    gc.collect()
    gc.disable()
    try:
        with held(client):  # queued, as while the I/O thread sends in a burst
            before = len(gc.get_objects())
            ars.extend(v.apply_async(noop) for _ in range(n))
            per_task = (len(gc.get_objects()) - before) / n
            assert sum(1 for a in ars if not a.done()) == n
    finally:
        gc.enable()
    print(f"\n{per_task:.1f} objects tracked per pending task, queued")
    # AsyncResult, TaskFuture, QueuedTask, its metadata, buffers and raw flags,
    # the outbox's entry (19 before: two Conditions, bound methods, lists, a request tuple)
    assert per_task <= 8
    wait_until(lambda: all(a.done() for a in ars), 60, "the burst to end")
    assert [a.get(0) for a in ars] == [None] * n
    assert made == []  # nobody waited on a pending future: no Condition was made
    assert not client._tasks
    assert ars[0].metadata["status"] == "ok" and ars[0].metadata["engine"] in client.ids


# -- the futures alone ------------------------------------------------------------------


def _calls(fn: Any) -> list[str]:
    calls: list[str] = []

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)

    gc.collect()  # a collection while counting would count earlier tests' finalizers
    gc.disable()
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


def test_a_task_s_futures_are_a_few_python_calls_from_submission_to_result() -> None:
    def one() -> None:
        f = TaskFuture("m", time.time(), "task")
        a = AsyncResult([f])
        f.replied({"engine": 0, "started": 1.0}, "ok")
        f.set_result(3)
        assert a.get() == 3

    one()
    calls = _calls(one)
    print(f"\n{len(calls)} Python calls: {calls}")
    assert len(calls) <= 24  # 46 with concurrent.futures' Condition per future
    assert "_Condition" not in " ".join(calls) and "__enter__" not in calls


def test_futures_resolved_before_anyone_waits_make_no_condition(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made = _count_conditions(monkeypatch)
    seen: list[Any] = []
    ok, bad = TaskFuture("a", 1.0, "task"), TaskFuture("b", 1.0, "task")
    a, b = AsyncResult([ok]), AsyncResult([bad])
    a.add_done_callback(seen.append)
    ok.set_result(7)
    bad.set_exception(ValueError("no"))
    assert a.result(0) == 7 and a.exception(0) is None and a.done() and not a.running()
    assert isinstance(b.exception(0), ValueError)
    with pytest.raises(ValueError):
        b.result(0)
    b.add_done_callback(seen.append)  # added when done: called at once
    assert seen == [a, b]
    with pytest.raises(cf.InvalidStateError):
        ok.set_result(8)
    assert made == []
    assert "finished returned int" in repr(ok)


def test_waiting_threads_wake_whoever_resolves_and_whenever(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads wait on futures that are resolved before, while and after they start
    waiting (the race between making a Condition and resolving without one)."""
    n, threads = 2000, 4
    made = _count_conditions(monkeypatch)
    futs = [TaskFuture(str(i), 1.0, "task") for i in range(n)]
    ars = [AsyncResult([f]) for f in futs]
    got: list[list[Any]] = [[] for _ in range(threads)]

    def wait(k: int) -> None:
        for i in range(k, n, threads):
            got[k].append(ars[i].result(timeout=30) if i % 2 else futs[i].result(30))

    def resolve() -> None:
        for i, f in enumerate(futs):
            f.set_result(i)

    ts = [threading.Thread(target=wait, args=(k,)) for k in range(threads)]
    ts.append(threading.Thread(target=resolve))
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert sorted(x for g in got for x in g) == list(range(n))
    assert len(made) <= n  # at most one per future waited on while pending


def test_wait_as_completed_asyncio_and_cancel_still_work() -> None:
    futs = [TaskFuture(str(i), 1.0, "task") for i in range(3)]
    ars = [AsyncResult([f]) for f in futs]
    threading.Timer(0.05, futs[1].set_result, (1,)).start()
    done, pending = cf.wait(ars, timeout=30, return_when=cf.FIRST_COMPLETED)
    assert done == {ars[1]} and pending == {ars[0], ars[2]}
    threading.Timer(0.05, futs[0].set_result, (0,)).start()
    assert next(cf.as_completed([ars[0]], timeout=30)) is ars[0]

    async def main() -> Any:
        asyncio.get_running_loop().call_later(0.05, futs[2].set_result, 2)
        return await ars[2]

    assert asyncio.run(main()) == 2
    f = TaskFuture("c", 1.0, "task")
    a = AsyncResult([f])
    assert a.cancel() and a.cancelled() and a.done()
    with pytest.raises(cf.CancelledError):
        a.result(0)
    m = TaskFuture("m", 1.0, "task")
    both = AsyncResult([m, TaskFuture("n", 1.0, "task")], single=False)
    m.set_result(1)
    assert not both.done()
    both._children[1].set_result(2)
    assert both.result(0) == [1, 2]


def test_metadata_is_made_when_read_and_sees_the_reply_either_way() -> None:
    reply = {"engine": 1, "engine_uuid": "u", "stdout": "out", "stderr": "",
             "started": 10.0, "completed": 11.0, "received": 12.0}
    early, late = TaskFuture("m", 5.0, "task", engine=1), TaskFuture("m", 5.0, "task", 1)
    held_md = early.metadata  # read while pending: the same mapping is updated later
    assert held_md["status"] == "pending" and held_md["started"] is None
    assert late._md is None  # not made until read
    for f in (early, late):
        f.replied(reply, "ok")
    assert late._md is None
    assert early.metadata is held_md
    assert early.metadata == late.metadata
    md = late.metadata
    assert md["status"] == "ok" and md["stdout"] == "out" and md["engine_uuid"] == "u"
    assert md["started"].timestamp() == 10.0 and md["submitted"].timestamp() == 5.0
    md["status"] = "pending"  # the client's own changes (a resend) stay
    assert late.metadata["status"] == "pending"


# -- batch replies --------------------------------------------------------------------------


def _batch_reply(n: int) -> Any:
    sender = Session(KEY)
    b = BatchBuilder()
    for i in range(n):
        b.add({"parent": {"msg_id": f"t{i}"}, "metadata": {"engine": 0},
               "content": {"status": "ok"}}, [b"x%d" % i], [False])
    _, frames = sender.serialize(BATCH_REPLY, "task", {"tasks": b.entries},
                                 buffers=b.buffers, raw=b.raw)
    return Session(KEY).feed(frames)


def test_a_batch_reply_s_tasks_share_its_header_and_are_one_entry_to_dispatch() -> None:
    msg = _batch_reply(5)
    shared = Session(KEY).split_batch(msg, own_headers=False)
    assert all(m.header is msg.header for m in shared)
    assert [m.parent["msg_id"] for m in shared] == [f"t{i}" for i in range(5)]
    assert [bytes(m.buffers[0]) for m in shared] == [b"x%d" % i for i in range(5)]
    bad = _batch_reply(2)
    bad.content["tasks"][1]["b"] = [7]  # an index out of range: nothing of it is used
    with pytest.raises(ProtocolError):
        Session(KEY).split_batch(bad, own_headers=False)

    seen: list[str] = []

    def on_reply(m: Any) -> None:
        if m.parent["msg_id"] == "t1":
            raise RuntimeError("a handler failed")
        seen.append(m.parent["msg_id"])

    io = IOThread.__new__(IOThread)  # dispatch alone: no sockets
    io.on_reply = on_reply
    io.dispatch([("replies", shared)])
    assert seen == ["t0", "t2", "t3", "t4"]  # one failure does not stop the others
