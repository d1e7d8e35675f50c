"""No task vanishes: engines killed, frozen and busy, timeouts, a controller crash, clients
that leave, bursts.

Every test starts its own cluster (they kill its processes) with real processes and
real signals, and checks both ends: every future at the client is settled, and every
msg_id is terminal in the Hub's database.  The counts each scenario ends with are
printed (``pytest -s`` shows them).

Resource handling: each cluster is stopped in ``finally`` (Cluster.__exit__), frozen
processes are continued before that, clients are closed by their ``with`` blocks.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import monq
from monq.cluster import Cluster, ClusterConfig
from tests.conftest import START_TIMEOUT, monq_env, wait_until

pytestmark = pytest.mark.slow

TERMINAL = {"ok", "error", "aborted", "timeout", "lost"}


@contextmanager
def cluster(tmp_path: Path, n: int, heartbeat: float = 1.0) -> Iterator[Cluster]:
    with Cluster(ClusterConfig(n=n, home=tmp_path / "home", heartbeat_period=heartbeat)) as c:
        c.start(timeout=START_TIMEOUT)
        yield c


def engine_pid(client: monq.Client, engine_id: int) -> int:
    for e in client.cluster_status()["engines"]:
        if e["id"] == engine_id and e["status"] == "alive":
            return int(e["pid"])
    raise AssertionError(f"engine {engine_id} is not alive")


def outcomes(futures: list[Any]) -> collections.Counter[str]:
    """ok / EngineDied / TaskTimeout / other error / not done, over settled futures."""
    c: collections.Counter[str] = collections.Counter()
    for f in futures:
        if not f.done():
            c["pending"] += 1
        elif f.exception() is None:
            c["ok"] += 1
        else:
            c[type(f.exception()).__name__] += 1
    return c


def db_statuses(client: monq.Client, msg_ids: list[str]) -> collections.Counter[str]:
    rows = client.db_query({"client": client.session.session_id}, keys=["msg_id", "status"])
    by_id = {r["msg_id"]: r["status"] for r in rows}
    return collections.Counter(by_id.get(m, "missing") for m in msg_ids)


# --- 1. engine death on the load-balanced path ----------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("retries", [0, 2])
def test_engine_killed_under_10000_load_balanced_tasks(tmp_path: Path, retries: int) -> None:
    """SIGKILL one of three engines while 10,000 short tasks are in flight."""
    with cluster(tmp_path, 3) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        c.wait_for_engines(3)
        victim = engine_pid(c, c.ids[1])
        v = c.load_balanced_view(retries=retries)
        gate = tmp_path / "gate"

        def gated(path: str) -> None:
            # a short task that first waits for the gate: engines stay on their first
            # task while the rest of the burst piles up in their sockets
            import os
            import time

            while not os.path.exists(path):
                time.sleep(0.002)

        futures = [v.apply_async(gated, str(gate)) for i in range(10_000)]
        # once the relay has dealt them all (the Hub has a record of each), a third wait
        # in the victim's socket or backlog: kill it, then let the others go
        wait_until(lambda: sum(c.cluster_status()["counts"].values()) >= 10_000, 120,
                   "all 10,000 tasks dealt")
        left = 10_000 - sum(f.done() for f in futures)
        os.kill(victim, signal.SIGKILL)
        gate.touch()
        ar = monq.AsyncResult(futures, single=False)
        ar.wait(timeout=180)
        got = outcomes(futures)
        ids = [f.msg_id for f in futures]
        db = db_statuses(c, ids)
        resent = sum(1 for f in futures if f.metadata.get("retries"))
        print(f"\nretries={retries}: {left} not done at the kill; client {dict(got)}; "
              f"hub {dict(db)}; re-sent {resent}")
        errs = [f.exception() for f in futures if f.done() and
                isinstance(f.exception(), monq.RemoteError)]
        assert not errs, errs[0].render_traceback()
        assert got["pending"] == 0
        assert set(db) <= TERMINAL, db
        if retries:
            assert got == {"ok": 10_000}, got
            assert db == {"ok": 10_000}, db
        else:
            assert set(got) <= {"ok", "EngineDied"}, got
            assert got["ok"] + got["EngineDied"] == 10_000
            assert db["ok"] == got["ok"] and db["lost"] == got["EngineDied"], (got, db)
        assert resent > 0  # the dead engine's queue was worked out and sent again


def _marker(marks: Path) -> Any:
    """A task that leaves a file per run (``<i>-<pid>``) and returns ``i``."""
    marks.mkdir()

    def mark(i: int) -> int:
        import os
        import pathlib

        pathlib.Path(marks, f"{i}-{os.getpid()}").touch()
        return i

    return mark


def _deal_to_a_frozen_engine_then_kill_it(c: monq.Client, victim: int, mark: Any,
                                           n: int = 40) -> tuple[list[Any], float]:
    """Freeze ``victim``, submit ``n`` marking tasks (its share sits unread in its
    socket), kill it once the Hub has a record of all; the futures and the kill's time."""
    v = c.load_balanced_view()
    os.kill(victim, signal.SIGSTOP)
    try:
        marked = [v.apply_async(mark, i) for i in range(n)]
        wait_until(lambda: sum(c.cluster_status()["counts"].values()) >= n, 10,
                   f"all {n} dealt")
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
    finally:
        os.kill(victim, signal.SIGCONT)
    return marked, t0


