"""Large buffers through shared memory (monq.shm): correct, zero-copy, signed, and freed.

Real processes: one cluster for the module (2 engines, ``MONQ_SHM_GRACE=1`` so
the Hub sweeps ended tasks' leftovers quickly).  Nothing is timed: the tests
count bytes through the Hub and segments in /dev/shm, and every wait is
bounded (``wait_until``).
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

import monq
from monq import shm
from monq.cluster import Cluster, ClusterConfig
from monq.errors import ProtocolError
from monq.protocol import Session
from monq.serialize import pack_apply
from tests.conftest import REPO, START_TIMEOUT, wait_until

pytestmark = pytest.mark.skipif(not shm.supported(), reason="no writable /dev/shm")

MB = 1 << 20

# the task functions below travel by value: the engines cannot import this module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def shm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("shm-cluster-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MONQ_SHM_GRACE", "1")  # inherited by the controller (the sweeper)
        c = Cluster(ClusterConfig(n=2, home=home, log_level="WARNING"))
        try:
            c.start(timeout=START_TIMEOUT)
            yield c
        finally:
            c.stop()


@pytest.fixture
def sc(shm_cluster: Cluster) -> Iterator[monq.Client]:
    c = monq.Client(connection_file=shm_cluster.connection_file, timeout=10.0)
    try:
        c.wait_for_engines(2, timeout=30)  # also learns their hosts
        yield c
    finally:
        c.close()


def cluster_segments(key: bytes) -> list[str]:
    prefix = f"monq-{shm.cluster_id(key)}-"
    return sorted(n for n in os.listdir(shm.DIR) if n.startswith(prefix))


def payload_bytes(c: monq.Client) -> dict[str, int]:
    return dict(c.cluster_status()["payload_bytes"])


def _mapped(a: np.ndarray) -> bool:
    """Whether ``a`` is a view of a memory mapping (what monq.shm hands pickle)."""
    b: Any = a
    while isinstance(b, np.ndarray) and b.base is not None:
        b = b.base
    return isinstance(b, memoryview) and isinstance(b.obj, mmap.mmap)


def ident(x: Any) -> Any:
    return x


def probe(x: np.ndarray) -> tuple[bool, bool, float]:
    """On the engine: is the argument a read-only view of shared memory?"""
    b: Any = x
    while isinstance(b, np.ndarray) and b.base is not None:
        b = b.base
    import mmap as _mmap

    return (isinstance(b, memoryview) and isinstance(b.obj, _mmap.mmap),
            bool(x.flags.writeable), float(x[-1]))


def plus_one(x: np.ndarray) -> np.ndarray:
    return x + 1


# -- the path ------------------------------------------------------------------------


def test_roundtrip_goes_through_shared_memory(sc: monq.Client) -> None:
    lb = sc.load_balanced_view()
    a = np.arange(4 * MB, dtype=np.float64)  # 32 MB
    before = payload_bytes(sc)
    mapped, writeable, last = lb.apply_sync(probe, a)
    assert mapped and not writeable and last == a[-1]  # the engine got a view, no copy
    ar = lb.apply_async(ident, a)
    r = ar.get(30)
    assert np.array_equal(r, a) and r.dtype == a.dtype and _mapped(r)
    r2 = lb.apply_sync(plus_one, a)  # a new result: written by the engine into a segment
    assert np.array_equal(r2, a + 1) and _mapped(r2)
    after = payload_bytes(sc)
    # the relay and the Hub saw three requests and three replies, and only their handles
    assert after.get("wire", 0) - before.get("wire", 0) < MB
    assert after.get("shm", 0) - before.get("shm", 0) == 5 * a.nbytes
    rec = sc.task_record(ar.msg_id)
    assert rec.request_bytes is not None and rec.request_bytes >= a.nbytes  # recorded by size
    assert rec.result_bytes is not None and rec.result_bytes >= a.nbytes


def _big_result(n: int) -> Any:
    import numpy as np

    return np.full(n, 3.0)


def test_batches_carry_shared_memory_results_and_large_arguments_go_alone(
        sc: monq.Client) -> None:
    """Tasks queued together go in one batch (monq.protocol); a large result still comes
    back through shared memory inside the batch's reply, and a task whose argument went
    into shared memory is sent alone."""
    lb = sc.load_balanced_view()
    a = np.arange(MB, dtype=np.float64)
    sent = dict(sc._io.sent)
    io = sc._io
    assert io.lock.acquire(timeout=10)  # hold the sockets, as the I/O thread in a burst
    try:
        ars = [lb.apply_async(_big_result, MB) for _ in range(4)]
        ars.append(lb.apply_async(ident, a))
        ars += [lb.apply_async(_big_result, 10) for _ in range(4)]
    finally:
        io.dispatch(io.release())
        io.activate_if_needed()
    results = [ar.get(30) for ar in ars]
    assert all(np.array_equal(r, np.full(MB, 3.0)) and _mapped(r) for r in results[:4])
    assert np.array_equal(results[4], a) and _mapped(results[4])
    assert all(np.array_equal(r, np.full(10, 3.0)) for r in results[5:])
    # [4 tasks] [the large argument alone] [4 tasks]: batches cut at the lone one
    assert sc._io.sent["apply_batch"] - sent.get("apply_batch", 0) >= 2
    assert sc._io.sent["apply_request"] - sent.get("apply_request", 0) >= 1


def test_direct_view_and_small_buffers(sc: monq.Client) -> None:
    dv = sc[sc.ids[0]]
    a = np.arange(2 * MB, dtype=np.int32)
    assert np.array_equal(dv.apply_sync(ident, a), a)
    small = np.arange(1000)
    before = payload_bytes(sc)
    r = dv.apply_sync(ident, small)  # under the threshold: inside the signed stream
    assert np.array_equal(r, small) and not _mapped(r)
    assert payload_bytes(sc).get("shm", 0) == before.get("shm", 0)


def test_segments_freed_when_the_task_ends(sc: monq.Client) -> None:
    key = sc.info.key
    sc.shm.config.pool_bytes = 0  # no pool: every segment goes with its task
    lb = sc.load_balanced_view()
    a = np.ones(2 * MB)
    r = lb.apply_sync(ident, a)
    r2 = lb.apply_sync(plus_one, a)
    # the results still view the memory, but no name is left behind in /dev/shm
    assert cluster_segments(key) == [] and sc.shm.segments() == []
    assert r.sum() == a.sum() and r2.sum() == 2 * a.sum()
    with pytest.raises(monq.RemoteError):
        lb.apply_sync(lambda x: 1 / 0, a)
    assert cluster_segments(key) == []


def test_pool_reuses_one_segment_then_close_frees_it(shm_cluster: Cluster) -> None:
    c = monq.Client(connection_file=shm_cluster.connection_file, timeout=10.0)
    key = c.info.key
    try:
        c.wait_for_engines(2, timeout=30)
        lb = c.load_balanced_view()
        a = np.ones(2 * MB)
        for _ in range(5):
            assert lb.apply_sync(ident, a).shape == a.shape  # result dropped at once
        # one segment written five times: no fresh pages after the first task
        assert len(c.shm.segments()) == 1
        held = lb.apply_sync(ident, a)  # a result still viewing the pooled segment ...
        r2 = lb.apply_sync(ident, a)  # ... is never overwritten: the next task takes another
        assert len(c.shm.segments()) == 2 and np.array_equal(held, a)
        del r2
    finally:
        c.close()
    assert cluster_segments(key) == []
    assert held.sum() == a.sum()  # the mapping outlives the name


def test_new_results_reuse_pooled_segments(shm_cluster: Cluster) -> None:
    """A task that makes a new large result: the engine writes it into a segment the
    client lent it, which the client pools again; a result still held is never reused."""
    with monq.Client(connection_file=shm_cluster.connection_file, timeout=10.0) as c:
        c.wait_for_engines(2, timeout=30)
        key = c.info.key
        lb = c.load_balanced_view()
        a = np.ones(2 * MB)
        for _ in range(6):
            r = lb.apply_sync(plus_one, a)
            assert r.sum() == 2 * a.sum() and _mapped(r)
            del r
        # the first result's segment was adopted, then lent back: two segments in all,
        # and no engine-made segment is left behind
        assert len(c.shm.segments()) == 2
        assert not [n for n in cluster_segments(key) if "-r" in n]
        held = [lb.apply_sync(plus_one, a + i) for i in range(3)]
        assert [float(h[0]) for h in held] == [2.0, 3.0, 4.0]
    assert cluster_segments(key) == []
    assert [float(h[-1]) for h in held] == [2.0, 3.0, 4.0]


def test_fallback_when_disabled_or_not_local(sc: monq.Client) -> None:
    lb = sc.load_balanced_view()
    a = np.arange(2 * MB, dtype=np.float64)
    sc.shm.bulk.config.enabled = False  # the frames (the bulk path: tests/test_bulk.py)
    for how in ("off", "remote"):
        if how == "off":
            sc.shm.config.enabled = False
        else:
            sc.shm.config.enabled = True
            sc.shm.set_hosts({k: "another-host" for k in sc.shm.hosts})
        before = payload_bytes(sc)
        r = lb.apply_sync(ident, a)
        assert np.array_equal(r, a) and not _mapped(r)
        after = payload_bytes(sc)
        assert after.get("shm", 0) == before.get("shm", 0)
        assert after.get("wire", 0) - before.get("wire", 0) >= 2 * a.nbytes
    off = shm.ShmConfig.from_env({"MONQ_SHM": "0"})
    assert off.enabled is False
    # an engine with it off registers no host: clients send it frames both ways
    assert shm.EngineShm(b"k" * 32, off).host == ""
    cfg = shm.ShmConfig.from_env({"MONQ_SHM_THRESHOLD": "4MB", "MONQ_SHM_POOL": "0"})
    assert cfg.enabled and cfg.threshold == 4_000_000 and cfg.pool_bytes == 0


# -- safety --------------------------------------------------------------------------


def test_tampered_handle_is_rejected_by_the_mac() -> None:
    key = os.urandom(32)
    cs = shm.ClientShm(key, shm.ShmConfig(pool_bytes=0))
    segs = None
    try:
        cs.set_hosts({0: cs.host})
        bufs, raw = pack_apply(ident, (np.ones(MB),), {})
        md: dict[str, Any] = {}
        bufs, raw, segs = cs.offload(bufs, raw, md, None)
        assert segs is not None and md["shm"]["bufs"][0][1] == segs[0].name
        sender, receiver = Session(key), Session(key)
        _, frames = sender.serialize("apply_request", "task", {}, metadata=md, buffers=bufs,
                                     raw=raw)
        forged = json.loads(frames[4])
        forged["shm"]["bufs"][0][2] = 4096  # another offset
        bad = [*frames[:4], json.dumps(forged).encode(), *frames[5:]]
        with pytest.raises(ProtocolError, match="signature"):
            receiver.feed(bad)
        assert receiver.feed(frames).metadata["shm"] == md["shm"]  # the genuine one passes
        # a handle signed with another key is refused as well
        _, other = Session(os.urandom(32)).serialize("apply_request", "task", {}, metadata=md,
                                                     buffers=bufs, raw=raw)
        with pytest.raises(ProtocolError):
            Session(key).feed(other)
    finally:
        cs.close()
        for seg in segs or ():
            seg.destroy()


def test_foreign_or_unsafe_segments_are_refused(tmp_path: Path) -> None:
    key = os.urandom(32)
    cid = shm.cluster_id(key)
    other = shm.cluster_id(os.urandom(32))
    tag = shm.host_tag()
    made: list[str] = []

    def make(name: str, mode: int = 0o600, size: int = 4096) -> str:
        path = os.path.join(shm.DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)
        os.ftruncate(fd, size)
        os.close(fd)
        made.append(path)
        return name

    def spec(name: str, off: int = 0, n: int = 4096) -> dict[str, Any]:
        return {"bufs": [[1, name, off, n]]}

    rnd = os.urandom(8).hex()
    try:
        good = make(f"monq-{cid}-{tag}-{os.getpid()}-c-{rnd}")
        frames, maps = shm.attach([b"stream"], spec(good), cid)
        assert bytes(frames[1]) == b"\0" * 4096
        del frames, maps
        for bad_name in (f"monq-{other}-{tag}-{os.getpid()}-c-{rnd}",  # another cluster
                         "../../etc/passwd", f"monq-{cid}-{tag}-1-c-{rnd}/../x"):
            with pytest.raises(shm.ShmError):
                shm.attach([b"s"], spec(bad_name), cid)
        loose = make(f"monq-{cid}-{tag}-{os.getpid()}-c-{os.urandom(8).hex()}", mode=0o644)
        with pytest.raises(shm.ShmError, match="private"):
            shm.attach([b"s"], spec(loose), cid)
        link = f"monq-{cid}-{tag}-{os.getpid()}-c-{os.urandom(8).hex()}"
        os.symlink(os.path.join(shm.DIR, good), os.path.join(shm.DIR, link))
        made.append(os.path.join(shm.DIR, link))
        with pytest.raises(shm.ShmError):
            shm.attach([b"s"], spec(link), cid)
        with pytest.raises(shm.ShmError, match="range"):
            shm.attach([b"s"], spec(good, off=1, n=4096), cid)
        with pytest.raises(shm.ShmError, match="gone"):
            shm.attach([b"s"], spec(f"monq-{cid}-{tag}-{os.getpid()}-c-{os.urandom(8).hex()}"), cid)
    finally:
        for p in made:
            if os.path.lexists(p):
                os.unlink(p)


def test_sweeper_judges_only_owners_of_its_own_host() -> None:
    key = os.urandom(32)
    cid = shm.cluster_id(key)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)  # a pid that has exited (and been reaped)
    ours = shm.seg_name(cid, dead.pid, "c")
    foreign = f"monq-{cid}-{'0' * 8 if shm.host_tag() != '0' * 8 else '1' * 8}-{dead.pid}-c-" \
        f"{os.urandom(8).hex()}"
    alive = shm.seg_name(cid, os.getpid(), "c")
    ended = shm.seg_name(cid, os.getpid(), "r" + "ab" * 16)
    running = shm.seg_name(cid, os.getpid(), "r" + "cd" * 16)
    names = [ours, foreign, alive, ended, running]
    try:
        for n in names:
            os.close(os.open(os.path.join(shm.DIR, n), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        sweeper = shm.Sweeper(key, grace=0.0)
        ends = {"ab" * 16: 1.0, "cd" * 16: None}
        assert sweeper.tick(lambda msg_id: ends.get(msg_id)) == 2
        left = set(cluster_segments(key))
        # a dead owner here, and a result whose task ended, go; a pid of another pid
        # namespace, a live owner and a running task's result stay
        assert left == {foreign, alive, running}
        assert shm.remove_all(key) == 3 and cluster_segments(key) == []
    finally:
        for n in names:
            if os.path.exists(os.path.join(shm.DIR, n)):
                os.unlink(os.path.join(shm.DIR, n))


def test_segment_gone_is_a_clean_task_error(sc: monq.Client) -> None:
    """A signed handle to a segment that no longer exists fails the task, not the engine."""
    from monq.client.client import Client

    lb = sc.load_balanced_view()
    orig = sc.shm.offload

    def offload_then_unlink(*a: Any) -> Any:
        out = orig(*a)
        for seg in out[2] or ():
            seg.destroy()  # as if swept away before the engine mapped it
        return out

    sc.shm.offload = offload_then_unlink  # type: ignore[method-assign]
    try:
        with pytest.raises(monq.RemoteError, match="gone"):
            lb.apply_sync(ident, np.ones(2 * MB))
    finally:
        sc.shm.offload = orig  # type: ignore[method-assign]
    assert isinstance(sc, Client) and lb.apply_sync(ident, 3) == 3


# -- processes that die ------------------------------------------------------------------


_CLIENT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import monq

    def wait_for(x, path):
        deadline = time.time() + 60
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.02)
        return None

    conn, flag, out = sys.argv[1:4]
    c = monq.Client(connection_file=conn)
    c.wait_for_engines(2, timeout=30)
    ar = c.load_balanced_view().apply_async(wait_for, np.ones(1 << 19), flag)
    with open(out + ".tmp", "w") as f:
        f.write("\\n".join(c.shm.segments()))
    os.replace(out + ".tmp", out)
    sys.stdin.read()  # until killed
""")


