"""Tests for monq.protocol: framing, signing, verification and replay protection."""

from __future__ import annotations

import json
import pickle
import random
import time

import cloudpickle
import numpy as np
import pytest
import zmq

from monq import serialize as ser
from monq.errors import ProtocolError
from monq.protocol import DELIM, N_FIXED, VERSION, Message, ReplayGuard, Session, split_idents

KEY = b"k" * 32
OTHER_KEY = b"x" * 32
TIMEOUT_MS = 5000


# -- helpers and fixtures ---------------------------------------------------------


@pytest.fixture
def ctx():
    c = zmq.Context()
    try:
        yield c
    finally:
        c.destroy(linger=0)


def _sock(ctx: zmq.Context, kind: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.linger = 0
    return s


@pytest.fixture
def router_dealer(ctx):
    """A ROUTER bound on a random port and a DEALER (with a known identity) connected to it."""
    router = _sock(ctx, zmq.ROUTER)
    dealer = _sock(ctx, zmq.DEALER)
    try:
        dealer.identity = b"dealer-1"
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        yield router, dealer
    finally:
        dealer.close(linger=0)
        router.close(linger=0)


def recv_frames(sock: zmq.Socket, timeout: int = TIMEOUT_MS) -> list[zmq.Frame]:
    assert sock.poll(timeout, zmq.POLLIN), "timed out waiting for a message"
    return sock.recv_multipart(copy=False)


def session_recv(session: Session, sock: zmq.Socket, timeout: int = TIMEOUT_MS) -> Message | None:
    assert sock.poll(timeout, zmq.POLLIN), "timed out waiting for a message"
    return session.recv(sock, zmq.NOBLOCK)


def frames_of(session: Session, msg_type: str = "apply_request", channel: str = "task",
              **kw) -> list[bytes]:
    """A valid message as a list of bytes frames (starting at the delimiter)."""
    _, frames = session.serialize(msg_type, channel, **kw)
    return [bytes(f) if not isinstance(f, bytes) else f for f in frames]


def signed_frames(session: Session, parts: list[bytes], buffers: list[bytes] = ()) -> list[bytes]:
    """Frames for arbitrary JSON parts, correctly signed with ``session``'s key."""
    buffers = list(buffers)
    return [DELIM, session.sign(parts + buffers), *parts, *buffers]


def valid_header(session: Session, channel: str = "task", nbuf: int = 0, **extra) -> dict:
    hdr = session.header("apply_request", channel)
    hdr["buffers"] = [[1, False]] * nbuf
    hdr.update(extra)
    return hdr


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def assert_rejected(session: Session, frames, reason: str) -> ProtocolError:
    before = session.rejected[reason]
    with pytest.raises(ProtocolError) as ei:
        session.feed(frames)
    assert ei.value.reason == reason, f"rejected as {ei.value.reason!r} ({ei.value})"
    assert session.rejected[reason] == before + 1
    return ei.value


def pair() -> tuple[Session, Session]:
    """A sender and a receiver sharing the cluster key."""
    return Session(KEY), Session(KEY)


# -- round trips --------------------------------------------------------------------


def test_session_requires_key():
    with pytest.raises(ValueError):
        Session(b"")


def test_serialize_feed_round_trip_and_header_fields():
    tx, rx = pair()
    before = time.time()
    bufs = [b"signed-bytes", b"r" * 100, memoryview(b"third")]
    hdr, frames = tx.serialize(
        "apply_request", "task",
        content={"a": 1, "s": "é"}, parent={"msg_id": "p"}, metadata={"m": [1, 2]},
        buffers=bufs, raw=[False, True, False],
    )
    assert frames[0] == DELIM
    assert len(frames) == 1 + N_FIXED + 3
    assert len(frames[1]) == 64
    msg = rx.feed([b"id1", b"id2", *frames])
    assert isinstance(msg, Message)
    assert msg.idents == [b"id1", b"id2"]
    assert msg.header == hdr
    assert msg.content == {"a": 1, "s": "é"}
    assert msg.parent == {"msg_id": "p"}
    assert msg.metadata == {"m": [1, 2]}
    assert [bytes(b) for b in msg.buffers] == [bytes(b) for b in bufs]
    assert msg.signature == frames[1]
    assert msg.raw_flags == [False, True, False]
    # header fields
    assert len(hdr["msg_id"]) == 32 and msg.msg_id == hdr["msg_id"]
    assert hdr["msg_type"] == "apply_request" == msg.msg_type
    assert hdr["session"] == tx.session_id
    assert hdr["channel"] == "task"
    assert hdr["seq"] == 1
    assert before <= hdr["date"] <= time.time()
    assert hdr["version"] == VERSION
    assert hdr["buffers"] == [[12, False], [100, True], [5, False]]
    assert rx.rejected == {}


def test_header_numbering_is_per_channel_and_msg_ids_unique():
    tx = Session(KEY, session_id="sess")
    seqs = [tx.header("x", "task")["seq"] for _ in range(3)]
    assert seqs == [1, 2, 3]
    assert tx.header("x", "hub")["seq"] == 1
    assert tx.header("x", "task")["seq"] == 4
    ids = {tx.header("x", "task")["msg_id"] for _ in range(100)}
    assert len(ids) == 100
    assert tx.header("x", "task", msg_id="fixed")["msg_id"] == "fixed"
    assert tx.header("x", "task")["session"] == "sess"


def test_msg_ids_start_with_the_current_millisecond_as_the_clock_moves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids made within one millisecond share its 12 hex digits (made once per ms), and the
    next millisecond's ids carry it: the prefix follows the clock, never lags it."""
    import monq.protocol as protocol

    now = [1_800_000_000.0001]
    monkeypatch.setattr(protocol.time, "time", lambda: now[0])
    ids = protocol._Ids()
    first = [ids() for _ in range(50)]
    now[0] += 0.001
    second = [ids() for _ in range(50)]
    t2 = now[0]
    now[0] -= 0.5  # a clock stepped back is followed too
    third = ids()
    assert {i[:12] for i in first} == {f"{int(1_800_000_000.0001 * 1000):012x}"}
    assert {i[:12] for i in second} == {f"{int(t2 * 1000):012x}"}
    assert int(t2 * 1000) == int(1_800_000_000.0001 * 1000) + 1
    assert third[:12] == f"{int(now[0] * 1000):012x}"
    assert len(set(first + second + [third])) == 101
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in first + second)