def _runs(marks: Path) -> collections.Counter[str]:
    return collections.Counter(p.name.split("-")[0] for p in marks.iterdir())


def test_tasks_unread_in_a_dead_engines_socket_are_re_sent_and_run_once(
        tmp_path: Path) -> None:
    """The hard case: requests the relay dealt to an engine that never read them.

    The victim is frozen (SIGSTOP) while a burst is dealt, so its share sits unread
    in its socket; then it is killed.  Only the Hub can tell which requests those
    were; they never started, so they are re-sent (no retries needed) and each
    runs exactly once."""
    marks = tmp_path / "marks"
    mark = _marker(marks)
    with cluster(tmp_path, 2, heartbeat=2.0) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(2)
        victim = engine_pid(c, ids[0])
        marked, t0 = _deal_to_a_frozen_engine_then_kill_it(c, victim, mark)
        results = [f.result(timeout=60) for f in marked]
        settled = time.monotonic() - t0
        assert results == list(range(40))
        runs = _runs(marks)
        assert runs == {str(i): 1 for i in range(40)}, runs  # each ran exactly once
        resent = [f for f in marked if f.metadata.get("retries")]
        assert 5 <= len(resent) <= 35  # the victim's share, about half
        pids = {int(p.name.split("-")[1]) for p in marks.iterdir()}
        assert victim not in pids
        print(f"\n{len(resent)} of 40 tasks were unread in the killed engine's socket: "
              f"re-sent and done {settled:.2f}s after the kill")


def test_a_missed_task_lost_notice_is_made_up_from_the_history(tmp_path: Path) -> None:
    """The Hub's notices travel on PUB/SUB: one can be missed (a client reconnecting,
    a queue limit).  Tasks whose ``task_lost`` notice this client drops must still be
    sent again and run once: the next notice's number shows the gap, and the client
    looks its unfinished tasks up in the history."""
    marks = tmp_path / "marks"
    mark = _marker(marks)
    with cluster(tmp_path, 2, heartbeat=0.5) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(2)
        victim = engine_pid(c, ids[0])
        deliver = c._io.on_notify
        dropped: list[list[str]] = []

        def drop_first_loss(msg: Any) -> None:
            if msg.msg_type == "task_lost" and not dropped:
                dropped.append(list(msg.content["msg_ids"]))
                return
            deliver(msg)

        c._io.on_notify = drop_first_loss
        marked, _ = _deal_to_a_frozen_engine_then_kill_it(c, victim, mark)
        results = [f.result(timeout=60) for f in marked]
        assert results == list(range(40))
        assert dropped and dropped[0], "no task_lost notice came"
        assert c.notice_gaps >= 1
        runs = _runs(marks)
        assert runs == {str(i): 1 for i in range(40)}, runs  # each ran exactly once
        by_id = {f.msg_id: f for f in marked}
        assert all(by_id[m].metadata.get("retries") for m in dropped[0])
        print(f"\n{len(dropped[0])} tasks' task_lost notice dropped; all re-sent and done")


# --- 2. engine death on the direct path ------------------------------------------------------

