"""Engines: heartbeats answered while busy, death noticed, output captured."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import monq
from monq.cluster import Cluster, ClusterConfig
from tests.conftest import wait_until

PERIOD = 0.2  # heartbeat period: an engine silent for 3 periods (0.6 s) is declared dead


@pytest.fixture
def fast_heart_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(ClusterConfig(n=2, home=tmp_path / "fh", heartbeat_period=PERIOD))
    try:
        c.start(timeout=60)
        yield c
    finally:
        c.stop()


@pytest.mark.slow
def test_busy_engine_is_not_declared_dead(fast_heart_cluster: Cluster) -> None:
    def busy_python(seconds: float) -> int:
        """Pure-Python spin: holds the GIL the whole time."""
        import time

        end = time.time() + seconds
        n = 0
        while time.time() < end:
            n += 1
        return n

    with monq.Client(connection_file=fast_heart_cluster.connection_file) as c:
        ids = c.wait_for_engines(2, timeout=20)
        ar = c[ids[0]].apply_async(busy_python, 10.0)
        assert ar.get(timeout=30) > 0
        assert c.ids == ids
        engines = {e["id"]: e for e in c.cluster_status()["engines"]}
        assert engines[ids[0]]["status"] == "alive"
        assert engines[ids[0]]["unregistered"] is None


@pytest.mark.slow
def test_killed_engine_is_noticed_and_its_direct_tasks_fail(fast_heart_cluster: Cluster) -> None:
    with monq.Client(connection_file=fast_heart_cluster.connection_file) as c:
        ids = c.wait_for_engines(2, timeout=20)
        victim = ids[0]
        pid = c[victim].apply_sync(os.getpid)
        running = c[victim].apply_async(time.sleep, 30)
        queued = c[victim].apply_async(lambda: 1)
        time.sleep(0.2)  # let the first task start
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(monq.EngineDied):
            running.get(timeout=10)
        detected = time.monotonic() - t0
        assert detected < 3.0, detected
        with pytest.raises(monq.EngineDied):
            queued.get(timeout=10)
        assert victim not in c.ids
        recs = {r["msg_id"]: r for r in c.db_query(
            {"msg_id": {"$in": [running.msg_id, queued.msg_id]}})}
        assert {r["status"] for r in recs.values()} == {"lost"}
        assert all(r["ename"] == "EngineDied" for r in recs.values())
        # the survivor keeps serving
        assert c.load_balanced_view().apply_sync(lambda: 5) == 5


def test_output_is_captured_per_task(client: monq.Client) -> None:
    def noisy(i: int) -> int:
        import sys

        print("out", i)
        sys.stderr.write(f"err {i}\n")
        return i

    v = client.load_balanced_view()
    ars = [v.apply_async(noisy, i) for i in range(6)]
    for i, ar in enumerate(ars):
        assert ar.get(10) == i
        assert ar.stdout == f"out {i}\n"
        assert ar.stderr == f"err {i}\n"


def test_huge_output_is_capped(client: monq.Client) -> None:
    ar = client.load_balanced_view().apply_async(lambda: print("x" * (3 << 20)))
    ar.get(20)
    assert len(ar.stdout) < (1 << 20) + 100
    assert "characters dropped" in ar.stdout


@pytest.mark.slow
def test_stopping_an_engine_answers_its_waiting_tasks(tmp_path: Path) -> None:
    """Tasks an engine has read but not started are answered ``aborted`` when it stops,
    not left for the client to wait on (one engine: the second task waits behind the
    first in it, as it did when a load-balanced pair landed on one engine)."""
    cluster = Cluster(ClusterConfig(n=1, home=tmp_path / "stop1", restart=False))
    try:
        cluster.start(timeout=60)
        with monq.Client(connection_file=cluster.connection_file) as c:
            v = c.load_balanced_view()
            running = v.apply_async(time.sleep, 600)
            waiting = [v.apply_async(abs, -i) for i in range(3)]
            wait_until(lambda: [r.status for r in c.history(msg_id=running.msg_id)]
                       == ["running"], 30, "the first task to start")
            cluster.stop(timeout=20)
            for ar in [running, *waiting]:
                with pytest.raises(monq.RemoteError) as info:
                    ar.get(timeout=10)
                assert info.value.ename == "Stopping"
                assert ar.metadata["status"] == "aborted"
            assert "before the task started" in str(waiting[0].exception())
    finally:
        cluster.stop()


@pytest.mark.slow
def test_stopping_a_cluster_aborts_running_tasks_at_once(tmp_path: Path) -> None:
    """A stop never waits for a long task: it is interrupted and answered as aborted."""
    cluster = Cluster(ClusterConfig(n=2, home=tmp_path / "stop"))
    try:
        cluster.start(timeout=60)
        c = monq.Client(connection_file=cluster.connection_file)
        try:
            v = c.load_balanced_view()

            def spin() -> None:
                while True:
                    pass

            long = [v.apply_async(time.sleep, 600), v.apply_async(spin)]
            time.sleep(0.5)
            t0 = time.monotonic()
            cluster.stop(timeout=20)
            assert time.monotonic() - t0 < 5
            for ar in long:
                with pytest.raises(monq.RemoteError) as info:
                    ar.get(timeout=10)
                assert info.value.ename == "Stopping"
                assert ar.metadata["status"] == "aborted"
        finally:
            c.close()
        # and the history says so: the Hub wrote its last batch before it stopped
        from monq.hub.store import TaskStore

        with TaskStore(cluster.config.db_url or
                       f"sqlite:///{cluster.config.profile_dir / 'history.db'}") as store:
            rows = store.db_query({"msg_id": {"$in": [a.msg_id for a in long]}})
        assert [r["status"] for r in rows] == ["aborted", "aborted"]
    finally:
        cluster.stop()


@pytest.mark.slow
def test_stop_ends_frozen_and_stubborn_engines(tmp_path: Path) -> None:
    """No orphans, whatever state the engines are in: frozen (SIGSTOP), or ignoring SIGTERM."""
    from monq.connection import pid_alive

    cluster = Cluster(ClusterConfig(n=2, home=tmp_path / "frozen"))
    try:
        cluster.start(timeout=60)
        pids = list(cluster.pids.values())
        with monq.Client(connection_file=cluster.connection_file) as c:
            frozen, stubborn = c.ids
            frozen_pid = c[frozen].apply_sync(os.getpid)

            def ignore_sigterm() -> None:
                import signal

                signal.signal(signal.SIGTERM, signal.SIG_IGN)

            c[stubborn].apply_sync(ignore_sigterm)
        os.kill(frozen_pid, signal.SIGSTOP)
        t0 = time.monotonic()
        cluster.stop(timeout=2.0)
        assert time.monotonic() - t0 < 10
        assert not any(pid_alive(p) for p in pids)
    finally:
        cluster.stop()
