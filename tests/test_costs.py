"""What a task costs, counted (never timed): guards against gross regressions.

- messages through the Hub per task: a short task is two copies (request in,
  reply out) and nothing else; engines' receipts come in batches;
- SQL statements per batch of task records: a handful, not one per row;
- pickling: a function sent many times is pickled once and unpickled once;
- copies of a large array: none between the caller's array and the frame sent.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event

import monq
from monq.hub.store import TaskStore
from monq.serialize import pack_apply, unpack_apply


def received(client: monq.Client) -> collections.Counter[str]:
    return collections.Counter(client.cluster_status()["received"])


def test_a_short_task_is_two_messages_through_the_hub(client: monq.Client) -> None:
    v = client.load_balanced_view()
    v.apply_sync(abs, -1)  # warm up
    before = received(client)
    for i in range(200):
        assert v.apply_sync(abs, -i) == i
    d = received(client) - before
    d.pop("hub status_request", None)  # our own counting query
    assert d == {"in.task apply_request": 200, "out.task apply_reply": 200}, d


def test_a_burst_costs_few_receipts(client: monq.Client) -> None:
    v = client.load_balanced_view()
    before = received(client)
    ar = v.map_async(abs, range(4000), chunksize=1)
    assert ar.get(timeout=120) == list(range(4000))
    d = received(client) - before
    print(dict(d))
    # submitted faster than sent, the tasks go in batches (monq.protocol): count tasks
    assert d["in.task apply_request"] + d["in.task apply_batch tasks"] == 4000, d
    assert d["out.task apply_reply"] + d["out.task apply_batch_reply tasks"] == 4000, d
    # engines report what they read but have not answered in batches (every 5 ms)
    assert d["hub tasks_received"] <= 4000 // 10, d
    # a task is announced only if it runs 5 ms or more: on a loaded machine a few do
    assert d["hub task_started"] <= 4000 // 100, d


def test_a_batch_of_2000_records_is_a_few_statements(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path / 'h.db'}")
    statements: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        statements.append(statement.split()[0])

    try:
        rows = [{"msg_id": f"m{i}", "status": "pending", "client": "c", "queue": "task",
                 "submitted": 1.0 + i} for i in range(2000)]
        store.write(rows, [])
        n_insert = len(statements)
        statements.clear()
        store.write([], [{"msg_id": f"m{i}", "status": "ok", "started": 2.0 + i,
                          "completed": 3.0 + i, "stdout": "x"} for i in range(2000)])
        n_update = len(statements)
    finally:
        store.close()
    print(f"\n2,000 inserts: {n_insert} statements; 2,000 updates: {n_update}")
    assert n_insert <= 8 and n_update <= 16  # updates go in a few groups by columns set


def test_a_write_builds_no_sql_statement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counters' upserts are built once, not per write: building one (its
    ``excluded`` alias, columns, cache key) had been a third of the Hub's CPU when tasks
    come one at a time, a write every 20 ms for a few rows."""
    from monq.hub import aggregates

    built = collections.Counter()
    real = aggregates.sqlite_insert

    def counting(table: Any) -> Any:
        built[table.name] += 1
        return real(table)

    monkeypatch.setattr(aggregates, "sqlite_insert", counting)
    store = TaskStore(f"sqlite:///{tmp_path / 'h.db'}")
    try:
        for w in range(5):
            store.write([{"msg_id": f"m{w}", "status": "pending", "client": "c",
                          "queue": "task", "submitted": 1.0 + w}], [])
            store.write([], [{"msg_id": f"m{w}", "status": "ok", "started": 2.0 + w,
                              "completed": 3.0 + w, "engine": 0}])
        with store.engine.connect() as conn:
            counts = conn.exec_driver_sql(
                "SELECT status, sum(n) FROM task_counts GROUP BY status").all()
    finally:
        store.close()
    assert dict(counts).get("ok") == 5  # the counters did change, through the upserts
    assert built == collections.Counter(), built