def test_engine_killed_under_direct_tasks(tmp_path: Path) -> None:
    def nap(i: int) -> int:
        import time

        time.sleep(0.005)
        return i

    with cluster(tmp_path, 3) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(3)
        target = ids[0]
        pid = engine_pid(c, target)
        dv = c.direct_view(target)
        deliver = c._io.on_notify
        notices: collections.Counter[str] = collections.Counter()

        def count(msg: Any) -> None:
            notices[msg.msg_type] += 1
            deliver(msg)

        c._io.on_notify = count
        futures = [dv.apply_async(nap, i) for i in range(400)]
        wait_until(lambda: sum(f.done() for f in futures) >= 50, 30, "50 direct tasks done")
        os.kill(pid, signal.SIGKILL)
        monq.AsyncResult(futures, single=False).wait(timeout=60)
        got = outcomes(futures)
        db = db_statuses(c, [f.msg_id for f in futures])
        print(f"\ndirect: client {dict(got)}; hub {dict(db)}; notices {dict(notices)}")
        assert got["pending"] == 0 and set(got) <= {"ok", "EngineDied"}
        assert got["EngineDied"] > 0  # they were not moved to another engine
        # the engine's tasks are lost together: one notice for all (one per task could be
        # dropped by a busy client's queue limit, and left tasks pending)
        assert notices["task_lost"] == 1, notices
        assert c.notice_gaps == 0
        assert db["ok"] == got["ok"] and db["lost"] == got["EngineDied"]
        assert all(f.metadata.get("engine") in (None, target) for f in futures)


# --- 3. detection -------------------------------------------------------------------------------

def test_killed_engine_is_noticed_within_a_second_and_replaced(tmp_path: Path) -> None:
    events: list[tuple[float, str, int, str]] = []
    with cluster(tmp_path, 2, heartbeat=1.0) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(2)
        c.on_engines(lambda ev, eid, why: events.append((time.monotonic(), ev, eid, why)))
        pid = engine_pid(c, ids[0])
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        gone = wait_until(lambda: [e for e in events if e[1] == "unregistered"], 5,
                          "the engine's departure")
        detected = gone[0][0] - t0
        new = wait_until(lambda: [e for e in events if e[1] == "registered"], 30,
                         "a replacement engine")
        print(f"\nSIGKILL noticed in {detected * 1000:.0f} ms ({gone[0][3]}); replacement "
              f"engine {new[0][2]} after {new[0][0] - t0:.2f}s")
        assert gone[0][2] == ids[0]
        assert "exited" in gone[0][3]
        assert detected < 1.0
        assert c.load_balanced_view().map_sync(lambda x: x + 1, range(20)) == \
            list(range(1, 21))


def test_frozen_engine_is_noticed_by_heartbeats_within_5s(tmp_path: Path) -> None:
    events: list[tuple[float, str, int, str]] = []
    with cluster(tmp_path, 2, heartbeat=1.0) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(2)
        c.on_engines(lambda ev, eid, why: events.append((time.monotonic(), ev, eid, why)))
        pid = engine_pid(c, ids[1])
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            gone = wait_until(lambda: [e for e in events if e[1] == "unregistered"], 10,
                              "the frozen engine declared dead")
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        detected = gone[0][0] - t0
        print(f"\nSIGSTOP noticed in {detected:.2f}s ({gone[0][3]})")
        assert gone[0][2] == ids[1] and "heartbeat" in gone[0][3]
        assert detected < 5.0
        # the Hub ended the frozen process, so it cannot wake up and run re-sent work
        wait_until(lambda: not _alive(pid), 5, "the frozen engine's end")
        assert c.load_balanced_view().apply_sync(lambda: "served") == "served"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except OSError:
        return False


def test_busy_engines_are_never_declared_dead(tmp_path: Path) -> None:
    """A pure-Python loop and one long numpy call, each 15+ heartbeat periods long."""

    def spin(seconds: float) -> int:
        import time

        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n

    def numpy_call(n: int) -> float:
        import time

        import numpy as np

        a = np.random.default_rng(0).random((n, n))
        t = time.perf_counter()
        np.linalg.eigvals(a)  # one C call
        return time.perf_counter() - t

    events: list[tuple[str, int, str]] = []
    with cluster(tmp_path, 2, heartbeat=0.2) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(2)
        c.on_engines(lambda ev, eid, why: events.append((ev, eid, why)))
        a = c[ids[0]].apply_async(spin, 4.0)
        b = c[ids[1]].apply_async(numpy_call, 1000)
        assert a.get(timeout=60) > 0
        took = b.get(timeout=120)
        print(f"\nbusy: 4 s pure-Python loop and a {took:.1f} s numpy call, "
              f"heartbeat 0.2 s: events {events}")
        assert took > 3 * 0.2 * 3  # well past the 3-period death limit
        assert events == []
        assert c.ids == ids


