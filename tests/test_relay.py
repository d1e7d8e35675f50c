"""Unit tests of monq.schedulers.Relay, in-process: no cluster, only sockets.

Each test builds a Context, a SUB bound on an ``inproc://`` URL standing in for
the Hub's monitor, a Relay, a client DEALER and fake engine DEALERs, and
checks both what is relayed and the copies the monitor receives.

Resource handling: every socket is closed with linger=0 and the Context
terminated in ``finally`` (which ends the relay loop with ETERM); the relay
thread is joined with a timeout.  Every receive is bounded by a poll.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import zmq

from monq.schedulers import Relay, routerqueue

TIMEOUT_MS = 5000
_urls = itertools.count()


def recv(sock: zmq.Socket, timeout_ms: int = TIMEOUT_MS) -> list[bytes]:
    """One multipart message, or fail the test after ``timeout_ms``."""
    if not sock.poll(timeout_ms, zmq.POLLIN):
        pytest.fail(f"nothing received within {timeout_ms} ms")
    return sock.recv_multipart(zmq.NOBLOCK)


def nothing_more(sock: zmq.Socket, timeout_ms: int = 200) -> bool:
    return not sock.poll(timeout_ms, zmq.POLLIN)


@dataclass
class Rig:
    ctx: zmq.Context
    monitor: zmq.Socket
    relay: Relay
    client_url: str
    engine_url: str
    sockets: list[zmq.Socket] = field(default_factory=list)

    def socket(self, kind: int, connect: str, identity: bytes | None = None) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.linger = 0
        self.sockets.append(s)
        if identity is not None:
            s.identity = identity
        s.connect(connect)
        return s


def _rig(name: str, engine_side: int) -> Iterator[Rig]:
    ctx = zmq.Context()
    ctx.linger = 0
    monitor = None
    relay = None
    rig = None
    try:
        monitor = ctx.socket(zmq.SUB)
        monitor.linger = 0
        monitor.rcvhwm = 0
        url = f"inproc://test-relay-monitor-{next(_urls)}"
        monitor.bind(url)
        monitor.subscribe(b"")
        relay = Relay(ctx, name, engine_side, "127.0.0.1", url)
        client_port, engine_port = relay.start_and_wait(monitor)
        assert client_port and engine_port and client_port != engine_port
        assert relay.ports == (client_port, engine_port)
        rig = Rig(ctx, monitor, relay, f"tcp://127.0.0.1:{client_port}",
                  f"tcp://127.0.0.1:{engine_port}")
        yield rig
    finally:
        for s in rig.sockets if rig is not None else []:
            s.close(linger=0)
        if monitor is not None:
            monitor.close(linger=0)
        ctx.term()  # ends the relay loop (ETERM); it closes its own sockets
        if relay is not None and relay.is_alive():
            relay.join(timeout=5)
            assert not relay.is_alive(), "the relay thread did not end after ctx.term()"


@pytest.fixture
def task_rig() -> Iterator[Rig]:
    yield from _rig("task", zmq.DEALER)


@pytest.fixture
def direct_rig() -> Iterator[Rig]:
    yield from _rig("direct", zmq.ROUTER)


def _connected(rig: Rig, engine_id: bytes) -> tuple[zmq.Socket, zmq.Socket]:
    """A client and an engine the direct relay routes between (pings sent until the
    relay knows the engine, then drained from it)."""
    client = rig.socket(zmq.DEALER, rig.client_url, identity=b"client-1")
    engine = rig.socket(zmq.DEALER, rig.engine_url, identity=engine_id)
    for _ in range(50):
        client.send_multipart([engine_id, b"ping"])
        if engine.poll(100, zmq.POLLIN):
            break
    while not nothing_more(engine, 100):
        engine.recv_multipart()
    return client, engine


def test_engine_side_must_be_dealer_or_router() -> None:
    ctx = zmq.Context()
    try:
        with pytest.raises(ValueError):
            Relay(ctx, "x", zmq.PUB, "127.0.0.1", "inproc://nowhere")
    finally:
        ctx.term()


def test_task_relay_forwards_and_copies_both_directions(task_rig: Rig) -> None:
    client = task_rig.socket(zmq.DEALER, task_rig.client_url, identity=b"client-1")
    engine = task_rig.socket(zmq.DEALER, task_rig.engine_url, identity=b"engine-1")
    payload = [b"<IDS|MSG>", b"sig", b'{"h":1}', b"\x00\x01binary\xff", b""]
    client.send_multipart(payload)

    got = recv(engine)
    # ROUTER -> DEALER: the engine sees the client's identity first, then the frames
    assert got == [b"client-1", *payload]
    engine.send_multipart([b"client-1", b"<IDS|MSG>", b"reply", b"\xfe"])
    assert recv(client) == [b"<IDS|MSG>", b"reply", b"\xfe"]

    copies = [recv(task_rig.monitor), recv(task_rig.monitor)]
    assert copies == [
        [b"in.task", b"client-1", *payload],
        [b"out.task", b"client-1", b"<IDS|MSG>", b"reply", b"\xfe"],
    ]
    assert nothing_more(task_rig.monitor)


def test_direct_relay_routes_by_engine_identity(direct_rig: Rig) -> None:
    engine_id = uuid.uuid4().hex.encode()
    other_id = uuid.uuid4().hex.encode()
    client = direct_rig.socket(zmq.DEALER, direct_rig.client_url, identity=b"client-1")
    engine = direct_rig.socket(zmq.DEALER, direct_rig.engine_url, identity=engine_id)
    other = direct_rig.socket(zmq.DEALER, direct_rig.engine_url, identity=other_id)
    payload = [b"<IDS|MSG>", b"sig", b'{"h":1}', b"\x00data"]
    # the ROUTER learns the engines' identities when they connect: wait for that
    # by sending a first message until it arrives (a ROUTER drops unknown routes)
    for _ in range(50):
        client.send_multipart([engine_id, b"hello"])
        if engine.poll(100, zmq.POLLIN):
            break
    else:
        pytest.fail("the direct relay never reached the engine")
    assert engine.recv_multipart() == [b"client-1", b"hello"]
    hellos = 0
    while not nothing_more(direct_rig.monitor, 100):
        msg = direct_rig.monitor.recv_multipart()
        assert msg == [b"in.direct", engine_id, b"client-1", b"hello"]
        hellos += 1
    assert hellos >= 1

    client.send_multipart([engine_id, *payload])
    # the engine receives it with the client's identity first (identities swapped)
    assert recv(engine) == [b"client-1", *payload]
    assert nothing_more(other, 100)
    engine.send_multipart([b"client-1", b"<IDS|MSG>", b"reply"])
    # ... and the reply reaches the client, prefixed with the engine it came from
    assert recv(client) == [engine_id, b"<IDS|MSG>", b"reply"]

    copies = [recv(direct_rig.monitor), recv(direct_rig.monitor)]
    assert copies == [
        [b"in.direct", engine_id, b"client-1", *payload],
        [b"out.direct", b"client-1", engine_id, b"<IDS|MSG>", b"reply"],
    ]
    # the second engine can be addressed just as well
    client.send_multipart([other_id, b"to-other"])
    assert recv(other) == [b"client-1", b"to-other"]
    assert recv(direct_rig.monitor) == [b"in.direct", other_id, b"client-1", b"to-other"]
    assert nothing_more(engine, 100)


def test_direct_relay_drops_messages_for_unknown_engines(direct_rig: Rig) -> None:
    engine_id = b"engine-known"
    client = direct_rig.socket(zmq.DEALER, direct_rig.client_url, identity=b"client-1")
    engine = direct_rig.socket(zmq.DEALER, direct_rig.engine_url, identity=engine_id)
    for _ in range(50):
        client.send_multipart([engine_id, b"ping"])
        if engine.poll(100, zmq.POLLIN):
            break
    engine.recv_multipart()
    while not nothing_more(engine, 100):
        engine.recv_multipart()
    client.send_multipart([b"no-such-engine", b"lost", b"frames"])
    client.send_multipart([engine_id, b"after"])
    # the unknown route is dropped silently; the relay goes on with the next message
    assert recv(engine) == [b"client-1", b"after"]
    while not nothing_more(direct_rig.monitor, 100):
        direct_rig.monitor.recv_multipart()


@pytest.mark.parametrize("side", ["client", "engine"])
def test_direct_relay_survives_a_single_frame_message(direct_rig: Rig, side: str) -> None:
    """A stranger's one-frame message must not cost the next real message."""
    engine_id = b"engine-1"
    client, engine = _connected(direct_rig, engine_id)
    while not nothing_more(direct_rig.monitor, 100):
        direct_rig.monitor.recv_multipart()

    stray = direct_rig.socket(zmq.DEALER,
                              direct_rig.client_url if side == "client" else
                              direct_rig.engine_url, identity=b"stranger")
    stray.send(b"one lonely frame")
    time.sleep(0.3)  # let the stray frame reach the relay first
    if side == "client":
        client.send_multipart([engine_id, b"<IDS|MSG>", b"real"])
        assert recv(engine, 2000) == [b"client-1", b"<IDS|MSG>", b"real"]
    else:
        client.send_multipart([engine_id, b"<IDS|MSG>", b"real"])
        assert recv(engine, 2000) == [b"client-1", b"<IDS|MSG>", b"real"]
        engine.send_multipart([b"client-1", b"<IDS|MSG>", b"reply"])
        assert recv(client, 2000) == [engine_id, b"<IDS|MSG>", b"reply"]
    # the stray frame was dropped and counted, and never copied to the Hub
    assert sum(direct_rig.relay.rejected.values()) == 1, direct_rig.relay.rejected
    copies = []
    while not nothing_more(direct_rig.monitor, 100):
        copies.append(direct_rig.monitor.recv_multipart())
    assert copies[0] == [b"in.direct", engine_id, b"client-1", b"<IDS|MSG>", b"real"]
    assert all(b"one lonely frame" not in c for c in copies)