def test_serialize_checks_raw_flags_length():
    tx = Session(KEY)
    with pytest.raises(ValueError):
        tx.serialize("x", "task", buffers=[b"a", b"b"], raw=[True])


def test_serialize_with_explicit_header_keeps_it():
    tx, rx = pair()
    hdr = tx.header("apply_request", "task", msg_id="m1")
    out, frames = tx.serialize("ignored", "ignored", buffers=[b"abc"], header=hdr)
    assert out["msg_id"] == "m1" and out["msg_type"] == "apply_request"
    assert out["buffers"] == [[3, False]]
    assert "buffers" not in hdr  # the caller's dict is not modified
    assert rx.feed(frames).header == out


def test_feed_accepts_zmq_frames():
    tx, rx = pair()
    _, frames = tx.serialize("x", "task", content={"v": 1}, buffers=[b"abc", b"d" * 10],
                             raw=[False, True])
    msg = rx.feed([zmq.Frame(b"ident"), *(zmq.Frame(bytes(f)) for f in frames)])
    assert msg.idents == [b"ident"]
    assert msg.content == {"v": 1}


def test_split_idents():
    tx = Session(KEY)
    frames = frames_of(tx)
    idents, rest = split_idents([b"a", b"b", *frames])
    assert idents == [b"a", b"b"] and rest == frames
    with pytest.raises(ProtocolError):
        split_idents([b"a", b"b"])


def test_send_recv_over_router_dealer(router_dealer):
    router, dealer = router_dealer
    client, server = pair()
    big = np.arange(100_000, dtype=np.float64)
    pframes, raw = ser.serialize({"arr": big, "x": 1})
    assert raw == [False, True]
    sent = client.send(dealer, "apply_request", "task", content={"q": 1},
                       metadata={"label": "t"}, buffers=pframes, raw=raw)
    msg = session_recv(server, router)
    assert msg is not None
    assert msg.idents == [b"dealer-1"]
    assert msg.header == sent
    assert msg.content == {"q": 1} and msg.metadata == {"label": "t"}
    assert msg.raw_flags == [False, True]
    assert all(isinstance(b, zmq.Frame) for b in msg.buffers)
    obj = ser.deserialize(msg.buffers)
    assert obj["x"] == 1 and np.array_equal(obj["arr"], big)

    # the reply goes back to the dealer through the ROUTER's ident
    reply_hdr = server.send(router, "apply_reply", "task", content={"status": "ok"},
                            parent=msg.header, idents=msg.idents)
    reply = session_recv(client, dealer)
    assert reply is not None
    assert reply.idents == []
    assert reply.header == reply_hdr
    assert reply.parent == sent
    assert reply.content == {"status": "ok"}
    assert client.rejected == {} and server.rejected == {}


