"""What starting a cluster costs, counted (never timed): guards against regressions.

- imports: each process imports what it needs and no more.  On a 2-core
  machine the controller and the engines start at the same time, so an
  engine that imports numpy (0.15 s) or SQLAlchemy (0.3 s) delays the
  controller too; the client side (asyncio, concurrent.futures, numpy) is
  needed by neither;
- the supervisor waits on the controller's ready pipe and the Hub's
  announcements, not by polling files or the Hub.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import monq.cluster
from monq.cluster import Cluster, ClusterConfig

REPO = Path(__file__).resolve().parent.parent


def modules_after(code: str, no_site: bool = False) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (this checkout's monq)."""
    env = monq.cluster._no_site_env()
    r = subprocess.run(
        [sys.executable, *(["-S"] if no_site else []), "-c",
         f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.splitlines()[-1]))


def test_an_engine_imports_neither_the_hub_nor_the_client_nor_numpy() -> None:
    mods = modules_after("import monq.engine.engine")
    assert {"zmq", "cloudpickle", "monq.protocol", "monq.serialize"} <= mods
    unwanted = {"numpy", "sqlalchemy", "monq.hub", "monq.client", "asyncio",
                "concurrent.futures", "tqdm"}
    assert mods & unwanted == set()


def test_the_controller_imports_neither_the_client_nor_numpy_nor_other_dialects() -> None:
    # as the supervisor starts it: python -S, its sys.path as PYTHONPATH
    mods = modules_after("import monq.hub.controller", no_site=True)
    assert {"zmq", "sqlalchemy", "monq.hub.hub", "monq.hub.store"} <= mods
    assert "site" not in mods
    unwanted = {"numpy", "cloudpickle", "monq.client", "monq.serialize", "tqdm",
                "sqlalchemy.orm", "sqlalchemy.dialects.postgresql"}
    assert mods & unwanted == set()


def test_the_supervisor_and_the_cli_import_no_database_nor_client() -> None:
    mods = modules_after("import monq.cluster, monq.cli")
    unwanted = {"numpy", "sqlalchemy", "zmq", "cloudpickle", "monq.client", "monq.hub.store",
                "asyncio"}
    assert mods & unwanted == set()


def test_import_monq_is_light_and_its_names_still_resolve() -> None:
    mods = modules_after("import monq")
    assert mods & {"zmq", "numpy", "cloudpickle", "monq.client", "monq.serialize"} == set()
    mods = modules_after("import monq; monq.Client; from monq import TaskTimeout, send_array")
    assert {"monq.client", "monq.serialize"} <= mods
    import monq

    assert monq.Client.__name__ == "Client" and monq.RemoteError.__module__ == "monq.errors"
    assert set(monq.__all__) <= set(dir(monq))
    with pytest.raises(AttributeError):
        monq.NoSuchThing  # noqa: B018
    assert not hasattr(monq, "no_such_module")
    mods = modules_after("import monq; monq.errors.MonqError, monq.records.TaskRecord")
    assert {"monq.errors", "monq.records"} <= mods


def test_the_supervisor_does_not_poll_for_the_connection_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller's ready pipe wakes it: the file is read once or twice, not every
    20 ms while the controller starts (SQLAlchemy alone takes 0.3-1 s to import)."""
    reads = []
    real = monq.cluster.load_connection_file

    def counting(*args: object, **kwargs: object) -> object:
        reads.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(monq.cluster, "load_connection_file", counting)
    with Cluster(ClusterConfig(n=1, home=tmp_path / "home", log_level="WARNING")) as c:
        t0 = time.monotonic()
        c.start(timeout=60)
        took = time.monotonic() - t0
        assert len(c.pids) == 2
        # running_info when locking, once when it is ready, and one look a second while
        # waiting (a fallback); polling every 20 ms made it 50 a second
        assert len(reads) <= 2 + took, (len(reads), took)


def test_the_controller_gets_this_monq_and_the_standard_library_before_site_packages() -> None:
    import os
    import sysconfig

    paths = monq.cluster._no_site_env()["PYTHONPATH"].split(os.pathsep)
    assert os.path.dirname(os.path.dirname(os.path.abspath(monq.__file__))) in paths
    stdlib, purelib = sysconfig.get_path("stdlib"), sysconfig.get_path("purelib")
    if stdlib in paths and purelib in paths:
        assert paths.index(stdlib) < paths.index(purelib)
