"""Large buffers through POSIX shared memory between a client and engines on one host.

The relays and the Hub cannot carry bulk bytes fast: a 100 MB array crosses
loopback TCP four times per round trip (client -> relay -> engine and back).
When the client and the engine run on the same host, a buffer of at least
``threshold`` bytes is written once into a segment in ``/dev/shm`` and only a
*handle* ``[position, name, offset, nbytes]`` travels, inside the message's
signed metadata (``metadata["shm"]``).  The receiver maps the segment
read-only and hands pickle a view of the mapping: the engine's argument is a
numpy array over shared memory, with no copy.  An engine whose result is (a
view of) one of its argument segments answers with a handle to that segment;
any other large result is written by the engine into an idle pooled segment
the client lent it with the request (``spare``), else into a new segment.

Safety
------
- *Signed handles.*  The handles are in the metadata, which is covered by the
  message's HMAC: a forged or altered handle is rejected by
  :class:`monq.protocol.Session` before anything is mapped.  dtype and shape
  stay in the (signed) pickle stream.
- *Names.*  ``monq-<cluster>-<host tag>-<owner pid>-<kind>-<64 random bits>``;
  cluster is a digest of the cluster key (other clusters' names never match),
  the host tag a digest of the host id below, the owner the client's pid,
  kind is ``c`` (a client's segment) or ``r<msg_id>`` (an engine's result
  segment for that task).  Segments are
  created with ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600; a receiver opens only
  names of its own cluster that match the pattern, with ``O_NOFOLLOW``, and
  maps only a regular file owned by its own uid, private to it (no group or
  other bits), at least as large as the handle says.
- *Same host only.*  Engines register a host id (the kernel's boot id, the
  device and inode of ``/dev/shm`` and the pid namespace: the same machine,
  shm mount and pids, so two containers do not mistake each other for local,
  and a sweeper only judges owner pids of its own namespace).  A client
  uses shared memory for a load-balanced task only when every live engine
  has its host id, for a direct task when the target has; an engine writes
  a result into shared memory only when the request carries its host id.
  Everything else that is large is served peer to peer over TCP
  (:mod:`monq.bulk`: the hooks are ``offload``/``on_reply`` here and the
  engine's ``attach``/``reply``), or travels as raw frames, as before.

Lifetime
--------
- The client owns the argument segments.  When a task ends (reply, error,
  lost, client closed: the future's done callback) the segment is unlinked,
  or, when the engine said it released its mapping and no result the client
  handed out still views it, kept in a small pool for the next task
  (``pool_bytes``; idle segments are unlinked after ``pool_idle`` seconds and
  when the client closes).  Reusing segments avoids the cost that dominates
  here: filling fresh tmpfs pages (about 3x a plain copy, see bench).
- A result segment created by an engine is unlinked by the client right after
  mapping it (the mapping stays valid on Linux), or at once if the task was
  already settled; with the pool on, it is instead renamed into the client's
  namespace (``c``) and pooled once the result views are gone.
- If a process dies: the Hub sweeps its host's ``/dev/shm`` once per
  heartbeat (:class:`Sweeper`) and unlinks a segment of its cluster whose
  owner pid is gone, or a result segment whose task ended more than
  ``MONQ_SHM_GRACE`` seconds ago (an engine killed between writing a result
  and sending it).  An engine that starts removes the segments of dead
  owners too (a host without the controller).  Stopping the cluster removes
  every segment of the cluster (:func:`remove_all`).

Configuration (environment, read when a Client or engine starts; a client's
``client.shm.config`` can be changed at run time): ``MONQ_SHM=0`` turns it
off; ``MONQ_SHM_THRESHOLD`` (bytes, default 512 KiB) is the smallest buffer
that goes through shared memory; ``MONQ_SHM_POOL`` (bytes, default 256 MiB,
0 = no pool) caps the idle segments a client keeps for reuse.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import re
import secrets
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from monq.bulk import Bulk, Ticket
from monq.errors import SerializationError

log = logging.getLogger(__name__)

DIR = "/dev/shm"
#: buffers are placed at offsets aligned to this in a segment
ALIGN = 64
#: monq-<cluster>-<host tag>-<owner pid>-<kind>-<random>
_NAME = re.compile(r"monq-([0-9a-f]{16})-([0-9a-f]{8})-([0-9]{1,10})-(c|r[0-9a-f]{1,64})"
                   r"-[0-9a-f]{16}\Z")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class ShmError(SerializationError):
    """A shared-memory handle that cannot be used (gone, foreign, or not ours)."""


def _env_size(env: dict[str, str], name: str, default: int) -> int:
    v = env.get(name)
    if v is None or v == "":
        return default
    try:
        from monq.hub.filters import parse_size

        return int(parse_size(v))
    except Exception:
        try:
            return int(v)
        except ValueError:
            log.warning("ignoring %s=%r: not a size", name, v)
            return default


#: the default of ShmConfig.threshold and MONQ_SHM_THRESHOLD
DEFAULT_THRESHOLD = 512 << 10


@dataclass
class ShmConfig:
    """Whether and when to use shared memory (see the module's doc for the variables)."""

    enabled: bool = True
    #: the smallest buffer that travels through shared memory: from 512 KiB a round
    #: trip through a segment beat raw frames (1.1-1.5x at 512 KiB, 1.4-2.0x at 0.95 MiB,
    #: about level at 256 KiB; bench/shm_roundtrip.py, alternating)
    threshold: int = DEFAULT_THRESHOLD
    #: idle segments a client keeps for reuse, in bytes (0: unlink each at the task's end)
    pool_bytes: int = 256 << 20
    #: seconds an idle pooled segment is kept
    pool_idle: float = 10.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ShmConfig:
        env = dict(os.environ) if env is None else env
        return cls(enabled=env.get("MONQ_SHM", "1").strip().lower() not in
                   ("0", "off", "false", "no"),
                   threshold=max(1, _env_size(env, "MONQ_SHM_THRESHOLD", DEFAULT_THRESHOLD)),
                   pool_bytes=max(0, _env_size(env, "MONQ_SHM_POOL", 256 << 20)))


def supported() -> bool:
    return sys.platform.startswith("linux") and os.path.isdir(DIR) and os.access(DIR, os.W_OK)


_host: str | None = None


def host_id() -> str:
    """This host and shm mount: boot id + device and inode of /dev/shm ('' if no shm)."""
    global _host
    if _host is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            st = os.stat(DIR)
            # the pid namespace too: owner pids mean something only inside it (the sweep)
            ns = os.stat("/proc/self/ns/pid").st_ino
            _host = f"{boot}:{st.st_dev:x}:{st.st_ino:x}:{ns:x}" if supported() else ""
        except OSError:
            _host = ""
    return _host


def host_tag() -> str:
    """A short digest of :func:`host_id`, part of every segment name made here."""
    return hashlib.blake2b(host_id().encode(), digest_size=4).hexdigest()


def seg_name(cid: str, owner: int, kind: str) -> str:
    """A new segment name: ``kind`` is ``c`` (a client's) or ``r<msg_id>`` (a result)."""
    return f"monq-{cid}-{host_tag()}-{owner}-{kind}-{secrets.token_hex(8)}"


def parse_name(name: Any, cid: str) -> tuple[str, int, str] | None:
    """(host tag, owner pid, kind) of a segment name of this cluster; None otherwise."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None or m.group(1) != cid:
        return None
    return m.group(2), int(m.group(3)), m.group(4)


def cluster_id(key: bytes) -> str:
    """The cluster's namespace in /dev/shm: a digest of its key (16 hex digits)."""
    return hashlib.blake2b(key, digest_size=8, person=b"monq-shm").hexdigest()


def _path(name: str) -> str:
    return os.path.join(DIR, name)


def _check_name(name: Any, cid: str) -> re.Match[str]:
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None or m.group(1) != cid:
        raise ShmError(f"refused shared-memory segment name {str(name)[:80]!r}: not this "
                       "cluster's")
    return m


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(name))


