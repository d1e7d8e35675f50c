"""Keys and transport: loopback binds, private files, no access without the key, CurveZMQ.

Most tests use the session clusters: ``cluster`` (plain, the default) and
``curve_cluster`` (``curve=True``).  Tests that start a cluster of their own
(restart, another --ip, the CLI) carry the ``slow`` marker.

Resource handling: raw sockets are closed with linger=0 and their Contexts
terminated in ``finally``; every receive is bounded by a poll; the TCP
eavesdropper's threads end when its sockets close; clusters a test starts
are stopped in ``finally`` (by ``with`` or the fixture).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket as _socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import zmq
from conftest import START_TIMEOUT, kill_cluster, monq_env, run_monq, wait_until

import monq
from monq.cluster import Cluster, ClusterConfig
from monq.connection import (
    DB_FILE,
    PORT_NAMES,
    ConnectionInfo,
    load_connection_file,
    write_connection_file,
)
from monq.protocol import DELIM, Session
from monq.security import CurveKeys, curve_keys

psutil = pytest.importorskip("psutil")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _listening(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port)
            for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def _copy_info(src: Path, dst: Path, **changes: Any) -> ConnectionInfo:
    info = dataclasses.replace(load_connection_file(src), **changes)
    write_connection_file(dst, info)
    return info


# --- binding and files -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cluster", "curve_cluster"])
def test_controller_listens_on_loopback_only_and_engines_bind_nothing(
        which: str, request: pytest.FixtureRequest) -> None:
    c: Cluster = request.getfixturevalue(which)
    info = load_connection_file(c.connection_file)
    assert info.ip == "127.0.0.1"
    assert set(info.ports) == set(PORT_NAMES)
    listening = _listening(info.controller_pid)
    assert listening == {("127.0.0.1", port) for port in info.ports.values()}
    # an engine listens on nothing but, once it has served a large result peer to peer
    # (monq.bulk: requests authenticated with the cluster key), its bulk server, on the
    # controller's interface
    with monq.Client(connection_file=c.connection_file, timeout=10.0) as client:
        client.wait_for_engines(2, timeout=30)
        bulk = {e: set(map(tuple, client[e].apply_sync(_bulk_listening)))
                for e in client.ids}
        pids = {e: client[e].apply_sync(os.getpid) for e in client.ids}
    for e, pid in pids.items():
        assert _listening(pid) == bulk[e], f"engine {e} listens on something else"
        assert all(host == "127.0.0.1" for host, _ in bulk[e])


# engines cannot import this module: its functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _bulk_listening() -> list[tuple[str, int]]:
    from monq import bulk

    return sorted(bulk.listening_in_process())


def test_connection_file_and_database_are_private(cluster: Cluster,
                                                   curve_cluster: Cluster) -> None:
    for c in (cluster, curve_cluster):
        assert _mode(c.connection_file) == 0o600
        assert _mode(c.connection_file.parent) & 0o077 == 0  # the profile dir: owner only
        db = c.config.profile_dir / DB_FILE
        assert db.exists() and _mode(db) == 0o600
        for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if extra.exists():
                assert _mode(extra) & 0o077 == 0, extra


# --- no key, no service -----------------------------------------------------------------------


def _ask_hub(info: ConnectionInfo, session: Session | None, msg_type: str,
             content: dict[str, Any], keys: CurveKeys | None = None) -> list[list[bytes]]:
    """Send one request to the Hub port with raw sockets; everything it answers within 1 s."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    try:
        s.linger = 0
        s.sndtimeo = 2000
        if keys is not None:
            s.curve_serverkey = keys.server_public
            s.curve_publickey = keys.client_public
            s.curve_secretkey = keys.client_secret
        s.connect(info.url("hub"))
        if session is None:  # unsigned: an empty signature
            s.send_multipart([DELIM, b"", json.dumps({"msg_type": msg_type}).encode(), b"{}",
                              b"{}", json.dumps(content).encode()])
        else:
            session.send(s, msg_type, "hub", content)
        got = []
        while s.poll(1000, zmq.POLLIN):
            got.append(s.recv_multipart())
        return got
    except zmq.Again:
        return []
    finally:
        s.close(linger=0)
        ctx.term()


