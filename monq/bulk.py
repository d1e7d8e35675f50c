"""Large buffers pulled peer to peer over TCP, when shared memory cannot carry them.

Through the relays a 100 MB argument crosses zmq four times per round trip
(client -> relay -> engine and back) and zmq tops out near 600 MB/s here,
while a plain TCP socket (``sendall`` of a memoryview, ``recv_into`` a
preallocated buffer) moves 1-2 GB/s.  So when :mod:`monq.shm` cannot be used
(the engine is on another host, or shared memory is off) a raw buffer of at
least ``threshold`` bytes does not travel with the message at all: the
sender *serves* it and only a handle ``[position, host, port, id, nbytes]``
goes into the message's signed metadata (``metadata["bulk"]``); the receiver
connects to the sender (or reuses its connection to that peer) and reads the
bytes straight into a buffer it allocated once, which pickle then gets as a
memoryview: one copy, kernel to user, and no intermediate ``bytes``.  The
relays and the Hub see (and record) the handle only; the Hub counts its size
as payload, as it does for shared memory.

Who serves: the client for arguments, the engine for results.  Each process
lazily starts one :class:`Server`: a listening socket bound to the address it
uses to reach the controller (127.0.0.1 for a local cluster), on a random
port, and one thread per accepted connection, which sends with
``socket.sendall(memoryview)`` (no copy, the GIL released while the kernel
copies) so the process's main thread stays free.

Protocol (one connection carries any number of requests, one at a time)::

    request:  op (1 byte: G fetch, D drop) + id (16 bytes) + HMAC-SHA256(key, op + id)
    answer:   status (1 byte: 0 ok, 1 unknown id, 2 refused) + size (8 bytes, big endian)
              then, for a fetch that is ok, ``size`` bytes

Safety
------
- *Authenticated requests.*  A request carries an HMAC of its id under the
  cluster key: a stranger who can reach the port learns nothing without the
  key (refused, and the connection is closed).  Ids are 128 random bits.
- *Signed handles.*  Handles are in the metadata, covered by the message's
  HMAC (:class:`monq.protocol.Session`): a forged handle never gets here.  The
  receiver still checks their shape, and reads exactly the handle's
  ``nbytes`` (an answer of another size is an error, not an allocation).
- *Bounded.*  Every connect and every receive has a timeout
  (``MONQ_BULK_TIMEOUT``, default 30 s, per step with no progress): a dead or
  stuck peer is a :class:`BulkError` (a SerializationError: the task fails
  with a clear message), never a hang.  An unknown or expired id is a clear
  error too, and the server keeps serving everyone else.

Lifetime
--------
- The client's arguments are served until the task ends (the future's done
  callback, :meth:`Ticket.release`) or the client closes: an engine may fetch
  them again for a resent task.  The served view refers to the caller's own
  buffer (no copy at submission): changing the array before the task has
  started changes what the engine reads, as with raw frames still queued in
  zmq.
- An engine's result is served once: it is dropped when its bytes were sent
  in full, when the client says it does not want it (a reply for a task that
  already ended), or ``MONQ_BULK_GRACE`` seconds (default 60) after the reply
  (a client that died or never came).
- A process that exits takes its server and buffers with it (daemon threads,
  nothing on disk).  :meth:`Server.close` stops serving at once.

Configuration (environment, read when a Client or engine starts; a client's
``client.shm.bulk.config`` can be changed at run time): ``MONQ_BULK=0`` turns
it off (raw frames through the relays, as before); ``MONQ_BULK_THRESHOLD``
(bytes, default 1 MiB) is the smallest buffer served this way.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monq.errors import SerializationError

log = logging.getLogger(__name__)

_OP_GET = b"G"
_OP_DROP = b"D"
_ID = 16
_MAC = 32
_REQ = 1 + _ID + _MAC
_ANSWER = struct.Struct(">BQ")
_OK, _UNKNOWN, _REFUSED = 0, 1, 2
#: a connection that asked nothing for this long is closed by the server
IDLE = 600.0
#: the most one recv_into asks for
_CHUNK = 1 << 30


#: every live Server of this process (served_in_process)
_servers: weakref.WeakSet[Server] = weakref.WeakSet()


class BulkError(SerializationError):
    """A served buffer that cannot be fetched (peer gone, unknown id, refused, cut short)."""


def _env_float(env: dict[str, str], name: str, default: float) -> float:
    try:
        return float(env.get(name) or default)
    except ValueError:
        log.warning("ignoring %s=%r: not a number", name, env.get(name))
        return default


#: the default of BulkConfig.threshold and MONQ_BULK_THRESHOLD
DEFAULT_THRESHOLD = 1 << 20


@dataclass
class BulkConfig:
    """Whether and when to serve buffers peer to peer (see the module's doc)."""

    enabled: bool = True
    #: the smallest buffer that is served instead of sent through the relays
    #: (bench/bulk_roundtrip.py: about level with raw frames at 256 KiB, ahead from 1 MiB)
    threshold: int = DEFAULT_THRESHOLD
    #: seconds a connect or a receive may wait without progress
    timeout: float = 30.0
    #: seconds an engine keeps a result nobody fetched
    grace: float = 60.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> BulkConfig:
        from monq.shm import _env_size

        env = dict(os.environ) if env is None else env
        return cls(enabled=env.get("MONQ_BULK", "1").strip().lower() not in
                   ("0", "off", "false", "no"),
                   threshold=max(1, _env_size(env, "MONQ_BULK_THRESHOLD", DEFAULT_THRESHOLD)),
                   timeout=max(0.1, _env_float(env, "MONQ_BULK_TIMEOUT", 30.0)),
                   grace=max(0.0, _env_float(env, "MONQ_BULK_GRACE", 60.0)))


def local_address(peer: str) -> str:
    """The address of this host's interface that reaches ``peer`` (the controller)."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(peer))
        except (OSError, ValueError):
            return "127.0.0.1"
    if ip.is_loopback or ip.is_unspecified:
        return "127.0.0.1"
    fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((str(ip), 9))  # a UDP connect sends nothing: it only picks the route
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _mac(key: bytes, op: bytes, bid: bytes) -> bytes:
    return hmac.new(key, b"monq-bulk:" + op + bid, hashlib.sha256).digest()


def _byte_view(b: Any) -> memoryview:
    mv = b if isinstance(b, memoryview) else memoryview(b)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _nbytes(f: Any) -> int:
    return f.nbytes if isinstance(f, memoryview) else len(f)


def _bound(sock: socket.socket, recv: float, send: float) -> None:
    """Make ``sock`` blocking with kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO): one
    ``recv_into(..., MSG_WAITALL)`` or ``sendall`` then moves a whole buffer in one
    system call (Python's own timeouts poll before each chunk: ~20% more CPU
    here).  A wait with no progress for the timeout still fails (EAGAIN).  Where
    the options are missing, Python's timeout instead."""
    try:
        for opt, t in ((socket.SO_RCVTIMEO, recv), (socket.SO_SNDTIMEO, send)):
            sec = int(t)
            sock.setsockopt(socket.SOL_SOCKET, opt,
                            struct.pack("ll", sec, int((t - sec) * 1e6)))
        sock.settimeout(None)
    except (OSError, struct.error):
        sock.settimeout(max(recv, send))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or b'' when the peer closed before the first; short: ConnectionError."""
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(mv[got:])
        if k == 0:
            if got == 0:
                return b""
            raise ConnectionError("connection closed in the middle of a message")
        got += k
    return bytes(buf)


# -- serving --------------------------------------------------------------------------


class _Entry:
    __slots__ = ("view", "once", "expires")

    def __init__(self, view: memoryview, once: bool, expires: float | None) -> None:
        self.view = view
        self.once = once
        self.expires = expires


class Server:
    """Serves registered buffers to peers that hold the cluster key.

    Resource handling: the listening socket and its threads start on the
    first :meth:`serve`; :meth:`close` (safe twice) shuts the listening socket
    and every open connection, which ends their threads, and forgets every
    buffer.
    """

    def __init__(self, key: bytes, host: str, grace: float = 60.0, timeout: float = 30.0
                 ) -> None:
        self.key = key
        self.host = host
        self.grace = grace
        #: seconds a send may wait for a receiver that reads nothing
        self.timeout = timeout
        self.port = 0
        self.lock = threading.Lock()
        self._entries: dict[bytes, _Entry] = {}
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._timer: threading.Timer | None = None
        self._closed = False
        #: fetches answered in full, and requests refused (tests count them)
        self.sent = 0
        self.refused = 0
        _servers.add(self)

    def _start(self) -> None:
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.bind((self.host, 0))
            s.listen(64)
        except OSError:
            s.close()
            raise
        self.port = s.getsockname()[1]
        self._sock = s
        threading.Thread(target=self._accept, args=(s,), name="monq-bulk-accept",
                         daemon=True).start()
        log.debug("serving large buffers at %s:%d", self.host, self.port)

    def serve(self, buf: Any, once: bool = False) -> list[Any]:
        """Serve ``buf`` (kept referenced until released); its handle ``[host, port, id
        hex, nbytes]``.  ``once``: dropped after one full send or after ``grace`` seconds."""
        mv = _byte_view(buf)
        bid = secrets.token_bytes(_ID)
        with self.lock:
            if self._closed:
                raise BulkError("the bulk server is closed")
            if self._sock is None:
                self._start()
            self._entries[bid] = _Entry(mv, once, time.monotonic() + self.grace if once
                                        else None)
            if once and self._timer is None:
                self._arm()
        return [self.host, self.port, bid.hex(), mv.nbytes]

    def release(self, ids: Sequence[str]) -> None:
        """Stop serving these ids (hex); unknown ones are ignored."""
        with self.lock:
            for h in ids:
                with contextlib.suppress(ValueError):
                    self._entries.pop(bytes.fromhex(h), None)

    def served(self) -> int:
        """How many buffers are served now."""
        with self.lock:
            return len(self._entries)

    def _arm(self) -> None:
        self._timer = threading.Timer(max(self.grace, 0.05), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self.lock:
            self._timer = None
            now = time.monotonic()
            old = [k for k, e in self._entries.items() if e.expires is not None and
                   e.expires <= now]
            for k in old:
                del self._entries[k]
            if not self._closed and any(e.once for e in self._entries.values()):
                self._arm()
        if old:
            log.info("dropped %d served result(s) nobody fetched", len(old))

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return  # closed
            with self.lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve_conn, args=(conn,), name="monq-bulk-conn",
                             daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _bound(conn, IDLE, self.timeout)
            while self._answer(conn):
                pass
        except (OSError, ConnectionError) as e:
            log.debug("bulk connection ended: %s", e)
        except Exception:
            log.exception("bulk connection failed")
        finally:
            with self.lock:
                self._conns.discard(conn)
            conn.close()

    def _answer(self, conn: socket.socket) -> bool:
        """Answer one request; False when the connection should close."""
        req = _recv_exact(conn, _REQ)
        if not req:
            return False
        op, bid, mac = req[:1], req[1:1 + _ID], req[1 + _ID:]
        if op not in (_OP_GET, _OP_DROP) or not hmac.compare_digest(mac, _mac(self.key, op,
                                                                             bid)):
            with self.lock:
                self.refused += 1
            log.warning("refused a bulk request from %s: bad authenticator",
                        _peer(conn))
            conn.sendall(_ANSWER.pack(_REFUSED, 0))
            return False
        with self.lock:
            e = self._entries.get(bid)
            if op == _OP_DROP or (e is not None and e.once):
                self._entries.pop(bid, None)  # a once-entry is not served twice, even at once
        if e is None:
            conn.sendall(_ANSWER.pack(_UNKNOWN, 0))
            return True
        if op == _OP_DROP:
            conn.sendall(_ANSWER.pack(_OK, 0))
            return True
        conn.sendall(_ANSWER.pack(_OK, e.view.nbytes))
        conn.sendall(e.view)
        with self.lock:
            self.sent += 1
        return True

    def close(self) -> None:
        with self.lock:
            self._closed = True
            s, self._sock = self._sock, None
            conns = list(self._conns)
            self._entries.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for c in ([s] if s is not None else []) + conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept/recv
            with contextlib.suppress(OSError):
                c.close()


def _peer(conn: socket.socket) -> str:
    try:
        host, port = conn.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


# -- fetching -------------------------------------------------------------------------


def _alloc(n: int) -> Any:
    """A writable buffer of ``n`` bytes, not zero-filled (recv_into writes every byte).

    numpy's allocator asks for transparent huge pages for large blocks: a fresh
    100 MB buffer then costs ~50 faults instead of ~25,000 (here 4 KiB faults
    made a first write 8x slower than into huge pages).
    """
    try:
        import numpy as np

        return np.empty(n, np.uint8)
    except ImportError:
        return bytearray(n)


class RecvPool:
    """Receive buffers kept for reuse once nothing refers to them any more.

    Into a fresh buffer the kernel's copy also pays the page faults (2-3x the
    copy itself here, even with huge pages); a buffer whose previous contents
    nobody holds (the caller dropped the result, the engine finished the task)
    is written again instead.  Whether anything refers to a buffer is its
    reference count: every view of it (memoryview, numpy array, pickle's
    buffer) holds a reference, so a count of only the pool's own means free.
    At most ``cap`` bytes are kept; a buffer not taken for ``idle`` seconds is
    freed (a timer runs while the pool holds any).
    """

    #: references to a pooled buffer while free: the pool's list, the loop
    #: variable, sys.getrefcount's argument
    _FREE = 3

    def __init__(self, cap: int = 256 << 20, idle: float = 10.0) -> None:
        self.cap = cap
        self.idle = idle
        self.lock = threading.Lock()
        self._bufs: list[Any] = []
        self._used: dict[int, float] = {}  # id(buffer) -> when last taken
        self._timer: threading.Timer | None = None
        #: buffers taken from the pool, and allocated (tests count them)
        self.reused = 0
        self.allocated = 0

    def take(self, n: int) -> Any:
        """A writable buffer of exactly ``n`` bytes (a pooled one if one fits)."""
        if n < 1 << 16 or n > self.cap:
            return _alloc(n)
        with self.lock:
            best = None
            for o in self._bufs:
                if sys.getrefcount(o) == self._FREE and len(o) >= n and len(o) < 2 * n and \
                        (best is None or len(o) < len(best)):
                    best = o
            if best is not None:
                self._used[id(best)] = time.monotonic()
                self.reused += 1
                return best[:n] if len(best) != n else best
            self.allocated += 1
            buf = _alloc(n)
            self._add(buf)
            return buf

    def _add(self, buf: Any) -> None:
        total = sum(len(o) for o in self._bufs) + len(buf)
        if total > self.cap:
            for o in list(self._bufs):  # evict free ones, oldest first
                if total <= self.cap:
                    break
                if sys.getrefcount(o) == self._FREE + 1:  # + the list() copy
                    self._bufs.remove(o)
                    self._used.pop(id(o), None)
                    total -= len(o)
            if total > self.cap:
                return  # not pooled: freed as usual once dropped
        self._bufs.append(buf)
        self._used[id(buf)] = time.monotonic()
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        self._timer = threading.Timer(self.idle, self._trim)
        self._timer.daemon = True
        self._timer.start()

    def _trim(self) -> None:
        with self.lock:
            self._timer = None
            now = time.monotonic()
            keep = []
            for o in self._bufs:
                if sys.getrefcount(o) == self._FREE and now - self._used.get(id(o), 0) >= \
                        self.idle:
                    self._used.pop(id(o), None)
                else:
                    keep.append(o)
            self._bufs = keep
            if keep:
                self._arm()

    def pooled(self) -> int:
        """Bytes the pool holds (free or in use)."""
        with self.lock:
            return sum(len(o) for o in self._bufs)

    def clear(self) -> None:
        with self.lock:
            self._bufs = []
            self._used.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


def parse_handle(h: Any) -> tuple[int, str, int, bytes, int]:
    """``(position, host, port, id, nbytes)`` of a handle; BulkError if malformed."""
    try:
        pos, host, port, hid, n = h
        pos, port, n = int(pos), int(port), int(n)
        bid = bytes.fromhex(hid)
        if pos < 0 or n < 0 or not 0 < port < 65536 or len(bid) != _ID or \
                not isinstance(host, str) or not host:
            raise ValueError("out of range")
    except (TypeError, ValueError) as e:
        raise BulkError(f"bad bulk handle {str(h)[:120]}: {e}") from None
    return pos, host, port, bid, n


class Fetcher:
    """Fetches served buffers, keeping one connection per peer for the next fetch.

    Resource handling: connections are closed on any error (the next fetch
    opens a new one) and by :meth:`close` (safe twice).
    """

    def __init__(self, key: bytes, timeout: float = 30.0) -> None:
        self.key = key
        self.timeout = timeout
        self.lock = threading.Lock()
        self._conns: dict[tuple[str, int], socket.socket] = {}
        #: bytes received into final buffers (tests count copies against it)
        self.received = 0
        self.pool = RecvPool()

    def _conn(self, peer: tuple[str, int]) -> tuple[socket.socket, bool]:
        s = self._conns.pop(peer, None)
        if s is not None:
            return s, True
        try:
            s = socket.create_connection(peer, timeout=self.timeout)
        except OSError as e:
            raise BulkError(f"cannot reach {peer[0]}:{peer[1]} to fetch a buffer ({e}): "
                            "its sender has gone?") from None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _bound(s, self.timeout, self.timeout)
        return s, False

    def fetch(self, handle: Any) -> tuple[int, memoryview]:
        """``(position, buffer)`` of a handle: the bytes read straight into a new buffer."""
        pos, host, port, bid, n = parse_handle(handle)
        with self.lock:
            return pos, self._request((host, port), _OP_GET, bid, n)

    def drop(self, handle: Any) -> None:
        """Tell the sender a served buffer is not wanted (best effort, never raises).

        Only over a connection already open to that sender: no new connection
        (and no connect timeout) for this; the sender's grace period covers the rest.
        """
        try:
            _, host, port, bid, _ = parse_handle(handle)
            with self.lock:
                if (host, port) in self._conns:
                    self._request((host, port), _OP_DROP, bid, 0)
        except BulkError as e:
            log.debug("could not drop a served buffer: %s", e)

    def _request(self, peer: tuple[str, int], op: bytes, bid: bytes, n: int
                 ) -> memoryview:
        for attempt in (0, 1):
            s, reused = self._conn(peer)
            started = False
            try:
                s.sendall(op + bid + _mac(self.key, op, bid))
                head = _recv_exact(s, _ANSWER.size)
                if not head:
                    raise ConnectionError("the sender closed the connection")
                started = True
                status, size = _ANSWER.unpack(head)
                if status == _REFUSED:
                    raise BulkError(f"{peer[0]}:{peer[1]} refused to serve a buffer (another "
                                    "cluster's key?)")
                if status == _UNKNOWN:
                    self._conns[peer] = s
                    raise BulkError(f"{peer[0]}:{peer[1]} no longer serves buffer {bid.hex()} "
                                    "(released: its task ended, or it expired)")
                if status != _OK or (op == _OP_GET and size != n):
                    raise BulkError(f"{peer[0]}:{peer[1]} answered {status}/{size} bytes for "
                                    f"a buffer of {n}")
                out = self._read(s, size) if op == _OP_GET else memoryview(b"")
                self._conns[peer] = s
                return out
            except BulkError:
                if self._conns.get(peer) is not s:
                    s.close()
                raise
            except (OSError, ConnectionError) as e:
                s.close()
                if reused and not started and attempt == 0:
                    continue  # an idle connection the peer had closed: once more, fresh
                raise BulkError(f"fetching a buffer of {n} bytes from {peer[0]}:{peer[1]} "
                                f"failed: {type(e).__name__}: {e} (its sender died?)") from None
            except BaseException:  # interrupted (a signal): the stream's position is unknown
                s.close()
                raise
        raise AssertionError("unreachable")

    def _read(self, s: socket.socket, n: int) -> memoryview:
        out = memoryview(self.pool.take(n))
        got = 0
        flags = socket.MSG_WAITALL if s.gettimeout() is None else 0
        while got < n:
            k = s.recv_into(out[got:], min(n - got, _CHUNK), flags)
            if k == 0:
                raise ConnectionError(f"connection closed after {got} of {n} bytes")
            got += k
        self.received += n
        return out

    def close(self) -> None:
        with self.lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for s in conns:
            s.close()
        self.pool.clear()


# -- one side of a task ---------------------------------------------------------------


class Ticket:
    """The buffers one message serves; :meth:`release` stops serving them (idempotent)."""

    def __init__(self, server: Server, ids: list[str]) -> None:
        self.server = server
        self.ids = ids

    def release(self, *_: Any) -> None:
        ids, self.ids = self.ids, []
        if ids:
            self.server.release(ids)


class Bulk:
    """A client's or an engine's side: serves its large buffers, fetches its peers'.

    ``reach`` is the controller's address: the server binds the interface that
    reaches it.
    """

    def __init__(self, key: bytes, reach: str = "127.0.0.1",
                 config: BulkConfig | None = None) -> None:
        self.config = config or BulkConfig.from_env()
        self.key = key
        self._reach = reach
        self._server: Server | None = None
        self.fetcher = Fetcher(key, self.config.timeout)
        self.lock = threading.Lock()
        self._closed = False

    @property
    def server(self) -> Server:
        with self.lock:
            if self._server is None:
                if self._closed:
                    raise BulkError("closed")
                self._server = Server(self.key, local_address(self._reach), self.config.grace,
                                      self.config.timeout)
            return self._server

    def served(self) -> int:
        """How many buffers this side serves now."""
        return self._server.served() if self._server is not None else 0

    def offload(self, buffers: list[Any], raw: list[bool], md: dict[str, Any], once: bool,
                threshold: Any = None) -> tuple[list[Any], list[bool], Ticket | None]:
        """Serve the large raw buffers; their handles go into ``md["bulk"]["bufs"]``.

        Also says (``min``) that this side fetches served buffers, so a peer may
        answer the same way.  Unchanged when off, or when serving fails (the
        frames always work).
        """
        if not self.config.enabled:
            return buffers, raw, None
        spec: dict[str, Any] = md.setdefault("bulk", {})
        spec["min"] = self.config.threshold
        try:
            least = max(1, int(threshold)) if threshold is not None else self.config.threshold
        except (TypeError, ValueError):
            least = self.config.threshold
        big = [i for i, (b, r) in enumerate(zip(buffers, raw)) if r and _nbytes(b) >= least]
        if not big:
            return buffers, raw, None
        handles = []
        try:
            server = self.server
            for i in big:
                handles.append([i, *server.serve(buffers[i], once=once)])
        except (OSError, BulkError) as e:
            log.warning("cannot serve large buffers (%s): sending them as frames", e)
            if self._server is not None:
                self._server.release([h[3] for h in handles])
            return buffers, raw, None
        spec["bufs"] = handles
        drop = set(big)
        return ([b for i, b in enumerate(buffers) if i not in drop],
                [r for i, r in enumerate(raw) if i not in drop],
                Ticket(server, [h[3] for h in handles]))

    def fetch_all(self, frames: Sequence[Any], spec: Any) -> list[Any]:
        """``frames`` with every served buffer of ``spec`` fetched and put in place."""
        out = list(frames)
        bufs = spec.get("bufs") if isinstance(spec, dict) else None
        if not bufs:
            return out
        if not isinstance(bufs, list):
            raise BulkError("bad bulk handles")
        got = sorted((self.fetcher.fetch(h) for h in bufs), key=lambda x: x[0])
        for pos, mv in got:
            if pos > len(out):
                raise BulkError(f"bulk handle position {pos} out of range")
            out.insert(pos, mv)
        return out

    def discard(self, spec: Any) -> None:
        """Tell the senders of ``spec``'s buffers they are not wanted."""
        bufs = spec.get("bufs") if isinstance(spec, dict) else None
        for h in bufs if isinstance(bufs, list) else ():
            self.fetcher.drop(h)

    def close(self) -> None:
        with self.lock:
            self._closed = True
            server, self._server = self._server, None
        if server is not None:
            server.close()
        self.fetcher.close()


def served_in_process() -> int:
    """How many buffers this process serves now (every side of it: diagnostics, tests)."""
    return sum(s.served() for s in list(_servers))


def listening_in_process() -> set[tuple[str, int]]:
    """The addresses this process's bulk servers listen on (none until one serves)."""
    return {(s.host, s.port) for s in list(_servers) if s._sock is not None}


def payload_bytes(metadata: dict[str, Any]) -> int:
    """Bytes a message's peers serve (from its signed metadata; 0 if none): the Hub
    records a handle as the size of its buffer."""
    spec = metadata.get("bulk")
    if not isinstance(spec, dict):
        return 0
    try:
        return sum(max(0, int(b[4])) for b in spec.get("bufs") or ())
    except (TypeError, ValueError, IndexError, AttributeError):
        return 0
