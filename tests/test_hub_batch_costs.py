"""What the Hub's CPU per task in a burst is made of, counted (never timed).

A burst's tasks reach the Hub in batches (``apply_batch`` copies, then
``apply_batch_reply`` copies of ~60 tasks each), and the Hub recording them
was the cluster's bottleneck: ~156 function calls per task at a4c9454 (a
replay of a recorded burst).  What is counted here is every Python and C
function call (``sys.setprofile``) to verify, record and write such batches,
the way the loop does in a burst: the request copies, a flush that holds the
new pending rows, the engine's receipts, the reply copies, and the write of
the finished rows.
"""

from __future__ import annotations

import collections
import gc
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from monq.hub import hub as hub_module
from monq.hub.hub import Hub, HubConfig, _Engine
from monq.hub.store import TaskStore
from monq.protocol import BATCH_REPLY, BATCH_REQUEST, BatchBuilder, Session, new_id

KEY = b"k" * 32
#: tasks per batch, and batches (of requests, and as many of replies)
PER_BATCH, BATCHES = 60, 20


Copies = list[list[Any]]


def _burst(client: Session, engine: Session) -> tuple[Copies, Copies, Copies]:
    """The monitor copies of a burst of no-ops, as a client and an engine batch them:
    one function frame for all the tasks of a batch, arguments and results of a few
    bytes each (each task's own frame), the client's metadata (a function name and a
    shared-memory entry without buffers), an engine's times and empty output; and the
    engine's receipts (``tasks_received``: the msg_ids it has read), one per batch."""
    func = b"f" * 513
    shm = {"host": "h", "pid": 1, "min": 524288}
    requests: Copies = []
    replies: Copies = []
    receipts: Copies = []
    for _ in range(BATCHES):
        req, rep = BatchBuilder(), BatchBuilder()
        ids = []
        for _ in range(PER_BATCH):
            msg_id = new_id()
            ids.append(msg_id)
            req.add({"msg_id": msg_id, "date": time.time(),
                     "metadata": {"func": "bench.noop", "shm": dict(shm)}},
                    [func, bytes(bytearray(17))], [False, False])  # its own frame
            now = time.time()
            rep.add({"parent": {"msg_id": msg_id, "session": client.session_id,
                                "date": now, "msg_type": "apply_request"},
                     "metadata": {"engine": 0, "engine_uuid": "e0", "status": "ok",
                                  "received": now, "started": now, "completed": now + 1e-4,
                                  "stdout": "", "stderr": ""},
                     "content": {"status": "ok"}}, [bytes(bytearray(b"\x80\x05N."))],
                    [False])
        for session, b, kind, where, out in (
                (client, req, BATCH_REQUEST, b"in.task", requests),
                (engine, rep, BATCH_REPLY, b"out.task", replies)):
            _, frames = session.serialize(kind, "task", {"tasks": b.entries},
                                          buffers=b.buffers, raw=b.raw)
            # as the Hub receives them (monq.frames.recv_frames: small frames as bytes)
            out.append([where, b"client-ident", *(bytes(f) for f in frames)])
        _, frames = engine.serialize("tasks_received", "link",
                                     {"engine_uuid": "e0", "msg_ids": ids})
        receipts.append([zmq.Frame(b"e0"), *(zmq.Frame(bytes(f)) for f in frames)])
    return requests, replies, receipts


def _calls_per_task(hub: Hub, requests: Copies, replies: Copies, receipts: Copies
                    ) -> tuple[float, float, collections.Counter[str]]:
    """(function calls per task, those made by monq.hub's own code, the calls by name)."""
    calls = own = 0
    by: collections.Counter[str] = collections.Counter()
    here = str(Path(hub_module.__file__).parent)

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls, own
        if event == "call":
            name = frame.f_code.co_name
            caller = frame.f_back
        elif event == "c_call":
            name = f"{frame.f_code.co_name} > {getattr(arg, '__qualname__', '?')}"
            caller = frame
        else:
            return
        calls += 1
        by[name] += 1
        if caller is not None and caller.f_code.co_filename.startswith(here):
            own += 1

    gc.collect()  # a collection while counting would count earlier tests' finalizers
    gc.disable()
    sys.setprofile(count)
    try:
        for frames in requests:
            hub._on_monitor(frames)
        hub.flush(hold=True)  # the loop's flush: new pending rows are held for their replies
        for frames in receipts:
            hub._on_received(hub.session.feed(frames))  # (what _on_router leads to)
        for frames in replies:
            hub._on_monitor(frames)
        hub.flush()
    finally:
        sys.setprofile(None)
        gc.enable()
    n = PER_BATCH * BATCHES
    return calls / n, own / n, by