def test_without_the_key_history_cannot_be_read(cluster: Cluster, client: monq.Client) -> None:
    client.load_balanced_view().apply_sync(lambda: "a task to find")
    assert client.hub_history(), "the history should not be empty"
    info = load_connection_file(cluster.connection_file)
    before = client.cluster_status()["rejected"]
    wrong = Session(os.urandom(32))
    for session in (wrong, None):
        for msg_type, content in (("history_request", {"limit": 10}),
                                  ("db_request", {"query": {}, "keys": ["msg_id"]}),
                                  ("hub_history_request", {}),
                                  ("result_request", {"msg_id": "x"})):
            answers = _ask_hub(info, session, msg_type, content)
            assert answers == [], (msg_type, answers)
    after = client.cluster_status()["rejected"]
    assert after.get("bad signature", 0) >= before.get("bad signature", 0) + 4
    assert after.get("unsigned", 0) >= before.get("unsigned", 0) + 4


def test_without_the_curve_keys_nothing_reaches_the_hub(curve_cluster: Cluster) -> None:
    info = load_connection_file(curve_cluster.connection_file)
    right = curve_keys(info)
    assert right is not None
    stranger = dataclasses.replace(CurveKeys.new(), server_public=right.server_public)
    # even holding the cluster key, a peer without the curve keys gets no answer
    for keys in (None, stranger):
        assert _ask_hub(info, Session(info.key), "history_request", {}, keys) == []
    # and with them, the same request is answered (the helper itself works)
    answers = _ask_hub(info, Session(info.key), "history_request", {}, right)
    assert len(answers) == 1 and b"history_reply" in answers[0][2]


# --- CurveZMQ ------------------------------------------------------------------------------


def test_curve_keys_in_the_connection_file(curve_cluster: Cluster) -> None:
    d = json.loads(curve_cluster.connection_file.read_text())
    keys = CurveKeys.from_json(d["curve"])
    assert zmq.curve_public(keys.server_secret) == keys.server_public
    assert zmq.curve_public(keys.client_secret) == keys.client_public
    assert keys.server_public != keys.client_public
    assert _mode(curve_cluster.connection_file) == 0o600


def test_a_client_with_the_connection_file_works(curve_cluster: Cluster) -> None:
    with monq.Client(connection_file=curve_cluster.connection_file, timeout=10) as c:
        ids = c.wait_for_engines(2, timeout=30)
        assert c.load_balanced_view().map_sync(lambda x: x * 3, range(20)) == \
            [x * 3 for x in range(20)]
        assert [c[i].apply_sync(lambda i=i: i) for i in ids] == ids
        assert c.history(limit=5)


def test_with_curve_large_buffers_stay_on_the_encrypted_channels(
        curve_cluster: Cluster) -> None:
    """Peer-to-peer transfers (monq.bulk) are authenticated, not encrypted: off with Curve."""
    import numpy as np

    with monq.Client(connection_file=curve_cluster.connection_file, timeout=10) as c:
        c.wait_for_engines(2, timeout=30)
        assert c.shm.bulk.config.enabled is False
        c.shm.config.enabled = False  # as if the engines were on another host
        before = dict(c.cluster_status()["payload_bytes"])
        a = np.arange(1 << 18, dtype=np.float64)  # 2 MiB, above the bulk threshold
        assert np.array_equal(c.load_balanced_view().apply_sync(lambda x: x, a), a)
        after = dict(c.cluster_status()["payload_bytes"])
        assert after.get("bulk", 0) == before.get("bulk", 0)
        assert after.get("wire", 0) - before.get("wire", 0) >= 2 * a.nbytes