# --- 4. per-task timeouts ---------------------------------------------------------------------

def test_timeout_ends_a_python_task_and_the_engine_keeps_serving(tmp_path: Path) -> None:
    def sleepy() -> None:
        import time

        time.sleep(30)

    with cluster(tmp_path, 2) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(2)
        v = c.load_balanced_view(timeout=0.5)
        t0 = time.monotonic()
        ar = v.apply_async(sleepy)
        with pytest.raises(monq.TaskTimeout) as ei:
            ar.get(timeout=20)
        took = time.monotonic() - t0
        assert "sleep" in ei.value.traceback  # interrupted where it was
        rec = c.history(limit=1)[0]
        assert rec.msg_id == ar.msg_id and rec.status == "timeout"
        assert c.ids == ids  # no engine had to go
        assert v.apply_sync(lambda: 5) == 5
        print(f"\npython task with timeout 0.5 s ended after {took:.2f}s")


def test_timeout_of_a_task_stuck_in_c_restarts_its_engine(tmp_path: Path) -> None:
    def stuck() -> None:
        import signal
        import time

        # what a C library stuck in a loop amounts to: the engine's alarm cannot reach it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(30)

    with cluster(tmp_path, 2, heartbeat=0.5) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(2)
        v = c.load_balanced_view(timeout=0.5)
        t0 = time.monotonic()
        ar = v.apply_async(stuck)
        with pytest.raises(monq.TaskTimeout, match="restarted"):
            ar.get(timeout=30)
        took = time.monotonic() - t0
        rec = c.db_query({"msg_id": ar.msg_id}, keys=["status", "engine"])[0]
        assert rec["status"] == "timeout"
        # the stuck engine was replaced; the cluster serves on two engines
        wait_until(lambda: len(c.ids) == 2 and c.ids != ids, 30, "a replacement engine")
        assert sorted(c[:].apply_sync(lambda: 1)) == [1, 1]
        print(f"\ntask stuck in C with timeout 0.5 s ended after {took:.2f}s; "
              f"engines {ids} -> {c.ids}")


def test_timeout_with_retries_runs_again_elsewhere(tmp_path: Path) -> None:
    marker = tmp_path / "first-try"

    def slow_once(path: str) -> int:
        import os
        import time

        if not os.path.exists(path):
            open(path, "w").close()
            time.sleep(30)
        return os.getpid()

    with cluster(tmp_path, 2) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        c.wait_for_engines(2)
        v = c.load_balanced_view(timeout=1.0, retries=1)
        ar = v.apply_async(slow_once, str(marker))
        assert isinstance(ar.get(timeout=30), int)
        rec = c.db_query({"msg_id": ar.msg_id}, keys=["status", "retries"])[0]
        assert (rec["status"], rec["retries"]) == ("ok", 1)


# --- 5. controller crash ------------------------------------------------------------------------

def test_controller_killed_and_restarted_loses_nothing(tmp_path: Path) -> None:
    def nap(i: int) -> int:
        import time

        time.sleep(0.05)
        return i

    with cluster(tmp_path, 2, heartbeat=0.5) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(2)
        v = c.load_balanced_view(retries=2)
        before = [v.apply_async(nap, i) for i in range(100)]
        assert [f.result(timeout=60) for f in before] == list(range(100))
        inflight = [v.apply_async(nap, i) for i in range(200)]
        wait_until(lambda: sum(f.done() for f in inflight) >= 20, 30, "some progress")
        old = cl.pids["controller"]
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: cl.pids["controller"] != old, 10, "the controller restarted")
        # engines and this client find the new controller by themselves
        wait_until(lambda: _ids_or_none(c) == ids, 10, "engines back with their ids")
        back = time.monotonic() - t0
        monq.AsyncResult(inflight, single=False).wait(timeout=60)
        got = outcomes(inflight)
        print(f"\ncontroller SIGKILL: engines and client back in {back:.2f}s; "
              f"in flight at the crash: {dict(got)}")
        assert got == {"ok": 200}, got
        assert [f.result() for f in inflight] == list(range(200))
        assert v.apply_sync(lambda: "new work") == "new work"
        # every task completed before the crash is in the history, with its result
        with monq.Client(connection_file=cl.connection_file, timeout=10) as c2:
            for f in before[::10]:
                assert c2.get_result(f.msg_id).get(timeout=10) == f.result()
            # the records the crash left unfinished are settled within the recovery grace
            db = wait_until(lambda: (lambda d: d if set(d) <= TERMINAL else None)(
                db_statuses(c, [f.msg_id for f in before + inflight])), 15,
                "no unfinished record")
            assert db["ok"] >= 100


