"""Large buffers served peer to peer over TCP (monq.bulk): correct, one copy, safe, freed.

One real cluster for the module (2 engines); clients turn shared memory off
(``client.shm.config.enabled = False``), which is what a client on another
host gets.  Nothing is timed: the tests count bytes through the Hub, bytes
received, buffers served, requests refused; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from typing import Any

import cloudpickle
import numpy as np
import pytest

import monq
from monq import bulk
from monq.bulk import BulkConfig, BulkError, Fetcher, Server
from monq.cluster import Cluster, ClusterConfig
from monq.errors import ProtocolError
from monq.protocol import Session
from monq.serialize import pack_apply
from tests.conftest import START_TIMEOUT, wait_until

MB = 1 << 20

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def bc(cluster: Cluster) -> Iterator[monq.Client]:
    """A client of the session cluster that uses no shared memory, as if across hosts."""
    c = monq.Client(connection_file=cluster.connection_file, timeout=10.0)
    try:
        c.wait_for_engines(2, timeout=30)
        c.shm.config.enabled = False  # as if the engines were on another host
        yield c
    finally:
        c.close()


def payload_bytes(c: monq.Client) -> dict[str, int]:
    return dict(c.cluster_status()["payload_bytes"])


def recv_buffer(a: np.ndarray) -> Any:
    """The buffer ``a``'s memory belongs to (following .base and memoryview.obj)."""
    b: Any = a
    while True:
        if isinstance(b, np.ndarray) and b.base is not None:
            b = b.base
        elif isinstance(b, memoryview):
            b = b.obj
        else:
            return b


def ident(x: Any) -> Any:
    return x


def probe(x: np.ndarray) -> tuple[bool, float, int]:
    """On the engine: is the argument a view of one whole receive buffer (no copy)?"""
    from monq import bulk as _bulk

    owner = recv_buffer(x)
    whole = isinstance(owner, np.ndarray) and owner.dtype == np.uint8 and \
        owner.nbytes == x.nbytes and owner.ctypes.data == x.ctypes.data
    return whole, float(x[-1]), _bulk.served_in_process()


def served_on_engine() -> int:
    from monq import bulk as _bulk

    return _bulk.served_in_process()


def my_pid() -> int:
    return os.getpid()


# -- the path ------------------------------------------------------------------------


def test_roundtrip_goes_through_bulk(bc: monq.Client) -> None:
    dv = bc[bc.ids[0]]
    a = np.arange(MB, dtype=np.float64)  # 8 MB
    whole, last, _ = dv.apply_sync(probe, a)
    assert whole and last == a[-1]  # the engine's argument is its receive buffer itself
    before = payload_bytes(bc)
    got_before = bc.shm.bulk.fetcher.received
    ar = dv.apply_async(ident, a)
    r = ar.get(30)
    assert np.array_equal(r, a) and r.dtype == a.dtype
    # one copy: the result is a view of the one buffer the bytes were received into
    owner = recv_buffer(r)
    assert isinstance(owner, np.ndarray) and owner.nbytes == a.nbytes
    assert owner.ctypes.data == r.ctypes.data and r.flags.writeable
    assert bc.shm.bulk.fetcher.received - got_before == a.nbytes
    after = payload_bytes(bc)
    # the relays and the Hub saw a request and a reply of a few hundred bytes each
    assert after.get("wire", 0) - before.get("wire", 0) < 64 << 10
    assert after.get("bulk", 0) - before.get("bulk", 0) == 2 * a.nbytes
    rec = bc.task_record(ar.msg_id)
    assert rec.request_bytes is not None and a.nbytes <= rec.request_bytes < a.nbytes + 4096
    assert rec.result_bytes is not None and a.nbytes <= rec.result_bytes < a.nbytes + 4096
    # the task ended: the client serves nothing more, the engine sent its result once
    assert bc.shm.bulk.served() == 0
    assert dv.apply_sync(served_on_engine) == 0


def test_load_balanced_and_small_buffers(bc: monq.Client) -> None:
    lb = bc.load_balanced_view()
    a = np.ones(2 * MB, dtype=np.float32)
    assert np.array_equal(lb.apply_sync(lambda x: x * 2, a), a * 2)
    small = np.arange(1000)  # under the threshold: inside the signed stream
    before = payload_bytes(bc)
    assert np.array_equal(lb.apply_sync(ident, small), small)
    assert payload_bytes(bc).get("bulk", 0) == before.get("bulk", 0)


def test_bulk_off_falls_back_to_frames(bc: monq.Client) -> None:
    bc.shm.bulk.config.enabled = False
    a = np.arange(MB, dtype=np.float64)
    before = payload_bytes(bc)
    r = bc.load_balanced_view().apply_sync(ident, a)
    after = payload_bytes(bc)
    assert np.array_equal(r, a) and not isinstance(recv_buffer(r), np.ndarray)
    assert after.get("bulk", 0) == before.get("bulk", 0)
    assert after.get("wire", 0) - before.get("wire", 0) >= 2 * a.nbytes
    assert BulkConfig.from_env({"MONQ_BULK": "0"}).enabled is False
    cfg = BulkConfig.from_env({"MONQ_BULK_THRESHOLD": "4MB"})
    assert cfg.enabled and cfg.threshold == 4_000_000