@pytest.mark.parametrize("case", ["no curve keys", "wrong client keys", "wrong server key"])
def test_a_client_without_the_curve_keys_is_refused(curve_cluster: Cluster, tmp_path: Path,
                                                    case: str) -> None:
    info = load_connection_file(curve_cluster.connection_file)
    right = curve_keys(info)
    assert right is not None
    fresh = CurveKeys.new()
    if case == "no curve keys":
        curve = None
    elif case == "wrong client keys":
        curve = dataclasses.replace(right, client_public=fresh.client_public,
                                    client_secret=fresh.client_secret).to_json()
    else:
        curve = dataclasses.replace(right, server_public=fresh.server_public).to_json()
    path = tmp_path / "connection.json"
    _copy_info(curve_cluster.connection_file, path, curve=curve)
    with monq.Client(connection_file=curve_cluster.connection_file, timeout=10) as good:
        before = good.hub_history()
        timeout = 2.0
        t0 = time.monotonic()
        with pytest.raises(monq.AuthenticationError, match="(?i)curve"):
            monq.Client(connection_file=path, timeout=timeout)
        assert time.monotonic() - t0 < timeout + 2
        assert good.hub_history() == before, "something ran for a refused client"


def _stranger(ctx: zmq.Context, url: str, keys: CurveKeys | None,
              server_public: bytes) -> tuple[zmq.Socket, zmq.Socket]:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if keys is not None:
        s.curve_serverkey = server_public
        s.curve_publickey = keys.client_public
        s.curve_secretkey = keys.client_secret
    mon = s.get_monitor_socket()
    s.connect(url)
    return s, mon


def _handshake_failed(mon: zmq.Socket, timeout: float = 5.0) -> bool:
    from zmq.utils.monitor import recv_monitor_message

    failed = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
              zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mon.poll(100):
            ev = recv_monitor_message(mon)["event"]
            if ev & failed:
                return True
            assert ev != zmq.EVENT_HANDSHAKE_SUCCEEDED, "a stranger completed the handshake"
    return False


@pytest.mark.parametrize("port", ["task_engine", "direct_engine", "hub", "task_client"])
def test_strangers_cannot_complete_the_handshake(curve_cluster: Cluster, port: str) -> None:
    """A plain peer, and a Curve peer with its own keys, are both refused on every port."""
    info = load_connection_file(curve_cluster.connection_file)
    right = curve_keys(info)
    assert right is not None
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        for keys in (None, CurveKeys.new()):
            s, mon = _stranger(ctx, info.url(port), keys, right.server_public)
            socks += [s, mon]
            assert _handshake_failed(mon), f"no handshake failure seen ({port}, {keys})"
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


def test_curve_is_set_on_the_engine_sockets(curve_cluster: Cluster) -> None:
    """The engines' side of the bargain: they connect as Curve clients (checked in-process)."""
    info = load_connection_file(curve_cluster.connection_file)
    from monq.security import client_socket_setup

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    try:
        client_socket_setup(s, info)
        assert s.mechanism == zmq.CURVE
        assert not s.curve_server
    finally:
        s.close(linger=0)
        ctx.term()


# --- the wire -------------------------------------------------------------------------------


