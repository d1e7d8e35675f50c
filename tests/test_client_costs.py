"""What a task of a burst costs the client, counted (never timed).

``[v.apply_async(f) for _ in range(n)]`` then reading every result passes
through the client's submission path once per task and its reply path once
per task, so both are kept short (bench/client_costs.py measures the CPU):

- submitting a task is a dozen Python calls (28 before): the function's
  stream and name are kept from the task before, a call without arguments
  is the same two frames every time, tasks alike share their metadata;
- a task waiting for its reply is three objects for the cyclic garbage
  collector (its two futures and the queued request), four while queued (6
  and 7 before);
- a reply is four Python calls from dispatch to both futures settled (15
  before): recorded and settled under one lock;
- a batch of tasks without arguments carries their arguments' stream once,
  as it carries the function's.

And the shortcuts keep the behaviour: metadata, callbacks, waiting threads,
errors and arguments that are not plain all still work.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import cloudpickle
import numpy as np

import monq
from monq.client.io import QueuedTask, pack
from monq.client.results import AsyncResult
from monq.protocol import BATCH_REQUEST, Message, Session
from monq.serialize import pack_apply, pack_call, unpack_apply
from tests.test_batching import held

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def noop() -> None:
    return None


def _calls(fn: Callable[[], Any]) -> list[str]:
    """The Python functions ``fn`` calls (C calls not counted), in this thread.

    The collector is run first and kept off while counting: a collection during
    ``fn`` would count the finalizers (``__del__``, weakref callbacks) of whatever
    earlier tests left behind (12.56 calls per task in one full-suite run)."""
    calls: list[str] = []

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)

    gc.collect()
    gc.disable()
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


@contextmanager
def queued_only(client: monq.Client) -> Iterator[None]:
    """Hold the sockets; what is queued meanwhile is dropped, never sent (the test answers
    the tasks itself)."""
    with held(client):
        try:
            yield
        finally:
            with client._lock:
                client._outbox.take_locked()


def _replies(client: monq.Client, ars: list[AsyncResult], value: Any) -> list[Message]:
    """Replies to ``ars``' tasks as a batch reply gives them to the client."""
    header = {"msg_id": "r", "msg_type": "apply_batch_reply"}
    return [Message([], header, {"msg_id": a.msg_id},
                    {"engine": 0, "engine_uuid": "e", "status": "ok", "started": 1.0,
                     "completed": 2.0, "received": 1.0, "stdout": "", "stderr": ""},
                    {"status": "ok"}, [pickle.dumps(value)]) for a in ars]


def test_submitting_a_task_is_a_dozen_python_calls(client: monq.Client) -> None:
    v = client.load_balanced_view()
    v.apply_sync(noop)  # warm up: the function's stream is kept
    n = 50
    ars: list[AsyncResult] = []

    def burst() -> None:
        for _ in range(n):
            ars.append(v.apply_async(noop))

    with queued_only(client):
        calls = _calls(burst)
        for a in ars:
            client._tasks.pop(a.msg_id, None)
    per_task = (len(calls) - 1) / n  # burst's own call
    print(f"\n{per_task:.1f} Python calls per task submitted: {calls[:20]}")
    # 28 at a4c9454 (pack_apply's cache look-up, generator, comprehensions, plain-type
    # walk and name; offload; two futures' set-up and the AsyncResult's callback chain)
    assert per_task <= 12.5, calls[:40]  # (and the bell rung once)
    assert "pack_apply" not in calls and "func_name" not in calls and "offload" not in calls


def test_a_pending_task_is_three_objects_for_the_garbage_collector(
        client: monq.Client) -> None:
    v = client.load_balanced_view()
    v.apply_sync(noop)
    n = 500
    ars: list[AsyncResult] = []
    gc.collect()
    gc.disable()
    try:
        with queued_only(client):  # queued, as while the I/O thread sends in a burst
            before = len(gc.get_objects())
            ars.extend(v.apply_async(noop) for _ in range(n))
            queued = (len(gc.get_objects()) - before) / n
        # the queue dropped: what a task keeps once sent, until its reply (the replies of
        # sent tasks would free some meanwhile: these are answered below)
        sent = (len(gc.get_objects()) - before) / n
    finally:
        gc.enable()
    print(f"\n{queued:.2f} objects tracked per queued task, {sent:.2f} once sent")
    client._io.dispatch([("replies", _replies(client, ars, None))])
    assert [a.get(0) for a in ars] == [None] * n and not client._tasks
    # 7 and 6 at a4c9454: the futures, the queued task, its metadata, buffer and
    # raw-flag lists, the outbox's entry; now the futures, the queued task and the entry
    assert queued <= 4.1
    assert sent <= 3.1