def test_a_batched_task_costs_the_hub_few_function_calls(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path / 'hub.db'}")
    hub = Hub(zmq.Context.instance(), Session(KEY), store, HubConfig())
    writes: list[tuple[int, int]] = []
    write = store.write

    def counted(inserts: Any, updates: Any) -> None:
        writes.append((len(inserts), len(updates)))
        write(inserts, updates)

    try:
        # an engine registered (as Hub._register would, without its sockets)
        hub._engines["e0"] = _Engine(0, "e0", "host", 1, time.time())
        hub.tracker.engine_added("e0")
        client, engine = Session(KEY), Session(KEY)
        # a first burst: statements compiled, row shapes checked (as in a running Hub)
        _calls_per_task(hub, *_burst(client, engine))
        store.write = counted  # type: ignore[method-assign]
        per_task, own, by = _calls_per_task(hub, *_burst(client, engine))
        n = PER_BATCH * BATCHES
        assert store.count(status="ok") == 2 * n and not hub._inflight
        assert writes == [(n, 0)]  # each task one INSERT, finished
        rows = store.db_query({"status": "ok"}, ["request_bytes", "result_bytes", "func",
                                                 "duration"])
        assert {(r["request_bytes"], r["result_bytes"], r["func"]) for r in rows} == \
            {(530, 4, "bench.noop")}
        assert all(r["duration"] is not None and r["duration"] > 0 for r in rows)
        print(f"\n{per_task:.1f} function calls per task, {own:.1f} by monq.hub; most: "
              f"{by.most_common(30)}")
        # a4c9454: 139 per task, 105 of them by monq.hub's own code (its handlers, the store,
        # the payloads, the aggregates); now 75 and 48.  The rest is the protocol's
        # verification and split (monq.protocol: ~25, not the Hub's to cut) and SQLAlchemy's
        # per-write calls
        assert per_task < 100, (per_task, by.most_common(20))
        assert own < 60, (own, by.most_common(20))
    finally:
        hub.close()


def test_a_held_row_of_a_batched_task_is_small(tmp_path: Path) -> None:
    """The rows of a burst's pending tasks wait in memory for their replies (at most
    ``hold_rows`` of them): a batch's tasks share one blob of their equal buffers and
    one string of their function's name, so that a row is ~0.6 KB (a4c9454: ~1.2 KB,
    a blob and strings of its own), and ``hold_rows`` 16,000 hold what 10,000 did."""
    import gc
    import tracemalloc

    store = TaskStore(f"sqlite:///{tmp_path / 'hub.db'}")
    hub = Hub(zmq.Context.instance(), Session(KEY), store, HubConfig())
    try:
        requests, _, _ = _burst(Session(KEY), Session(KEY))
        n = PER_BATCH * BATCHES
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for frames in requests:
                hub._on_monitor(frames)
                frames.clear()  # what the Hub keeps of a copy is its own
            hub.flush(hold=True)
            gc.collect()
            held = (tracemalloc.get_traced_memory()[0] - before) / n
        finally:
            tracemalloc.stop()
        assert len(hub._held) == n and store.count() == 0
        print(f"\n{held:.0f} bytes per task in flight, its row held")
        # the task in flight (~270 B: see test_costs) and its held row
        assert held < 1000, held
        assert hub.config.hold_rows * (held - 270) <= 10_000 * 1200
    finally:
        hub.close()
