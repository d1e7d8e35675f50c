"""Tests for the `monq` command, run as real subprocesses against real clusters."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    START_TIMEOUT,
    alive,
    cluster_pids,
    kill_cluster,
    monq_env,
    run_monq,
    wait_until,
)

from monq.cli import ExitCode, main
from monq.connection import ConnectionInfo, load_connection_file, write_connection_file
from monq.records import short_id

# -- no cluster: one line, a named exit code, quickly


@pytest.mark.parametrize("command", [["status"], ["history"], ["stop"], ["status", "--json"]])
def test_no_cluster_is_a_one_line_error(monq_home: Path, command: list[str]) -> None:
    t0 = time.monotonic()
    r = run_monq(*command, timeout=30)
    elapsed = time.monotonic() - t0
    assert r.returncode == ExitCode.NO_CLUSTER, r.stderr
    assert "no cluster running" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert elapsed < 5


def test_stale_connection_file_means_no_cluster(monq_home: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_connection_file(monq_home / "default" / "connection.json",
                          ConnectionInfo(key=b"k" * 32, ports={"hub": 1},
                                         controller_pid=dead.pid, supervisor_pid=dead.pid))
    t0 = time.monotonic()
    r = run_monq("status", timeout=30)
    assert r.returncode == ExitCode.NO_CLUSTER
    assert "has exited" in r.stderr and time.monotonic() - t0 < 5
    # `stop` cleans the stale file up
    r = run_monq("stop", timeout=30)
    assert r.returncode == ExitCode.NO_CLUSTER
    assert not (monq_home / "default" / "connection.json").exists()


def test_home_option_overrides_monq_home(tmp_path: Path, monq_home: Path) -> None:
    r = run_monq("--home", str(tmp_path / "elsewhere"), "status", timeout=30)
    assert r.returncode == ExitCode.NO_CLUSTER
    assert str(tmp_path / "elsewhere" / "default") in r.stderr


def test_usage_errors(monq_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == ExitCode.USAGE
    with pytest.raises(SystemExit) as e:
        main(["history", "--limit", "many"])
    assert e.value.code == ExitCode.USAGE
    assert main(["status", "--profile", "../x"]) == ExitCode.USAGE
    assert "bad profile name" in capsys.readouterr().err


def test_help_lists_the_commands(monq_home: Path) -> None:
    r = run_monq("--help", timeout=30)
    assert r.returncode == 0
    for cmd in ("start", "stop", "status", "history"):
        assert cmd in r.stdout


# -- a daemon cluster, end to end


@pytest.mark.slow
def test_daemon_start_status_history_stop(monq_home: Path) -> None:
    engine_pids: list[int] = []
    try:
        r = run_monq("start", "--daemon", "-n", "2", timeout=START_TIMEOUT + 30)
        assert r.returncode == ExitCode.OK, r.stdout + r.stderr
        conn = monq_home / "default" / "connection.json"
        assert f"connection file: {conn}" in r.stdout
        assert f"history database: {monq_home / 'default' / 'history.db'}" in r.stdout
        assert len(re.findall(r"engine \d+ registered", r.stdout)) == 2
        assert stat.S_IMODE(conn.stat().st_mode) == 0o600
        info = load_connection_file(conn)

        # status: text and JSON
        r = run_monq("status", timeout=30)
        assert r.returncode == 0, r.stderr
        assert "engines (2):" in r.stdout
        assert str(info.controller_pid) in r.stdout
        r = run_monq("status", "--json", timeout=30)
        st = json.loads(r.stdout)
        assert len(st["engines"]) == 2
        assert st["controller_pid"] == info.controller_pid
        assert st["supervisor_pid"] == info.supervisor_pid
        engine_pids = [e["pid"] for e in st["engines"]]
        pids = cluster_pids(monq_home)
        assert len(pids) == 4 and alive(pids) == pids

        # a couple of tasks, one failing, through a client of the default profile
        from monq.client import Client
        from monq.errors import RemoteError

        with Client(timeout=10) as c:
            v = c.load_balanced_view()
            assert v.apply_async(pow, 2, 10).get(timeout=30) == 1024
            with pytest.raises(RemoteError):
                v.apply_async(divmod, 1, 0).get(timeout=30)
            wait_until(lambda: len(c.history()) >= 2
                       and all(t.status in ("ok", "error") for t in c.history()),
                       10, "the Hub to record both tasks")
            recorded = {t.msg_id: t for t in c.history()}

        # history: table
        r = run_monq("history", timeout=30)
        assert r.returncode == 0, r.stderr
        header, *rows = r.stdout.strip().splitlines()
        assert header.split() == ["msg_id", "status", "engine", "func", "submitted", "duration"]
        assert len(rows) == 2
        assert {row.split()[0] for row in rows} == {short_id(m) for m in recorded}
        assert "pow" in r.stdout and "divmod" in r.stdout
        # history: JSON lines and filters
        r = run_monq("history", "--json", timeout=30)
        docs = [json.loads(line) for line in r.stdout.splitlines()]
        assert {d["msg_id"] for d in docs} == set(recorded)
        assert {d["status"] for d in docs} == {"ok", "error"}
        err = next(d for d in docs if d["status"] == "error")
        assert err["ename"] == "ZeroDivisionError" and "ZeroDivisionError" in err["traceback"]
        r = run_monq("history", "--json", "--status", "error", timeout=30)
        assert [json.loads(x)["status"] for x in r.stdout.splitlines()] == ["error"]
        r = run_monq("history", "--json", "--limit", "1", "--since", "1 hour ago", timeout=30)
        assert len(r.stdout.splitlines()) == 1
        r = run_monq("history", "--since", "tomorrow-ish", timeout=30)
        assert r.returncode == ExitCode.USAGE and "Traceback" not in r.stderr

        # a second start on the same profile is refused, foreground or not
        for args in (["start", "--daemon", "-n", "1"], ["start", "-n", "1"]):
            t0 = time.monotonic()
            r = run_monq(*args, timeout=30)
            assert r.returncode == ExitCode.ALREADY_RUNNING, r.stdout + r.stderr
            assert "already running" in r.stderr and "monq stop" in r.stderr
            assert time.monotonic() - t0 < 10
        assert alive(pids) == pids

        # stop: every process gone, connection file removed
        r = run_monq("stop", timeout=60)
        assert r.returncode == 0, r.stderr
        assert alive(pids) == []
        assert not conn.exists()
        r = run_monq("status", timeout=30)
        assert r.returncode == ExitCode.NO_CLUSTER

        # the history outlives the cluster: read from the profile's database
        r = run_monq("history", "--json", timeout=30)
        assert r.returncode == 0, r.stderr
        assert {json.loads(x)["msg_id"] for x in r.stdout.splitlines()} == set(recorded)
        db = monq_home / "default" / "history.db"
        r = run_monq("--home", str(monq_home / "elsewhere"), "history", "--status", "error",
                     "--db", f"sqlite:///{db}", timeout=30)
        assert r.returncode == 0, r.stderr
        assert "divmod" in r.stdout and "pow" not in r.stdout
    finally:
        kill_cluster(monq_home, extra=engine_pids)


@pytest.mark.slow
def test_daemon_start_failure_prints_the_log(monq_home: Path) -> None:
    r = run_monq("start", "--daemon", "-n", "1", "--db", "nosuchdialect://x", timeout=60)
    assert r.returncode == ExitCode.START_FAILED
    assert "cluster.log" in r.stderr and "controller" in r.stderr
    assert "Traceback (most recent call last)" not in r.stderr.splitlines()[0]


# -- a foreground cluster: Ctrl-C and SIGKILL


def _start_foreground(home: Path, tmp_path: Path,
                      n: int = 2) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "start.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "monq", "start", "-n", str(n)],
                                env=monq_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    # "ready with": "engines ready: 1/2" comes first, once per engine
    wait_until(lambda: proc.poll() is not None or b"ready with" in out.read_bytes(),
               START_TIMEOUT, "the cluster to be ready")
    assert proc.poll() is None, out.read_text()
    return proc, out


@pytest.mark.slow
def test_foreground_start_stops_everything_on_ctrl_c(monq_home: Path, tmp_path: Path) -> None:
    proc, out = _start_foreground(monq_home, tmp_path)
    pids: list[int] = []
    try:
        text = out.read_text()
        assert "connection file:" in text and "history database:" in text
        assert len(re.findall(r"engine \d+ registered", text)) == 2
        pids = cluster_pids(monq_home)
        assert len(pids) == 4 and pids[0] == proc.pid
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, out.read_text()
        assert alive(pids) == []
        assert "stopped" in out.read_text()
        assert not (monq_home / "default" / "connection.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_cluster(monq_home, extra=pids)


@pytest.mark.slow
def test_killed_supervisor_leaves_no_orphans(monq_home: Path, tmp_path: Path) -> None:
    proc, out = _start_foreground(monq_home, tmp_path)
    pids: list[int] = []
    try:
        pids = cluster_pids(monq_home)
        assert len(pids) == 4
        proc.kill()
        proc.wait(10)
        # PR_SET_PDEATHSIG: the kernel sends the children SIGTERM when their parent dies
        wait_until(lambda: not alive(pids), 20, f"pids {alive(pids)} to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_cluster(monq_home, extra=pids)


@pytest.mark.slow
def test_stop_sigterms_a_foreground_cluster(monq_home: Path, tmp_path: Path) -> None:
    proc, out = _start_foreground(monq_home, tmp_path, n=1)
    pids: list[int] = []
    try:
        pids = cluster_pids(monq_home)
        r = run_monq("stop", timeout=60)
        assert r.returncode == 0, r.stderr
        assert proc.wait(10) == 0
        assert alive(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_cluster(monq_home, extra=pids)


# -- the README tour, exactly as written


def _readme_blocks(lang: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _tour_steps() -> list[tuple[str, str]]:
    """The README's tour, in order: ("python", source) and ("shell", one monq command line)."""
    text = (REPO / "README.md").read_text()
    tour = text[text.index("## A short tour"):text.index("## The `monq` command")]
    steps: list[tuple[str, str]] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", tour, flags=re.S | re.M):
        if lang == "python":
            steps.append(("python", body))
        else:
            steps += [("shell", line) for line in body.splitlines() if line.startswith("monq ")]
    return steps


