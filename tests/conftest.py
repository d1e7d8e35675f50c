"""Shared fixtures: an isolated MONQ_HOME, a real cluster, a client, and `monq` in a subprocess.

Resource handling: every process a fixture or helper starts is stopped in its
``finally``; tests never touch ``~/.monq`` (MONQ_HOME points into tmp_path for
every test, and the session cluster lives in its own tmp directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monq.cluster import Cluster, ClusterConfig
from monq.connection import CONNECTION_FILE, load_connection_file, pid_alive

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0

# Several tests press Ctrl-C (SIGINT) on the processes they start.  A suite run in
# the background of a non-interactive shell (`pytest &`, as a script would) inherits
# SIGINT ignored, and every process it starts would ignore it too, as the shell
# meant for background jobs: give this process, and through it them, the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "monq-home"
    home.mkdir()
    monkeypatch.setenv("MONQ_HOME", str(home))
    return home


@pytest.fixture
def monq_home(_isolated_home: Path) -> Path:
    """A fresh, empty MONQ_HOME for this test (already set in the environment)."""
    return _isolated_home


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real controller with 2 engines, shared by the session; stopped at the end."""
    home = tmp_path_factory.mktemp("cluster-home")
    c = Cluster(ClusterConfig(n=2, home=home))
    try:
        c.start(timeout=START_TIMEOUT)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def curve_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real controller with 2 engines and CurveZMQ on, shared by the session."""
    home = tmp_path_factory.mktemp("curve-cluster-home")
    c = Cluster(ClusterConfig(n=2, home=home, curve=True))
    try:
        c.start(timeout=START_TIMEOUT)
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Any]:
    """A Client of the session cluster, closed after the test."""
    from monq.client import Client

    c = Client(connection_file=cluster.connection_file, timeout=10.0)
    try:
        yield c
    finally:
        c.close()


def monq_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a `monq` subprocess: this one (MONQ_HOME included), monq importable."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_monq(*args: str, env: dict[str, str] | None = None,
             timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m monq ARGS`` to completion (bounded by ``timeout``)."""
    return subprocess.run([sys.executable, "-m", "monq", *args], env=monq_env(env),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(name="run_monq")
def run_monq_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_monq


def wait_until(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if pid_alive(p)]


def cluster_pids(home: Path, profile: str = "default") -> list[int]:
    """Supervisor, controller and engine pids of a running cluster, via `monq status --json`."""
    r = run_monq("--home", str(home), "status", "--profile", profile, "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    pids = [st["supervisor_pid"], st["controller_pid"], *(e["pid"] for e in st["engines"])]
    return [int(p) for p in pids if p]


def kill_cluster(home: Path, profile: str = "default", extra: list[int] | None = None) -> None:
    """Last-resort cleanup: SIGKILL whatever a test may have left running for a profile."""
    pids = list(extra or [])
    with contextlib.suppress(Exception):
        info = load_connection_file(home / profile / CONNECTION_FILE, check_alive=False)
        pids += [info.supervisor_pid, info.controller_pid]
    for pid in pids:
        if pid and pid != os.getpid() and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