def test_client_killed_mid_task_leaves_no_segment(shm_cluster: Cluster, tmp_path: Path,
                                                  sc: monq.Client) -> None:
    flag, out = tmp_path / "release", tmp_path / "segments"
    script = tmp_path / "client.py"
    script.write_text(_CLIENT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(shm_cluster.connection_file),
                             str(flag), str(out)], env=env, stdin=subprocess.PIPE)
    try:
        names = wait_until(lambda: out.exists() and out.read_text().split(), 60,
                           "the client's segments")
        assert all(os.path.exists(os.path.join(shm.DIR, n)) for n in names)
        proc.kill()
        proc.wait(10)
        # the Hub sweeps what a dead owner left behind
        wait_until(lambda: not any(os.path.exists(os.path.join(shm.DIR, n)) for n in names),
                   20, "the Hub to sweep the dead client's segments")
    finally:
        flag.touch()  # let the task end
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert sc.load_balanced_view().apply_sync(ident, 5) == 5  # the engines carry on


def hang_with_result_segment(x: np.ndarray, name_file: str, pid_file: str) -> None:
    """Pretend to be an engine killed after writing its result into a segment."""
    import os
    import time

    deadline = time.time() + 60
    while not os.path.exists(name_file) and time.time() < deadline:
        time.sleep(0.02)
    name = open(name_file).read()
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"result" * 1000)
    os.close(fd)
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    while time.time() < deadline:
        time.sleep(0.05)