class Eavesdropper:
    """A TCP relay between a client and one controller port that keeps every byte it passes."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = _socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._socks: list[_socket.socket] = [self.listener]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pairs: dict[_socket.socket, _socket.socket] = {}
        while not self._stop.is_set():
            r, _, _ = select.select([self.listener, *pairs], [], [], 0.1)
            for s in r:
                if s is self.listener:
                    a, _ = self.listener.accept()
                    b = _socket.create_connection(self.target)
                    self._socks += [a, b]
                    pairs[a], pairs[b] = b, a
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    other = pairs.pop(s)
                    pairs.pop(other, None)
                    continue
                with self._lock:
                    self.seen += data
                pairs[s].sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self._socks:
            s.close()


@pytest.mark.parametrize("which", ["cluster", "curve_cluster"])
def test_what_crosses_the_wire(which: str, request: pytest.FixtureRequest,
                               tmp_path: Path) -> None:
    """With Curve a marker in a task never appears on the wire; without, it does (control)."""
    c: Cluster = request.getfixturevalue(which)
    info = load_connection_file(c.connection_file)
    taps = {name: Eavesdropper(info.ports[name]) for name in ("hub", "task_client")}
    try:
        path = tmp_path / "tapped.json"
        _copy_info(c.connection_file, path,
                   ports={**info.ports, **{n: t.port for n, t in taps.items()}})
        marker = "MONQ-MARKER-" + os.urandom(8).hex()
        with monq.Client(connection_file=path, timeout=10) as cl:
            assert cl.load_balanced_view().apply_sync(lambda m: m[::-1], marker) == marker[::-1]
        seen = b"".join(bytes(t.seen) for t in taps.values())
    finally:
        for t in taps.values():
            t.close()
    assert len(seen) > 200
    plain = marker.encode() in seen and marker[::-1].encode() in seen
    assert plain == (which == "cluster"), f"marker on the wire: {plain}"
    assert (b"apply_request" in seen) == (which == "cluster")


# --- clusters of their own ---------------------------------------------------------------------


def _controller(profile_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "monq.hub", "--profile-dir", str(profile_dir),
                             "--log-level", "WARNING", *extra], env=monq_env(),
                            stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_restarted_controller_keeps_the_curve_keys(tmp_path: Path) -> None:
    """Killed and restarted with the same profile: same keys, so old holders still get in."""
    pdir = tmp_path / "default"
    path = pdir / "connection.json"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        first = _controller(pdir, "--curve")
        procs.append(first)
        wait_until(lambda: path.exists() and load_connection_file(path).controller_pid ==
                   first.pid, START_TIMEOUT, "the first controller")
        old = path.read_text()
        first.kill()
        first.wait(10)
        second = _controller(pdir, "--curve")
        procs.append(second)
        wait_until(lambda: load_connection_file(path, check_alive=False).controller_pid ==
                   second.pid, START_TIMEOUT, "the second controller")
        new = json.loads(path.read_text())
        assert new["curve"] == json.loads(old)["curve"] and new["key"] == json.loads(old)["key"]
        # a client holding the old file (only the pid differs) still gets in
        stale = tmp_path / "old.json"
        stale.write_text(json.dumps({**json.loads(old), "controller_pid": second.pid,
                                     "ports": new["ports"]}))
        with monq.Client(connection_file=stale, timeout=10) as c:
            assert c.ids == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.mark.slow
def test_every_bind_uses_the_configured_ip(tmp_path: Path) -> None:
    # 127.0.0.2 is loopback too on Linux, yet distinct from the default
    with Cluster(ClusterConfig(n=1, home=tmp_path, ip="127.0.0.2")) as c:
        info = c.start(timeout=START_TIMEOUT)
        assert info.ip == "127.0.0.2"
        assert _listening(info.controller_pid) == {("127.0.0.2", p) for p in info.ports.values()}
        with monq.Client(connection_file=c.connection_file, timeout=10) as cl:
            assert cl.load_balanced_view().apply_sync(lambda: 5) == 5


@pytest.mark.slow
def test_monq_start_curve_from_the_command_line(monq_home: Path) -> None:
    try:
        r = run_monq("--home", str(monq_home), "start", "-n", "1", "--curve", "--daemon",
                     "--timeout", "60")
        assert r.returncode == 0, r.stderr + r.stdout
        path = monq_home / "default" / "connection.json"
        assert _mode(path) == 0o600
        assert CurveKeys.from_json(json.loads(path.read_text())["curve"])
        r = run_monq("--home", str(monq_home), "status", "--json")
        assert r.returncode == 0, r.stderr
        assert [e["status"] for e in json.loads(r.stdout)["engines"]] == ["alive"]
    finally:
        run_monq("--home", str(monq_home), "stop", timeout=60)
        kill_cluster(monq_home)
    wait_until(lambda: not (monq_home / "default" / "connection.json").exists(), 10,
               "the connection file to go")

