"""The client API against a real cluster: views, futures, map, arrays, errors."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os

import numpy as np
import pytest

import monq
from monq.client.results import AsyncMapResult


def test_ids_and_views(client: monq.Client) -> None:
    assert client.ids == [0, 1] or len(client.ids) == 2
    assert isinstance(client[0], monq.DirectView)
    assert client[:].targets == client.ids
    with pytest.raises(IndexError):
        client[99]


def test_apply_variants(client: monq.Client) -> None:
    v = client.load_balanced_view()
    ar = v.apply_async(lambda x, y=1: x * y, 6, y=7)
    assert isinstance(ar, cf.Future)
    assert ar.get(timeout=10) == 42
    assert ar.ready() and ar.successful() and ar.wait(0)
    assert v.apply_sync(pow, 2, 10) == 1024
    assert isinstance(v.apply(pow, 2, 3), monq.AsyncResult)  # block=False by default
    v.block = True
    assert v.apply(pow, 2, 3) == 8


def test_closures_and_partials(client: monq.Client) -> None:
    import functools

    base = 100

    def add(x: int) -> int:
        return x + base

    v = client.load_balanced_view()
    assert v.apply_sync(add, 1) == 101
    assert v.apply_sync(functools.partial(add, 2)) == 102


def test_metadata(client: monq.Client) -> None:
    v = client.load_balanced_view()

    def work() -> str:
        import sys

        print("to stdout")
        print("to stderr", file=sys.stderr)
        return "done"

    ar = v.apply_async(work)
    assert ar.get(10) == "done"
    md = ar.metadata
    assert md["engine"] in client.ids
    assert md["status"] == "ok"
    assert md["stdout"] == "to stdout\n"
    assert md["stderr"] == "to stderr\n"
    assert md["submitted"] <= md["started"] <= md["completed"]
    assert ar.msg_id == md["msg_id"]


def test_direct_view_targets_each_engine(client: monq.Client) -> None:
    pids = client[:].apply_sync(os.getpid)
    assert len(pids) == 2 and len(set(pids)) == 2
    for i in client.ids:
        ar = client[i].apply_async(os.getpid)
        assert ar.get(10) == pids[client.ids.index(i)]
        assert ar.metadata["engine"] == i


def test_push_pull_execute(client: monq.Client) -> None:
    dv = client[:]
    dv.push({"monq_test_value": 5}).get(10)
    assert dv.pull("monq_test_value").get(10) == [5, 5]
    dv.execute("monq_test_value2 = monq_test_value * 3").get(10)
    assert dv.pull(["monq_test_value", "monq_test_value2"]).get(10) == [[5, 15], [5, 15]]


def test_map_ordered_and_chunks(client: monq.Client) -> None:
    v = client.load_balanced_view()
    ar = v.map(lambda x: x * x, range(1000))
    assert isinstance(ar, AsyncMapResult)
    assert ar.get(30) == [x * x for x in range(1000)]
    ar = v.map_async(lambda a, b: a + b, range(10), range(10, 20), chunksize=3)
    assert len(ar.msg_ids) == 4  # 10 items in chunks of 3
    assert ar.get(10) == [a + b for a, b in zip(range(10), range(10, 20))]
    assert list(v.imap(str, range(5), chunksize=1)) == ["0", "1", "2", "3", "4"]
    assert client[:].map_sync(lambda x: -x, range(7)) == [-x for x in range(7)]


def test_map_unordered(client: monq.Client) -> None:
    v = client.load_balanced_view()

    def slow_first(x: int) -> int:
        import time

        time.sleep(0.5 if x == 0 else 0)
        return x

    ar = v.map_async(slow_first, range(6), chunksize=1, ordered=False)
    out = ar.get(20)
    assert sorted(out) == list(range(6))
    # engines take tasks in turn, so items queued behind the slow one wait too; but 1, on
    # the other engine, finishes long before 0
    assert out.index(0) > out.index(1)
    assert out != list(range(6))


def test_numpy_arrays_round_trip(client: monq.Client) -> None:
    v = client.load_balanced_view()
    cases = [
        np.arange(1_000_000, dtype="f8").reshape(1000, 1000),
        np.arange(200_000, dtype="i4").reshape(400, 500)[::2, ::3],  # non-contiguous
        np.asfortranarray(np.ones((300, 400), dtype="complex64")),
        np.zeros((0, 5), dtype="u2"),
        np.array([(1, 2.5)] * 10_000, dtype=[("a", "i8"), ("b", "f4")]),
        np.array(3.25),
    ]
    for a in cases:
        b = v.apply_sync(lambda x: x, a)
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(a, b)
    total = v.apply_sync(lambda x: float(x.sum()), cases[0])
    assert total == float(cases[0].sum())


def test_map_over_numpy_rows(client: monq.Client) -> None:
    a = np.random.default_rng(0).normal(size=(16, 50_000))
    sums = client.load_balanced_view().map_sync(lambda row: row.sum(), a)
    np.testing.assert_allclose(sums, a.sum(axis=1))


def test_remote_error(client: monq.Client) -> None:
    def boom(x: int) -> float:
        return x / 0

    ar = client.load_balanced_view().apply_async(boom, 1)
    with pytest.raises(monq.RemoteError) as info:
        ar.get(10)
    e = info.value
    assert e.ename == "ZeroDivisionError"
    assert e.evalue == "division by zero"
    assert "return x / 0" in e.traceback
    assert e.engine in client.ids
    assert e.msg_id == ar.msg_id
    assert not ar.successful()
    assert ar.metadata["status"] == "error"
    assert isinstance(e, monq.MonqError)


def test_error_in_map_chunk(client: monq.Client) -> None:
    ar = client.load_balanced_view().map_async(lambda x: 1 // (x - 3), range(6), chunksize=2)
    with pytest.raises(monq.RemoteError, match="ZeroDivisionError"):
        ar.get(10)


def test_timeout_is_clear(client: monq.Client) -> None:
    import time

    ar = client.load_balanced_view().apply_async(time.sleep, 1.0)
    with pytest.raises(monq.TimeoutError, match="not finished"):
        ar.get(timeout=0.05)
    assert ar.get(timeout=10) is None  # the task went on and finished


def test_awaitable(client: monq.Client) -> None:
    v = client.load_balanced_view()

    async def main() -> list[int]:
        return list(await asyncio.gather(v.apply_async(lambda: 1), v.apply_async(lambda: 2)))

    assert asyncio.run(main()) == [1, 2]


def test_futures_interop(client: monq.Client) -> None:
    v = client.load_balanced_view()
    ars = [v.apply_async(lambda i=i: i * 2) for i in range(20)]
    done, _ = cf.wait(ars, timeout=20)
    assert len(done) == 20
    assert sorted(f.result() for f in cf.as_completed(ars)) == [i * 2 for i in range(20)]


def test_many_tasks_from_threads(client: monq.Client) -> None:
    """Submitting from several threads at once loses nothing (one send lock, ordered seqs)."""
    v = client.load_balanced_view()
    with cf.ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda k: [v.apply_async(lambda j=j: j, ) for j in range(250)],
                                range(4)))
    for batch in batches:
        assert [a.get(30) for a in batch] == list(range(250))


def test_closed_client_fails_pending_and_refuses(cluster: object) -> None:
    import time

    c = monq.Client(connection_file=cluster.connection_file)  # type: ignore[attr-defined]
    ar = c.load_balanced_view().apply_async(time.sleep, 0.5)
    c.close()
    c.close()  # twice is fine
    with pytest.raises(monq.MonqError):
        ar.get(5)
    with pytest.raises(monq.MonqError, match="closed"):
        c.load_balanced_view().apply_async(time.sleep, 0)


def test_executor(client: monq.Client) -> None:
    with client.executor() as ex:
        assert isinstance(ex, cf.Executor)
        futs = [ex.submit(pow, 2, i) for i in range(10)]
        assert [f.result(timeout=10) for f in futs] == [2**i for i in range(10)]
        assert list(ex.map(abs, [-1, -2, 3], timeout=10)) == [1, 2, 3]
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)
    one = client.executor(targets=client.ids[-1])
    assert one.submit(os.getpid).result(10) == client[client.ids[-1]].apply_sync(os.getpid)


def test_scatter_gather(client: monq.Client) -> None:
    dv = client[:]
    dv.scatter("part", list(range(11))).get(10)
    parts = dv.pull("part").get(10)
    assert [len(p) for p in parts] == [6, 5]
    assert dv.gather("part").get(10) == list(range(11))
    a = np.arange(10.0)
    dv.scatter("arr", a).get(10)
    dv.execute("arr2 = arr * 2").get(10)
    np.testing.assert_array_equal(dv.gather("arr2").get(10), a * 2)