def test_recv_returns_none_for_rejected_and_keeps_going(router_dealer):
    router, dealer = router_dealer
    client, server = pair()
    evil = Session(OTHER_KEY)
    dealer.send_multipart(frames_of(evil))
    assert session_recv(server, router) is None
    dealer.send_multipart([b"garbage"])
    assert session_recv(server, router) is None
    good = frames_of(client)
    dealer.send_multipart(good)
    assert session_recv(server, router) is not None
    dealer.send_multipart(good)  # replayed
    assert session_recv(server, router) is None
    assert server.rejected == {"bad signature": 1, "malformed": 1, "replay": 1}
    client.send(dealer, "apply_request", "task")
    assert session_recv(server, router) is not None


# -- rejection ------------------------------------------------------------------------


def test_reject_no_delimiter():
    tx, rx = pair()
    frames = frames_of(tx)
    assert_rejected(rx, frames[1:], "malformed")
    assert_rejected(rx, [], "malformed")
    assert_rejected(rx, [b"ident", *frames[1:]], "malformed")


def test_reject_delimiter_hidden_after_many_idents():
    tx, rx = pair()
    # identities are short and few; a delimiter buried deep is not looked for
    assert_rejected(rx, [b"i"] * 20 + frames_of(tx), "malformed")
    assert rx.feed([b"i"] * 16 + frames_of(tx)).idents == [b"i"] * 16


def test_reject_too_few_frames():
    tx, rx = pair()
    frames = frames_of(tx)
    for n in range(1, 1 + N_FIXED):
        assert_rejected(rx, frames[:n], "malformed")


def test_reject_missing_signature():
    tx, rx = pair()
    frames = frames_of(tx)
    frames[1] = b""
    assert_rejected(rx, frames, "unsigned")
    # and a message that simply lacks the signature frame
    frames = frames_of(tx, buffers=[b"x"])
    assert_rejected(rx, [frames[0], *frames[2:]], "unsigned")


@pytest.mark.parametrize("sig", [b"0" * 63, b"0" * 65, b"0" * 32, b"\x00" * 128])
def test_reject_wrong_length_signature(sig):
    tx, rx = pair()
    frames = frames_of(tx)
    frames[1] = sig
    assert_rejected(rx, frames, "unsigned")


def test_reject_signature_with_other_key():
    evil = Session(OTHER_KEY)
    rx = Session(KEY)
    assert_rejected(rx, frames_of(evil), "bad signature")
    assert_rejected(rx, frames_of(evil, buffers=[b"p"], raw=[False]), "bad signature")
    assert_rejected(rx, frames_of(evil, buffers=[b"p"], raw=[True]), "bad signature")


def test_reject_wrong_but_well_formed_signature():
    tx, rx = pair()
    frames = frames_of(tx)
    frames[1] = b"0" * 64
    assert_rejected(rx, frames, "bad signature")


@pytest.mark.parametrize("index,name", [(2, "header"), (3, "parent"), (4, "metadata"),
                                        (5, "content")])
def test_reject_tampered_json_parts(index, name):
    tx, rx = pair()
    frames = frames_of(tx, content={"code": "ok"}, parent={"p": 1}, metadata={"m": 2})
    doc = json.loads(frames[index])
    doc["injected"] = True
    frames[index] = dumps(doc)
    assert_rejected(rx, frames, "bad signature")


def test_reject_tampered_header_same_length():
    tx, rx = pair()
    frames = frames_of(tx, msg_type="apply_request")
    frames[2] = frames[2].replace(b"apply_request", b"apply_rEquest")
    assert_rejected(rx, frames, "bad signature")


def test_reject_bytes_moved_between_json_frames():
    tx, rx = pair()
    frames = frames_of(tx, parent={"a": 1}, content={"b": 2})
    # same concatenation, different split: the MAC matches but it is not valid JSON
    frames[2], frames[3] = frames[2] + frames[3][:1], frames[3][1:]
    with pytest.raises(ProtocolError):
        rx.feed(frames)


