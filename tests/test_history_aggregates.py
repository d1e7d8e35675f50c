"""The maintained aggregates (schema 3; the histogram's lo/hi, schema 5) stay equal to a
full GROUP BY over tasks."""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from monq.hub import aggregates as agg
from monq.hub.schema import duration_hist, minute_counts, task_counts, tasks
from monq.hub.store import FINISHED, STATUSES, TaskStore

LABELS = [None, "a", "b", "c"]
ENGINES = [None, 0, 1, 2]


def _maintained(s: TaskStore) -> tuple[Counter[Any], dict[Any, Any], Counter[Any]]:
    """The three tables; the histogram as {key: (n, lo, hi)}."""
    with s.engine.connect() as conn:
        counts = Counter({(r.status, r.engine, r.label): r.n
                          for r in conn.execute(select(task_counts)) if r.n})
        hist = {(r.engine, r.label, r.status, r.bucket): (r.n, r.lo, r.hi)
                for r in conn.execute(select(duration_hist)) if r.n}
        minutes = Counter({(r.minute, r.status): r.n
                           for r in conn.execute(select(minute_counts)) if r.n})
    return counts, hist, minutes


def _recount(s: TaskStore) -> tuple[Counter[Any], dict[Any, Any], Counter[Any]]:
    """What a full GROUP BY over the tasks table gives (exact min and max per bucket)."""
    counts: Counter[Any] = Counter()
    hist: dict[Any, Any] = {}
    minutes: Counter[Any] = Counter()
    c = tasks.c
    with s.engine.connect() as conn:
        for st, e, lab, sub, d in conn.execute(
                select(c.status, c.engine, c.label, c.submitted, c.duration)):
            ek, lk = agg.engine_key(e), agg.label_key(lab)
            counts[(st, ek, lk)] += 1
            if d is not None:
                k = (ek, lk, st, agg.bucket(d))
                n, lo, hi = hist.get(k, (0, d, d))
                hist[k] = (n + 1, min(lo, d), max(hi, d))
            if sub is not None:
                minutes[(agg.minute_of(sub), st)] += 1
    return counts, hist, minutes


def _row(rnd: random.Random, i: int) -> dict[str, Any]:
    sub = None if rnd.random() < 0.05 else 6000.0 + rnd.random() * 600
    row: dict[str, Any] = {"msg_id": f"t{i}", "status": rnd.choice(STATUSES),
                           "engine": rnd.choice(ENGINES), "label": rnd.choice(LABELS),
                           "submitted": sub}
    if sub is not None and rnd.random() < 0.7:
        row["started"] = sub + rnd.random()
        if rnd.random() < 0.8:
            row["completed"] = row["started"] + rnd.lognormvariate(-3, 2)
    return row


def _update(rnd: random.Random, msg_id: str) -> dict[str, Any]:
    up: dict[str, Any] = {"msg_id": msg_id}
    for key, gen in (("status", lambda: rnd.choice(STATUSES)),
                     ("engine", lambda: rnd.choice(ENGINES)),
                     ("label", lambda: rnd.choice(LABELS)),
                     ("started", lambda: 6000.0 + rnd.random() * 600),
                     ("completed", lambda: 6300.0 + rnd.random() * 600),
                     ("submitted", lambda: 5900.0 + rnd.random() * 900),
                     ("stdout", lambda: "some text")):
        if rnd.random() < 0.4:
            up[key] = gen()
    return up


def _exact(s: TaskStore, fn: Any) -> Any:
    s.aggregates = False
    try:
        return fn()
    finally:
        s.aggregates = True


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with TaskStore(f"sqlite:///{tmp_path / 'h.db'}") as s:
        yield s