def _remove_ours(name: str) -> bool:
    """Unlink a name in /dev/shm if it is a file of this user (never raises)."""
    try:
        st = os.lstat(_path(name))
        if st.st_uid != os.geteuid():
            return False  # someone else's (a decoy under our prefix): not ours to judge
        os.unlink(_path(name))
        return True
    except OSError:
        return False


def _addr(buf: Any) -> int:
    import numpy as np

    return int(np.frombuffer(buf, np.uint8).__array_interface__["data"][0])


# -- writing --------------------------------------------------------------------------


class Segment:
    """A segment this process created and may write; ``fd`` stays open while it lives."""

    def __init__(self, cid: str, owner: int, kind: str, adopt: tuple[str, int, int] | None = None
                 ) -> None:
        self.released = False
        self.refs = 0
        self.waiting = False
        self.idle_since = 0.0
        #: a writable mapping kept while the segment is pooled (see write)
        self.map: mmap.mmap | None = None
        if adopt is not None:  # an existing segment: (name, open fd, size)
            self.name, self.fd, self.size = adopt
            return
        for _ in range(8):
            name = seg_name(cid, owner, kind)
            try:
                fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW |
                             _O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue  # somebody holds that name (pre-created?): take another
        else:
            raise OSError("could not create a shared-memory segment")
        self.name = name
        self.fd = fd
        #: bytes written so far (the file's size)
        self.size = 0
        # released: the engine said it no longer maps it (set per reply); refs: result
        # views this client handed out that still map it; waiting: the task ended while
        # refs > 0 (back to the pool when they go)

    def write(self, bufs: Sequence[Any], keep_map: bool = False) -> list[int]:
        """Write ``bufs`` one after the other (aligned); return their offsets.

        Into fresh pages, ``pwrite`` (the kernel allocates them without a page
        fault each); into a segment written before (a pooled one) with
        ``keep_map``, a memcpy into a mapping kept from one use to the next: about
        1.7x faster than pwrite here once its page tables are filled.
        """
        views = []
        for b in bufs:
            mv = b if isinstance(b, memoryview) else memoryview(b)
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            views.append(mv)
        offsets, pos = [], 0
        for mv in views:
            offsets.append(pos)
            pos = (pos + mv.nbytes + ALIGN - 1) // ALIGN * ALIGN
        if keep_map and 0 < pos <= self.size:
            import numpy as np

            if self.map is None or len(self.map) != self.size:
                self._unmap()
                self.map = mmap.mmap(self.fd, self.size)
            for mv, off in zip(views, offsets):
                np.copyto(np.frombuffer(self.map, np.uint8, mv.nbytes, off),
                          np.frombuffer(mv, np.uint8))
            return offsets
        for mv, off in zip(views, offsets):
            n, done = mv.nbytes, 0
            while done < n:
                done += os.pwrite(self.fd, mv[done:], off + done)
        if os.fstat(self.fd).st_size < pos:
            os.ftruncate(self.fd, pos)  # the file covers the aligned extent (never shrinks)
        self.size = max(self.size, pos)
        return offsets

    def _unmap(self) -> None:
        if self.map is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.map.close()
            self.map = None

    def destroy(self) -> None:
        """Unlink and close (idempotent)."""
        self._unmap()
        if self.fd >= 0:
            _unlink(self.name)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _nbytes(f: Any) -> int:
    return f.nbytes if isinstance(f, memoryview) else len(f)