def test_engine_killed_mid_task_leaves_no_segment(sc: monq.Client, tmp_path: Path) -> None:
    key = sc.info.key
    sc.shm.config.pool_bytes = 0
    name_file, pid_file = tmp_path / "name", tmp_path / "pid"
    lb = sc.load_balanced_view()
    ar = lb.apply_async(hang_with_result_segment, np.ones(2 * MB), str(name_file),
                        str(pid_file))
    args_seg = sc.shm.segments()
    assert len(args_seg) == 1
    result_seg = shm.seg_name(shm.cluster_id(key), os.getpid(), f"r{ar.msg_id}")
    # written whole at once: the task polls for the file and must never read it half-written
    (tmp_path / "name.tmp").write_text(result_seg)
    os.replace(tmp_path / "name.tmp", name_file)
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60,
                         "the task to start"))
    assert os.path.exists(os.path.join(shm.DIR, result_seg))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(monq.EngineDied):
        ar.get(30)
    # the client frees its argument segment when the task is lost; the Hub sweeps the
    # result segment of a task that ended (after MONQ_SHM_GRACE)
    assert not os.path.exists(os.path.join(shm.DIR, args_seg[0]))
    wait_until(lambda: not os.path.exists(os.path.join(shm.DIR, result_seg)), 20,
               "the Hub to sweep the dead engine's result segment")
    sc.wait_for_engines(2, timeout=60)  # the supervisor restarts it


def test_cluster_stop_removes_every_segment(tmp_path: Path) -> None:
    cl = Cluster(ClusterConfig(n=1, home=tmp_path / "home", log_level="WARNING",
                               restart=False))
    try:
        info = cl.start(timeout=START_TIMEOUT)
        with monq.Client(connection_file=cl.connection_file, timeout=10.0) as c:
            r = c.load_balanced_view().apply_sync(ident, np.ones(2 * MB))
            assert _mapped(r)
        # a segment whose owner is alive (this process) is not the sweeper's to remove
        leftover = shm.Segment(shm.cluster_id(info.key), os.getpid(), "c")
        leftover.write([b"x" * 100])
        os.close(leftover.fd)
        assert cluster_segments(info.key)
    finally:
        cl.stop()
    assert cluster_segments(info.key) == []