@pytest.mark.slow
def test_readme_tour_runs_as_written(monq_home: Path, tmp_path: Path) -> None:
    """Every command and the Python block of the tour, exactly as README.md has them."""
    steps = _tour_steps()
    kinds = [k for k, _ in steps]
    assert kinds[0] == "shell" and steps[0][1].startswith("monq start --daemon")
    assert "python" in kinds and steps[-1] == ("shell", "monq stop")
    outputs: list[str] = []
    try:
        for kind, what in steps:
            if kind == "python":
                script = tmp_path / "tour.py"
                script.write_text(what)
                r = subprocess.run([sys.executable, str(script)], env=monq_env(),
                                   capture_output=True, text=True, timeout=120, cwd=tmp_path)
            else:
                r = run_monq(*shlex.split(what)[1:], timeout=START_TIMEOUT + 30)
            assert r.returncode == 0, f"{what}\n{r.stdout}{r.stderr}"
            outputs.append(r.stdout)
        text = "\n".join(outputs)
        assert "1024" in text and "ZeroDivisionError" in text
        assert "fails" in text  # the failed task appears in `monq history --status error`
        assert not (monq_home / "default" / "connection.json").exists()  # `monq stop` ran
    finally:
        kill_cluster(monq_home)


def test_ci_script_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert "pip install -e '.[test]'" in ci and "pytest" in ci
    assert os.access(REPO / ".ci" / "run", os.X_OK)
    assert "pip install -e '.[test]' && pytest" in (REPO / "README.md").read_text()


@pytest.mark.slow
def test_a_hung_controller_is_a_quick_error_not_a_hang(monq_home: Path, tmp_path: Path) -> None:
    proc, _ = _start_foreground(monq_home, tmp_path, n=1)
    pids: list[int] = []
    try:
        pids = cluster_pids(monq_home)
        ctl = load_connection_file(monq_home / "default" / "connection.json").controller_pid
        os.kill(ctl, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = run_monq("status", timeout=30)
            assert r.returncode == ExitCode.NO_CLUSTER, r.stderr
            assert "no cluster answered" in r.stderr and "Traceback" not in r.stderr
            assert time.monotonic() - t0 < 20  # the 5 s connect timeout plus start-up, not a hang
        finally:
            os.kill(ctl, signal.SIGCONT)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert alive(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_cluster(monq_home, extra=pids)