def _ids_or_none(c: monq.Client) -> list[int] | None:
    try:
        return c.ids
    except monq.MonqError:
        return None


def test_in_flight_tasks_of_a_crashed_controller_end_without_retries(tmp_path: Path) -> None:
    def nap(i: int) -> int:
        import time

        time.sleep(0.05)
        return i

    with cluster(tmp_path, 2, heartbeat=0.5) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        c.wait_for_engines(2)
        v = c.load_balanced_view()
        inflight = [v.apply_async(nap, i) for i in range(200)]
        wait_until(lambda: sum(f.done() for f in inflight) >= 20, 30, "some progress")
        old = cl.pids["controller"]
        os.kill(old, signal.SIGKILL)
        monq.AsyncResult(inflight, single=False).wait(timeout=60)
        got = outcomes(inflight)
        print(f"\ncontroller SIGKILL without retries: {dict(got)}")
        assert got["pending"] == 0 and set(got) <= {"ok", "EngineDied"}, got
        # the Hub settles the records the crash left unfinished within its recovery grace
        db = wait_until(lambda: (lambda d: d if set(d) <= TERMINAL | {"missing"} else None)(
            db_statuses(c, [f.msg_id for f in inflight])), 15, "no unfinished record")
        print(f"hub records: {dict(db)}")


# --- 9. clients come and go ----------------------------------------------------------------------

def test_a_client_that_exits_leaves_its_tasks_to_finish(tmp_path: Path) -> None:
    with cluster(tmp_path, 2) as cl:
        script = textwrap.dedent(f"""
            import json, monq
            def nap(i):
                import time
                time.sleep(0.1)
                return i * i
            c = monq.Client(connection_file={str(cl.connection_file)!r})
            v = c.load_balanced_view()
            ars = [v.apply_async(nap, i) for i in range(40)]
            print(json.dumps([a.msg_id for a in ars]), flush=True)
            c.close()
        """)
        out = subprocess.run([sys.executable, "-c", script], env=monq_env(), timeout=60,
                             capture_output=True, text=True, check=True)
        msg_ids = json.loads(out.stdout.strip().splitlines()[-1])
        with monq.Client(connection_file=cl.connection_file, timeout=10) as c:
            results = [c.get_result(m).get(timeout=60) for m in msg_ids]
            assert results == [i * i for i in range(40)]
            rows = c.db_query({"msg_id": {"$in": msg_ids}}, keys=["status"])
            assert [r["status"] for r in rows] == ["ok"] * 40


# --- 6. bursts -----------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_100000_tasks_in_a_burst_are_all_recorded(tmp_path: Path) -> None:
    with cluster(tmp_path, 2) as cl, \
            monq.Client(connection_file=cl.connection_file, timeout=10) as c:
        c.wait_for_engines(2)
        v = c.load_balanced_view()
        t0 = time.monotonic()
        futures = [v.apply_async(lambda: None) for _ in range(100_000)]
        submitted = time.monotonic() - t0
        monq.AsyncResult(futures, single=False).wait(timeout=400)
        took = time.monotonic() - t0
        got = outcomes(futures)
        rows = c.db_query({"client": c.session.session_id},
                          keys=["msg_id", "status", "submitted", "completed"])
        print(f"\n100,000 tasks: submitted in {submitted:.1f}s, all done in {took:.1f}s; "
              f"client {dict(got)}; hub recorded {len(rows)}")
        assert got == {"ok": 100_000}
        assert len(rows) == 100_000
        assert {r["msg_id"] for r in rows} == {f.msg_id for f in futures}
        assert all(r["status"] == "ok" and r["submitted"] and r["completed"] for r in rows)
        assert c.cluster_status()["rejected"] == {}


def test_bad_retries_or_timeout_is_a_clear_error_at_once(client: monq.Client) -> None:
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="retries"):
            client.load_balanced_view(retries=bad)  # type: ignore[arg-type]
    for bad_t in (0, -3.0):
        with pytest.raises(ValueError, match="timeout"):
            client.load_balanced_view(timeout=bad_t)
        with pytest.raises(ValueError, match="timeout"):
            client.direct_view(timeout=bad_t)
    assert client.load_balanced_view(retries=1, timeout=5).apply_sync(abs, -2) == 2