def test_reject_tampered_signed_buffer():
    tx, rx = pair()
    payload, raw = ser.serialize({"x": 1})
    frames = frames_of(tx, buffers=payload, raw=raw)
    b = bytearray(frames[-1])
    b[len(b) // 2] ^= 0x01
    frames[-1] = bytes(b)
    assert_rejected(rx, frames, "bad signature")


def test_reject_signed_buffer_swapped_for_another_of_same_size():
    tx, rx = pair()
    frames = frames_of(tx, buffers=[b"aaaa", b"bbbb"])
    frames[-2], frames[-1] = frames[-1], frames[-2]
    assert_rejected(rx, frames, "bad signature")


def test_raw_buffer_content_is_outside_the_mac_but_size_is_bound():
    tx, rx = pair()
    frames = frames_of(tx, buffers=[b"stream", b"\x00" * 1000], raw=[False, True])
    # documented: raw buffers are plain memory, not covered by the MAC
    frames[-1] = b"\xff" * 1000
    msg = rx.feed(frames)
    assert bytes(msg.buffers[1]) == b"\xff" * 1000

    for size in (999, 1001, 0):
        frames = frames_of(tx, buffers=[b"stream", b"\x00" * 1000], raw=[False, True])
        frames[-1] = b"\x00" * size
        assert_rejected(rx, frames, "malformed")


def test_raw_flags_cannot_be_flipped():
    tx, rx = pair()
    frames = frames_of(tx, buffers=[b"stream"], raw=[False])
    hdr = json.loads(frames[2])
    hdr["buffers"][0][1] = True  # pretend the pickle stream is unsigned raw data
    frames[2] = dumps(hdr)
    assert_rejected(rx, frames, "bad signature")


def test_reject_extra_or_missing_buffer_frames():
    tx, rx = pair()
    frames = frames_of(tx, buffers=[b"one", b"two"])
    assert_rejected(rx, frames + [b"three"], "bad signature")
    assert_rejected(rx, frames[:-1], "bad signature")
    assert_rejected(rx, frames[: 1 + N_FIXED], "bad signature")

    frames = frames_of(tx)
    assert_rejected(rx, frames + [b"extra"], "bad signature")

    # raw buffers are not in the MAC, so a missing/extra raw frame keeps the
    # signature valid and is caught by the signed buffer count instead
    frames = frames_of(tx, buffers=[b"raw"], raw=[True])
    with pytest.raises(ProtocolError):
        rx.feed(frames[:-1])
    with pytest.raises(ProtocolError):
        rx.feed(frames + [b"raw2"])
    assert sum(rx.rejected.values()) == 6


@pytest.mark.parametrize("bad", [
    b"{not json",
    b"",
    b"\xff\xfe\x00",
    b'{"a":1}{"b":2}',
])
@pytest.mark.parametrize("index", [3, 4, 5])
def test_reject_garbage_json_with_right_key(bad, index):
    tx, rx = pair()
    parts = [dumps(valid_header(tx)), b"{}", b"{}", b"{}"]
    parts[index - 2] = bad
    assert_rejected(rx, signed_frames(tx, parts), "malformed")


@pytest.mark.parametrize("bad", [b"{not json", b"", b"\xff\xfe", b"null", b"[]", b'"s"', b"3",
                                 b"{}", b'{"buffers":"x"}', b'{"buffers":[1]}',
                                 b'{"buffers":[["a",false]]}', b'{"buffers":[[1]]}'])
def test_reject_garbage_header_with_right_key(bad):
    tx, rx = pair()
    parts = [bad, b"{}", b"{}", b"{}"]
    assert_rejected(rx, signed_frames(tx, parts, [b"x"] if b"buffers" in bad else []),
                    "malformed")


@pytest.mark.parametrize("missing", ["date", "seq", "session", "channel"])
def test_reject_header_missing_replay_fields(missing):
    tx, rx = pair()
    hdr = valid_header(tx)
    del hdr[missing]
    assert_rejected(rx, signed_frames(tx, [dumps(hdr), b"{}", b"{}", b"{}"]), "malformed")


@pytest.mark.parametrize("index", [3, 4, 5])
@pytest.mark.parametrize("doc", [b"[]", b"[1,2]", b'"str"', b"1", b"null", b"true"])
def test_reject_json_that_is_not_an_object(index, doc):
    tx, rx = pair()
    parts = [dumps(valid_header(tx)), b"{}", b"{}", b"{}"]
    parts[index - 2] = doc
    assert_rejected(rx, signed_frames(tx, parts), "malformed")


def test_garbage_header_with_wrong_key_reports_bad_signature():
    evil, rx = Session(OTHER_KEY), Session(KEY)
    assert_rejected(rx, signed_frames(evil, [b"{garbage", b"{}", b"{}", b"{}"]), "bad signature")


def test_reject_replay_of_identical_frames():
    tx, rx = pair()
    frames = frames_of(tx, content={"n": 1}, buffers=[b"a"])
    rx.feed(frames)
    assert_rejected(rx, frames, "replay")
    assert_rejected(rx, [b"other-ident", *frames], "replay")
    # a second receiver (its own memory) accepts it once
    Session(KEY).feed(frames)


def test_reject_lower_seq_same_session_and_channel():
    tx, rx = pair()
    first = frames_of(tx, channel="task")
    second = frames_of(tx, channel="task")
    third = frames_of(tx, channel="task")
    rx.feed(third)
    assert_rejected(rx, first, "replay")
    assert_rejected(rx, second, "replay")


def test_same_seq_on_other_channel_or_session_is_fine():
    tx, rx = pair()
    a = frames_of(tx, channel="task")
    b = frames_of(tx, channel="hub")
    assert json.loads(a[2])["seq"] == json.loads(b[2])["seq"] == 1
    rx.feed(a)
    rx.feed(b)
    other = Session(KEY)
    c = frames_of(other, channel="task")
    assert json.loads(c[2])["seq"] == 1
    rx.feed(c)
    assert rx.rejected == {}
    assert len(rx.replay) == 3


def test_seq_gaps_are_fine():
    tx, rx = pair()
    frames_of(tx)  # seq 1 lost in transit
    rx.feed(frames_of(tx))  # seq 2
    rx.feed(frames_of(tx))  # seq 3
    assert rx.rejected == {}


@pytest.mark.parametrize("offset", [-100.0, +100.0])
def test_reject_stale_date(offset):
    tx = Session(KEY)
    rx = Session(KEY, replay_window=10.0)
    hdr = tx.header("apply_request", "task")
    hdr["date"] += offset
    _, frames = tx.serialize("apply_request", "task", header=hdr)
    assert_rejected(rx, frames, "stale")
    # within the window it is fine
    hdr = tx.header("apply_request", "task")
    hdr["date"] -= 5.0
    _, frames = tx.serialize("apply_request", "task", header=hdr)
    rx.feed(frames)


def test_nan_date_rejected():
    # NaN is not JSON: a signed header carrying one is refused as malformed (never "fresh")
    tx, rx = pair()
    hdr = valid_header(tx, date=float("nan"))
    assert_rejected(rx, signed_frames(tx, [dumps(hdr), b"{}", b"{}", b"{}"]), "malformed")


def test_hostile_unsigned_json_never_escapes_as_other_exception():
    """The header is parsed before the MAC is checked: that parse must be bullet proof."""
    rx = Session(KEY)
    nested = b"[" * 200_000
    deep_obj = b'{"buffers":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    for header in (nested, deep_obj, b'{"buffers":[[Infinity,false]]}',
                   b'{"buffers":[[NaN,false]]}', b'{"buffers":[[1e400,false]]}',
                   b'{"buffers":[[' + b"9" * 5000 + b',false]]}'):
        frames = [DELIM, b"0" * 64, header, b"{}", b"{}", b"{}", b"x"]
        with pytest.raises(ProtocolError):
            rx.feed(frames)
    # even correctly signed, hostile numbers are reported as malformed
    tx = Session(KEY)
    hdr = dumps(valid_header(tx))[:-1] + b',"seq":Infinity}'
    hdr = hdr.replace(b'"seq":1,', b"")
    assert_rejected(rx, signed_frames(tx, [hdr, b"{}", b"{}", b"{}"]), "malformed")