def test_shared_memory_still_wins_on_one_host(cluster: Cluster) -> None:
    from monq import shm

    if not shm.supported():
        pytest.skip("no writable /dev/shm")
    with monq.Client(connection_file=cluster.connection_file, timeout=10.0) as c:
        c.wait_for_engines(2, timeout=30)
        a = np.arange(MB, dtype=np.float64)
        before = payload_bytes(c)
        assert np.array_equal(c.load_balanced_view().apply_sync(ident, a), a)
        after = payload_bytes(c)
        assert after.get("shm", 0) - before.get("shm", 0) == 2 * a.nbytes
        assert after.get("bulk", 0) == before.get("bulk", 0)


def test_served_buffers_released_when_tasks_end_or_client_closes(bc: monq.Client) -> None:
    lb = bc.load_balanced_view()
    a = np.ones(2 * MB)
    with pytest.raises(monq.RemoteError):
        lb.apply_sync(lambda x: 1 / 0, a)
    assert bc.shm.bulk.served() == 0
    ev_file = os.path.join(os.path.dirname(bc.connection_file), f"bulk-go-{os.getpid()}")

    def wait_for_file(x: np.ndarray, path: str) -> float:
        import time as _t

        deadline = _t.monotonic() + 20
        while not os.path.exists(path) and _t.monotonic() < deadline:
            _t.sleep(0.01)
        return float(x.sum())

    ar = lb.apply_async(wait_for_file, a, ev_file)
    try:
        assert bc.shm.bulk.served() == 1  # served while the task runs
        host, port = bc.shm.bulk.server.host, bc.shm.bulk.server.port
    finally:
        bc.close()  # before the task ends: the client stops serving at once
        with open(ev_file, "w"):
            pass
    assert bc.shm.bulk.served() == 0
    with pytest.raises(monq.MonqError):
        ar.get(1)
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=5):
        pass
    os.unlink(ev_file)


def test_engine_killed_before_the_fetch_is_a_clean_error(tmp_path: Any) -> None:
    c = Cluster(ClusterConfig(n=1, home=tmp_path, log_level="WARNING"))
    try:
        c.start(timeout=START_TIMEOUT)
        with monq.Client(connection_file=c.connection_file, timeout=10.0) as cl:
            cl.wait_for_engines(1, timeout=30)
            cl.shm.config.enabled = False
            pid = cl[cl.ids[0]].apply_sync(my_pid)
            fetch = cl.shm.bulk.fetcher.fetch

            def kill_then_fetch(handle: Any) -> Any:
                os.kill(pid, signal.SIGKILL)  # the engine that serves the result dies
                wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                           open(f"/proc/{pid}/stat").read().split()[2] == "Z", 10,
                           "the engine to die")
                return fetch(handle)

            cl.shm.bulk.fetcher.fetch = kill_then_fetch  # type: ignore[method-assign]
            ar = cl[cl.ids[0]].apply_async(ident, np.ones(MB))
            with pytest.raises(BulkError, match="cannot reach|failed"):
                ar.get(30)
    finally:
        c.stop()


# -- the server and fetcher alone ----------------------------------------------------


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(b"k" * 32, "127.0.0.1", grace=0.2)
    try:
        yield s
    finally:
        s.close()


def test_wrong_key_is_refused_and_others_still_served(server: Server) -> None:
    a = np.arange(MB, dtype=np.uint8)
    h = [0, *server.serve(a)]
    with pytest.raises(BulkError, match="refused"):
        Fetcher(b"x" * 32, timeout=5).fetch(h)
    assert server.refused == 1
    good = Fetcher(b"k" * 32, timeout=5)
    try:
        pos, mv = good.fetch(h)
        assert pos == 0 and bytes(mv) == a.tobytes()
        # unknown id: a clear error, and the same connection keeps working
        bad = list(h)
        bad[3] = "00" * 16
        with pytest.raises(BulkError, match="no longer serves"):
            good.fetch(bad)
        assert bytes(good.fetch(h)[1]) == a.tobytes()
        # a handle whose size disagrees with what is served is never read
        wrong = list(h)
        wrong[4] = 10
        with pytest.raises(BulkError, match="answered"):
            good.fetch(wrong)
        assert bytes(good.fetch(h)[1][:8]) == a.tobytes()[:8]
        for forged in ([0, "127.0.0.1", h[2]], [0, "", h[2], h[3], 1], [0, "h", 0, h[3], 1],
                       [-1, "h", 1, h[3], 1], [0, "h", 1, "zz", 1], "junk"):
            with pytest.raises(BulkError, match="bad bulk handle"):
                good.fetch(forged)
    finally:
        good.close()