def test_a_burst_batch_costs_no_per_row_python_calls_or_full_text_statements(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch as a Hub writes it in a burst (new pending tasks, and earlier ones that
    finished with empty stdout and stderr): the statements are a fixed handful, none
    for the full-text index (no row has text), no IN list re-rendered by SQLAlchemy
    (the state SELECT is plain SQL), and the aggregates are counted in bulk (a minute
    is worked out per minute, not per row)."""
    from sqlalchemy.sql import compiler

    from monq.hub import aggregates

    store = TaskStore(f"sqlite:///{tmp_path / 'h.db'}")
    statements: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        statements.append(" ".join(statement.split()[:3]))

    calls = collections.Counter[str]()
    expand = compiler.SQLCompiler._process_parameters_for_postcompile
    minute_of = aggregates.minute_of

    def counting_expand(self: Any, *a: Any, **kw: Any) -> Any:
        calls["expanded IN"] += 1
        return expand(self, *a, **kw)

    def counting_minute(s: float) -> int:
        calls["minute_of"] += 1
        return minute_of(s)

    def pending(i: int) -> dict[str, Any]:
        return {"msg_id": f"m{i:06d}", "status": "pending", "client": "c", "queue": "task",
                "submitted": 1000.0 + i / 100, "engine": None, "label": None,
                "request": b"f" * 600, "request_bytes": 600, "retries": 0}

    def done(i: int) -> dict[str, Any]:
        return {"msg_id": f"m{i:06d}", "status": "ok", "engine": i % 4,
                "started": 1001.0 + i / 100, "completed": 1001.5 + i / 100,
                "received": 1002.0 + i / 100, "stdout": "", "stderr": "",
                "result": b"r", "result_bytes": 1}

    try:
        store.write([pending(i) for i in range(2000)], [])
        store.write([pending(i) for i in range(2000, 3000)], [done(i) for i in range(1000)])
        monkeypatch.setattr(compiler.SQLCompiler, "_process_parameters_for_postcompile",
                            counting_expand)
        monkeypatch.setattr(aggregates, "minute_of", counting_minute)
        statements.clear()
        store.write([pending(i) for i in range(3000, 4000)],
                    [done(i) for i in range(1000, 2000)])
        monkeypatch.undo()
        print(f"\n1,000 inserts + 1,000 updates: {len(statements)} statements, {dict(calls)}")
        assert not [s for s in statements if "tasks_fts" in s], statements
        assert calls["expanded IN"] == 0, calls
        # the batch spans 20 s of submitted times, and its updates' 10 s: a few minutes
        assert calls["minute_of"] <= 6, calls
        # 7: the state SELECT, payloads, INSERT, UPDATE and one upsert per aggregate table
        assert len(statements) <= 8, statements
        assert store.count(status="ok") == 2000
    finally:
        monkeypatch.undo()
        store.close()


def test_a_function_is_pickled_once_for_many_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    import monq.serialize as ser

    dumps = []
    real = ser._dumps
    monkeypatch.setattr(ser, "_dumps", lambda obj, cb: dumps.append(obj) or real(obj, cb))

    def f(x: int) -> int:
        return x * 2

    frames = [pack_apply(f, (i,), {})[0] for i in range(100)]
    functions = [o for o in dumps if o is f]
    assert len(functions) == 1  # the function once, the arguments 100 times
    loaded = {id(unpack_apply(fr)[0]) for fr in frames}
    assert len(loaded) == 1  # unpickled once on the engine side


def test_a_pending_task_is_few_objects_for_the_garbage_collector() -> None:
    """A burst keeps two futures per task alive; every object the cyclic collector tracks
    makes its full passes over the growing heap longer (they were most of the client's
    CPU per task in a 20,000-task burst)."""
    import gc
    import time

    from monq.client.results import AsyncResult, TaskFuture

    keep = []
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        for _ in range(1000):
            keep.append(AsyncResult([TaskFuture("m", time.time(), "task")]))
        per_task = (len(gc.get_objects()) - before) / 1000
    finally:
        gc.enable()
    print(f"\n{per_task:.0f} objects tracked per pending task's futures")
    # 25 with concurrent.futures' own Condition, 14 with a lighter one; a future now makes
    # its Condition only when a thread waits on it (monq.client.results.LeanFuture)
    assert per_task <= 3
    f = keep[0]._children[0]
    f.set_result(7)
    assert keep[0].result(1) == 7  # and they still work as futures


def test_a_large_array_is_not_copied_on_the_way_out() -> None:
    a = np.arange(4_000_000, dtype=np.float64)  # 32 MB
    frames, raw = pack_apply(np.sum, (a,), {})
    assert raw == [False, False, True]
    assert np.shares_memory(np.frombuffer(frames[2], dtype=np.float64), a)
    assert sum(len(memoryview(f)) for f in frames[:2]) < 4096  # no data in the streams


# -- the Hub's own costs per task (recorded copies fed straight into a Hub) --------------


def _hub(tmp_path: Path) -> tuple[Any, Any]:
    import zmq

    from monq.hub.hub import Hub, HubConfig
    from monq.protocol import Session

    key = b"k" * 32
    store = TaskStore(f"sqlite:///{tmp_path / 'hub.db'}")
    return Hub(zmq.Context.instance(), Session(key), store, HubConfig()), Session(key)


def _copies(client: Any, engine: Any, n: int) -> tuple[list[list[Any]], list[list[Any]]]:
    """The monitor copies of ``n`` no-ops: their requests, and their replies."""
    import time

    import zmq

    requests, replies = [], []
    for _ in range(n):
        hdr, frames = client.serialize("apply_request", "task", content={},
                                       metadata={"func": "noop"}, buffers=[b"f" * 500, b"a"])
        requests.append([zmq.Frame(b"in.task"), zmq.Frame(b"client-ident"),
                         *(zmq.Frame(bytes(f)) for f in frames)])
        now = time.time()
        _, frames = engine.serialize("apply_reply", "task", content={"status": "ok"},
                                     parent=hdr, buffers=[b"r"],
                                     metadata={"engine": 0, "engine_uuid": "e0", "started": now,
                                               "completed": now, "stdout": "", "stderr": ""})
        replies.append([zmq.Frame(b"out.task"), zmq.Frame(b"client-ident"),
                        *(zmq.Frame(bytes(f)) for f in frames)])
    return requests, replies


def test_the_hub_holds_few_bytes_per_task_in_flight(tmp_path: Path) -> None:
    import gc
    import tracemalloc

    from monq.protocol import Session

    hub, client = _hub(tmp_path)
    try:
        n = 3000
        requests, _ = _copies(client, Session(client.key), n)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for frames in requests:
                hub._on_monitor(frames)
                frames.clear()  # what a frame caches (its bytes) is the Hub's only if kept
            hub.flush()
            gc.collect()
            held = (tracemalloc.get_traced_memory()[0] - before) / n
        finally:
            tracemalloc.stop()
        assert len(hub._inflight) == n and hub.store.count() == n
        print(f"\n{held:.0f} bytes held per task in flight")
        # a msg_id (81 B), a slotted record, the tracker's entry and the dicts' slots:
        # about 270 B; 100,000 tasks in flight stay under 40 MB
        assert held < 400, held
    finally:
        hub.close()


def test_a_short_task_is_one_insert_and_no_per_row_parameter_building(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.sql import compiler

    from monq.protocol import Session

    hub, client = _hub(tmp_path)
    statements: list[str] = []

    @event.listens_for(hub.store.engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        statements.append(" ".join(statement.split()[:3]))

    built = collections.Counter[str]()
    construct = compiler.SQLCompiler.construct_params
    init = compiler.SQLCompiler.__init__

    def counting_construct(self: Any, *a: Any, **kw: Any) -> Any:
        built["params"] += 1
        return construct(self, *a, **kw)

    def counting_init(self: Any, *a: Any, **kw: Any) -> None:
        built["compiled"] += 1
        init(self, *a, **kw)

    try:
        engine = Session(client.key)
        for round_ in range(3):
            requests, replies = _copies(client, engine, 1000)
            if round_ == 2:  # statements compiled and cached by the first rounds
                monkeypatch.setattr(compiler.SQLCompiler, "construct_params", counting_construct)
                monkeypatch.setattr(compiler.SQLCompiler, "__init__", counting_init)
                statements.clear()
            # the loop's flush holds new pending rows: replies that come before the
            # next flush make each task a single INSERT
            for frames in requests[:500]:
                hub._on_monitor(frames)
            hub.flush(hold=True)
            for frames in requests[500:] + replies[:500]:
                hub._on_monitor(frames)
            hub.flush(hold=True)
            for frames in replies[500:]:
                hub._on_monitor(frames)
            hub.flush(hold=True)
        monkeypatch.undo()
        assert hub.store.count(status="ok") == 3000 and not hub._inflight
        print(f"\n1,000 tasks: {len(statements)} statements, SQLAlchemy {dict(built)}")
        assert not [s for s in statements if s.startswith("UPDATE tasks")], statements
        assert sum(s.startswith("INSERT INTO tasks ") for s in statements) <= 3
        # SQLAlchemy builds parameters for its own few statements (aggregates, payloads),
        # never one set per task, and compiles nothing it has compiled before
        assert built["params"] <= 40, built
        assert built["compiled"] == 0, built
    finally:
        monkeypatch.undo()
        hub.close()