# -- fuzzing ------------------------------------------------------------------------------


def test_fuzz_feed_only_raises_protocol_error():
    rng = random.Random(1234)
    tx = Session(KEY, session_id="fuzz-sender")
    rx = Session(KEY)

    def valid() -> list[bytes]:
        nbuf = rng.randrange(0, 4)
        bufs = [rng.randbytes(rng.randrange(0, 50)) for _ in range(nbuf)]
        return frames_of(tx, content={"i": rng.random()}, buffers=bufs)

    accepted = 0
    kinds: dict[str, int] = {}
    for i in range(5000):
        kind = rng.choice(["random", "random", "truncated", "flipped", "valid", "junk-delim"])
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "random":
            n = rng.randrange(0, 13)
            frames = [rng.randbytes(rng.choice([0, 1, 9, 64, rng.randrange(0, 200)]))
                      for _ in range(n)]
        elif kind == "junk-delim":
            n = rng.randrange(0, 13)
            frames = [rng.randbytes(rng.randrange(0, 100)) for _ in range(n)]
            frames.insert(rng.randrange(0, len(frames) + 1), DELIM)
        elif kind == "truncated":
            frames = valid()
            cut = rng.randrange(0, len(frames))
            frames = frames[:cut]
            if frames and rng.random() < 0.5:
                j = rng.randrange(len(frames))
                frames[j] = frames[j][: rng.randrange(0, len(frames[j]) + 1)]
        elif kind == "flipped":
            frames = valid()
            j = rng.randrange(len(frames))
            if len(frames[j]) == 0:
                frames[j] = b"\x00"
            else:
                b = bytearray(frames[j])
                b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
                frames[j] = bytes(b)
        else:
            frames = valid()
        try:
            msg = rx.feed(frames)
        except ProtocolError:
            assert kind != "valid", f"valid message {i} rejected"
            continue
        except Exception as e:  # pragma: no cover - this is the failure being tested for
            raise AssertionError(f"{kind} message {i} raised {type(e).__name__}: {e}") from e
        assert kind == "valid", f"{kind} message {i} was accepted: {frames!r}"
        assert isinstance(msg, Message)
        accepted += 1
    assert accepted == kinds["valid"] > 0
    assert sum(rx.rejected.values()) == 5000 - accepted
    assert set(rx.rejected) <= {"malformed", "unsigned", "bad signature", "replay", "stale"}
    # still works afterwards
    assert rx.feed(frames_of(tx, content={"after": True})).content == {"after": True}