def test_a_reply_is_four_python_calls_to_both_futures_settled(client: monq.Client) -> None:
    v = client.load_balanced_view()
    v.apply_sync(noop)
    n = 50
    with queued_only(client):
        ars = [v.apply_async(noop) for _ in range(n)]
    msgs = _replies(client, ars, 7)
    calls = _calls(lambda: client._io.dispatch([("replies", msgs)]))
    per_reply = (len(calls) - 2) / n  # the lambda and dispatch itself
    print(f"\n{per_reply:.1f} Python calls per reply: {calls[:12]}")
    assert [a.get(0) for a in ars] == [7] * n
    # 15 at a4c9454 (replied, deserialize's helpers, set_result, _finish and the
    # callbacks of both futures)
    assert per_reply <= 4
    md = ars[0].metadata  # still made from the reply when first read
    assert md["status"] == "ok" and md["engine"] == 0 and md["started"] is not None


def test_a_reply_settles_futures_that_are_watched_waited_on_or_read(
        client: monq.Client) -> None:
    """The one-step settling only takes the usual case: a callback, a waiting thread or
    metadata read before the reply still see everything."""
    v = client.load_balanced_view()
    v.apply_sync(noop)
    with queued_only(client):
        ars = [v.apply_async(noop) for _ in range(5)]
    called: list[Any] = []
    ars[0].add_done_callback(lambda f: called.append(f.result()))
    ars[1]._children[0].add_done_callback(lambda f: called.append(f.result()))
    assert ars[2].metadata["status"] == "pending"  # read before the reply
    # an AsyncResult of the AsyncResults (as users combine them) watches each of them
    outer = AsyncResult(ars, single=False)
    woke: list[Any] = []
    waiter = threading.Thread(target=lambda: woke.append(ars[3]._children[0].result(10)))
    waiter.start()
    try:
        cf.wait([ars[3]], timeout=0.05)  # makes its Condition
        client._io.dispatch([("replies", _replies(client, ars, 5))])
    finally:
        waiter.join(10)
    assert [a.get(0) for a in ars] == [5] * 5
    assert called == [5, 5] and woke == [5]
    # the last is watched by nothing but ``outer``: settled, it settles ``outer``
    assert outer.done() and outer.result(0) == [5] * 5
    assert ars[2].metadata["status"] == "ok" and ars[2].metadata["engine"] == 0
    assert all(a.metadata["status"] == "ok" for a in ars)


def test_a_batch_of_tasks_without_arguments_carries_their_arguments_once() -> None:
    client, engine = Session(b"k" * 32), Session(b"k" * 32)
    items = []
    for _ in range(40):
        buffers, raw, name = pack_call(noop, (), {})
        hdr = client.header("apply_request", "task")
        items.append((b"task", QueuedTask(hdr, {"func": name}, buffers, raw, ())))
    (_, frames, ids), = pack(items, client, engines=1)
    msg = engine.feed(frames)
    assert msg.msg_type == BATCH_REQUEST and len(ids) == 40
    assert len(msg.buffers) == 2  # the function's stream and the (empty) arguments' stream
    for m in engine.split_batch(msg):
        f, args, kwargs = unpack_apply(m.buffers)
        assert (args, kwargs) == ((), {}) and f() is None


def test_pack_call_gives_pack_apply_s_frames() -> None:
    big = np.arange(100_000, dtype=np.float64)
    for args, kwargs in [((), {}), ((1, "a"), {}), ((), {"k": [1, 2]}), ((big,), {}),
                         ([3], {})]:
        frames, raw, name = pack_call(abs, args, kwargs)  # type: ignore[arg-type]
        want, want_raw = pack_apply(abs, args, kwargs)
        assert [bytes(memoryview(f)) for f in frames] == \
               [bytes(memoryview(f)) for f in want]
        assert list(raw) == want_raw and name == "abs"
    # the function packed last is kept, but a new one is packed anew
    assert pack_call(noop, (), {})[0][0] == pack_apply(noop, (), {})[0][0]
    assert pack_call(abs, (), {})[2] == "abs"


def test_a_burst_with_arguments_labels_and_errors_still_comes_back(
        client: monq.Client) -> None:
    v = client.load_balanced_view(label="burst-costs", retries=1)
    ars = [v.apply_async(divmod, 7, i) for i in range(1, 40)]
    ars.append(v.apply_async(divmod, 1, 0))
    assert [a.get(60) for a in ars[:-1]] == [divmod(7, i) for i in range(1, 40)]
    try:
        ars[-1].get(60)
    except monq.RemoteError as e:
        assert e.ename == "ZeroDivisionError"
    else:
        raise AssertionError("the error did not come back")
    assert ars[0].metadata["status"] == "ok" and ars[-1].metadata["status"] == "error"
    rec = client.task_record(ars[0].msg_id)
    assert rec.label == "burst-costs"