def test_direct_relay_drops_short_messages_keeps_order_and_copies(direct_rig: Rig) -> None:
    """A mix of valid and too-short messages: every valid one arrives, in order, copied once."""
    engine_id = b"engine-1"
    client, engine = _connected(direct_rig, engine_id)
    while not nothing_more(direct_rig.monitor, 100):
        direct_rig.monitor.recv_multipart()
    n = 500
    short = 0
    for i in range(n):
        if i % 3 == 0:
            client.send(b"x" * (i % 7))  # one frame: the relay sees two
            short += 1
        if i % 5 == 0:
            client.send(engine_id)  # identity only: two frames, nothing to deliver
            short += 1
        client.send_multipart([engine_id, b"<IDS|MSG>", str(i).encode()])
    got = [recv(engine) for _ in range(n)]
    assert got == [[b"client-1", b"<IDS|MSG>", str(i).encode()] for i in range(n)]
    assert nothing_more(engine)
    copies = [recv(direct_rig.monitor) for _ in range(n)]
    assert copies == [[b"in.direct", engine_id, b"client-1", b"<IDS|MSG>", str(i).encode()]
                      for i in range(n)]
    assert nothing_more(direct_rig.monitor)
    assert sum(direct_rig.relay.rejected.values()) == short


@pytest.mark.slow
def test_task_relay_balances_1000_messages_and_copies_all(task_rig: Rig) -> None:
    n = 1000
    client = task_rig.socket(zmq.DEALER, task_rig.client_url, identity=b"client-1")
    engines = {name: task_rig.socket(zmq.DEALER, task_rig.engine_url, identity=name)
               for name in (b"engine-a", b"engine-b")}
    # both engines must be connected before the burst, or the first takes everything
    for s in engines.values():
        s.send_multipart([b"nobody", b"hello"])  # a reply to an unknown client: dropped
    seen: Counter[bytes] = Counter()
    for _ in range(200):
        # out.* copies of the two hellos show both engine connections are up
        if task_rig.monitor.poll(50, zmq.POLLIN):
            assert task_rig.monitor.recv_multipart()[:2] == [b"out.task", b"nobody"]
            seen[b"hello"] += 1
        if seen[b"hello"] == 2:
            break
    assert seen[b"hello"] == 2

    for i in range(n):
        client.send_multipart([b"<IDS|MSG>", str(i).encode()])
    per_engine: Counter[bytes] = Counter()
    received: set[int] = set()
    poller = zmq.Poller()
    for s in [*engines.values(), client, task_rig.monitor]:
        poller.register(s, zmq.POLLIN)
    replies = 0
    copies: Counter[bytes] = Counter()
    while len(received) < n or replies < n:
        events = dict(poller.poll(TIMEOUT_MS))
        if not events:
            pytest.fail(f"stalled: {len(received)} of {n} delivered")
        for name, s in engines.items():
            while s in events:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                assert frames[:2] == [b"client-1", b"<IDS|MSG>"]
                received.add(int(frames[2]))
                per_engine[name] += 1
                s.send_multipart([b"client-1", b"<IDS|MSG>", b"r" + frames[2]])
        while client.poll(0, zmq.POLLIN):
            client.recv_multipart()
            replies += 1
        while task_rig.monitor.poll(0, zmq.POLLIN):
            copies[task_rig.monitor.recv_multipart()[0]] += 1
    assert received == set(range(n))
    # round-robin between two idle engines: an even split, give or take a little
    assert sum(per_engine.values()) == n
    assert min(per_engine.values()) >= n * 0.4, per_engine
    while sum(copies.values()) < 2 * n:
        if not task_rig.monitor.poll(TIMEOUT_MS, zmq.POLLIN):
            break
        copies[task_rig.monitor.recv_multipart()[0]] += 1
    assert copies == {b"in.task": n, b"out.task": n}, "the monitor dropped copies"
    assert nothing_more(task_rig.monitor)


