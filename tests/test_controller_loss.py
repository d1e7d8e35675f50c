"""A client never waits forever on a controller that is gone."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import monq
from monq.cluster import Cluster, ClusterConfig


@pytest.mark.slow
def test_waiting_tasks_fail_when_the_controller_dies(tmp_path: Path) -> None:
    # restart=False: a controller that stays dead (a restarted one is test_reliability's)
    cluster = Cluster(ClusterConfig(n=1, home=tmp_path, heartbeat_period=0.2, restart=False))
    try:
        cluster.start(timeout=60)
        c = monq.Client(connection_file=cluster.connection_file)
        try:
            ar = c.load_balanced_view().apply_async(time.sleep, 60)
            time.sleep(0.3)
            os.kill(c.info.controller_pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(monq.NoClusterError, match="lost contact"):
                ar.get(timeout=30)
            assert time.monotonic() - t0 < 8  # grace is max(5 s, 5 heartbeats)
            assert ar.metadata["status"] == "lost"
        finally:
            c.close()
    finally:
        cluster.stop()


@pytest.mark.slow
def test_client_shutdown_stops_the_whole_cluster(monq_home: Path) -> None:
    from conftest import alive, cluster_pids, kill_cluster, run_monq, wait_until

    pids: list[int] = []
    try:
        r = run_monq("start", "--daemon", "-n", "2", timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
        pids = cluster_pids(monq_home)  # supervisor, controller, 2 engines
        assert len(pids) == 4 and alive(pids) == pids
        c = monq.Client()
        c.shutdown(wait=15)
        wait_until(lambda: not alive(pids), 20, f"pids {alive(pids)} to exit")
        with pytest.raises(monq.MonqError):
            c.load_balanced_view().apply_async(abs, 1)
        assert not (monq_home / "default" / "connection.json").exists()
    finally:
        kill_cluster(monq_home, extra=pids)
