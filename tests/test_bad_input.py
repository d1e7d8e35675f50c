"""Bad input of every kind: a wrong key, no cluster, failing or unpicklable tasks, hostile traffic.

Tests that only read from the cluster or run ordinary failing tasks use the
shared session ``cluster``; tests that could leave it damaged (hostile
traffic, known-bug demonstrations) run against ``own_cluster``, a cluster of
this module alone.

Resource handling: every raw socket is closed with linger=0 and every
Context terminated in ``finally``; every receive is bounded by a poll and
every send by SNDTIMEO; the module's cluster is stopped by its fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import socket as _socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import START_TIMEOUT, run_monq, wait_until

import monq
from monq.cluster import Cluster, ClusterConfig
from monq.connection import (
    PORT_NAMES,
    ConnectionInfo,
    load_connection_file,
    pid_alive,
    write_connection_file,
)
from monq.protocol import DELIM, Session
from monq.security import CurveKeys, curve_keys
from monq.serialize import pack_apply

KEY_BYTES = 32


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 2-engine cluster for this module's tests that may damage it."""
    home = tmp_path_factory.mktemp("bad-input-home")
    with Cluster(ClusterConfig(n=2, home=home, log_level="DEBUG")) as c:
        c.start(timeout=START_TIMEOUT)
        yield c


def rejected(client: monq.Client) -> Counter[str]:
    return Counter(client.cluster_status()["rejected"])


def task_count(client: monq.Client) -> int:
    return len(client.hub_history())


def wrong_key_copy(src: Path, dst: Path) -> ConnectionInfo:
    info = load_connection_file(src)
    bad = ConnectionInfo(**{**info.__dict__, "key": os.urandom(KEY_BYTES)})
    write_connection_file(dst, bad)
    return bad


# --- a wrong key -------------------------------------------------------------------------


def test_wrong_key_is_refused_clearly_and_nothing_runs(cluster: Cluster, client: monq.Client,
                                                         tmp_path: Path) -> None:
    before_rej = rejected(client)
    before_tasks = task_count(client)
    bad_file = tmp_path / "wrong-key.json"
    bad = wrong_key_copy(cluster.connection_file, bad_file)

    t0 = time.monotonic()
    with pytest.raises(monq.AuthenticationError, match="key"):
        monq.Client(connection_file=bad_file, timeout=10.0)
    assert time.monotonic() - t0 < 5

    # a task signed with the wrong key, sent straight to both relays, runs nowhere
    marker = tmp_path / "ran"

    def touch() -> None:
        Path(marker).write_text("ran")

    session = Session(bad.key)
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        engine_uuid = next(e["uuid"] for e in client.cluster_status()["engines"]
                           if e["status"] == "alive")
        for port, idents in (("task_client", []), ("direct_client", [engine_uuid.encode()])):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.sndtimeo = 5000
            socks.append(s)
            s.connect(bad.url(port))
            buffers, raw = pack_apply(touch, (), {})
            session.send(s, "apply_request", port.split("_")[0], {}, buffers=buffers, raw=raw,
                         idents=idents)
        # the Hub's copies of both are refused: that is also when the engines had them
        wait_until(lambda: rejected(client)["bad signature"] >= before_rej["bad signature"] + 3,
                   10, "the Hub to count the wrong-key messages")
        for s in socks:
            assert not s.poll(500, zmq.POLLIN), "a wrong-key task got an answer"
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    assert not marker.exists()
    assert task_count(client) == before_tasks, "a wrong-key message was recorded as a task"
    # and the cluster serves its rightful users as before
    assert client.load_balanced_view().apply_sync(lambda: 42) == 42


# --- no cluster ------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = _socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _fake_connection_file(path: Path, controller_pid: int) -> None:
    ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES)), strict=True))
    info = ConnectionInfo(key=os.urandom(KEY_BYTES), ports=ports,
                          controller_pid=controller_pid)
    write_connection_file(path, info)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.pid