def test_direct_relay_moves_messages_without_pyzmqs_per_frame_layers(
        direct_rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct loop holds the GIL (shared with the Hub) per message: it uses the
    Cython send/recv, never pyzmq's recv_multipart/send_multipart (2-3x its CPU),
    and looks at ZMQ_EVENTS rather than raising zmq.Again after the last message."""
    in_relay: Counter[str] = Counter()
    for name in ("recv_multipart", "send_multipart"):
        real = getattr(zmq.Socket, name)

        def counted(self: zmq.Socket, *a: object, _real: object = real, _name: str = name,
                    **k: object) -> object:
            if threading.current_thread() is direct_rig.relay:
                in_relay[_name] += 1
            return _real(self, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(zmq.Socket, name, counted)
    real_recv = routerqueue._recv

    def recv_counting_again(sock: zmq.Socket, *a: object) -> object:
        try:
            return real_recv(sock, *a)
        except zmq.Again:
            in_relay["zmq.Again"] += 1
            raise

    monkeypatch.setattr(routerqueue, "_recv", recv_counting_again)
    engine_id = b"engine-1"
    client, engine = _connected(direct_rig, engine_id)
    for i in range(20):
        client.send_multipart([engine_id, b"<IDS|MSG>", str(i).encode(), b"x" * 100_000])
        got = recv(engine)
        assert got[:3] == [b"client-1", b"<IDS|MSG>", str(i).encode()]
        assert len(got[3]) == 100_000
        engine.send_multipart([b"client-1", b"<IDS|MSG>", b"reply"])
        assert recv(client) == [engine_id, b"<IDS|MSG>", b"reply"]
    copies = 0
    while not nothing_more(direct_rig.monitor, 100):
        direct_rig.monitor.recv_multipart()
        copies += 1
    assert copies >= 40  # each request and reply copied once (and the pings)
    # nor does it end each wake-up on a raised zmq.Again: it asks the socket
    assert in_relay == Counter()


def test_direct_relay_copies_a_message_before_forwarding_it(
        direct_rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that has its reply may ask the Hub about it at once; the Hub takes in
    the copies waiting before it answers, so the copy must be waiting by then: the
    relay finishes the monitor copy before it sends the first frame on (a query right
    after a direct reply had found the task unfinished under load)."""
    order: list[str] = []
    real_send = routerqueue._send

    def send_noting(sock: zmq.Socket, frame: object, flags: int, *a: object) -> object:
        if threading.current_thread() is direct_rig.relay:
            order.append("copy" if sock.type == zmq.XPUB else "forward")
        return real_send(sock, frame, flags, *a)

    monkeypatch.setattr(routerqueue, "_send", send_noting)
    engine_id = b"engine-1"
    client, engine = _connected(direct_rig, engine_id)
    order.clear()
    engine.send_multipart([b"client-1", b"<IDS|MSG>", b"reply"])
    assert recv(client) == [engine_id, b"<IDS|MSG>", b"reply"]
    # prefix + 4 frames copied, then 4 forwarded
    assert order == ["copy"] * 5 + ["forward"] * 4, order