# -- nothing unverified reaches pickle ----------------------------------------------------

PWNED: list[str] = []


def _pwn(tag: str) -> str:
    PWNED.append(tag)
    return tag


class _Evil:
    def __reduce__(self):
        return (_pwn, ("unpickled",))


@pytest.fixture
def pickle_spy(monkeypatch):
    calls: list[str] = []
    real_loads = pickle.loads
    real_load = pickle.load

    def loads(*a, **k):
        calls.append("loads")
        return real_loads(*a, **k)

    def load(*a, **k):
        calls.append("load")
        return real_load(*a, **k)

    monkeypatch.setattr(pickle, "loads", loads)
    monkeypatch.setattr(pickle, "load", load)
    monkeypatch.setattr(cloudpickle, "loads", loads)
    monkeypatch.setattr(cloudpickle, "load", load)
    PWNED.clear()
    yield calls
    PWNED.clear()


def test_feed_never_unpickles(pickle_spy):
    tx, rx = pair()
    evil = Session(OTHER_KEY)
    payload, raw = ser.serialize(_Evil())
    big_payload, big_raw = ser.serialize([_Evil(), np.zeros(20_000)])
    assert big_raw == [False, True]
    bad = [
        frames_of(evil, buffers=payload, raw=raw),
        frames_of(evil, buffers=big_payload, raw=big_raw),
        [DELIM, b"0" * 64, dumps(valid_header(tx, nbuf=1)), b"{}", b"{}", b"{}", payload[0]],
        # the pickle hidden as a "raw" buffer of a badly signed message
        frames_of(evil, buffers=[payload[0]], raw=[True]),
        # a valid message whose raw buffer was replaced by a pickle of the same size
        None,
    ]
    good = frames_of(tx, buffers=[b"\x00" * len(payload[0])], raw=[True])
    good[-1] = payload[0]
    bad[-1] = good
    for frames in bad[:-1]:
        with pytest.raises(ProtocolError):
            rx.feed(frames)
    rx.feed(bad[-1])  # accepted: but feed itself never unpickles
    rx.feed(frames_of(tx, buffers=payload, raw=raw))
    assert pickle_spy == []
    assert PWNED == []