@pytest.mark.parametrize("case", ["no file", "dead pid", "nothing listening"])
def test_no_cluster_is_a_clear_error_within_the_timeout(case: str, tmp_path: Path) -> None:
    path = tmp_path / "connection.json"
    if case == "dead pid":
        _fake_connection_file(path, _dead_pid())
    elif case == "nothing listening":
        _fake_connection_file(path, os.getpid())  # alive, but it is not a controller
    timeout = 1.5
    t0 = time.monotonic()
    with pytest.raises(monq.NoClusterError, match="no cluster"):
        monq.Client(connection_file=path, timeout=timeout)
    assert time.monotonic() - t0 < timeout + 2


def test_no_cluster_in_the_default_profile(monq_home: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(monq.NoClusterError, match="no cluster running"):
        monq.Client(timeout=1.0)
    assert time.monotonic() - t0 < 3


# --- tasks that go wrong ------------------------------------------------------------------------


def test_function_that_raises(client: monq.Client) -> None:
    def divide(x: int) -> float:
        return 1 / x  # the failing line

    ar = client.load_balanced_view().apply_async(divide, 0)
    with pytest.raises(monq.RemoteError) as ei:
        ar.get(timeout=30)
    err = ei.value
    assert err.ename == "ZeroDivisionError"
    assert "division by zero" in err.evalue
    # the remote traceback points at the function and its failing line (cloudpickle 3
    # replaces the file name with "<dynamic-code>", so the source text is not shown)
    line = divide.__code__.co_firstlineno + 1
    assert f"line {line}, in divide" in err.traceback, err.traceback
    assert err.engine in client.ids
    assert err.msg_id == ar.msg_id
    assert ar.metadata["status"] == "error"
    assert "ZeroDivisionError" in err.render_traceback()


def test_unpicklable_function_fails_at_submit_and_sends_nothing(client: monq.Client) -> None:
    lock = threading.Lock()
    before = task_count(client)
    v = client.load_balanced_view()
    with pytest.raises(monq.SerializationError, match="pickle"):
        v.apply_async(lambda: lock.locked())
    with pytest.raises(monq.SerializationError):
        client[client.ids[0]].apply_async(lambda: lock.locked())
    assert task_count(client) == before
    assert v.apply_sync(lambda: "still fine") == "still fine"


def test_unpicklable_result_is_a_clear_remote_error(client: monq.Client) -> None:
    def make_lock() -> Any:
        import threading

        return threading.Lock()

    for view in (client.load_balanced_view(), client[client.ids[-1]]):
        ar = view.apply_async(make_lock)
        with pytest.raises(monq.RemoteError, match="cannot be sent back") as ei:
            ar.get(timeout=30)
        assert "lock" in ei.value.evalue.lower()
        assert ei.value.engine in client.ids
    assert client.load_balanced_view().apply_sync(lambda: 7 * 6) == 42


@pytest.mark.parametrize("code", [None, 3, "bye"])
def test_task_calling_sys_exit_errors_and_the_engine_survives(client: monq.Client,
                                                              code: Any) -> None:
    ids = client.ids

    def leave() -> None:
        import sys

        sys.exit(code)

    for eid in ids:
        with pytest.raises(monq.RemoteError) as ei:
            client[eid].apply_async(leave).get(timeout=30)
        assert ei.value.ename == "SystemExit"
        assert ei.value.engine == eid

    def getpid() -> int:
        import os

        return os.getpid()

    assert client.ids == ids
    assert len(set(client[:].apply_sync(getpid))) == len(ids)
    assert client.load_balanced_view().map_sync(lambda x: x + 1, range(10)) == list(range(1, 11))


# --- hostile traffic -----------------------------------------------------------------------------

N_HOSTILE = 10_000
BIG = 3 << 20  # "oversized": a few MB
PUB_PORTS = ("notify", "hb_ping")


class _Touch:
    """Unpickling this creates a file: proof that something unverified reached pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class Garbage:
    """Hostile messages of every shape for one port; see :meth:`messages`.

    Kinds: random frames (1 to 8, sometimes with a delimiter), truncated (a valid
    message with a frame cut short), bad JSON (garbage in the JSON frames, correctly
    signed), unsigned, forged (signed with another key), tampered (a signed message
    whose payload was replaced by a pickle that would create a file if ever unpickled),
    replayed (a valid signed message sent twice), oversized (a few MB), and wrong
    identities (addressed to nobody, to a real engine or client, or forged).
    """

    KINDS = ("random", "truncated", "bad json", "unsigned", "forged", "tampered", "replayed")

    def __init__(self, rng: random.Random, key: bytes, port: str, engine_uuids: list[bytes],
                 client_ids: list[bytes], evil: bytes) -> None:
        self.rng = rng
        self.port = port
        self.good = Session(key)
        self.forger = Session(os.urandom(KEY_BYTES))
        self.engine_uuids = engine_uuids
        self.client_ids = client_ids
        self.evil = evil
        self.channel = port.split("_")[0]
        self.kinds: Counter[str] = Counter()

    def _idents(self) -> list[bytes]:
        r = self.rng.random()
        if self.port == "direct_client":
            if r < 0.8:
                return [self.rng.choice(self.engine_uuids)]  # so the garbage reaches an engine
            return [self.rng.randbytes(self.rng.randint(1, 40))]
        if self.port.endswith("_engine"):
            if r < 0.4:
                return [self.rng.choice(self.client_ids)]  # garbage routed to a real client
            return [b"no-such-client"] if r < 0.7 else [self.rng.randbytes(16)]
        return []

    def _random(self) -> list[bytes]:
        frames = [self.rng.randbytes(self.rng.randint(0, 80))
                  for _ in range(self.rng.randint(1, 8))]
        if self.rng.random() < 0.3:
            frames.insert(self.rng.randint(0, len(frames)), DELIM)
        if self.port == "hb_pong" and self.rng.random() < 0.3:
            frames = [b"ping", str(self.rng.randint(0, 10**6)).encode()]
        return frames

    def _valid(self, session: Session, evil: bool = False) -> list[Any]:
        if self.port == "hub":
            t = self.rng.choice(["status_request", "history_request", "db_request"])
            content = {"limit": 1} if t == "history_request" else (
                {"query": {}, "keys": ["msg_id"]} if t == "db_request" else {})
            _, frames = session.serialize(t, "hub", content)
        elif self.port.endswith("_client"):
            if evil:
                buffers, raw = [self.evil], [False]
            else:
                buffers, raw = pack_apply(abs, (-1,), {})
            _, frames = session.serialize("apply_request", self.channel, {},
                                          metadata={"label": "hostile"},
                                          buffers=buffers, raw=raw)
        else:
            # a reply to a task nobody sent (a new id each time: the Hub records what a key
            # holder says, and one row per reply is what such an insider costs it)
            _, frames = session.serialize("apply_reply", self.channel, {"status": "ok"},
                                          parent={"msg_id": f"no-such-task-{self.rng.random()}"},
                                          buffers=[self.evil] if evil else [])
        return [*self._idents(), *frames]

    def _one(self) -> list[list[Any]]:
        if self.port == "hb_pong":
            kind = "random"
        else:
            kind = self.rng.choice(self.KINDS)
        self.kinds[kind] += 1
        if kind == "random":
            return [self._random()]
        if kind == "forged":
            return [self._valid(self.forger, evil=True)]
        if kind == "replayed":
            msg = self._valid(self.good)
            return [msg, list(msg)]
        msg = self._valid(self.good, evil=kind == "tampered")
        i = msg.index(DELIM)
        if kind == "truncated":
            j = self.rng.randrange(i + 1, len(msg))
            msg[j] = bytes(msg[j])[: len(msg[j]) // 2]
        elif kind == "bad json":
            parts = [self.rng.choice([b"{", b"[1,2]", b"\xff\xfe", b'{"buffers": 7}', b"null",
                                      b'{"date": "x", "buffers": []}'])
                     if self.rng.random() < 0.5 else bytes(p) for p in msg[i + 2: i + 6]]
            msg[i + 2: i + 6] = parts
            msg[i + 1] = self.good.sign(parts + [bytes(b) for b in msg[i + 6:]])
        elif kind == "unsigned":
            msg[i + 1] = self.rng.choice([b"", b"0" * 63, b"x" * 65])
        elif kind == "tampered":
            # signed for one payload, carrying another (the pickle): the MAC must catch it
            msg[-1] = pack_apply(abs, (-1,), {})[0][0]
            msg[i + 1] = self.good.sign([bytes(p) for p in msg[i + 2: i + 6]] +
                                        [msg[-1]])
            msg[-1] = self.evil
        return [msg]

    def messages(self, n: int) -> Iterator[list[Any]]:
        sent = 0
        while sent < n:
            if self.rng.random() < 0.0005:
                self.kinds["oversized"] += 1
                yield [*self._idents(), DELIM, self.rng.randbytes(64), b"{}", b"{}", b"{}",
                       b"{}", os.urandom(BIG)]
                sent += 1
                continue
            for msg in self._one():
                yield msg
                sent += 1


def _pub_garbage(rng: random.Random, n: int, kinds: Counter[str]) -> Iterator[list[bytes]]:
    """What an XSUB can say to a PUB: (un)subscriptions of any size, and anything else."""
    for _ in range(n):
        r = rng.random()
        if r < 0.0005:
            kinds["oversized"] += 1
            yield [b"\x02" + os.urandom(BIG)]
        elif r < 0.001:
            # a subscription far above the PUB's inbound cap (SMALL_MSG): the peer is cut off.
            # Not megabytes: libzmq keeps a subscription in a trie with one node per byte,
            # and tearing down a multi-MB one overflows the stack (that is why the
            # controller caps what its PUB sockets accept)
            kinds["oversized subscription"] += 1
            yield [b"\x01" + os.urandom(64 << 10)]
        elif r < 0.5:
            kinds["subscription"] += 1
            yield [rng.choice([b"\x00", b"\x01"]) + rng.randbytes(rng.randint(0, 40))]
        else:
            kinds["random"] += 1
            yield [rng.randbytes(rng.randint(0, 80)) for _ in range(rng.randint(1, 5))]


def _send(sock: zmq.Socket, msg: list[Any], deadline: float) -> None:
    """Send without blocking forever: retry while the peer's queue is full, until deadline."""
    while True:
        try:
            sock.send_multipart(msg, zmq.NOBLOCK, copy=len(msg[-1]) < BIG)
            return
        except zmq.Again:
            if time.monotonic() > deadline:
                raise
            while sock.poll(0, zmq.POLLIN):
                sock.recv_multipart(zmq.NOBLOCK)
            time.sleep(0.001)


def _flood_port(info: ConnectionInfo, port: str, n: int, seed: int, engine_uuids: list[bytes],
                client_ids: list[bytes], evil: bytes, deadline: float,
                results: dict[str, Counter[str]], errors: list[BaseException],
                identity: bytes | None = None) -> None:
    """Send ``n`` hostile messages to ``port``; runs in its own thread with its own Context."""
    ctx = zmq.Context()
    sock = None
    try:
        rng = random.Random(seed)
        if port in PUB_PORTS:
            sock = ctx.socket(zmq.XSUB)
            kinds: Counter[str] = Counter()
            gen: Iterator[list[Any]] = _pub_garbage(rng, n, kinds)
        else:
            sock = ctx.socket(zmq.DEALER)
            g = Garbage(rng, info.key, port, engine_uuids, client_ids, evil)
            kinds = g.kinds
            gen = g.messages(n)
        sock.linger = 0
        sock.rcvhwm = 100
        if identity is not None:
            sock.identity = identity
        sock.connect(info.url(port))
        sent = 0
        for msg in gen:
            if identity is not None:
                # a forged identity: the ROUTER refuses the connection (the real engine holds
                # that identity), so nothing can be sent at all; that is the expected outcome
                try:
                    _send(sock, msg, min(deadline, time.monotonic() + 2))
                except zmq.Again:
                    kinds["refused"] += 1
                    break
            else:
                _send(sock, msg, deadline)
            sent += 1
            if sent % 200 == 0:  # throw away whatever comes back
                while sock.poll(0, zmq.POLLIN):
                    sock.recv_multipart(zmq.NOBLOCK)
        kinds["sent"] = sent
        results[port if identity is None else f"{port} as {identity!r}"] = kinds
    except BaseException as e:  # reported to the test
        errors.append(e)
    finally:
        if sock is not None:
            sock.close(linger=0)
        ctx.term()


def _raw_tcp_junk(info: ConnectionInfo, ports: list[str], n: int, seed: int,
                  results: dict[str, Counter[str]], errors: list[BaseException]) -> None:
    """Transport-level garbage: TCP connections that speak broken ZMTP, then hang up."""
    rng = random.Random(seed)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\x00" * 16 + \
        b"\x00" + b"\x00" * 31
    kinds: Counter[str] = Counter()
    try:
        for i in range(n):
            port = ports[i % len(ports)]
            r = rng.random()
            if r < 0.3:
                data = rng.randbytes(rng.randint(1, 200))
            elif r < 0.6:
                data = greeting[: rng.randint(1, len(greeting))]
            elif r < 0.9:  # a full greeting, then garbage where the handshake should be
                data = greeting + rng.randbytes(rng.randint(1, 100))
            else:  # a frame that claims to be huge
                data = greeting + b"\x06" + (1 << 40).to_bytes(8, "big") + b"x" * 10
            with _socket.create_connection(("127.0.0.1", info.ports[port]), timeout=2) as s:
                try:
                    s.sendall(data)
                except OSError:
                    pass
            kinds[port] += 1
        results["raw tcp"] = kinds
    except BaseException as e:
        errors.append(e)


def _start(target: Any, *args: Any) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def flood_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 2-engine cluster for the flood, logging at INFO (DEBUG would log every refusal)."""
    home = tmp_path_factory.mktemp("flood-home")
    with Cluster(ClusterConfig(n=2, home=home, log_level="INFO")) as c:
        c.start(timeout=START_TIMEOUT)
        yield c


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~60 s on 2 idle cores; several times that on a loaded machine
def test_hostile_traffic_on_every_port_while_a_workload_runs(flood_cluster: Cluster,
                                                             tmp_path: Path) -> None:
    """10,000 hostile messages to each of the 8 ports the controller binds, under load.

    Engines bind nothing: every port is the controller's.  task_engine is flooded while
    a direct-only workload runs: in plain mode any peer there is handed load-balanced
    tasks (that is what --curve is for; see test_a_stranger_on_the_task_engine_port...),
    so a flood there during load-balanced work would swallow tasks by design.  The other
    seven ports are flooded together while load-balanced and direct work runs.
    """
    info = load_connection_file(flood_cluster.connection_file)
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Touch(str(marker)))
    deadline = time.monotonic() + 200
    results: dict[str, Counter[str]] = {}
    errors: list[BaseException] = []
    pids = dict(flood_cluster.pids)
    with monq.Client(connection_file=flood_cluster.connection_file, timeout=10.0) as c:
        ids = c.wait_for_engines(2, timeout=30)
        uuids = [e["uuid"].encode() for e in c.cluster_status()["engines"]
                 if e["status"] == "alive"]
        assert len(uuids) == 2
        client_ids = [c.session.session_id.encode()]
        n_before = task_count(c)

        # phase 1: task_engine, with direct work only
        t = _start(_flood_port, info, "task_engine", N_HOSTILE, 1, uuids, client_ids, evil,
                   deadline, results, errors)
        direct = [c[eid].apply_async(lambda x, e=eid: (e, x), i)
                  for i in range(150) for eid in ids]
        assert [d.get(timeout=120) for d in direct] == \
            [(eid, i) for i in range(150) for eid in ids]
        t.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not t.is_alive() and not errors, errors

        # phase 2: the seven other ports, plus forged identities and broken ZMTP
        ports = ["task_client", "direct_client", "direct_engine", "hub", "notify", "hb_ping",
                 "hb_pong"]
        threads = [_start(_flood_port, info, p, N_HOSTILE, 10 + k, uuids, client_ids, evil,
                          deadline, results, errors) for k, p in enumerate(ports)]
        threads += [_start(_flood_port, info, p, 300, 30 + k, uuids, client_ids, evil, deadline,
                           results, errors, uuids[0])
                    for k, p in enumerate(["direct_engine", "hb_pong"])]
        threads.append(_start(_raw_tcp_junk, info, [*ports, "task_engine"], 400, 40, results,
                              errors))
        v = c.load_balanced_view()
        n_lb = 2000
        ar = v.map_async(lambda x: x * x, range(n_lb), chunksize=1)
        direct = [c[eid].apply_async(lambda x, e=eid: (e, -x), i)
                  for i in range(250) for eid in ids]
        assert ar.get(timeout=120) == [x * x for x in range(n_lb)]
        assert [d.get(timeout=60) for d in direct] == \
            [(eid, -i) for i in range(250) for eid in ids]
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "the flood did not end"
        assert not errors, errors
        for port in ["task_engine", *ports]:
            assert results[port]["sent"] >= N_HOSTILE, (port, results[port])
        for port in ports:
            if port not in PUB_PORTS and port != "hb_pong":
                kinds = results[port]
                assert all(kinds[k] > 0 for k in Garbage.KINDS), (port, kinds)

        # nobody died, nothing was unpickled, the cluster still works
        assert {n: p for n, p in flood_cluster.pids.items()} == pids
        assert all(pid_alive(p) for p in pids.values())
        assert not marker.exists(), "an unverified payload was unpickled"
        assert c.ids == ids
        st = c.cluster_status()
        assert sorted(e["id"] for e in st["engines"] if e["status"] == "alive") == ids
        assert v.map_sync(lambda x: -x, range(50)) == [-x for x in range(50)]
        assert [c[eid].apply_sync(lambda: "ok") for eid in ids] == ["ok", "ok"]

        # every task of the workload is in the history, as ok
        rows = c.db_query({"msg_id": {"$in": ar.msg_ids + [d.msg_id for d in direct]}},
                          keys=["msg_id", "status"])
        assert len(rows) == n_lb + len(direct) and {r["status"] for r in rows} == {"ok"}
        assert task_count(c) >= n_before + n_lb + 600

    # and `monq status` shows what was refused, by reason
    r = run_monq("--home", str(flood_cluster.config.home), "status", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    refused = json.loads(r.stdout)["rejected"]
    for reason in ("bad signature", "replay", "malformed", "unsigned",
                   "direct relay: too few frames", "bad pong"):
        assert refused.get(reason, 0) > 0, (reason, refused)
    r = run_monq("--home", str(flood_cluster.config.home), "status", timeout=60)
    assert "rejected messages: " in r.stdout and "bad signature" in r.stdout


# --- the three former known bugs --------------------------------------------------------------


def _curve_socket(ctx: zmq.Context, info: ConnectionInfo, kind: int = zmq.DEALER,
                  keys: CurveKeys | None = None) -> zmq.Socket:
    """A raw socket with the cluster's curve keys (or ``keys``): an insider's or a stranger's."""
    s = ctx.socket(kind)
    s.linger = 0
    s.sndtimeo = 5000
    right = curve_keys(info)
    assert right is not None
    k = keys or right
    s.curve_serverkey = right.server_public
    s.curve_publickey = k.client_public
    s.curve_secretkey = k.client_secret
    return s


@pytest.mark.slow
def test_a_stranger_on_the_task_engine_port_gets_no_tasks(curve_cluster: Cluster) -> None:
    """Under Curve only holders of the cluster's keys can connect; a stranger gets nothing.

    (Formerly a known bug: a DEALER load-balances to every connected peer, so without
    authentication a stranger on task_engine was handed a share of the tasks.)
    """
    info = load_connection_file(curve_cluster.connection_file)
    ctx = zmq.Context()
    strangers: list[zmq.Socket] = []
    try:
        own_keys = _curve_socket(ctx, info, keys=CurveKeys.new())
        plain = ctx.socket(zmq.DEALER)
        plain.linger = 0
        strangers = [own_keys, plain]
        for s in strangers:
            s.connect(info.url("task_engine"))
        with monq.Client(connection_file=curve_cluster.connection_file, timeout=10.0) as c:
            v = c.load_balanced_view()
            ars = [v.apply_async(lambda i=i: i) for i in range(20)]
            assert [a.get(timeout=30) for a in ars] == list(range(20))
            for s in strangers:
                assert not s.poll(500, zmq.POLLIN), "a stranger was handed a task"
    finally:
        for s in strangers:
            s.close(linger=0)
        ctx.term()


@pytest.mark.slow
def test_without_curve_the_task_engine_port_is_for_trusted_local_users(
        own_cluster: Cluster) -> None:
    """The assumption plain mode rests on, written down: the ports are on loopback only.

    Without ``--curve`` nothing authenticates a connection, and any process that can reach
    task_engine would be handed load-balanced tasks (it cannot run or forge anything: that
    needs the key).  So plain mode binds 127.0.0.1 and trusts the machine's local users;
    README "Security" says so, and ``--curve`` is the answer for anything else.
    """
    info = load_connection_file(own_cluster.connection_file)
    assert info.ip == "127.0.0.1" and info.curve is None
    for port in info.ports.values():
        s = _socket.socket()
        try:
            s.settimeout(2)
            # reachable on loopback ...
            s.connect(("127.0.0.1", port))
        finally:
            s.close()
    hosts = {a[4][0] for a in _socket.getaddrinfo(_socket.gethostname(), None,
                                                  _socket.AF_INET)} - {"127.0.0.1"}
    for host in sorted(hosts)[:2]:
        if host.startswith("127."):
            continue
        s = _socket.socket()
        try:
            s.settimeout(2)
            # ... and on no other interface of this machine
            assert s.connect_ex((host, info.ports["task_engine"])) != 0, host
        finally:
            s.close()


@pytest.mark.slow
def test_a_replayed_task_does_not_run_twice(curve_cluster: Cluster, tmp_path: Path) -> None:
    """A captured request replayed by anyone without the cluster's curve keys runs nowhere.

    Replay protection in the engines is per receiver, and the task relay load-balances,
    so a replay that reached the relay could run once on each engine.  Under Curve it
    cannot reach the relay: capturing needs the curve keys (traffic is encrypted, and
    strangers cannot connect to task_engine), and so does sending.  Whoever holds the keys
    holds the connection file, and with it the cluster key: they can run anything anyway.
    """
    info = load_connection_file(curve_cluster.connection_file)
    log = tmp_path / "runs.log"

    def record() -> None:
        import os

        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")

    buffers, raw = pack_apply(record, (), {})
    _, frames = Session(info.key).serialize("apply_request", "task", {}, buffers=buffers, raw=raw)
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        owner = _curve_socket(ctx, info)
        plain = ctx.socket(zmq.DEALER)
        plain.linger = 0
        plain.sndtimeo = 0
        stranger = _curve_socket(ctx, info, keys=CurveKeys.new())
        stranger.sndtimeo = 0
        socks = [owner, plain, stranger]
        for s in socks:
            s.connect(info.url("task_client"))
        owner.send_multipart(frames)  # the original
        wait_until(log.exists, 10, "the task to run once")
        for s in (plain, stranger):  # the replays: same bytes, from outside
            for _ in range(3):
                with contextlib.suppress(zmq.Again):
                    s.send_multipart(frames, zmq.NOBLOCK)
        with monq.Client(connection_file=curve_cluster.connection_file, timeout=10) as c:
            # whatever was going to reach an engine has reached it once the Hub has seen
            # a later task: both go through the same relay, in order
            assert c.load_balanced_view().apply_sync(lambda: "later") == "later"
        runs = log.read_text().split()
        assert len(runs) == 1, f"ran {len(runs)} times, on pids {sorted(set(runs))}"
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


@pytest.mark.slow
def test_a_replay_in_plain_mode_is_refused_by_its_engine_and_counted(
        own_cluster: Cluster, tmp_path: Path) -> None:
    """Without Curve: a replay to the same engine does not run again, and the Hub counts it."""
    info = load_connection_file(own_cluster.connection_file)
    log = tmp_path / "runs.log"

    def record() -> None:
        with open(log, "a") as f:
            f.write("ran\n")

    with monq.Client(connection_file=own_cluster.connection_file, timeout=10.0) as c:
        before = rejected(c)
        uuid = next(e["uuid"] for e in c.cluster_status()["engines"] if e["status"] == "alive")
        buffers, raw = pack_apply(record, (), {})
        _, frames = Session(info.key).serialize("apply_request", "direct", {},
                                                buffers=buffers, raw=raw)
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        try:
            s.linger = 0
            s.sndtimeo = 5000
            s.connect(info.url("direct_client"))
            for _ in range(3):
                s.send_multipart([uuid.encode(), *frames])
            wait_until(lambda: rejected(c)["replay"] >= before["replay"] + 2, 10,
                       "the Hub to count both replays")
            replies = 0
            while s.poll(1000, zmq.POLLIN):
                s.recv_multipart()
                replies += 1
            assert replies == 1
        finally:
            s.close(linger=0)
            ctx.term()
    assert log.read_text().split() == ["ran"]


@pytest.mark.slow
@pytest.mark.parametrize("port", ["direct_client", "direct_engine"])
def test_a_single_frame_on_the_direct_port_costs_nothing(own_cluster: Cluster,
                                                         port: str) -> None:
    """(Formerly a known bug of pyzmq's C loop; the direct relay is monq's own now.)"""
    info = load_connection_file(own_cluster.connection_file)
    ctx = zmq.Context()
    stranger = ctx.socket(zmq.DEALER)
    try:
        stranger.linger = 0
        stranger.sndtimeo = 5000
        stranger.connect(info.url(port))
        with monq.Client(connection_file=own_cluster.connection_file, timeout=10.0) as c:
            before = rejected(c)
            stranger.send(b"one frame")
            wait_until(lambda: rejected(c)["direct relay: too few frames"] >
                       before["direct relay: too few frames"], 10, "the relay to count it")
            for eid in c.ids:
                assert c[eid].apply_async(lambda: "through").get(timeout=5) == "through"
    finally:
        stranger.close(linger=0)
        ctx.term()


def test_connection_file_helper_is_json(tmp_path: Path) -> None:
    # _fake_connection_file writes what load_connection_file reads back
    path = tmp_path / "c.json"
    _fake_connection_file(path, os.getpid())
    d = json.loads(path.read_text())
    assert set(d["ports"]) >= {"hub", "task_client"}
    assert load_connection_file(path).controller_pid == os.getpid()