def _big(buffers: Sequence[Any], raw: Sequence[bool], threshold: int) -> list[int]:
    return [i for i, (b, r) in enumerate(zip(buffers, raw)) if r and _nbytes(b) >= threshold]


def _without(items: Sequence[Any], drop: set[int]) -> list[Any]:
    return [x for i, x in enumerate(items) if i not in drop]


# -- reading --------------------------------------------------------------------------


def _map(name: str, cid: str) -> tuple[mmap.mmap, int]:
    """Map a segment of this cluster read-only, after checking what it is."""
    _check_name(name, cid)
    try:
        fd = os.open(_path(name), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        raise ShmError(f"shared-memory segment {name} is gone (freed, or not on this "
                       "host)") from None
    except OSError as e:
        raise ShmError(f"cannot open shared-memory segment {name}: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ShmError(f"refused shared-memory segment {name}: not a private file of "
                           "this user")
        if st.st_size <= 0:
            raise ShmError(f"shared-memory segment {name} is empty")
        return mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ), \
            st.st_size
    finally:
        os.close(fd)


def _open_rw(name: str, cid: str) -> tuple[int, int]:
    """Open an existing segment of this cluster for writing, with the same checks."""
    _check_name(name, cid)
    fd = os.open(_path(name), os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ShmError(f"refused shared-memory segment {name}: not a private file of "
                           "this user")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _entries(spec: Any) -> list[tuple[int, str, int, int]]:
    bufs = spec.get("bufs") if isinstance(spec, dict) else None
    if not bufs:
        return []
    out = []
    try:
        for pos, name, off, n in bufs:
            pos, off, n = int(pos), int(off), int(n)
            if pos < 0 or off < 0 or n < 0:
                raise ValueError("negative")
            out.append((pos, str(name), off, n))
    except (TypeError, ValueError) as e:
        raise ShmError(f"bad shared-memory handles: {e}") from None
    out.sort()
    return out


def attach(frames: Sequence[Any], spec: Any, cid: str
           ) -> tuple[list[Any], dict[str, mmap.mmap]]:
    """``frames`` with each handle's buffer (a read-only view of its mapping) put back in
    place; and the mappings, by name."""
    entries = _entries(spec)
    out = list(frames)
    maps: dict[str, tuple[mmap.mmap, int]] = {}
    for pos, name, off, n in entries:
        if name not in maps:
            maps[name] = _map(name, cid)
        mm, size = maps[name]
        if off + n > size or pos > len(out):
            raise ShmError(f"shared-memory handle out of range for {name}")
        out.insert(pos, memoryview(mm)[off:off + n])
    return out, {k: v[0] for k, v in maps.items()}


def payload_bytes(metadata: dict[str, Any]) -> int:
    """Bytes a message carries in shared memory (from its signed metadata; 0 if none).

    The Hub adds this to the wire size it records: a handle counts as the
    buffer it stands for, and the bytes themselves are never touched.
    """
    spec = metadata.get("shm")
    if not spec:
        return 0
    try:
        return sum(max(0, int(b[3])) for b in spec.get("bufs") or ())
    except (TypeError, ValueError, IndexError, AttributeError):
        return 0


# -- the client -----------------------------------------------------------------------


class ClientShm:
    """A client's side: puts large arguments in (pooled) segments, maps results."""

    def __init__(self, key: bytes, config: ShmConfig | None = None,
                 reach: str = "127.0.0.1") -> None:
        self.config = config or ShmConfig.from_env()
        self.cid = cluster_id(key)
        #: where shared memory cannot be used: large buffers served peer to peer (monq.bulk);
        #: ``reach`` is the controller's address (the interface to serve on)
        self.bulk = Bulk(key, reach)
        self.pid = os.getpid()
        self.host = host_id() if supported() else ""
        #: host id of each engine, by engine id (from the Hub; see engine_added)
        self.hosts: dict[int, str] = {}
        self._all_local = False
        self.lock = threading.Lock()
        self._tasks: dict[str, list[Segment]] = {}
        self._mine: dict[str, Segment] = {}  # every live segment of ours, by name
        self._free: list[Segment] = []
        self._timer: threading.Timer | None = None
        self._closed = False
        #: what tag() gives tasks without raw buffers (shared by them)
        self._spec: dict[str, Any] | None = None
        self._bulk_spec: dict[str, Any] | None = None

    # engines

    def set_hosts(self, hosts: Any) -> None:
        """The live engines' host ids, as the Hub gives them (``{id: host}``)."""
        if isinstance(hosts, dict):
            self.hosts = {int(k): str(v) for k, v in hosts.items()}
            self._update()

    def engine_added(self, engine: int, host: str) -> None:
        self.hosts[engine] = host
        self._update()

    def engine_removed(self, engine: int) -> None:
        self.hosts.pop(engine, None)
        self._update()

    def _update(self) -> None:
        hosts = list(self.hosts.values())
        self._all_local = bool(hosts) and all(h == self.host for h in hosts)

    def local(self, engine: int | None) -> bool:
        """Whether a task for ``engine`` (None: load-balanced: every engine must be on this
        host, as any may take it) may use shared memory."""
        if not (self.config.enabled and self.host):
            return False
        if engine is not None:
            return self.hosts.get(engine) == self.host
        return self._all_local

    # sending

    def offload(self, buffers: list[Any], raw: list[bool], md: dict[str, Any],
                engine: int | None) -> tuple[list[Any], list[bool], list[Any] | None]:
        """Move large raw buffers into a segment; handles (and this client's host, so the
        engine may answer through shared memory) go into ``md["shm"]``.

        With a large argument, an idle pooled segment is lent to the engine as
        ``spare``: it writes a large result there (warm pages) instead of into a
        new segment.
        """
        if not self.local(engine):
            # not through shared memory: large buffers are served to the engine (monq.bulk)
            buffers, raw, ticket = self.bulk.offload(buffers, raw, md, once=False)
            return buffers, raw, [ticket] if ticket is not None else None
        spec: dict[str, Any] = {"host": self.host, "pid": self.pid,
                                "min": self.config.threshold}
        md["shm"] = spec
        big = _big(buffers, raw, self.config.threshold)
        if not big:
            return buffers, raw, None
        need = sum((_nbytes(buffers[i]) + ALIGN - 1) // ALIGN * ALIGN for i in big)
        seg = None
        try:
            seg = self._take(need)
            offsets = seg.write([buffers[i] for i in big], keep_map=True)
        except OSError as e:  # /dev/shm full, ...: the raw path still works
            log.warning("shared memory unavailable (%s): sending the buffers as frames", e)
            if seg is not None:
                self._forget(seg)
            return buffers, raw, None
        spec["bufs"] = [[i, seg.name, off, _nbytes(buffers[i])] for i, off in zip(big, offsets)]
        segs = [seg]
        spare = self._lend()
        if spare is not None:
            spec["spare"] = spare.name
            segs.append(spare)
        drop = set(big)
        return _without(buffers, drop), _without(raw, drop), segs

    def tag(self, engine: int | None) -> tuple[str, dict[str, Any]] | None:
        """What :meth:`offload` adds to the metadata of a task without raw buffers,
        as ``(key, value)`` (None: nothing): the value is shared by such tasks and
        never changed (made again when the threshold changes), so a burst makes
        no dict per task for it."""
        # self.local(engine), without a call more
        if self.config.enabled and self.host and (
                self._all_local if engine is None else self.hosts.get(engine) == self.host):
            spec = self._spec
            if spec is None or spec["min"] != self.config.threshold or \
                    spec["host"] != self.host:
                spec = self._spec = {"host": self.host, "pid": self.pid,
                                     "min": self.config.threshold}
            return "shm", spec
        cfg = self.bulk.config
        if not cfg.enabled:
            return None
        b = self._bulk_spec
        if b is None or b["min"] != cfg.threshold:
            b = self._bulk_spec = {"min": cfg.threshold}
        return "bulk", b

    def track(self, fut: Any, segs: list[Any] | None) -> None:
        """The task ``fut`` uses ``segs`` (segments, or a bulk Ticket) until it is done
        (any way it ends)."""
        if segs and isinstance(segs[0], Ticket):
            fut.add_done_callback(segs[0].release)
            return
        if not segs:
            return
        with self.lock:
            self._tasks[fut.msg_id] = segs
        fut.add_done_callback(self._task_done)

    def drop(self, segs: list[Any] | None) -> None:
        """Segments (or a bulk Ticket) whose message was never sent."""
        for seg in segs or ():
            if isinstance(seg, Ticket):
                seg.release()
            else:
                self._forget(seg)

    # receiving

    def on_reply(self, msg: Any) -> list[Any]:
        """The reply's frames with its shared-memory buffers mapped in place.

        Records whether the engine released the task's argument segment, maps
        result handles (a handle to one of our own segments holds it out of the
        pool while the view lives) and unlinks result segments the engine made.
        """
        md = msg.metadata
        if not self._tasks and "shm" not in md and "bulk" not in md:
            return msg.buffers  # most replies: nothing to map, no segment of ours to free
        if "bulk" in md:  # result buffers the engine serves: fetched here
            return self.bulk.fetch_all(msg.buffers, md["bulk"])
        spec = md.get("shm")
        segs = self._tasks.get(str(msg.parent.get("msg_id", ""))) or ()
        rel = spec.get("released") if isinstance(spec, dict) else None
        for i, seg in enumerate(segs):
            # the argument segment, when the engine unmapped it; a spare is never mapped
            seg.released = i > 0 or (isinstance(rel, list) and seg.name in rel)
        if not spec:
            return list(msg.buffers)
        try:
            frames, maps = attach(msg.buffers, spec, self.cid)
        except BaseException:
            self.discard_reply(msg)
            raise
        for name, mm in maps.items():
            own = self._mine.get(name)
            if own is None:
                own = self._adopt(name, len(mm))  # an engine's result segment
                if own is None:
                    continue
            with self.lock:
                own.size = max(own.size, len(mm))
                own.refs += 1
            weakref.finalize(mm, self._unref, own)
        return frames

    def _adopt(self, name: str, size: int) -> Segment | None:
        """Take over a result segment an engine made for us: unlinked when pooling is off,
        else renamed into this client's namespace and pooled once its views are gone."""
        parts = parse_name(name, self.cid)
        if not (parts and parts[2].startswith("r") and parts[1] == self.pid):
            return None
        if not self.config.pool_bytes or size > self.config.pool_bytes or self._closed:
            _unlink(name)
            return None
        new = seg_name(self.cid, self.pid, "c")
        try:
            os.link(_path(name), _path(new))  # never replaces an existing name
            _unlink(name)
            fd, st_size = _open_rw(new, self.cid)
        except (OSError, ShmError):
            _unlink(name)
            _unlink(new)
            return None
        seg = Segment(self.cid, self.pid, "c", adopt=(new, fd, max(size, st_size)))
        seg.released = seg.waiting = True  # no task holds it: pooled when its views go
        with self.lock:
            self._mine[new] = seg
        return seg

    def _lend(self) -> Segment | None:
        """An idle pooled segment to lend an engine for a large result (None if none)."""
        with self.lock:
            if not self._free:
                return None
            seg = max(self._free, key=lambda s: s.size)
            self._free.remove(seg)
            return seg

    def discard_reply(self, msg: Any) -> None:
        """Unlink the result segments an engine made for a reply (mapped or not wanted);
        tell an engine serving the results that nobody will fetch them."""
        if "bulk" in msg.metadata:
            self.bulk.discard(msg.metadata["bulk"])
        spec = msg.metadata.get("shm")
        with contextlib.suppress(ShmError):
            for _, name, _, _ in _entries(spec):
                parts = parse_name(name, self.cid)
                if parts and parts[2].startswith("r") and name not in self._mine:
                    _unlink(name)

    # lifetime

    def _task_done(self, fut: Any) -> None:
        with self.lock:
            segs = self._tasks.pop(fut.msg_id, None) or []
            done = []
            for seg in segs:
                if seg.released and not self._closed and self.config.pool_bytes:
                    if seg.refs:
                        seg.waiting = True
                        continue
                    if self._give(seg):
                        continue
                done.append(seg)
        for seg in done:
            self._forget(seg)

    def _unref(self, seg: Segment) -> None:
        with self.lock:
            seg.refs -= 1
            if seg.refs or not seg.waiting:
                return
            seg.waiting = False
            if not self._closed and self._give(seg):
                return
        self._forget(seg)

    def _take(self, need: int) -> Segment:
        with self.lock:
            fits = [s for s in self._free if s.size >= need]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._free.remove(seg)
                return seg
        seg = Segment(self.cid, self.pid, "c")
        with self.lock:
            self._mine[seg.name] = seg
        return seg

    def _give(self, seg: Segment) -> bool:
        """Into the pool (caller holds the lock); False when it does not fit."""
        seg.released = seg.waiting = False
        cap = self.config.pool_bytes
        if seg.size > cap:
            return False
        total = sum(s.size for s in self._free) + seg.size
        while total > cap and self._free:
            old = self._free.pop(0)
            total -= old.size
            self._mine.pop(old.name, None)
            old.destroy()
        seg.idle_since = time.monotonic()
        self._free.append(seg)
        if self._timer is None:
            self._timer = threading.Timer(self.config.pool_idle, self._trim)
            self._timer.daemon = True
            self._timer.start()
        return True

    def _trim(self) -> None:
        with self.lock:
            self._timer = None
            now = time.monotonic()
            old = [s for s in self._free if now - s.idle_since >= self.config.pool_idle]
            for s in old:
                self._free.remove(s)
                self._mine.pop(s.name, None)
                s.destroy()
            if self._free and not self._closed:
                self._timer = threading.Timer(self.config.pool_idle, self._trim)
                self._timer.daemon = True
                self._timer.start()

    def _forget(self, seg: Segment) -> None:
        with self.lock:
            self._mine.pop(seg.name, None)
        seg.destroy()

    def close(self) -> None:
        """Unlink every segment of this client (views handed out stay valid)."""
        with self.lock:
            self._closed = True
            segs = list(self._mine.values())
            self._mine.clear()
            self._free.clear()
            self._tasks.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for s in segs:
            s.destroy()
        self.bulk.close()

    def segments(self) -> list[str]:
        """Names of this client's live segments (pool included)."""
        with self.lock:
            return sorted(self._mine)


# -- the engine -----------------------------------------------------------------------


class EngineShm:
    """An engine's side: maps a request's segments, answers large results through shm."""

    def __init__(self, key: bytes, config: ShmConfig | None = None,
                 reach: str = "127.0.0.1") -> None:
        self.config = config or ShmConfig.from_env()
        self.cid = cluster_id(key)
        #: large arguments fetched from, and results served to, non-local clients (monq.bulk)
        self.bulk = Bulk(key, reach)
        #: registered with the Hub: '' (off here, or no /dev/shm) makes clients send frames
        self.host = host_id() if supported() and self.config.enabled else ""
        #: this task's mappings: (name, weak mmap, start address, size)
        self._maps: list[tuple[str, weakref.ref[mmap.mmap], int, int]] = []
        if self.host:
            with contextlib.suppress(Exception):  # what dead clients left on this host
                Sweeper(key).tick(lambda msg_id: None)

    def attach(self, msg: Any) -> list[Any]:
        """The request's frames, its shared-memory arguments mapped in place (no copy)."""
        self._maps = []
        if "bulk" in msg.metadata:  # arguments the client serves: fetched here
            return self.bulk.fetch_all(msg.buffers, msg.metadata["bulk"])
        spec = msg.metadata.get("shm")
        if not spec or not _entries(spec):
            return list(msg.buffers)
        if not self.host or spec.get("host") != self.host:
            raise ShmError("the task's arguments are in shared memory on another host "
                           "(or shared memory is off on this engine)")
        frames, maps = attach(msg.buffers, spec, self.cid)
        self._maps = [(n, weakref.ref(mm), _addr(mm), len(mm)) for n, mm in maps.items()]
        return frames

    def reply(self, msg: Any, buffers: list[Any], raw: list[bool], metadata: dict[str, Any]
              ) -> tuple[list[Any], list[bool]]:
        """Large result buffers as handles: into an argument segment when the result is a
        view of it, else into a new segment; unchanged when the client is not local (or
        anything goes wrong: the frames always work)."""
        try:
            return self._reply(msg, buffers, raw, metadata)
        except Exception:
            log.exception("could not answer through shared memory: sending frames")
            metadata.pop("shm", None)
            return buffers, raw

    def _reply(self, msg: Any, buffers: list[Any], raw: list[bool], metadata: dict[str, Any]
               ) -> tuple[list[Any], list[bool]]:
        spec = msg.metadata.get("shm")
        if not (self.host and isinstance(spec, dict) and
                spec.get("host") == self.host):
            return self._bulk_reply(msg, buffers, raw, metadata)
        try:
            threshold = max(1, int(spec.get("min", self.config.threshold)))
            owner = int(spec["pid"])
        except (KeyError, TypeError, ValueError):
            return buffers, raw
        big = _big(buffers, raw, threshold)
        if not big:
            return buffers, raw  # most replies: nothing large (no regex per reply)
        msg_id = msg.msg_id if isinstance(msg.msg_id, str) and \
            re.fullmatch(r"[0-9a-f]{1,64}", msg.msg_id) else ""
        entries: list[list[Any]] = []
        fresh: list[int] = []
        for i in big:
            where = self._locate(buffers[i])
            if where is None:
                fresh.append(i)
            else:
                entries.append([i, where[0], where[1], _nbytes(buffers[i])])
        seg = None
        if fresh:
            try:
                seg = self._spare(spec.get("spare"), owner) or \
                    Segment(self.cid, owner, f"r{msg_id}")
                offsets = seg.write([buffers[i] for i in fresh])
            except OSError as e:
                # the fresh ones go as raw frames; handles into argument segments still hold
                log.warning("shared memory unavailable (%s): result sent as frames", e)
                if seg is not None and seg.name == spec.get("spare"):
                    os.close(seg.fd)  # the client's spare: not ours to unlink
                elif seg is not None:
                    seg.destroy()
            else:
                entries += [[i, seg.name, off, _nbytes(buffers[i])]
                            for i, off in zip(fresh, offsets)]
                os.close(seg.fd)  # the client unlinks it once mapped
                seg.fd = -1
        if not entries:
            return buffers, raw
        entries.sort()
        metadata["shm"] = {"bufs": entries}
        drop = {e[0] for e in entries}
        return _without(buffers, drop), _without(raw, drop)

    def _bulk_reply(self, msg: Any, buffers: list[Any], raw: list[bool],
                    metadata: dict[str, Any]) -> tuple[list[Any], list[bool]]:
        """Serve large results to a client that fetches served buffers (its request said
        so, with its threshold); each is served once."""
        want = msg.metadata.get("bulk")
        if not isinstance(want, dict):
            return buffers, raw
        md: dict[str, Any] = {}
        buffers, raw, _ = self.bulk.offload(buffers, raw, md, once=True,
                                            threshold=want.get("min"))
        if md.get("bulk", {}).get("bufs"):
            metadata["bulk"] = {"bufs": md["bulk"]["bufs"]}
        return buffers, raw

    def _spare(self, name: Any, owner: int) -> Segment | None:
        """The segment the client lent for this result (its pages are warm), if usable."""
        parts = parse_name(name, self.cid)
        if parts is None or parts[0] != host_tag() or parts[1:] != (owner, "c"):
            return None
        try:
            fd, size = _open_rw(name, self.cid)
        except (OSError, ShmError):
            return None
        return Segment(self.cid, owner, "c", adopt=(name, fd, 0))

    def _locate(self, buf: Any) -> tuple[str, int] | None:
        if not self._maps:
            return None
        try:
            a = _addr(buf)
        except (TypeError, ValueError):
            return None
        n = _nbytes(buf)
        for name, ref, start, size in self._maps:
            # a live mapping (the buffer keeps its own alive): address ranges cannot overlap
            if ref() is not None and start <= a and a + n <= start + size:
                return name, a - start
        return None

    def finish(self, metadata: dict[str, Any]) -> None:
        """Say which argument segments this engine no longer maps (once the task's objects
        are dropped): the client may then reuse them."""
        if not self._maps:
            return
        released = [n for n, ref, _, _ in self._maps if ref() is None]
        self._maps = []
        if released:
            metadata.setdefault("shm", {})["released"] = released


# -- sweeping ---------------------------------------------------------------------------


class Sweeper:
    """Unlinks a cluster's segments left behind by processes that died (run by the Hub).

    ``task_end(msg_id)`` tells when a task ended (epoch seconds), or None while it
    runs or is unknown.
    """

    def __init__(self, key: bytes, grace: float | None = None) -> None:
        self.prefix = f"monq-{cluster_id(key)}-"
        self.cid = cluster_id(key)
        self.tag = host_tag()
        if grace is None:
            try:
                grace = float(os.environ.get("MONQ_SHM_GRACE", "30"))
            except ValueError:
                grace = 30.0
        self.grace = grace
        self.swept = 0
        self.enabled = supported()

    def tick(self, task_end: Callable[[str], float | None]) -> int:
        """One sweep; how many segments it removed.  Never raises (it runs in the Hub's loop)."""
        if not self.enabled:
            return 0
        try:
            return self._tick(task_end)
        except Exception:
            log.exception("shared-memory sweep failed")
            return 0

    def _tick(self, task_end: Callable[[str], float | None]) -> int:
        from monq.connection import pid_alive

        try:
            names = [n for n in os.listdir(DIR) if n.startswith(self.prefix)]
        except OSError:
            return 0
        n = 0
        now = time.time()
        for name in names:
            parts = parse_name(name, self.cid)
            if parts is None:
                continue
            tag, owner, kind = parts
            # an owner's pid is only meaningful in this host's pid namespace
            gone = tag == self.tag and not pid_alive(owner)
            if not gone and kind.startswith("r"):
                try:
                    ended = task_end(kind[1:])
                except Exception:
                    ended = None
                gone = ended is not None and now - ended > self.grace
            if gone and _remove_ours(name):
                n += 1
        if n:
            log.info("removed %d shared-memory segment(s) left by dead processes or ended "
                     "tasks", n)
        self.swept += n
        return n


def hub_task_end(hub: Any, msg_id: str) -> float | None:
    """When the Hub saw ``msg_id`` end (None: running, or unknown)."""
    st = hub._inflight.get(msg_id)
    if st is not None and st.status not in ("ok", "error", "aborted", "timeout", "lost",
                                            "resubmitted"):
        return None
    row = hub.store.get_task(msg_id)
    if row is None or row.get("status") in (None, "pending", "running"):
        return None
    return float(row.get("completed") or row.get("received") or 0.0) or time.time() - 3600


def remove_all(key: bytes) -> int:
    """Unlink every segment of the cluster with this key (the cluster stops)."""
    if not supported():
        return 0
    prefix = f"monq-{cluster_id(key)}-"
    n = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(DIR):
            if name.startswith(prefix) and _remove_ours(name):
                n += 1
    return n
