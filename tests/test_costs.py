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
    assert d["in.task apply_request"] == 4000 and d["out.task apply_reply"] == 4000
    # engines report what they read but have not answered in batches (every 5 ms)
    assert d["hub tasks_received"] <= 4000 // 10, d
    assert d["hub task_started"] == 0, d  # no task ran long enough to be announced


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


def test_a_large_array_is_not_copied_on_the_way_out() -> None:
    a = np.arange(4_000_000, dtype=np.float64)  # 32 MB
    frames, raw = pack_apply(np.sum, (a,), {})
    assert raw == [False, False, True]
    assert np.shares_memory(np.frombuffer(frames[2], dtype=np.float64), a)
    assert sum(len(memoryview(f)) for f in frames[:2]) < 4096  # no data in the streams