def test_deserialize_only_after_feed_succeeds(monkeypatch, pickle_spy, router_dealer):
    router, dealer = router_dealer
    client, server = pair()
    evil = Session(OTHER_KEY)
    events: list[str] = []
    real_feed = Session.feed
    real_deserialize = ser.deserialize

    def feed(self, frames):
        try:
            msg = real_feed(self, frames)
        except ProtocolError:
            events.append("rejected")
            raise
        events.append("verified")
        return msg

    def deserialize(frames):
        assert events and events[-1] == "verified", "deserialize reached before verification"
        events.append("deserialize")
        return real_deserialize(frames)

    monkeypatch.setattr(Session, "feed", feed)
    monkeypatch.setattr(ser, "deserialize", deserialize)

    def recv_obj(session: Session, sock: zmq.Socket):
        msg = session_recv(session, sock)
        if msg is None:
            return None
        return ser.deserialize(msg.buffers)

    payload, raw = ser.serialize(_Evil())
    evil.send(dealer, "apply_request", "task", buffers=payload, raw=raw)
    assert recv_obj(server, router) is None
    tampered = frames_of(client, buffers=ser.serialize("harmless")[0])
    tampered[-1] = payload[0]
    dealer.send_multipart(tampered)
    assert recv_obj(server, router) is None
    assert events == ["rejected", "rejected"]
    assert pickle_spy == [] and PWNED == []

    ok_payload, ok_raw = ser.serialize({"fine": [1, 2, 3]})
    client.send(dealer, "apply_request", "task", buffers=ok_payload, raw=ok_raw)
    assert recv_obj(server, router) == {"fine": [1, 2, 3]}
    assert events == ["rejected", "rejected", "verified", "deserialize"]
    assert pickle_spy == ["loads"]


# -- replay guard ------------------------------------------------------------------------


def test_replay_guard_memory_bounded_by_senders():
    guard = ReplayGuard()
    channels = ["task", "hub", "direct"]
    now = time.time()
    sessions = [f"s{i}" for i in range(10)]
    seqs = {(s, c): 0 for s in sessions for c in channels}
    rng = random.Random(0)
    for _ in range(100_000):
        key = (rng.choice(sessions), rng.choice(channels))
        seqs[key] += 1
        assert guard.check(key[0], key[1], seqs[key], now, now=now) is None
        assert len(guard) <= 10 * len(channels)
    assert len(guard) == 10 * len(channels)


def test_replay_guard_bounded_through_sessions():
    rx = Session(KEY)
    senders = [Session(KEY) for _ in range(10)]
    channels = ["task", "hub"]
    for i in range(5000):
        s = senders[i % 10]
        rx.feed(frames_of(s, channel=channels[(i // 10) % 2]))
    assert rx.rejected == {}
    assert len(rx.replay) <= 10 * len(channels)


def test_replay_guard_forgets_idle_senders():
    guard = ReplayGuard(window=100.0)
    t0 = 1_000_000.0
    for i in range(50):
        assert guard.check(f"old{i}", "task", 1, t0, now=t0) is None
    assert len(guard) == 50
    t1 = t0 + 500.0
    assert guard.check("new", "task", 1, t1, now=t1) is None
    assert len(guard) == 1
    # an old sender's message from back then is now stale, not accepted
    assert guard.check("old0", "task", 1, t0, now=t1) == "stale"


def test_replay_guard_reasons():
    guard = ReplayGuard(window=100.0)
    now = 5000.0
    assert guard.check("s", "c", 5, now, now=now) is None
    assert guard.check("s", "c", 5, now, now=now) == "replay"
    assert guard.check("s", "c", 4, now, now=now) == "replay"
    assert guard.check("s", "c", 6, now, now=now) is None
    assert guard.check("s", "d", 1, now, now=now) is None
    assert guard.check("s", "c", 7, now - 101, now=now) == "stale"
    assert guard.check("s", "c", 7, now + 101, now=now) == "stale"
    # a stale message does not advance the sequence
    assert guard.check("s", "c", 7, now, now=now) is None


def test_replay_guard_future_dated_message_cannot_be_replayed_after_sweep():
    """A message dated ahead (clock skew) must stay replay-protected while its date is valid."""
    w = 100.0
    guard = ReplayGuard(window=w)
    t0 = 1_000_000.0
    date = t0 + 0.9 * w  # sender's clock runs ahead, still inside the window
    assert guard.check("skewed", "task", 1, date, now=t0) is None
    t1 = t0 + w + 61.0  # the sender has been idle for longer than the window
    assert guard.check("someone-else", "task", 1, t1, now=t1) is None  # triggers a sweep
    assert guard.check("skewed", "task", 1, date, now=t1) is not None
