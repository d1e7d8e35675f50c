"""Where the history goes: any SQLAlchemy URL, and it outlives the cluster."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

import monq
from monq.cluster import Cluster, ClusterConfig
from monq.hub.store import TaskStore


@pytest.mark.slow
def test_db_url_and_history_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "custom.db"
    cfg = ClusterConfig(n=1, home=tmp_path / "home", db_url=f"sqlite:///{db}")
    with Cluster(cfg) as cluster:
        cluster.start(timeout=60)
        with monq.Client(connection_file=cluster.connection_file) as c:
            first = c.load_balanced_view(label="day one").apply_async(lambda: "kept")
            assert first.get(10) == "kept"
    assert db.exists() and stat.S_IMODE(db.stat().st_mode) == 0o600
    assert not (cfg.profile_dir / "history.db").exists()
    with TaskStore(f"sqlite:///{db}") as store:
        assert store.get_task(first.msg_id)["status"] == "ok"  # type: ignore[index]

    # the next day: a new cluster on the same database still knows the old task
    with Cluster(cfg) as cluster:
        cluster.start(timeout=60)
        with monq.Client(connection_file=cluster.connection_file) as c:
            assert c.get_result(first.msg_id).get(10) == "kept"
            old = c.history(since="1 hour ago")
            assert [r.label for r in old if r.msg_id == first.msg_id] == ["day one"]
            # engine ids keep counting: the old engine 0 is not confused with the new one
            assert c.ids == [1]
            engines = c.cluster_status()["engines"]
            assert {e["id"]: e["status"] for e in engines}[0] in ("stopped", "dead")