@pytest.mark.parametrize("recount", ["walk", "seek"])
def test_random_batches_keep_the_aggregates_equal_to_group_by(
        store: TaskStore, recount: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # a histogram row that lost a task at a bound has its lo/hi recounted by seeks into the
    # duration index or by a walk over its status' tasks: each way forced in turn
    ways: list[str] = []

    def choose(status: str, seeks: float, walk: int) -> str:
        ways.append("seek" if status == "ok" or recount == "seek" else "walk")
        return ways[-1]

    monkeypatch.setattr(agg, "_refresh_choice", choose)
    rnd = random.Random(42)
    next_id = 0
    for step in range(60):
        known = [f"t{i}" for i in range(next_id)]
        ins = []
        for _ in range(rnd.randrange(0, 60)):
            ins.append(_row(rnd, next_id))
            next_id += 1
        if known and rnd.random() < 0.15:  # a msg_id seen twice: the retry-as-update path
            again = _row(rnd, 0)
            again["msg_id"] = rnd.choice(known)
            ins.append(again)
        ups = []
        pool = known + [r["msg_id"] for r in ins] + ["unknown"]
        for _ in range(rnd.randrange(0, 60)):
            ups.append(_update(rnd, rnd.choice(pool)))
        store.write(ins, ups)
        r = rnd.random()
        if known and r < 0.2:
            store.purge(msg_ids=rnd.sample(known, min(len(known), 15)))
        elif r < 0.3:
            store.delete_oldest(rnd.randrange(1, 10))
        elif r < 0.35:
            store.purge(status=rnd.choice(FINISHED), engine=rnd.choice([0, 1, 2]))
        assert _maintained(store) == _recount(store), step
    assert store.total_tasks() > 100
    assert ways.count(recount) > 10  # the way under test did recount rows


def _fill(store: TaskStore, n: int = 1500, seed: int = 7) -> None:
    rnd = random.Random(seed)
    rows = [_row(rnd, i) for i in range(n)]
    store.write(rows[:n // 2], [])
    store.write(rows[n // 2:], [_update(rnd, f"t{rnd.randrange(n // 2)}") for _ in range(300)])


FILTERS: list[dict[str, Any]] = [
    {}, {"status": "ok"}, {"status": ["error", "timeout"]}, {"engine": 1},
    {"engine": [0, 2]}, {"label": "a"}, {"label": ["a", "b"]},
    {"status": "ok", "engine": 0, "label": "b"}, {"status": "nope"},
]


@pytest.mark.parametrize("by", ["status", "engine", "label"])
def test_counts_from_the_aggregates_equal_the_exact_ones(store: TaskStore, by: str) -> None:
    _fill(store)
    for f in FILTERS:
        got = store.task_stats(by, **f)
        assert got == _exact(store, lambda f=f: store.task_stats(by, **f)), f  # type: ignore[misc]
        assert store.count(**f) == _exact(store, lambda f=f: store.count(**f)), f  # type: ignore[misc]
    assert None in dict(store.task_stats(by)) or by == "status"  # NULL keys map back


@pytest.mark.parametrize("size", ["minute", "hour"])
def test_time_buckets_from_the_aggregates_equal_the_exact_ones(store: TaskStore,
                                                              size: str) -> None:
    _fill(store)
    rnd = random.Random(3)
    cases: list[dict[str, Any]] = [{}, {"status": "ok"}, {"since": 6120.0},
                                   {"since": 6000.0, "until": 6600.0}]
    for _ in range(30):
        a = 5900 + rnd.random() * 900
        b = a + rnd.random() * 400
        cases.append({"since": a, "until": b})
        cases.append({"since": a, "until": b, "status": rnd.sample(STATUSES, 2)})
        cases.append({"until": b})
        cases.append({"since": a, "until": a + rnd.random() * 30})  # inside one minute
    for f in cases:
        got = store.task_stats(size, **f)
        assert got == _exact(store, lambda f=f: store.task_stats(size, **f)), f  # type: ignore[misc]


@pytest.mark.parametrize("by", [None, "engine", "label"])
def test_percentiles_from_the_histogram_are_within_one_bucket(store: TaskStore,
                                                             by: str | None) -> None:
    _fill(store)
    ps = [0, 1, 25, 50, 90, 99, 99.9, 100]
    for f in FILTERS:
        got = store.duration_percentiles(by, ps, **f)
        want = store.duration_percentiles(by, ps, exact=True, **f)
        assert [g["key"] for g in got] == [g["key"] for g in want] or \
            {g["key"] for g in got} == {g["key"] for g in want}, f
        exact = {g["key"]: g for g in want}
        for g in got:
            w = exact[g["key"]]
            assert g["n"] == w["n"] and g["min"] == w["min"] and g["max"] == w["max"]
            for p in ps:
                name = f"p{p:g}"
                assert g[name] >= w[name], (f, name)
                assert abs(agg.bucket(g[name]) - agg.bucket(w[name])) <= 1, (f, name)


def test_a_batch_costs_a_handful_of_statements(store: TaskStore) -> None:
    rnd = random.Random(5)
    store.write([_row(rnd, i) for i in range(1000)], [])
    calls: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        calls.append(statement.split()[0].upper())

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        ins = [_row(rnd, i) for i in range(1000, 2000)]
        ups = [{"msg_id": f"t{i}", "status": "ok", "completed": 7000.0 + i}
               for i in range(1000)]
        store.write(ins, ups)
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert len(calls) <= 16, calls
    assert _maintained(store) == _recount(store)


def test_a_version_2_history_is_upgraded_with_its_aggregates(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    with TaskStore(f"sqlite:///{path}") as s:
        _fill(s)
        want = _recount(s)
        stats = s.task_stats("label"), s.task_stats("minute")
    with sqlite3.connect(path) as conn:  # what the version-2 code left
        for t in ("task_counts", "duration_hist", "minute_counts"):
            conn.execute(f"DROP TABLE {t}")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with TaskStore(f"sqlite:///{path}") as s:
        assert _maintained(s) == want
        assert (s.task_stats("label"), s.task_stats("minute")) == stats
        assert s.total_tasks() == 1500
        s.write([_row(random.Random(1), 5000)], [])
        assert _maintained(s) == _recount(s)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                            ).fetchone() == ("5",)


def test_buckets_and_minutes() -> None:
    assert agg.bucket(0.0) == 0 and agg.bucket(-1.0) == 0 and agg.bucket(1e9) == 219
    for d in (1e-5, 0.003, 0.2, 1.0, 7.5, 3600.0):
        b = agg.bucket(d)
        assert agg.bucket_upper(b - 1) <= d < agg.bucket_upper(b)
        assert agg.bucket_upper(b) / agg.bucket_upper(b - 1) == pytest.approx(10 ** 0.05)
    for s in (0.0, 59.999999, 60.0, 1_700_000_000.0 - 1e-6, -0.5):
        m = agg.minute_of(s)
        assert m * 60 <= s < (m + 1) * 60
