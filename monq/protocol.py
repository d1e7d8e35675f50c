"""Framing and signing of monq's multipart messages.

A message on the wire is::

    [routing idents..., b"<IDS|MSG>", signature, header, parent, metadata, content, buffers...]

``header``, ``parent``, ``metadata`` and ``content`` are small JSON documents
that any process (the Hub above all) can read without touching a payload.
``header`` carries ``msg_id``, ``msg_type``, ``session``, ``date`` (float
epoch seconds), ``version`` and ``buffers``: one ``[nbytes, raw]`` pair per
buffer frame.

The signature is HMAC-SHA256, with the cluster key, over the four JSON frames
and every buffer that is *not* raw.  Raw buffers (large out-of-band array
data) are left out of the MAC for speed, which is safe because their count
and sizes are bound in the signed header and they are only ever used as plain
memory, never handed to pickle as a stream.  A receiver checks, in this order
and before anything is parsed: frame count, signature, replay, JSON, buffer
sizes.  Anything that fails is rejected with :class:`ProtocolError` and
counted in :attr:`Session.rejected`; callers drop it and keep going.

Message types (``msg_type``), by channel:

- task/direct (client -> engine): ``apply_request``; reply ``apply_reply``.
  Or, for many tasks at once, ``apply_batch``; reply ``apply_batch_reply``
  (or single ``apply_reply`` messages): see *Batches* below.
- hub (engine -> hub): ``registration_request`` -> ``registration_reply``,
  ``task_started`` (no reply), ``unregistration_request`` (no reply); after
  the Hub's ``reregister_request`` (a restarted controller), the engine
  registers again and sends its last seconds' replies as ``recent_replies``
  (no reply; shaped as an ``apply_batch_reply``, plus ``queue`` and
  ``engine_uuid``).
- hub (client -> hub): ``connect_request``, ``engines_request``,
  ``queue_request``, ``history_request``, ``db_request``,
  ``hub_history_request``, ``result_request``, ``purge_request``,
  ``status_request``, ``shutdown_request``; each answered by the matching ``*_reply`` whose
  content has ``status`` ``ok`` or ``error`` (with ``ename``/``evalue``).
- notify (hub -> clients, PUB): ``engine_registered``, ``engine_unregistered``.

Batches.  Most of a small task's cost is per *message* (framing, one HMAC,
a relay hop and a monitor copy, verification by engine and Hub), so a
client that submits faster than it can send packs consecutive queued tasks
into one ``apply_batch``, and an engine finishing a batch's tasks in quick
succession answers them in one ``apply_batch_reply``.  A batch is one signed
message; its own header is numbered on its channel like any message (the
client uses the highest number of the tasks it packs, so the channel's order
holds) and its ``buffers`` spec lists every buffer frame of every task.
Its content is ``{"tasks": [entry, ...]}`` (at most :data:`MAX_BATCH_TASKS`),
one entry per task:

- request entry: ``msg_id`` (the task's own id: what the Hub records and the
  client's futures key on), ``date`` (its submission time), ``metadata``
  (what a single request carries as metadata) and ``b``, the indices of the
  task's buffer frames in the message (a frame may serve several tasks: the
  function's stream, pickled once, is sent once);
- reply entry: ``parent`` (``msg_id``, ``session``, ``date`` of the request),
  ``metadata``, ``content`` (what a single reply carries) and ``b``.

:meth:`Session.split_batch` turns a verified batch into one :class:`Message`
per task, shaped exactly as the single request or reply would be (the
``msg_type`` is ``apply_request`` / ``apply_reply``, the header's
``buffers`` spec is the task's own), so engines, the Hub and clients handle
each task as they handle a single one.  A batch whose entries do not fit
(not a list, too many, an index out of range, a missing id) is rejected
whole with :class:`ProtocolError` ``malformed`` and counted.  Single-task
messages are unchanged: a task sent while nothing else is queued goes alone.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import zmq

from monq.errors import ProtocolError
from monq.frames import send_frames

log = logging.getLogger(__name__)

DELIM = b"<IDS|MSG>"
#: message types of a batch of tasks and of a batch of their replies (see above)
BATCH_REQUEST = "apply_batch"
BATCH_REPLY = "apply_batch_reply"
#: at most this many tasks in one batch message (a receiver refuses more)
MAX_BATCH_TASKS = 64
#: a sender closes a batch once its buffers reach this many bytes
MAX_BATCH_BYTES = 1 << 20
#: an engine's replies of the last seconds, told to a restarted controller (the old one
#: may have died before writing them): shaped as a batch of replies
RECENT_REPLIES = "recent_replies"
_SINGLE = {BATCH_REQUEST: "apply_request", BATCH_REPLY: "apply_reply",
           RECENT_REPLIES: "apply_reply"}
VERSION = 1
#: Frames after the delimiter that every message has: signature + 4 JSON docs.
N_FIXED = 5

Buffer = Any  # bytes, memoryview, zmq.Frame or anything with the buffer protocol


def new_id() -> str:
    """A random 128-bit id in hex (a session's id; a seed for its message ids)."""
    return uuid.uuid4().hex


class _Ids:
    """Message ids: 32 hex digits, the time in milliseconds (12) then 80 random bits (20),
    from a generator seeded once from the OS.

    ``uuid4`` asks the kernel for entropy on every call, which costs tens of
    microseconds here on each of hundreds of thousands of messages; ids only
    need to be unique, not secret.  Time first (as in UUIDv7), so that ids sort
    roughly by creation: the Hub's history keys its rows by msg_id, and a
    random key put every new row on a random page of that index, one more page
    read and written per task at every commit (measured on a 200,000-task
    history: 2,820 -> 1,380 page writes and 484 -> 162 reads per 500-row
    write, bench/PROFILE.md).  80 random bits per millisecond per process keep
    them unique.
    """

    def __init__(self) -> None:
        self._rng = random.Random(os.urandom(32))
        self._bits = self._rng.getrandbits
        #: the last millisecond and its 12 hex digits, as one tuple (threads may share a
        #: Session): a burst makes many ids in each
        self._last: tuple[int, str] = (-1, "")

    def __call__(self) -> str:
        ms = int(time.time() * 1000) & 0xFFFFFFFFFFFF
        last = self._last
        if ms != last[0]:
            last = self._last = (ms, f"{ms:012x}")
        return f"{last[1]}{self._bits(80):020x}"


def _nbytes(buf: Buffer) -> int:
    t = type(buf)
    if t is bytes or t is zmq.Frame:
        return len(buf)
    if isinstance(buf, zmq.Frame):
        return len(buf)
    return memoryview(buf).nbytes


_Frame = zmq.Frame
_DELIM_LEN = len(DELIM)


def _as_bytes(frame: Any) -> bytes:
    if isinstance(frame, zmq.Frame):
        return frame.bytes
    return bytes(frame)


#: non-string keys become strings, as with the json module
_JSON_OPTS = orjson.OPT_NON_STR_KEYS
_EMPTY = b"{}"


def _dumps(obj: dict[str, Any] | None) -> bytes:
    """Compact JSON (orjson: the four documents of every message are encoded and
    decoded several times per task, by the client, the engine and the Hub)."""
    if not obj:
        return _EMPTY
    return orjson.dumps(obj, option=_JSON_OPTS)


@dataclass
class Message:
    """A verified message: parsed JSON parts and the raw buffer frames."""

    idents: list[bytes]
    header: dict[str, Any]
    parent: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[Any] = field(default_factory=list)
    #: the frames after the delimiter exactly as received (for re-forwarding)
    signature: bytes = b""

    @property
    def msg_id(self) -> str:
        return str(self.header.get("msg_id", ""))

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def raw_flags(self) -> list[bool]:
        return [bool(raw) for _, raw in self.header.get("buffers", [])]


class ReplayGuard:
    """Refuses a message that was already received (a replay).

    Every sender numbers its messages per channel (``header["seq"]``), and a
    channel delivers them in order (ZeroMQ keeps order per pipe and the relays
    keep it too), so a receiver only has to remember the highest number seen
    per ``(session, channel)``: anything not above it is a replay.  Senders
    idle for longer than ``window`` seconds are forgotten, and messages dated
    further than ``window`` from now are refused as stale, so the memory is
    bounded by the number of live senders, never by the message count.  The
    window is long (a day by default) because a task may sit in an engine's
    queue for a long time before it is read.
    """

    def __init__(self, window: float = 86400.0) -> None:
        self.window = window
        self._last: dict[tuple[str, str], tuple[int, float]] = {}
        self._next_sweep = 0.0

    def check(self, session: str, channel: str, seq: int, date: float,
              now: float | None = None) -> str | None:
        """Record the message; return a rejection reason, or None when fresh."""
        now = time.time() if now is None else now
        if not (now - self.window <= date <= now + self.window):
            return "stale"
        key = (session, channel)
        last = self._last.get(key)
        if last is not None and seq <= last[0]:
            return "replay"
        # remember the sender until its messages are stale: a message dated
        # ahead of our clock must not become replayable once forgotten
        self._last[key] = (seq, max(now, date))
        if now >= self._next_sweep:
            self._next_sweep = now + 60.0
            idle = [k for k, (_, t) in self._last.items() if t < now - self.window]
            for k in idle:
                del self._last[k]
        return None

    def __len__(self) -> int:
        return len(self._last)


class Session:
    """Signs outgoing and verifies incoming messages for one process.

    Each receiving socket owner keeps its own Session (its own replay memory).
    ``rejected`` counts refused messages by reason.
    """

    def __init__(
        self,
        key: bytes,
        session_id: str | None = None,
        replay_window: float = 86400.0,
    ) -> None:
        if not key:
            raise ValueError("a cluster key is required")
        self.key = key
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        #: the keyed MAC itself (OpenSSL's, when hmac wraps one): its copy, update and
        #: digest are C calls, without the pure-Python hmac.HMAC wrapper around each
        self._hmac: Any = getattr(self._mac, "_hmac", None) or self._mac
        self.session_id = session_id or new_id()
        self._new_msg_id = _Ids()
        self.replay = ReplayGuard(replay_window)
        self.rejected: collections.Counter[str] = collections.Counter()
        self._seq: dict[str, int] = {}

    # -- outgoing -----------------------------------------------------------

    def sign(self, parts: Sequence[Buffer]) -> bytes:
        # a copy of a keyed HMAC skips the key setup and the digest lookup of a new one
        h = self._hmac.copy()
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()

    def new_msg_id(self) -> str:
        """A fresh message id (not numbered: for a message that takes another's number)."""
        return self._new_msg_id()

    def header(self, msg_type: str, channel: str, msg_id: str | None = None) -> dict[str, Any]:
        """A fresh header; numbers the message on ``channel`` (see ReplayGuard).

        Messages must be sent on ``channel`` in the order their headers were made.
        """
        seq = self._seq[channel] = self._seq.get(channel, 0) + 1
        return {
            "msg_id": msg_id or self._new_msg_id(),
            "msg_type": msg_type,
            "session": self.session_id,
            "channel": channel,
            "seq": seq,
            "date": time.time(),
            "version": VERSION,
        }

    def serialize(
        self,
        msg_type: str,
        channel: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[Buffer] = (),
        raw: Sequence[bool] | None = None,
        header: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], list[Any]]:
        """Build ``(header, frames)``; frames start at the delimiter."""
        # every message of every process passes here: one pass over the buffers, the
        # JSON encoded and the MAC updated without intermediate lists
        hdr = dict(header) if header is not None else self.header(msg_type, channel)
        h = self._hmac.copy()
        if buffers:
            if raw is None:
                raw = [False] * len(buffers)
            elif len(raw) != len(buffers):
                raise ValueError("one raw flag per buffer")
            spec: list[list[Any]] = []
            hdr["buffers"] = spec
            for b, r in zip(buffers, raw):  # a loop, not a comprehension: once per buffer
                spec.append([len(b) if type(b) is bytes else _nbytes(b), bool(r)])
        else:
            if raw:
                raise ValueError("one raw flag per buffer")
            hdr["buffers"] = []
        hd = _dumps(hdr)
        pa = _dumps(parent)
        md = _dumps(metadata)
        ct = _dumps(content)
        h.update(hd)
        h.update(pa)
        h.update(md)
        h.update(ct)
        if buffers:
            for b, r in zip(buffers, raw):  # type: ignore[arg-type]
                if not r:
                    h.update(memoryview(b) if type(b) is _Frame else b)  # type: ignore[arg-type]
        return hdr, [DELIM, h.hexdigest().encode(), hd, pa, md, ct, *buffers]

    def send(
        self,
        socket: zmq.Socket,
        msg_type: str,
        channel: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[Buffer] = (),
        raw: Sequence[bool] | None = None,
        idents: Sequence[bytes] = (),
        header: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Sign and send a message; returns its header."""
        hdr, frames = self.serialize(msg_type, channel, content, parent, metadata, buffers, raw,
                                     header)
        if type(socket) is zmq.Socket:
            # pyzmq's send_multipart adds several Python layers per frame (monq.frames)
            send_frames(socket, [*idents, *frames])
        else:
            socket.send_multipart([*idents, *frames], copy=False)
        return hdr

    # -- incoming -----------------------------------------------------------

    def feed(self, frames: Sequence[Any]) -> Message:
        """Verify and parse a received multipart message (with its idents).

        Raises ProtocolError (after counting it) for anything not acceptable.
        """
        try:
            return self._feed(frames)
        except ProtocolError as e:
            self.rejected[e.reason] += 1
            log.debug("rejected message: %s", e)
            raise

    def _feed(self, frames: Sequence[Any]) -> Message:
        # The hot path of every receiver (the Hub verifies two copies per task): frames
        # are read once each, the MAC is one C object's copy, and nothing is built
        # that the checks below do not need.
        idx = -1
        n = len(frames)
        # identities are short; do not scan into payloads looking for DELIM
        for i in range(n if n < 17 else 17):
            f = frames[i]
            if len(f) == _DELIM_LEN and (f if type(f) is bytes else _as_bytes(f)) == DELIM:
                idx = i
                break
        if idx < 0:
            raise ProtocolError("malformed", "no delimiter")
        idents = [f if type(f) is bytes else _as_bytes(f) for f in frames[:idx]] if idx else []
        nbufs = n - idx - 1 - N_FIXED
        if nbufs < 0:
            raise ProtocolError("malformed", f"{nbufs + N_FIXED} frames after the delimiter")
        sig, hdr, par, md, ct = [f if type(f) is bytes else
                                 f.bytes if type(f) is _Frame else bytes(f)
                                 for f in frames[idx + 1:idx + 1 + N_FIXED]]
        if len(sig) != 64:
            raise ProtocolError("unsigned", "signature missing or of the wrong size")
        bufs = list(frames[idx + 1 + N_FIXED:]) if nbufs else []
        # The header is JSON we have not verified yet: parse it only to learn
        # which buffers are raw, then verify the MAC before trusting anything.
        try:
            header = orjson.loads(hdr)
            spec = header["buffers"]
            if not isinstance(spec, list) or len(spec) != nbufs:
                raise ValueError("buffer count")
            raw_flags = [bool(s[1]) for s in spec] if nbufs else []
            sizes = [int(s[0]) for s in spec] if nbufs else []
        except (ValueError, KeyError, TypeError, IndexError, OverflowError, RecursionError) as e:
            # still check the MAC first so the reason reported is honest
            if not hmac.compare_digest(sig, self.sign([hdr, par, md, ct] +
                                                      [_frame_view(b) for b in bufs])):
                raise ProtocolError("bad signature", "") from None
            raise ProtocolError("malformed", f"bad buffer spec: {e}") from None
        h = self._hmac.copy()
        h.update(hdr)
        h.update(par)
        h.update(md)
        h.update(ct)
        for b, r in zip(bufs, raw_flags):
            if not r:
                h.update(b if type(b) is bytes else _frame_view(b))
        if not hmac.compare_digest(sig, h.hexdigest().encode()):
            what = header.get("msg_type", "?") if isinstance(header, dict) else "?"
            raise ProtocolError("bad signature", str(what))
        for b, n in zip(bufs, sizes):
            if (len(b) if type(b) is _Frame or type(b) is bytes else _nbytes(b)) != n:
                raise ProtocolError("malformed", "buffer size differs from the signed size")
        try:
            # "{}" (most parents and contents of requests) needs no parser
            parent = {} if par == _EMPTY else orjson.loads(par)
            metadata = {} if md == _EMPTY else orjson.loads(md)
            content = {} if ct == _EMPTY else orjson.loads(ct)
            date = float(header["date"])
            seq = int(header["seq"])
            sender, channel = str(header["session"]), str(header["channel"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
            raise ProtocolError("malformed", f"bad JSON: {e}") from None
        if not (type(parent) is dict and type(metadata) is dict and type(content) is dict
                and type(header) is dict):
            raise ProtocolError("malformed", "JSON parts must be objects")
        why = self.replay.check(sender, channel, seq, date)
        if why:
            raise ProtocolError(why, header.get("msg_id", "?"))
        return Message(idents, header, parent, metadata, content, bufs, sig)

    def split_batch(self, msg: Message, own_headers: bool = True) -> list[Message]:
        """The tasks of a verified ``apply_batch`` / ``apply_batch_reply``, one Message
        each, shaped as the single request / reply would be.

        ``own_headers=False`` (replies only): every task's Message shares the
        batch's header, for a receiver that reads only a reply's parent,
        metadata, content and buffers and never changes them (the client: a
        header per task was a good part of its cost per reply in a burst).

        Raises ProtocolError ``malformed`` (after counting it) when the entries do
        not fit the message: nothing of a bad batch is used.
        """
        try:
            return _split_batch(msg, own_headers)
        except ProtocolError as e:
            self.rejected[e.reason] += 1
            log.debug("rejected batch: %s", e)
            raise

    def recv(self, socket: zmq.Socket, flags: int = 0) -> Message | None:
        """Receive one message; None (after counting and logging) if rejected."""
        frames = socket.recv_multipart(flags, copy=False)
        try:
            return self.feed(frames)
        except ProtocolError:
            return None


def _split_batch(msg: Message, own_headers: bool = True) -> list[Message]:
    # Runs for every task of a burst in the engine, the Hub and the client: per task, one
    # header copy, two C-level list builds, one Message; the checks are inline loops
    # (no generator or comprehension frames), and the per-batch work is done once.
    single = _SINGLE.get(msg.msg_type)
    if single is None:
        raise ProtocolError("malformed", f"{msg.msg_type} is not a batch")
    tasks = msg.content.get("tasks")
    if type(tasks) is not list or not 0 < len(tasks) <= MAX_BATCH_TASKS:
        raise ProtocolError("malformed", "a batch needs 1 to "
                            f"{MAX_BATCH_TASKS} task entries")
    base = msg.header
    spec_at = base["buffers"].__getitem__
    bufs_at = msg.buffers.__getitem__
    n = len(msg.buffers)
    idents, sig = msg.idents, msg.signature
    reply = single == "apply_reply"
    shared = reply and not own_headers
    # the batch's header made the single request's / reply's once; each task's is a copy
    proto = dict(base)
    proto["msg_type"] = single
    base_id = base.get("msg_id")
    out: list[Message] = []
    append = out.append
    parent: Any
    content: Any
    k = 0
    for t in tasks:
        if type(t) is not dict:
            raise ProtocolError("malformed", f"batch entry {k} is not an object")
        idx = t.get("b", ())
        md = t.get("metadata", {})
        if type(idx) is not list or type(md) is not dict:
            raise ProtocolError("malformed", f"batch entry {k}: bad buffers or metadata")
        for i in idx:  # a loop, not all(<generator>): this runs for every task of a burst
            if type(i) is not int or not 0 <= i < n:
                raise ProtocolError("malformed", f"batch entry {k}: bad buffers or metadata")
        if reply:
            parent, content = t.get("parent"), t.get("content")
            if type(parent) is not dict or type(content) is not dict or \
                    type(parent.get("msg_id")) is not str:
                raise ProtocolError("malformed", f"batch reply entry {k}: bad parent or "
                                    "content")
            if shared:
                append(Message(idents, base, parent, md, content, list(map(bufs_at, idx)),
                               sig))
                k += 1
                continue
            hdr = proto.copy()
            hdr["msg_id"] = f"{base_id}.{k}"
        else:
            msg_id, date = t.get("msg_id"), t.get("date")
            if type(msg_id) is not str or not msg_id or len(msg_id) > 64 or \
                    (type(date) is not float and type(date) is not int):
                raise ProtocolError("malformed", f"batch entry {k}: bad msg_id or date")
            hdr = proto.copy()
            hdr["msg_id"] = msg_id
            hdr["date"] = date
            parent, content = {}, {}
        hdr["buffers"] = list(map(spec_at, idx))
        append(Message(idents, hdr, parent, md, content, list(map(bufs_at, idx)), sig))
        k += 1
    if not reply and len({t["msg_id"] for t in tasks}) != len(out):
        raise ProtocolError("malformed", "a task appears twice in one batch")
    return out


class BatchBuilder:
    """Packs tasks (or replies) into the content and buffer frames of one batch message.

    A frame passed several times as the *same object* (the function's stream,
    pickled once and cached) is sent once and named by every task using it.
    """

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.buffers: list[Any] = []
        self.raw: list[bool] = []
        self.nbytes = 0
        self._index: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: dict[str, Any], buffers: Sequence[Buffer], raw: Sequence[bool]
            ) -> None:
        idx: list[int] = []
        index = self._index
        for b, r in zip(buffers, raw):
            i = index.get(id(b))
            if i is None or self.raw[i] != bool(r):
                i = len(self.buffers)
                self.buffers.append(b)
                self.raw.append(bool(r))
                self.nbytes += len(b) if type(b) is bytes else _nbytes(b)
                index[id(b)] = i
            idx.append(i)
        entry["b"] = idx
        self.entries.append(entry)

    def full(self) -> bool:
        return len(self.entries) >= MAX_BATCH_TASKS or self.nbytes >= MAX_BATCH_BYTES


def _frame_view(buf: Any) -> Any:
    if isinstance(buf, zmq.Frame):
        return memoryview(buf)  # type: ignore[arg-type]  # zero-copy, 4x cheaper than .buffer
    return buf


def split_idents(frames: Sequence[Any]) -> tuple[list[bytes], list[Any]]:
    """Split routing identities from the rest without verifying anything."""
    for i, f in enumerate(frames[:17]):
        if len(f) == len(DELIM) and _as_bytes(f) == DELIM:
            return [_as_bytes(x) for x in frames[:i]], list(frames[i:])
    raise ProtocolError("malformed", "no delimiter")