def test_once_entries_served_once_or_expire_and_drop(server: Server) -> None:
    f = Fetcher(b"k" * 32, timeout=5)
    try:
        h = [0, *server.serve(b"x" * 100, once=True)]
        assert bytes(f.fetch(h)[1]) == b"x" * 100
        with pytest.raises(BulkError, match="no longer serves"):
            f.fetch(h)
        server.serve(b"y" * 100, once=True)  # nobody comes: gone after the grace
        wait_until(lambda: server.served() == 0, 10, "the unfetched result to expire")
        b = bulk.Bulk(b"k" * 32)
        h2 = [0, *server.serve(b"z" * 100, once=True)]
        b.discard({"bufs": [h2]})  # no connection to that sender yet: left to the grace
        assert server.served() == 1
        b.fetch_all([], {"bufs": [[0, *server.serve(b"w" * 10)]]})  # now there is one
        b.discard({"bufs": [h2]})  # the client says it will not fetch it
        assert server.served() == 1  # only the one it fetched (not once) is left
        b.close()
    finally:
        f.close()


def _fake_peer(behaviour: str) -> tuple[socket.socket, threading.Thread]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)

    def run() -> None:
        conn, _ = ls.accept()
        with conn:
            conn.recv(1 + 16 + 32)
            if behaviour == "short":
                conn.sendall(struct.pack(">BQ", 0, 1000) + b"x" * 500)
            else:  # stall: answer nothing until the client gives up
                conn.settimeout(10)
                try:
                    conn.recv(1)  # returns when the client gives up and closes
                except OSError:
                    pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return ls, t


@pytest.mark.parametrize("behaviour", ["short", "stall"])
def test_peer_that_dies_or_stalls_mid_fetch_is_an_error_not_a_hang(behaviour: str) -> None:
    ls, t = _fake_peer(behaviour)
    port = ls.getsockname()[1]
    f = Fetcher(b"k" * 32, timeout=0.5)
    try:
        with pytest.raises(BulkError, match="failed"):
            f.fetch([0, "127.0.0.1", port, "ab" * 16, 1000])
    finally:
        f.close()
        t.join(15)
        ls.close()
    with pytest.raises(BulkError, match="cannot reach"):
        Fetcher(b"k" * 32, timeout=0.5).fetch([0, "127.0.0.1", port, "ab" * 16, 1])


def test_tampered_bulk_handle_is_rejected_by_the_mac() -> None:
    key = os.urandom(32)
    b = bulk.Bulk(key)
    try:
        arr = np.ones(MB)
        bufs, raw = pack_apply(ident, (arr,), {})
        md: dict[str, Any] = {}
        bufs, raw, ticket = b.offload(bufs, raw, md, once=False)
        assert ticket is not None and b.served() == 1 and len(md["bulk"]["bufs"]) == 1
        # served in place: the server sends from the caller's array, no copy was made
        (entry,) = b.server._entries.values()
        assert np.frombuffer(entry.view, np.uint8).ctypes.data == arr.ctypes.data
        sender, receiver = Session(key), Session(key)
        _, frames = sender.serialize("apply_request", "task", {}, metadata=md, buffers=bufs,
                                     raw=raw)
        forged = json.loads(frames[4])
        forged["bulk"]["bufs"][0][2] += 1  # another port
        with pytest.raises(ProtocolError, match="signature"):
            receiver.feed([*frames[:4], json.dumps(forged).encode(), *frames[5:]])
        assert receiver.feed(frames).metadata["bulk"] == md["bulk"]
        ticket.release()
        assert b.served() == 0
    finally:
        b.close()


def test_receive_buffers_reused_only_when_nothing_views_them() -> None:
    pool = bulk.RecvPool(idle=0.2)
    a = pool.take(MB)
    del a
    b = pool.take(MB)  # the first one, free again
    assert (pool.allocated, pool.reused) == (1, 1)
    view = np.frombuffer(memoryview(b), np.float64)  # what pickle would hand out
    del b
    c = pool.take(MB)  # the first is still viewed: a second buffer
    assert (pool.allocated, pool.reused) == (2, 1)
    assert not np.shares_memory(view, c)
    del view, c
    wait_until(lambda: pool.pooled() == 0, 10, "idle buffers to be freed")


def test_repeated_roundtrips_reuse_receive_buffers(bc: monq.Client) -> None:
    dv = bc[bc.ids[0]]
    a = np.arange(MB, dtype=np.float64)
    pool = bc.shm.bulk.fetcher.pool
    held = dv.apply_sync(ident, a)  # held: its buffer is never written again
    reused = pool.reused
    for i in range(4):
        assert dv.apply_sync(ident, a + i)[-1] == a[-1] + i  # each result dropped at once
    assert pool.reused - reused >= 3
    assert np.array_equal(held, a)
