"""Thread hand-offs and wake-ups of a round trip, counted (never timed).

- a sequential ``apply_sync`` is sent and received by the caller's own thread:
  the client's I/O thread is neither woken nor used, nothing goes through the
  outbox, and the client sends one message per task;
- futures that no caller waits on (``apply_async`` with callbacks or
  ``concurrent.futures.wait``), callers in several threads and queries still
  resolve: the I/O thread takes over whenever no caller receives;
- an idle engine's link thread sleeps: it is not woken while nothing runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import select
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

import monq
import monq.client.io as client_io
from monq.cluster import Cluster, ClusterConfig
from monq.engine.engine import Engine


def test_a_sequential_apply_sync_stays_in_the_callers_thread(
        client: monq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    lb, direct = client.load_balanced_view(), client[client.ids[0]]
    assert lb.apply_sync(abs, -1) == 1 and direct.apply_sync(abs, -1) == 1  # warm up
    io = client._io
    sent: list[int] = []
    real_send = client_io.send_frames
    monkeypatch.setattr(client_io, "send_frames",
                        lambda sock, frames, flags=0: sent.append(len(frames)) or
                        real_send(sock, frames, flags))
    puts: list[Any] = []
    real_put = client._outbox.put
    monkeypatch.setattr(client._outbox, "put", lambda *a: puts.append(a) or real_put(*a))
    resolved_in: list[str] = []
    real_on_reply = client._on_reply

    def on_reply(msg: Any) -> None:
        resolved_in.append(threading.current_thread().name)
        real_on_reply(msg)

    monkeypatch.setattr(client, "_on_reply", on_reply)
    monkeypatch.setattr(io, "on_reply", on_reply)
    turns, wakeups = io.turns, io.wakeups
    for i in range(100):
        assert lb.apply_sync(abs, -i) == i
        assert direct.apply_sync(abs, -i) == i
    assert (io.turns - turns, io.wakeups - wakeups) == (0, 0)  # the I/O thread slept
    assert puts == []  # no message handed to another thread
    assert len(sent) == 200  # one message per task, nothing else (no bell, no retry)
    assert resolved_in == [threading.current_thread().name] * 200


def test_a_sequential_reply_is_read_without_a_raised_again(
        client: monq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the one reply a sequential ``apply_sync`` waits for, the caller asks the
    socket whether more wait instead of reading on until zmq.Again is raised (the
    exception cost the client ~10 us per round trip)."""
    lb = client.load_balanced_view()
    assert lb.apply_sync(abs, -1) == 1
    agains: list[int] = []
    real_recv = client_io.recv_frames
    me = threading.current_thread()

    def recv(sock: Any, flags: int = 0) -> Any:
        try:
            return real_recv(sock, flags)
        except zmq.Again:
            # (the I/O thread drains the Hub's notices, beats included, on its own)
            if threading.current_thread() is me:
                agains.append(1)
            raise

    monkeypatch.setattr(client_io, "recv_frames", recv)
    for i in range(50):
        assert lb.apply_sync(abs, -i) == i
    assert len(agains) <= 2  # (a reply that had not fully arrived on the first look)


def test_futures_resolve_with_or_without_a_waiting_caller(client: monq.Client) -> None:
    v = client.load_balanced_view()
    done: list[int] = []
    ars = [v.apply_async(abs, -i) for i in range(50)]
    for ar in ars:
        ar.add_done_callback(lambda f: done.append(f.result()))
    # nobody calls get(): the I/O thread receives
    finished, _ = cf.wait(ars, timeout=60)
    assert len(finished) == 50 and sorted(done) == list(range(50))

    # callers in several threads, mixing sync calls, gets and queries
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(30):
                assert v.apply_sync(abs, -i - k) == i + k
                ar = v.apply_async(abs, -i)
                if i % 3 == 0:
                    assert client.queue_status() is not None
                assert ar.get(timeout=60) == i
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert v.map_sync(abs, range(-20, 0)) == list(range(20, 0, -1))


def test_a_get_that_times_out_leaves_the_task_to_the_io_thread(client: monq.Client) -> None:
    ar = client.load_balanced_view().apply_async(time.sleep, 0.5)
    with pytest.raises(monq.TimeoutError):
        ar.get(timeout=0.01)
    # nobody waits any more: the I/O thread still receives the reply
    finished, _ = cf.wait([ar], timeout=30)
    assert finished and ar.result() is None


def _settled(link: Any) -> bool:
    """The link sleeps and its timer (left armed after the last task) has fired and
    been handled: its wake-up count will not change by itself."""
    if not link.asleep:
        return False
    if link.timer is None:
        return True
    p = select.poll()
    p.register(link.timer.fileno(), select.POLLIN)
    return not link.timer.pending() and not p.poll(0)


@pytest.mark.slow
def test_an_idle_engine_link_thread_sleeps(tmp_path: Path) -> None:
    cluster = Cluster(ClusterConfig(n=0, home=tmp_path / "idle"))
    engine: Engine | None = None
    runner: threading.Thread | None = None
    try:
        cluster.start(timeout=60)
        assert cluster.info is not None
        engine = Engine(cluster.info)
        engine.register()
        runner = threading.Thread(target=engine.run, daemon=True)
        runner.start()
        link = engine._link
        assert link is not None
        with monq.Client(connection_file=cluster.connection_file) as c:
            c.wait_for_engines(1, timeout=30)
            v = c.load_balanced_view()
            for i in range(20):
                assert v.apply_sync(abs, -i) == i
            deadline = time.monotonic() + 10
            while not _settled(link) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert link.asleep
            before = link.wakeups
            time.sleep(1.0)
            assert link.wakeups == before  # it used to wake every 5 ms: 200 times
            if link.timer is not None:
                # short tasks one after another: each start arms the timer (or finds the
                # link awake), no start writes to its pipe, and the link wakes only
                # where the next start came more than 5 ms after the last (the timer
                # fired in between: once after the last task, and wherever the OS
                # delayed a round trip).  The base woke at the first start, then looked
                # every 5 ms for 100 ms: 20 wake-ups and more.
                pipe_wakes = link.pipe_wakes
                slow = 0
                for i in range(50):
                    t0 = time.monotonic()
                    assert v.apply_sync(abs, -i) == i
                    slow += time.monotonic() - t0 >= 0.004
                while not _settled(link) and time.monotonic() < deadline + 10:
                    time.sleep(0.05)
                assert link.pipe_wakes == pipe_wakes
                # each such gap: the timer's wake-up, maybe one more look if the next
                # task had started meanwhile
                assert link.wakeups - before <= 3 * (slow + 1)
                before = link.wakeups
            # a task wakes it (to tell the Hub about a long one), then it sleeps again
            assert v.apply_sync(time.sleep, 0.05) is None
            assert link.wakeups > before
            ar = v.apply_async(time.sleep, 0.2)
            assert ar.get(timeout=30) is None
            assert ar.metadata["status"] == "ok"
    finally:
        if engine is not None:
            engine.stop()
            if runner is not None:
                runner.join(5)
            engine.close()
        cluster.stop()
