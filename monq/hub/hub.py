"""The Hub: registers engines, watches their hearts and records every task.

The Hub runs in the controller's main thread.  It reads three sockets:

- the monitor SUB, bound on ``inproc://`` and fed by every relay, which sees
  each request as it enters (``in.task`` / ``in.direct``) and each reply as
  it leaves (``out.task`` / ``out.direct``);
- the Hub ROUTER, where engines register and report ``task_started`` and
  clients ask their queries;
- the heartbeat pong ROUTER.

It verifies every message (a forged copy never becomes history), keeps a
small record of each task in flight, and writes records to the store in
batches: one transaction per ``flush_rows`` rows or ``flush_interval``
seconds, whichever comes first, and always before answering a query, so a
client that has seen its result also sees it in the history.  Payloads are
passed through as bytes and never unpickled here.

Resource handling: the Hub owns its sockets and the store and closes them in
:meth:`close` (safe to call twice); the Context belongs to the controller.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import os
import signal
import socket as _socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.backend import Socket as _BackendSocket

from monq import bulk, shm
from monq.errors import HubError, ProtocolError
from monq.frames import recv_frames
from monq.hub import blobs
from monq.hub.filters import FILTER_KEYS, split_filters
from monq.hub.heart import HeartMonitor
from monq.hub.retention import Retention, RetentionPolicy
from monq.hub.store import TaskStore
from monq.hub.tracker import LoadTracker
from monq.protocol import BATCH_REPLY, BATCH_REQUEST, DELIM, RECENT_REPLIES, Message, Session
from monq.schedulers.relay import bind_port
from monq.security import SMALL_MSG

log = logging.getLogger(__name__)

MONITOR_URL = "inproc://monq-monitor"
TERMINAL = frozenset({"ok", "error", "aborted", "timeout", "lost", "resubmitted"})
# cap on a reply's captured output kept per stream (bytes of text)
_OUTPUT_CAP = 1 << 20
#: monitor copies handled on an engine's receipt before the receipt itself; if more are
#: waiting (a burst), the receipt is parked until the backlog is drained (see _receipt)
RECEIPT_DRAIN = 5000
#: seconds the loop spends on one socket's backlog before it looks at the others and
#: at its heartbeat (a burst's monitor backlog can take minutes on a loaded machine)
TURN = 0.1
#: msg_ids in one task_lost notice at most (~40 bytes each)
LOST_PER_NOTICE = 5000
#: a walk over the tasks in flight for cluster_status is reused for this many times
#: what it cost (see Hub._inflight_by_engine)
QUEUE_WALK_REUSE = 10
_get = _BackendSocket.get
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


@dataclass(frozen=True)
class HubConfig:
    """How the Hub behaves; passed explicitly by the controller."""

    ip: str = "127.0.0.1"
    heartbeat_period: float = 1.0
    heartbeat_max_missed: int = 3
    #: how often the loop writes while it keeps up.  Each write is a burst of CPU
    #: (~1.7 ms for the ~23 rows of 20 ms of sequential round trips) on a core the
    #: relays and engines share: written every 20 ms it was the latency's p99 (one
    #: round trip in 25-30 waited behind it); every 0.25 s, the load-balanced p99 is
    #: 0.33-0.37x (bench/PROFILE.md 12).  Rows held longer are not lost with the
    #: controller: engines tell a new one their recent replies (see _on_recent)
    flush_interval: float = 0.25
    flush_rows: int = 2000
    #: while monitor copies are still waiting (a burst the Hub is behind on), the loop
    #: writes every ``flush_rows`` rows, or once the oldest unwritten row is this old,
    #: instead of every ``flush_interval``: see :meth:`Hub._flush_due`
    flush_backlog_interval: float = 0.5
    #: a new task's row waits in memory for its reply up to this long after the Hub has
    #: caught up with the copies (while they wait, the history is behind anyway), so
    #: that a task that ends by then is one INSERT rather than an INSERT and an UPDATE:
    #: see :meth:`Hub.flush`; and ``hold_max`` at most, caught up or not
    hold_pending: float = 1.0
    hold_max: float = 10.0
    #: at most this many rows wait so; later new tasks are written at once.  A burst's
    #: tasks come in batches, whose rows share their blob and strings: ~0.6 KB each
    #: (a row of its own, ~1.2 KB): 16,000 take less memory than the 10,000 rows of
    #: ~1.2 KB this was before they were shared, and a burst with up to 16,000 tasks
    #: waiting for their replies writes none of them twice (a 20,000-task burst's
    #: replay: 8,300 tasks written pending, then updated, with 10,000; 2,300 with 16,000)
    hold_rows: int = 16_000
    payload_cap: int = 1 << 20
    #: undecided load-balanced requests older than this are settled with probes
    probe_after: float = 0.25
    #: extra time past a task's timeout before the Hub ends it itself (and its engine)
    timeout_grace: float = 1.0
    #: after a restart, how long engines have to claim the unfinished tasks of the history
    recovery_grace: float = 3.0
    #: history limits (--retain, --max-tasks, --max-bytes), applied in bounded steps
    retention: RetentionPolicy = RetentionPolicy()


@dataclass(slots=True)
class _InFlight:
    """What the Hub keeps of a task in flight (slots: a burst holds 100,000s of them)."""

    queue: str
    status: str
    engine: int | None
    client: str
    inserted: bool = False
    #: load-balanced requests: the order the task relay sent it in (see tracker)
    seq: int | None = None
    #: uuid of the engine that has read it (receipt, start notice or reply)
    holder: str | None = None
    #: seconds the task may run, and when it started (the Hub ends overrunners)
    timeout: float | None = None
    started: float | None = None
    #: controller restart: a task found unfinished in the history must be claimed by an
    #: engine before this monotonic time, or it is recorded lost
    claim_by: float | None = None


@dataclass
class _Engine:
    id: int
    uuid: str
    hostname: str
    pid: int
    registered: float
    status: str = "alive"


class Hub:
    """The controller's bookkeeper.  Create, :meth:`bind`, then :meth:`run`."""

    #: applied to each tcp socket before it binds, with its inbound size cap (or -1):
    #: CurveZMQ server options and limits, set by the controller (see monq.security)
    socket_setup: Callable[[zmq.Socket, int], None] = staticmethod(lambda sock, max_msg: None)
    #: a file descriptor the loop also polls, readable when it should look at its stop flag
    #: at once (the controller's signal.set_wakeup_fd pipe); None: only the poll timeout
    wake_fd: int | None = None

    def __init__(self, ctx: zmq.Context, session: Session, store: TaskStore,
                 config: HubConfig, db_url: str = "",
                 on_shutdown: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.session = session
        self.store = store
        self.config = config
        self.db_url = db_url
        #: what a client's shutdown_request does (the controller stops the whole cluster)
        self.on_shutdown = on_shutdown or self.stop
        self.ports: dict[str, int] = {}
        self.rejected: Counter[str] = Counter()
        #: how a monitor copy is read (bind() sets the Cython path for its real socket)
        self._recv_monitor: Callable[[Any, int], list[Any]] = \
            lambda sock, flags: sock.recv_multipart(flags, copy=False)
        #: verified messages handled, by source and type ("out.task apply_reply", "hub
        #: tasks_received", ...): what each task costs the Hub (monq status --json); a
        #: batch counts as one message, and "<source> apply_batch tasks" counts its tasks
        self.received: Counter[str] = Counter()
        #: monitor copies handled, a batch counting as its tasks (paces _drain_monitor)
        self.monitor_tasks = 0
        self._stop = False
        self._sockets: list[zmq.Socket] = []
        self._inflight: dict[str, _InFlight] = {}
        self._walk: dict[str | None, list[int]] = {}  # see _inflight_by_engine
        self._walk_until = 0.0
        self._dirty: dict[str, dict[str, Any]] = {}
        self._dirty_since = 0.0
        #: the last monitor turn ended with copies still waiting (see _flush_due)
        self._backlog = False
        #: when the Hub last found more copies waiting than one step takes (see flush)
        self._behind_at = 0.0
        #: rows of new tasks still pending, not written yet (see flush): msg_id ->
        #: (when first held, row), oldest first
        self._held: dict[str, tuple[float, dict[str, Any]]] = {}
        self._engines: dict[str, _Engine] = {}  # by uuid
        self._by_id: dict[int, _Engine] = {}
        self._next_id = store.max_engine_id() + 1
        self._closed = False
        self.tracker = LoadTracker()
        self._probes: dict[str, None] = {}  # msg_ids of probes in flight (bounded)
        #: monitor prefix -> (direction, channel, its text); (source, msg_type) -> the
        #: key counted in ``received``: made once, not per message (both bounded)
        self._prefixes: dict[bytes, tuple[str, str, str]] = {}
        self._received_keys: dict[tuple[str, str], str] = {}
        self._next_probe = 0.0
        self._timed: dict[str, _InFlight] = {}  # running tasks with a timeout
        #: task_lost notices not sent yet, by what they say (engine, reason, started,
        #: status, queue): one message per kind at the end of the turn, not one per task
        #: (an engine's death in a burst loses thousands; see _send_lost)
        self._lost_out: dict[tuple[Any, ...], list[str]] = {}
        #: engines' receipts (task_started, tasks_received) waiting for the monitor copies
        #: sent before them to be handled (see _receipt)
        self._parked: deque[Message] = deque()
        self._recovering = 0
        self._hostname = _socket.gethostname()
        self.probe: zmq.Socket | None = None
        #: engines asked to register again, by uuid: when (bounded; see _on_pong)
        self._asked: dict[bytes, float] = {}
        self.retention = Retention(store, config.retention)
        #: bytes of payload seen, on the wire and as shared-memory handles (monq.shm)
        self.payload_bytes: Counter[str] = Counter()
        self._hosts: dict[str, str] = {}  # engine host ids, by uuid (monq.shm)
        self.shm_sweeper = shm.Sweeper(session.key)
        for row in store.engines():
            if row.get("status") == "alive":
                # the previous controller ended without saying; they re-register if alive
                store.upsert_engine({**row, "status": "dead", "unregistered": time.time()})
        self._recover()

    def _recover(self) -> None:
        """Take over the tasks a previous controller left unfinished in the history.

        Engines that survived re-register and say which tasks they hold; what
        nobody claims within ``recovery_grace`` seconds is recorded ``lost``
        (and its clients are told, so they can retry it).
        """
        rows = self.store.unfinished()
        if not rows:
            return
        claim_by = time.monotonic() + max(self.config.recovery_grace,
                                          3 * self.config.heartbeat_period)
        for r in rows:
            self._inflight[r["msg_id"]] = _InFlight(
                r.get("queue") or "task", r["status"], r.get("engine"), r.get("client") or "",
                inserted=True, claim_by=claim_by)
        self._recovering = len(rows)
        log.warning("%d task(s) were unfinished when the last controller stopped: engines "
                    "have %.1fs to claim them", len(rows), claim_by - time.monotonic())

    # -- sockets --------------------------------------------------------------

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.linger = 0
        self._sockets.append(s)
        return s

    def bind(self, want: dict[str, int] | None = None) -> dict[str, int]:
        """Bind every Hub socket; the monitor first, so relays can connect to it.

        ``want``: the ports to bind when free (a restarted controller's predecessor's).
        """
        want = want or {}
        addr = f"tcp://{self.config.ip}"
        self.monitor = self._socket(zmq.SUB)
        self.monitor.rcvhwm = 0  # never drop a copy; queue it
        self.monitor.bind(MONITOR_URL)
        self.monitor.subscribe(b"")
        # copies through pyzmq's Cython receive, small frames as bytes (verified 3x
        # faster than Frames; a sequential task's two copies are two turns of the loop)
        self._recv_monitor = recv_frames
        self.router = self._socket(zmq.ROUTER)
        self.router.sndhwm = 0
        self.socket_setup(self.router, -1)
        self.ports["hub"] = bind_port(self.router, addr, want.get("hub", 0))
        self.notify = self._socket(zmq.PUB)
        # queue notices for a slow client rather than drop them: a task_lost dropped
        # left its tasks pending forever (clients also look again after a gap in the
        # notices' numbers: Client._on_notify)
        self.notify.sndhwm = 0
        self.socket_setup(self.notify, SMALL_MSG)  # subscriptions only come in
        self.ports["notify"] = bind_port(self.notify, addr, want.get("notify", 0))
        ping = self._socket(zmq.PUB)
        self.socket_setup(ping, SMALL_MSG)
        self.ports["hb_ping"] = bind_port(ping, addr, want.get("hb_ping", 0))
        pong = self._socket(zmq.ROUTER)
        self.socket_setup(pong, SMALL_MSG)
        self.ports["hb_pong"] = bind_port(pong, addr, want.get("hb_pong", 0))
        self.heart = HeartMonitor(ping, pong, self.config.heartbeat_period,
                                  self.config.heartbeat_max_missed)
        return dict(self.ports)

    def connect_probe(self, task_client_url: str,
                      setup: Callable[[zmq.Socket], None] | None = None) -> None:
        """Where probes go in: the task relay's client side (see _send_probes).

        ``setup`` is applied before connecting (CurveZMQ client options, monq.security).
        """
        self.probe = self._socket(zmq.DEALER)
        self.probe.sndhwm = 0
        if setup is not None:
            setup(self.probe)
        self.probe.connect(task_client_url)

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stop = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._send_lost()
        except Exception:
            log.exception("could not send the last task_lost notices")
        try:
            self.flush()
        except Exception:
            log.exception("final flush failed")
        for s in self._sockets:
            s.close(linger=0)
        self.store.close()

    # -- loop -----------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.heart.pong, zmq.POLLIN)
        handlers: dict[zmq.Socket, Callable[[], None]] = {
            self.monitor: self._drain_monitor,
            self.router: self._drain_router,
            self.heart.pong: self._drain_pong,
        }
        if self.wake_fd is not None:
            poller.register(self.wake_fd, zmq.POLLIN)
            handlers[self.wake_fd] = self._drain_wake  # type: ignore[index]
        while not self._stop:
            timeout = 100.0
            if self._dirty:
                timeout = max(0.0, (self._dirty_since + self._flush_age()
                                    - time.monotonic()) * 1000)
            if self._held:
                timeout = min(timeout, max(0.0, (self._held_until() - time.monotonic()) * 1000))
            timeout = min(timeout, max(0.0, (self.heart.next_beat - time.monotonic()) * 1000))
            try:
                events = poller.poll(math.ceil(timeout))
            except zmq.ZMQError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            for sock, _ in events:
                handlers[sock]()
            beat = self.heart.beat
            if time.monotonic() >= self.heart.next_beat:
                # pongs that came while this loop was busy count: a slow Hub must not
                # take its own delay for dead engines
                self._drain_pong()
            for uuid in self.heart.tick():
                self._engine_gone(uuid.decode(errors="replace"), "missed heartbeats",
                                  kill=True)
            if self.heart.beat != beat:
                # clients watch this to tell a live controller from a dead one
                self._publish("hub_beat", {"beat": self.heart.beat,
                                           "hub": self.session.session_id})
                self._periodic()
                self.shm_sweeper.tick(lambda msg_id: shm.hub_task_end(self, msg_id))
            self._settle_orphans()
            if self._lost_out:
                self._send_lost()
            if self._dirty and self._flush_due() or self._held_due():
                self._safe_flush(hold=True)
            self._retain()

    def settle(self, quiet: float = 0.05, limit: float = 1.0) -> None:
        """After the loop, before :meth:`close`: take in what is still arriving.

        A stop wakes the loop at once; the last replies' monitor copies and the
        engines' goodbyes may still be on their way through the relays (an
        engine stopped mid-task answers ``aborted`` just before it exits).
        Handle the monitor and the router until nothing is expected (no engine
        still registered, no task unfinished, nor one just recorded lost: its
        engine's goodbye can overtake its reply, which then corrects it), or
        neither has had anything for ``quiet`` seconds, or ``limit`` seconds
        have passed.  An idle cluster's stop waits for nothing.
        """
        poller = zmq.Poller()
        handlers = {self.monitor: self._drain_monitor, self.router: self._drain_router}
        for sock in handlers:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            if not any(e.status == "alive" for e in self._engines.values()) and \
                    not any(st.status not in TERMINAL or st.status == "lost"
                            for st in self._inflight.values()):
                # one last look: a copy may have come with the goodbyes
                self._catch_up()
                self._send_lost()
                return
            try:
                events = poller.poll(max(1, math.ceil(min(quiet, left) * 1000)))
            except zmq.ZMQError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not events:
                break
            for sock, _ in events:
                handlers[sock]()
        self._catch_up()
        self._send_lost()

    def _dirty_full(self) -> bool:
        """``flush_rows`` rows are waiting to be written (held rows do not count)."""
        return len(self._dirty) >= self.config.flush_rows

    def _flush_age(self) -> float:
        return self.config.flush_backlog_interval if self._backlog else \
            self.config.flush_interval

    def _flush_due(self) -> bool:
        """Whether the loop writes the dirty rows now.

        Every ``flush_interval`` (a quarter of a second: the history follows
        the cluster closely, and queries write first anyway), except while the
        monitor has a backlog: then every
        ``flush_rows`` rows, or ``flush_backlog_interval`` seconds at most.
        A write costs a fixed ~2 ms (statements, the pages every commit
        rewrites) plus its rows, and a bigger one dirties fewer pages per row
        (rows share the random pages of the msg_id index): into a
        300,000-task history, a burst's rows cost ~94 us each in 800-row
        writes (a turn's worth, as before), ~77 us in 2,000-row ones
        (bench/PROFILE.md).  What waits meanwhile is the rows of copies
        already read; the backlog itself, unread, is what a crash loses first.
        Queries write everything before answering, as always.
        """
        return self._dirty_full() or \
            time.monotonic() - self._dirty_since >= self._flush_age()

    def _held_cutoff(self, now: float) -> float:
        """Held rows held since this time or earlier are due (see flush)."""
        c = self.config
        cutoff = now - c.hold_max
        if not self._backlog and self._behind_at <= now - c.hold_pending:
            cutoff = max(cutoff, now - c.hold_pending)
        return cutoff

    def _held_until(self) -> float:
        """When the oldest held row is due, if the Hub keeps up meanwhile (the loop's
        wake-up: while a backlog lasts, only ``hold_max`` can make it due)."""
        since = next(iter(self._held.values()))[0]
        c = self.config
        if self._backlog:
            return since + c.hold_max
        return min(max(since, self._behind_at) + c.hold_pending, since + c.hold_max)

    def _held_due(self) -> bool:
        if not self._held:
            return False
        now = time.monotonic()
        return next(iter(self._held.values()))[0] <= self._held_cutoff(now)

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.wake_fd or -1, 4096)

    def _retain(self) -> None:
        """One bounded retention step when due (see monq.hub.retention); never ends the loop."""
        try:
            self.retention.tick()
        except Exception:
            log.exception("retention step failed")
            self.retention.next_run = time.monotonic() + self.config.retention.interval

    def _periodic(self) -> None:
        """Once a heartbeat: timeouts, restart recovery."""
        now = time.monotonic()
        wall = time.time()
        for msg_id, st in list(self._timed.items()):
            if st.status in TERMINAL:
                del self._timed[msg_id]
            elif st.timeout is not None and st.started is not None and \
                    wall > st.started + st.timeout + self.config.timeout_grace:
                # the engine could not interrupt it (C code holding on): end it from here
                del self._timed[msg_id]
                eng = self._by_id.get(st.engine) if st.engine is not None else None
                self._finish_lost(msg_id, f"the task ran longer than its timeout of "
                                  f"{st.timeout:g}s and could not be interrupted; its engine "
                                  "is restarted", st.engine, started=True, status="timeout")
                if eng is not None:
                    self._engine_gone(eng.uuid, "stopped for a task that overran its timeout",
                                      kill=True)
        if self._recovering:
            # a claim is settled by the engines' receipts: apply any parked first
            self._catch_up()
            left = 0
            for msg_id, st in list(self._inflight.items()):
                if st.claim_by is None:
                    continue
                if st.holder is not None or st.status in TERMINAL:
                    st.claim_by = None
                elif now > st.claim_by:
                    st.claim_by = None
                    self._finish_lost(msg_id, "the controller restarted and no engine held "
                                      "the task", st.engine, started=st.status == "running")
                else:
                    left += 1
            self._recovering = left

    def _settle_orphans(self) -> None:
        """Load-balanced requests that went to a dead engine: tell their clients."""
        for msg_id in self.tracker.orphans():
            if self._probes.pop(msg_id, 0) is None:
                continue  # a probe: nothing waits for it
            self._finish_lost(msg_id, "it was queued on an engine that died before reading "
                              "it; it never started", None, started=False)
        now = time.monotonic()
        if now >= self._next_probe and self.tracker.needs_probe(self.config.probe_after, now):
            self._next_probe = now + self.config.probe_after
            self._send_probes(max(1, len(self.tracker.horizon) + len(self.tracker.unknown)))

    def _send_probes(self, n: int) -> None:
        """Probes through the task relay: each lands in some live engine's pipe."""
        if self.probe is None:
            return
        for _ in range(n):
            hdr, frames = self.session.serialize("probe", "probe", {})
            if len(self._probes) > 10_000:
                self._probes.pop(next(iter(self._probes)))
            self._probes[hdr["msg_id"]] = None
            self.probe.send_multipart(frames)

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[Any]], None],
               limit: int = 1000, budget: float | None = None,
               recv: Callable[[zmq.Socket, int], list[Any]] | None = None) -> int:
        """Handle up to ``limit`` waiting messages, for at most about ``budget``
        seconds if given; returns how many were handled, or ``limit`` if the
        budget ran out first: fewer than ``limit`` means none is left waiting.

        ``recv``: how a message is read (default: zmq Frames, no copy).  After a
        message the socket is asked whether another waits (ZMQ_EVENTS, ~1 us)
        instead of reading on until ``zmq.Again`` is raised (~10 us here): when
        tasks come one at a time, every copy is a turn of its own.
        """
        end = None if budget is None else time.monotonic() + budget
        # ZMQ_EVENTS through the Cython call, as an int: pyzmq's Socket.get makes an enum
        # member of it (5 us a look instead of 3)
        get: Callable[[int], Any] = \
            functools.partial(_get, sock) if isinstance(sock, zmq.Socket) else sock.get
        for i in range(limit):
            try:
                frames = recv(sock, zmq.NOBLOCK) if recv is not None else \
                    sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return i
            try:
                handle(frames)
            except Exception:
                # one bad message must never end the loop
                log.exception("error handling a message")
                self.rejected["handler error"] += 1
            if not get(_EVENTS) & _POLLIN:
                return i + 1
            if end is not None and not i & 63 and time.monotonic() > end:
                break
        return limit

    #: tasks' worth of monitor copies handled per turn of the loop, and per step
    MONITOR_TURN = 5000
    MONITOR_STEP = 16

    def _drain_monitor(self) -> None:
        """Handle waiting monitor copies, about MONITOR_TURN tasks' worth per turn
        and for at most about :data:`TURN` seconds.

        A batch copy carries up to MAX_BATCH_TASKS tasks, so copies are taken a
        few at a time and rows are written as soon as ``flush_rows`` are
        dirty: a backlog of batches never piles up 100,000s of unwritten rows
        (memory), nor keeps the loop from beating and answering for long.  Once
        the backlog is gone, the receipts parked meanwhile are applied.
        """
        budget = self.MONITOR_TURN
        end = time.monotonic() + TURN
        while budget > 0:
            seen = self.monitor_tasks
            step = min(budget, self.MONITOR_STEP)
            n = self._drain(self.monitor, self._on_monitor, recv=self._recv_monitor, limit=step)
            if n == step:
                self._behind_at = time.monotonic()
            if self._dirty_full():
                self._safe_flush(hold=True)
            if n < step:
                self._backlog = False
                if self._parked:
                    self._apply_parked()
                return
            budget -= max(n, self.monitor_tasks - seen)
            if time.monotonic() > end:
                break
        self._backlog = True

    def _safe_flush(self, hold: bool = False) -> None:
        try:
            self.flush(hold)
        except Exception:
            # a database error must not end the Hub: the batch is logged, counted (by
            # flush) and dropped
            log.exception("could not write task records")

    def _drain_router(self) -> None:
        self._drain(self.router, self._on_router, budget=TURN)

    def _drain_pong(self) -> None:
        self._drain(self.heart.pong, self._on_pong)

    def _on_pong(self, frames: list[Any]) -> None:
        fr = [f.bytes for f in frames]
        if self.heart.handle_pong(fr):
            return
        if len(fr) != 3 or fr[1] != b"ping":
            self.rejected["bad pong"] += 1
            return
        # a beating engine this Hub does not know: it was registered with a controller
        # that has since restarted; ask it (at most once a second) to register again
        # (pongs are not signed: a stranger's costs one signed, content-free request a
        # second per identity, remembered in a bounded table)
        now = time.monotonic()
        if now - self._asked.get(fr[0], 0.0) < 1.0:
            return
        if len(self._asked) >= 10_000:
            self._asked.pop(next(iter(self._asked)))
        self._asked[fr[0]] = now
        _, out = self.session.serialize("reregister_request", "hub", {})
        self.router.send_multipart([fr[0], *out])

    def _on_exited(self, msg: Message) -> None:
        """The supervisor saw an engine process exit: no need to wait for heartbeats."""
        pid = msg.content.get("pid")
        host = msg.content.get("hostname", self._hostname)
        for eng in list(self._engines.values()):
            if eng.pid == pid and eng.hostname == host and eng.status == "alive":
                self._engine_gone(eng.uuid, f"its process exited with code "
                                  f"{msg.content.get('code')}")

    # -- monitor: the life of tasks ---------------------------------------------

    def _verify(self, frames: list[Any]) -> Message | None:
        try:
            return self.session.feed(frames)
        except ProtocolError as e:
            self.rejected[e.reason] += 1
            return None

    def _on_monitor(self, frames: list[Any]) -> None:
        prefix = frames[0]
        if type(prefix) is not bytes:  # a zmq Frame (monq.serialize.recv_frames gives bytes)
            prefix = prefix.bytes
        # (direction, channel, source): the few relay prefixes, decoded once
        known = self._prefixes.get(prefix)
        if known is None:
            text = prefix.decode(errors="replace")
            direction, _, channel = text.partition(".")
            known = (sys.intern(direction), sys.intern(channel), text)
            if len(self._prefixes) < 64:
                self._prefixes[prefix] = known
        direction, channel, source = known
        msg = self._verify(frames[1:])
        if msg is None:
            return
        msg_type = msg.header.get("msg_type")
        if type(msg_type) is not str:
            msg_type = msg.msg_type
        key = self._received_keys.get((source, msg_type))
        if key is None:
            key = f"{source} {msg_type}"
            if len(self._received_keys) < 1024:
                self._received_keys[(source, msg_type)] = key
        self.received[key] += 1
        self.monitor_tasks += 1
        if direction == "in" and msg_type == "apply_request":
            target = msg.idents[0].decode(errors="replace") if channel == "direct" and \
                msg.idents else None
            self._on_requests([msg], channel, target, _no_raw(msg))
        elif direction == "out" and msg_type == "apply_reply":
            self._on_replies([msg], channel, None, _no_raw(msg))
        elif (direction == "in" and msg_type == BATCH_REQUEST) or \
                (direction == "out" and msg_type == BATCH_REPLY):
            # verified once, recorded as its tasks: each exactly as if it came alone.  A
            # reply's own header is never read here, only its raw flags (packed with its
            # buffers): without raw buffers in the batch, its tasks share the batch's
            # header (split_batch builds no header per task)
            no_raw = _no_raw(msg)
            try:
                tasks = self.session.split_batch(
                    msg, own_headers=direction == "in" or not no_raw)
            except ProtocolError as e:
                self.rejected[e.reason] += 1
                return
            self.received[f"{key} tasks"] += len(tasks)
            self.monitor_tasks += len(tasks) - 1
            if direction == "in":
                target = msg.idents[0].decode(errors="replace") if channel == "direct" and \
                    msg.idents else None
                self._on_requests(tasks, channel, target, no_raw)
            else:
                # the batch's replies were received together: one timestamp for all
                self._on_replies(tasks, channel, _epoch(time.time()), no_raw)
        elif direction == "in" and msg_type == "probe" and channel == "task" and \
                msg.header.get("session") == self.session.session_id:
            self.tracker.sent(msg.msg_id)

    def _touch(self, msg_id: str, **fields: Any) -> None:
        for k in _TIME_FIELDS:
            if k in fields:
                fields[k] = _epoch(fields[k])
        row = self._unwritten(msg_id)
        if row is None:
            if not self._dirty:
                self._dirty_since = time.monotonic()
            row = self._dirty[msg_id] = {"msg_id": msg_id}
        row.update(fields)

    def _unwritten(self, msg_id: str) -> dict[str, Any] | None:
        """The row of ``msg_id`` not written yet, if any; a held one is waiting no
        longer: it is written at the next flush, with what is added to it now."""
        row = self._dirty.get(msg_id)
        if row is None and self._held:
            got = self._held.pop(msg_id, None)
            if got is not None:
                row = got[1]
                if not self._dirty:
                    self._dirty_since = time.monotonic()
                self._dirty[msg_id] = row
        return row

    def _payload(self, msg: Message, no_raw: bool = False) -> tuple[bytes | None, int]:
        """The blob of a message's buffers to store (None: not kept) and their size.

        ``no_raw``: none of its buffers is raw (their flags are not read: a batch's
        replies may share the batch's header, see _on_monitor)."""
        bufs = msg.buffers
        size = blobs.total_size(bufs)
        # handles count as their size, unread (only messages with an "shm" entry have
        # shared-memory handles, only those with a "bulk" entry buffers served peer to peer)
        in_shm = shm.payload_bytes(msg.metadata) if "shm" in msg.metadata else 0
        in_bulk = bulk.payload_bytes(msg.metadata) if "bulk" in msg.metadata else 0
        self.payload_bytes["wire"] += size
        if in_shm or in_bulk:
            # the segment is freed (the buffer no longer served) when the task ends: keep
            # the size only
            if in_shm:
                self.payload_bytes["shm"] += in_shm
            if in_bulk:
                self.payload_bytes["bulk"] += in_bulk
            return None, size + in_shm + in_bulk
        if size > self.config.payload_cap:
            return None, size
        return blobs.pack(bufs, blobs.NOT_RAW if no_raw else
                          [s[1] for s in msg.header["buffers"]]), size

    def _on_requests(self, msgs: Sequence[Message], channel: str, target_uuid: str | None,
                     no_raw: bool) -> None:
        """Record requests that came together (one copy, or the tasks of one batch:
        one sender, one target), each exactly as :meth:`_on_request` would.

        A burst's tasks come in batches, and the Hub's work per task was most of
        its CPU: so what is the same for the whole batch (the sender's session,
        the target, the time, the payload counters, the blobs of equal buffers)
        is worked out once, and a new task (the common case: not a new try, no
        shared-memory or peer-served buffers) is recorded inline, without the
        calls :meth:`_on_request` makes; any other goes through it.
        """
        engine = self._engines.get(target_uuid) if target_uuid else None
        if channel == "direct" and (engine is None or engine.status != "alive"):
            for m in msgs:  # each is recorded lost: rare, the general way
                self._on_request(m, channel, target_uuid, no_raw)
            return
        engine_id = engine.id if engine else None
        inflight, dirty, held = self._inflight, self._dirty, self._held
        was_dirty = bool(dirty)
        now = time.monotonic()
        sent = self.tracker.sent if channel == "task" else None
        pack = blobs.Packer(self.config.payload_cap).pack
        wire = 0
        last_func = None
        # all the tasks of one message have its sender's session: one string for them all
        client = ""
        for m in msgs:
            h, md = m.header, m.metadata
            if not client:
                client = sys.intern(str(h.get("session", "")))
            msg_id = h.get("msg_id")
            if type(msg_id) is not str:
                msg_id = m.msg_id
            # shared-memory buffers (every request of a client that can use shared memory
            # has an "shm" entry, mostly naming none: monq.shm.payload_bytes is 0) or
            # peer-served ones (monq.bulk), a timeout, a new try, one seen before: the
            # general way
            spec = md["shm"] if "shm" in md else None
            if spec is not None and (type(spec) is not dict or "bufs" in spec) or \
                    "bulk" in md or "timeout" in md or "retries_done" in md or \
                    msg_id in inflight or msg_id in dirty or msg_id in held or \
                    not no_raw and m.buffers:
                self._on_request(m, channel, target_uuid, no_raw)
                continue
            blob, size = pack(m.buffers)
            wire += size
            state = _InFlight(channel, "pending", engine_id, client)
            inflight[msg_id] = state
            if sent is not None:
                state.seq = sent(msg_id, now)
            label, func = md.get("label"), md.get("func")
            if func is not None:
                if func == last_func:
                    func = last_func  # a batch's tasks mostly share it: one string for all
                else:
                    func = last_func = _short(func, 300)
            dirty[msg_id] = {
                "msg_id": msg_id,
                "submitted": _epoch(h.get("date")),
                "client": client, "queue": channel, "status": "pending",
                "label": None if label is None else _short(label, 200),
                "func": func,
                "engine": engine_id, "engine_uuid": target_uuid, "request": blob,
                "request_bytes": size, "retries": 0}
        if wire:
            self.payload_bytes["wire"] += wire
        if not was_dirty and dirty:
            self._dirty_since = now

    def _on_request(self, msg: Message, channel: str, target_uuid: str | None,
                    no_raw: bool = False) -> None:
        h, md = msg.header, msg.metadata
        msg_id = msg.msg_id
        engine = self._engines.get(target_uuid) if target_uuid else None
        engine_id = engine.id if engine else None
        blob, size = self._payload(msg, no_raw)
        # the sender's session id is the same string for all its tasks: keep one copy
        client = sys.intern(str(h.get("session", "")))
        timeout = md.get("timeout")
        state = _InFlight(channel, "pending", engine_id, client,
                          timeout=None if timeout is None else _positive(timeout))
        old = self._inflight.get(msg_id)
        retries = md.get("retries_done")
        if old is not None:
            # a new try of a task still in flight here
            state.inserted = old.inserted
            self._timed.pop(msg_id, None)
        elif retries:
            # a new try: update its row, if the first try was recorded (a controller that
            # crashed may have died before writing it)
            state.inserted = self.store.get_task(msg_id) is not None
        self._inflight[msg_id] = state
        if channel == "task":
            state.seq = self.tracker.sent(msg_id)
        label, func = md.get("label"), md.get("func")
        fields = {
            "client": client, "queue": channel, "status": "pending",
            "label": None if label is None else _short(label, 200),
            "func": None if func is None else _short(func, 300), "engine": engine_id,
            "engine_uuid": target_uuid, "request": blob, "request_bytes": size,
            "retries": int(retries or 0)}
        row = self._unwritten(msg_id)
        if row is None and not state.inserted and old is None:
            # the common case, a new task: its row in one piece
            if not self._dirty:
                self._dirty_since = time.monotonic()
            self._dirty[msg_id] = {"msg_id": msg_id, "submitted": _epoch(h.get("date")),
                                   **fields}
        else:
            if not state.inserted and old is None:
                self._touch(msg_id, submitted=h.get("date"))  # a new try keeps the first
            self._touch(msg_id, **fields)
        if channel == "direct" and (engine is None or engine.status != "alive"):
            # the relay drops messages for unknown identities: say so instead of waiting forever
            self._finish_lost(msg_id, f"no engine with uuid {target_uuid}", None)

    def _on_replies(self, msgs: Sequence[Message], channel: str, received: float | None,
                    no_raw: bool, track: bool = True) -> None:
        """Record replies that came together (one copy, or the tasks of one batch), each
        exactly as :meth:`_on_reply` would; ``received``: when (None: now).

        As :meth:`_on_requests`: what the batch shares is worked out once, and
        the common reply (``ok``, to a request seen here, without shared-memory
        or peer-served buffers) is recorded inline; any other goes through
        :meth:`_on_reply`.  What engines have read is told to the tracker once
        per engine for the batch (its horizon is the highest seq read).
        """
        if received is None:
            received = _epoch(time.time())
        inflight, dirty, held = self._inflight, self._dirty, self._held
        was_dirty = bool(dirty)
        pack = blobs.Packer(self.config.payload_cap).pack
        unread = self.tracker.unread if channel == "task" and track else None
        # engine uuid -> the highest seq it has read here (the last engine's: top_uuid, top)
        read: dict[str, int] = {}
        top_uuid: str | None = None
        top = -1
        last_uuid = ""
        wire = 0
        for m in msgs:
            md, content = m.metadata, m.content
            msg_id: Any = m.parent.get("msg_id")
            state = inflight.get(msg_id) if type(msg_id) is str and msg_id else None
            uuid = md.get("engine_uuid")
            spec = md["shm"] if "shm" in md else None
            if state is None or content.get("status") != "ok" or type(uuid) is not str or \
                    spec is not None and (type(spec) is not dict or "bufs" in spec) or \
                    "bulk" in md or not no_raw and m.buffers:
                self._on_reply(m, channel, received, track, no_raw)
                continue
            if uuid != last_uuid:
                last_uuid = sys.intern(uuid)
            uuid = last_uuid  # a batch's replies come from one engine: one string for all
            if unread is not None:
                seq = state.seq
                if seq is None:
                    self.tracker.read(uuid, msg_id, None)
                else:
                    unread.pop(msg_id, None)
                    if uuid is not top_uuid:
                        if top_uuid is not None:
                            read[top_uuid] = top
                        top_uuid, top = uuid, read.get(uuid, -1)
                    if seq > top:
                        top = seq
            blob, size = pack(m.buffers)
            wire += size
            engine = md.get("engine")
            stdout, stderr = md.get("stdout"), md.get("stderr")
            fields: dict[str, Any] = {
                "status": "ok", "engine": engine, "engine_uuid": uuid,
                "started": _epoch(md.get("started")), "completed": _epoch(md.get("completed")),
                "received": received,
                "stdout": stdout if stdout == "" or stdout is None else
                _short(stdout, _OUTPUT_CAP),
                "stderr": stderr if stderr == "" or stderr is None else
                _short(stderr, _OUTPUT_CAP),
                "result": blob, "result_bytes": size,
            }
            state.status = "ok"
            state.engine = engine
            row = dirty.get(msg_id)
            if row is None and held:
                got = held.pop(msg_id, None)
                if got is not None:
                    row = got[1]
                    dirty[msg_id] = row
            if row is None:
                fields["msg_id"] = msg_id
                dirty[msg_id] = fields
            else:
                row.update(fields)
        if top_uuid is not None:
            read[top_uuid] = top
        for uuid, seq in read.items():
            self.tracker.advance(uuid, seq)
        if wire:
            self.payload_bytes["wire"] += wire
        if not was_dirty and dirty:
            self._dirty_since = time.monotonic()

    def _on_reply(self, msg: Message, channel: str, received: float | None = None,
                  track: bool = True, no_raw: bool = False) -> None:
        parent, md, content = msg.parent, msg.metadata, msg.content
        msg_id = parent.get("msg_id")
        if not msg_id:
            return
        if type(msg_id) is not str:
            msg_id = str(msg_id)
        state = self._inflight.get(msg_id)
        status = content.get("status", "error")
        if status not in TERMINAL:
            status = "error"
        uuid = md.get("engine_uuid")
        if isinstance(uuid, str):
            uuid = sys.intern(uuid)
            if channel == "task" and track:
                self.tracker.read(uuid, msg_id, state.seq if state is not None else None)
        blob, size = self._payload(msg, no_raw)
        engine = md.get("engine")
        stdout, stderr = md.get("stdout"), md.get("stderr")
        fields: dict[str, Any] = {
            "status": status, "engine": engine, "engine_uuid": uuid,
            "started": _epoch(md.get("started")), "completed": _epoch(md.get("completed")),
            "received": _epoch(time.time()) if received is None else received,
            "stdout": stdout if stdout == "" or stdout is None else _short(stdout, _OUTPUT_CAP),
            "stderr": stderr if stderr == "" or stderr is None else _short(stderr, _OUTPUT_CAP),
            "result": blob, "result_bytes": size,
        }
        if status != "ok":
            fields.update(ename=_short(content.get("ename"), 200),
                          evalue=_short(content.get("evalue"), _OUTPUT_CAP),
                          traceback=_short(content.get("traceback"), _OUTPUT_CAP))
        if state is None:
            # a reply whose request this Hub never saw (e.g. it restarted): keep it anyway
            state = _InFlight(channel, status, engine, str(parent.get("session", "")))
            self._inflight[msg_id] = state
            fields.update(client=parent.get("session"), submitted=_epoch(parent.get("date")),
                          queue=channel)
        state.status = status
        state.engine = engine
        row = self._unwritten(msg_id)
        if row is None:
            if not self._dirty:
                self._dirty_since = time.monotonic()
            fields["msg_id"] = msg_id
            self._dirty[msg_id] = fields
        else:
            row.update(fields)

    def _receipt(self, msg: Message) -> None:
        """An engine's ``task_started`` or ``tasks_received``.

        The monitor copies of the requests it names were sent before it, so
        they are handled first.  In a burst hundreds of thousands of copies can
        be waiting: draining them all here kept the loop from beating (and from
        answering pongs) for seconds.  So at most :data:`RECEIPT_DRAIN` are
        handled now; if more wait, the receipt is parked, in arrival order, and
        applied as soon as the monitor is drained (the loop's next turns) or
        when a decision needs it: a query, an engine's end, the final settle.
        Until then it only delays what it would tell (which engine holds a
        task), never changes it.
        """
        if self._parked:
            # receipts are waiting already: the backlog is not drained yet
            self._parked.append(msg)
            return
        self._parked.append(msg)
        if self._drain(self.monitor, self._on_monitor, recv=self._recv_monitor, limit=RECEIPT_DRAIN,
                       budget=TURN) < RECEIPT_DRAIN:
            self._apply_parked()
        else:
            self._behind_at = time.monotonic()

    def _catch_up(self) -> None:
        """Handle every waiting monitor copy, then every parked receipt.

        Rows are written every ``flush_rows`` on the way, as in the loop: a
        query made at the end of a burst (``cluster_status``, the dashboard)
        used to drain tens of thousands of tasks' copies into unwritten rows
        first, which made the controller's peak memory (211 -> 387 MB in a
        100,000-task burst).
        """
        step = self.MONITOR_STEP
        while True:
            n = self._drain(self.monitor, self._on_monitor, recv=self._recv_monitor, limit=step)
            if n == step:
                self._behind_at = time.monotonic()
            if self._dirty_full():
                self._safe_flush(hold=True)
            if n < step:
                break
        self._backlog = False
        self._apply_parked()

    def _apply_parked(self) -> None:
        while self._parked:
            msg = self._parked.popleft()
            try:
                (self._on_started if msg.msg_type == "task_started" else self._on_received)(msg)
            except Exception:
                log.exception("error handling a %s", msg.msg_type)
                self.rejected["handler error"] += 1

    def _on_started(self, msg: Message) -> None:
        msg_id = str(msg.content.get("msg_id", ""))
        uuid = str(msg.content.get("engine_uuid", ""))
        state = self._inflight.get(msg_id)
        self._on_read(uuid, msg_id, state)
        if state is None or state.status in TERMINAL:
            return  # the reply already said everything, or we never saw the request
        eng = self._engines.get(uuid)
        if eng is not None and eng.status in ("dead", "stopped"):
            self._finish_lost(msg_id, "its engine died while running it", state.engine)
            return
        state.status = "running"
        state.engine = msg.content.get("engine")
        state.started = _epoch(msg.content.get("started"))
        timeout = _positive(msg.content.get("timeout"))
        if timeout is not None:
            state.timeout = timeout
        if state.timeout is not None:
            self._timed[msg_id] = state
        self._touch(msg_id, status="running", started=state.started,
                    engine=state.engine, engine_uuid=uuid or None)

    def _on_received(self, msg: Message) -> None:
        """An engine's receipts: the msg_ids it has read and not answered yet."""
        uuid = str(msg.content.get("engine_uuid", ""))
        eng = self._engines.get(uuid)
        ids = msg.content.get("msg_ids")
        if eng is None or not isinstance(ids, list):
            return
        # every task of a burst is named in a receipt: a load-balanced one read in order
        # is :meth:`_on_read` inline, and the tracker told once, at the end, the highest
        # seq this engine has read (its horizon); any other goes through _on_read
        inflight, unread = self._inflight, self.tracker.unread
        top = -1
        for msg_id in ids[:100_000]:
            if type(msg_id) is not str:
                msg_id = str(msg_id)
            state = inflight.get(msg_id)
            if state is None or state.seq is None or state.queue != "task":
                self._on_read(uuid, msg_id, state)
            else:
                state.holder = uuid
                unread.pop(msg_id, None)
                if state.seq > top:
                    top = state.seq
            if state is not None and state.status == "pending":
                state.engine = eng.id
                if eng.status in ("dead", "stopped"):
                    # a receipt sent just before the engine died, read after its death
                    # was handled: what it names never started
                    self._finish_lost(msg_id, f"engine {eng.id} died ({eng.status}) before "
                                      "starting it", eng.id, started=False)
        if top >= 0:
            self.tracker.advance(uuid, top)

    def _on_read(self, uuid: str, msg_id: str, state: _InFlight | None) -> None:
        if state is None:
            if msg_id in self._probes:
                self._probes.pop(msg_id, None)
                self.tracker.read(uuid, msg_id, None)
            return
        state.holder = uuid
        if state.queue == "task":
            self.tracker.read(uuid, msg_id, state.seq)

    def _finish_lost(self, msg_id: str, why: str, engine: int | None, started: bool = True,
                     status: str = "lost") -> None:
        """End a task the Hub knows will not be answered; tell its client.

        ``started``: whether it may have begun to run (a client re-sends one that
        never started, as it has no effect yet; one that started only if it
        asked for retries).
        """
        state = self._inflight.get(msg_id)
        if state is None or state.status in TERMINAL:
            return
        state.status = status
        self.tracker.forget(msg_id)
        self._timed.pop(msg_id, None)
        ename = "TaskTimeout" if status == "timeout" else "EngineDied"
        self._touch(msg_id, status=status, completed=time.time(), ename=ename,
                    evalue=why, engine=engine)
        self._lost_out.setdefault((engine, why, started, status, state.queue),
                                  []).append(msg_id)

    def _on_recent(self, msg: Message) -> None:
        """A re-registered engine's replies of its last seconds (``recent_replies``).

        A finished task's row waits in memory up to ``flush_interval`` (longer in
        a burst), and the copies of replies the old controller had not read yet
        died with it: the engine that sent them still knows them (see
        monq.engine.engine.RECENT_KEPT).  Those this Hub does not hold finished,
        in memory or in the history, are recorded from the engine's word, as
        their copies would have been (results kept up to a few KB).
        """
        c = msg.content
        queue = c.get("queue")
        eng = self._engines.get(str(c.get("engine_uuid", "")))
        if queue not in ("task", "direct") or eng is None:
            self.rejected["recent replies of an unknown engine"] += 1
            return
        # the replies share the batch's header unless some buffer is raw: a reply's raw
        # flags are read from its own header then
        no_raw = _no_raw(msg)
        replies = self.session.split_batch(msg, own_headers=not no_raw)
        self._catch_up()  # the copies that did come first
        ids = [m.parent["msg_id"] for m in replies]
        stored = self.store.statuses([i for i in ids if i not in self._inflight])
        told = 0
        for m, msg_id in zip(replies, ids):
            st = self._inflight.get(msg_id)
            if (st.status if st is not None else stored.get(msg_id)) in TERMINAL:
                continue
            self._on_reply(m, queue, track=False, no_raw=no_raw)
            told += 1
        if told:
            log.warning("engine %d told %d finished task(s) the last controller had not "
                        "recorded", eng.id, told)
            self.received["recovered replies"] += told

    def _send_lost(self) -> None:
        """Tell clients, in one ``task_lost`` message per kind, the tasks lost this turn."""
        out, self._lost_out = self._lost_out, {}
        for (engine, why, started, status, queue), ids in out.items():
            for i in range(0, len(ids), LOST_PER_NOTICE):
                self._publish("task_lost", {
                    "msg_ids": ids[i:i + LOST_PER_NOTICE], "engine": engine, "reason": why,
                    "started": started, "status": status, "queue": queue})

    def flush(self, hold: bool = False) -> None:
        """Write every dirty record in one transaction; forget finished tasks.

        ``hold`` (the loop's timed and size-triggered flushes): the row of a
        new task still pending is not written yet but held in memory, so that
        a task whose reply comes meanwhile is one INSERT instead of an INSERT,
        then an UPDATE (which also rewrites the row's index entries and reads
        its old state for the aggregates): in a burst that was ~20 % of the
        Hub's work.  A held row is written pending with the first flush once
        it has waited ``hold_pending`` seconds since the Hub last found copies
        piling up (while they do, the history is behind by their backlog
        anyway; a query's catch-up counts too), or ``hold_max`` seconds in
        all; at most ``hold_rows`` are held.  Queries that read rows, and
        :meth:`close`, write everything.
        """
        now = time.monotonic()
        held = self._held
        due = bool(held) and (not hold or self._held_due())
        if not self._dirty and not due:
            return
        inserts, updates, states = [], [], []
        inflight = self._inflight
        room = self.config.hold_rows - len(held) if hold else 0
        for msg_id, row in self._dirty.items():
            state = inflight.get(msg_id)
            if state is not None and state.inserted:
                updates.append(row)
            elif room > 0 and state is not None and state.status == "pending":
                held[msg_id] = (now, row)
                room -= 1
                continue
            else:
                inserts.append(row)
            states.append((msg_id, state))
        self._dirty = {}
        if due:
            # the oldest first (held in arrival order); every one when not holding
            cutoff = self._held_cutoff(now) if hold else math.inf
            gone = []
            for msg_id, (since, row) in held.items():
                if since > cutoff:
                    break
                gone.append(msg_id)
                inserts.append(row)
                states.append((msg_id, inflight.get(msg_id)))
            for msg_id in gone:
                del held[msg_id]
        try:
            if inserts or updates:
                self.store.write(inserts, updates)
        except Exception:
            # dropped (the caller logs it): their tasks are still known in flight, so a
            # later reply is written as a row of its own
            self.rejected["store error"] += len(inserts) + len(updates)
            for msg_id, state in states:
                if state is not None and state.status in TERMINAL:
                    del inflight[msg_id]
            raise
        for msg_id, state in states:
            if state is None:
                continue
            if state.status in TERMINAL:
                del inflight[msg_id]
            else:
                state.inserted = True

    # -- engines ----------------------------------------------------------------

    def _register(self, msg: Message) -> dict[str, Any]:
        c = msg.content
        uuid = str(c.get("uuid", ""))
        if not uuid:
            raise HubError("registration without a uuid")
        old = self._engines.get(uuid)
        if old is not None and old.status == "alive":
            eid = old.id
        else:
            known = [e for e in self.store.engines() if e.get("uuid") == uuid]
            eid = known[0]["id"] if known else self._next_id
            self._next_id = max(self._next_id, eid + 1)
        # an engine that had an id already was on the task channel before this Hub knew
        # it (the controller restarted): what its pipe holds is not known yet
        again = c.get("id") is not None
        if old is None or old.status != "alive":
            self.tracker.engine_added(uuid, fresh=not again)
        holding = c.get("holding")
        for msg_id in holding[:100_000] if isinstance(holding, list) else ():
            st = self._inflight.get(str(msg_id))
            if st is not None and st.status not in TERMINAL:
                st.holder, st.engine, st.claim_by = uuid, eid, None
        eng = _Engine(eid, uuid, _short(c.get("hostname"), 200) or "", int(c.get("pid") or 0),
                      time.time())
        self._engines[uuid] = eng
        self._by_id[eid] = eng
        self._hosts[uuid] = _short(c.get("host_id"), 200) or ""
        self.heart.add(uuid.encode())
        self.store.upsert_engine({"id": eid, "uuid": uuid, "hostname": eng.hostname,
                                  "pid": eng.pid, "registered": eng.registered,
                                  "unregistered": None, "status": "alive"})
        log.info("engine %d registered (pid %d on %s)", eid, eng.pid, eng.hostname)
        self._publish("engine_registered", {"id": eid, "uuid": uuid,
                                            "host": self._hosts[uuid]})
        return {"status": "ok", "id": eid}

    def _engine_gone(self, uuid: str, reason: str, kill: bool = False) -> None:
        eng = self._engines.get(uuid)
        if eng is None or eng.status != "alive":
            return
        # which tasks it held is known only once every receipt it sent is applied
        self._catch_up()
        eng.status = "stopped" if reason == "stopped" else "dead"
        self.heart.remove(uuid.encode())
        self.tracker.engine_removed(uuid)
        if kill and eng.hostname == self._hostname:
            # frozen or stuck: make sure it cannot wake up and run what is re-sent elsewhere
            _kill_engine(eng.pid)
        self.store.upsert_engine({"id": eng.id, "uuid": uuid, "hostname": eng.hostname,
                                  "pid": eng.pid, "registered": eng.registered,
                                  "unregistered": time.time(), "status": eng.status})
        log.warning("engine %d gone (%s)", eng.id, reason)
        # tasks we know it held: addressed to it, or read by it (receipt, start, reply)
        for msg_id, st in list(self._inflight.items()):
            if st.status not in ("pending", "running"):
                continue
            if st.holder == uuid or (st.holder is None and st.engine == eng.id):
                started = st.status == "running" or st.queue == "direct"
                self._finish_lost(msg_id, f"engine {eng.id} died ({reason})", eng.id,
                                  started=started)
        self._publish("engine_unregistered", {"id": eng.id, "uuid": uuid, "reason": reason})

    def _alive(self) -> dict[str, str]:
        return {str(e.id): e.uuid for e in self._engines.values() if e.status == "alive"}

    def _publish(self, msg_type: str, content: dict[str, Any]) -> None:
        if self._lost_out and msg_type != "task_lost":
            self._send_lost()  # notices leave in the order they were decided
        _, frames = self.session.serialize(msg_type, "notify", content)
        self.notify.send_multipart([b"notify", *frames])

    # -- router: engines and clients ----------------------------------------------

    def _on_router(self, frames: list[Any]) -> None:
        try:
            msg = self.session.feed(frames)
        except ProtocolError as e:
            self.rejected[e.reason] += 1
            self._maybe_auth_error(frames, e)
            return
        t = msg.msg_type
        self.received[f"hub {t}"] += 1
        if t in ("task_started", "tasks_received"):
            self._receipt(msg)
            return
        if t == "unregistration_request":
            self._engine_gone(str(msg.content.get("uuid", "")), "stopped")
            return
        if t == "engine_exited":
            self._on_exited(msg)
            return
        if t == RECENT_REPLIES:
            try:
                self._on_recent(msg)
            except ProtocolError:
                pass  # counted by split_batch
            except Exception:
                log.exception("error handling an engine's recent replies")
                self.rejected["handler error"] += 1
            return
        handler = self._queries.get(t)
        if handler is None:
            self._reply(msg, {"status": "error", "ename": "HubError",
                              "evalue": f"unknown request {t!r}"})
            return
        # see every copy the relays have made, and write it, before answering (the queries
        # that only count tasks leave the held rows of pending tasks held: they count
        # them in memory; see _ROWLESS)
        self._catch_up()
        self._safe_flush(hold=t in _ROWLESS)
        buffers: list[Any] = []
        raw: list[bool] = []
        try:
            result = handler(self, msg)
            if isinstance(result, tuple):
                result, buffers, raw = result
            content = {"status": "ok", **result}
        except (HubError, ValueError, TypeError, KeyError) as e:
            content = {"status": "error", "ename": type(e).__name__, "evalue": str(e)}
        except Exception as e:
            log.exception("query %s failed", t)
            content = {"status": "error", "ename": type(e).__name__, "evalue": str(e)}
        self._reply(msg, content, buffers, raw)

    def _reply(self, msg: Message, content: dict[str, Any], buffers: Sequence[Any] = (),
               raw: Sequence[bool] | None = None) -> None:
        reply_type = msg.msg_type.replace("_request", "_reply")
        self.session.send(self.router, reply_type, "hub", content, parent=msg.header,
                          buffers=buffers, raw=raw, idents=msg.idents)

    def _maybe_auth_error(self, frames: list[Any], err: ProtocolError) -> None:
        """Tell a client with the wrong key so, instead of letting it wait.

        Only a ``connect_request`` gets this answer, and it carries nothing but
        the fact that the signature was refused.
        """
        if err.reason != "bad signature":
            return
        try:
            i = [f.bytes for f in frames[:17]].index(DELIM)
            header = json.loads(frames[i + 2].bytes)
            if header.get("msg_type") != "connect_request":
                return
        except (ValueError, IndexError, AttributeError):
            return
        parent = json.dumps({"msg_id": header.get("msg_id")}).encode()
        self.router.send_multipart([
            *[f.bytes for f in frames[:i]], DELIM, b"",
            b'{"msg_type":"auth_error"}', parent, b"{}",
            b'{"status":"error","ename":"AuthenticationError"}'])

    # -- queries --------------------------------------------------------------------

    def _q_connect(self, msg: Message) -> dict[str, Any]:
        return {"engines": self._alive(), "hub_session": self.session.session_id,
                "hosts": self._engine_hosts()}

    def _q_engines(self, msg: Message) -> dict[str, Any]:
        return {"engines": self._alive(), "hosts": self._engine_hosts()}

    def _engine_hosts(self) -> dict[str, str]:
        """Host id of each live engine (a client uses shared memory with local ones)."""
        return {str(e.id): self._hosts.get(e.uuid, "") for e in self._engines.values()
                if e.status == "alive"}

    def _queue_status(self) -> dict[str, Any]:
        counts = self.store.counts()
        q: dict[str, Any] = {}
        by_engine = self._inflight_by_engine()
        unassigned = sum(map(sum, by_engine.values()))  # less those of live engines, below
        for e in self._engines.values():
            if e.status != "alive":
                continue
            done = counts.get("engine", {}).get(e.id, counts.get("engine", {}).get(str(e.id), {}))
            waiting, running = by_engine.get(str(e.id), (0, 0))
            unassigned -= waiting + running
            q[str(e.id)] = {"queue": waiting, "tasks": running,
                            "completed": sum(n for s, n in done.items() if s in TERMINAL)}
        q["unassigned"] = unassigned
        return q

    def _inflight_by_engine(self) -> dict[str | None, list[int]]:
        """Unfinished tasks in flight by engine (``str(id)``, None: not assigned yet):
        [pending (addressed to it, or read by it and waiting), running].

        A walk over every task in flight: ~8 ms with 50,000 of them (a burst), and
        ``monq status --watch`` or a progress display may ask every few tens of ms.
        So a walk that cost ``c`` is reused for ``QUEUE_WALK_REUSE * c`` seconds:
        polling costs the Hub at most ~1/QUEUE_WALK_REUSE of its time, and a walk
        of a few hundred tasks (microseconds) is never reused in practice.
        """
        now = time.monotonic()
        if now < self._walk_until:
            return self._walk
        out: dict[str | None, list[int]] = {}
        for st in self._inflight.values():
            status = st.status
            if status in TERMINAL:
                continue
            key = None if st.engine is None else str(st.engine)
            n = out.get(key)
            if n is None:
                n = out[key] = [0, 0]
            n[status != "pending"] += 1
        self._walk = out
        self._walk_until = now + QUEUE_WALK_REUSE * (time.monotonic() - now)
        return out

    def _q_queue(self, msg: Message) -> dict[str, Any]:
        return {"queue": self._queue_status()}

    def _q_status(self, msg: Message) -> dict[str, Any]:
        counts = self.store.counts()
        rejected = Counter(self.rejected)
        by_status = counts.get("status", {})
        if self._held:  # pending tasks whose rows wait for their replies (see flush)
            by_status["pending"] = by_status.get("pending", 0) + len(self._held)
        return {
            "engines": self.store.engines(),
            "counts": by_status,
            "queue": self._queue_status(),
            "rejected": dict(rejected),
            "received": dict(self.received),
            "in_flight": len(self._inflight),
            "payload_bytes": dict(self.payload_bytes),
            "shm_swept": self.shm_sweeper.swept,
            "db_url": _hide_password(self.db_url),
            "hostname": _socket.gethostname(),
        }

    # history queries: one filter vocabulary (monq.hub.filters), checked by the store

    def _q_history(self, msg: Message) -> dict[str, Any]:
        filters, opts = split_filters(msg.content)
        _only(opts, {"limit", "order", "cursor"}, "history")
        records, cursor = self.store.history_page(limit=opts.get("limit"),
                                                  order=opts.get("order", "-submitted"),
                                                  cursor=opts.get("cursor"), **filters)
        return {"records": records, "next_cursor": cursor}

    def _q_stats(self, msg: Message) -> dict[str, Any]:
        filters, opts = split_filters(msg.content)
        what = opts.pop("what", None)
        if what == "count":
            _only(opts, set(), "count")
            return {"count": self.store.count(**filters)}
        if what == "groups":
            _only(opts, {"by"}, "task_stats")
            groups = self.store.task_stats(opts.get("by", "status"), **filters)
            return {"groups": [list(g) for g in groups]}
        if what == "percentiles":
            _only(opts, {"by", "percentiles"}, "duration_percentiles")
            return {"groups": self.store.duration_percentiles(
                opts.get("by"), opts.get("percentiles", (50, 90, 99)), **filters)}
        if what == "span":
            _only(opts, set(), "stats")
            return {"span": self.store.time_span(**filters)}
        raise HubError(f"stats: what must be count, groups, percentiles or span, not {what!r}")

    def _q_task(self, msg: Message) -> dict[str, Any]:
        msg_id = msg.content.get("msg_id")
        if not isinstance(msg_id, str) or not msg_id:
            raise HubError("task_request needs a msg_id (or a unique prefix of one)")
        return {"record": self.store.find_task(msg_id)}

    def _q_db(self, msg: Message) -> dict[str, Any]:
        query = msg.content.get("query")
        if not isinstance(query, dict):
            raise HubError("db_query needs a dict query")
        return {"records": self.store.db_query(query, msg.content.get("keys"))}

    def _q_tasks_status(self, msg: Message) -> dict[str, Any]:
        ids = msg.content.get("msg_ids")
        if not isinstance(ids, list):
            raise HubError("tasks_status_request needs a list of msg_ids")
        out: dict[str, str | None] = {}
        for msg_id in ids[:100_000]:
            msg_id = str(msg_id)
            st = self._inflight.get(msg_id)
            if st is not None:
                out[msg_id] = st.status
            else:
                row = self.store.get_task(msg_id)
                out[msg_id] = row.get("status") if row else None
        return {"statuses": out}

    def _q_hub_history(self, msg: Message) -> dict[str, Any]:
        return {"msg_ids": self.store.hub_history()}

    def _q_result(self, msg: Message) -> Any:
        msg_id = msg.content.get("msg_id")
        if not isinstance(msg_id, str):
            raise HubError("result_request needs a msg_id")
        row = self.store.get_task(msg_id, with_payload=True)
        if row is None:
            raise HubError(f"no task {msg_id!r} in the history")
        blob = row.pop("result", None)
        row.pop("request", None)
        if row.get("status") not in TERMINAL:
            return {"record": row, "done": False}
        if blob is None:
            return {"record": row, "done": True, "has_result": False}
        try:
            frames, raw = blobs.unpack(blob)
        except ValueError as e:
            raise HubError(f"stored result of {msg_id} is corrupt: {e}") from e
        return {"record": row, "done": True, "has_result": True}, frames, raw

    def _q_purge(self, msg: Message) -> dict[str, Any]:
        filters, opts = split_filters(msg.content)
        _only(opts, {"msg_ids", "before", "everything", "payloads_only"}, "purge")
        return {"purged": self.store.purge(**opts, **filters)}

    def _q_shutdown(self, msg: Message) -> dict[str, Any]:
        log.info("shutdown requested by client %s", msg.header.get("session"))
        self.on_shutdown()
        return {}

    _queries: dict[str, Callable[[Hub, Message], Any]] = {
        "connect_request": _q_connect,
        "engines_request": _q_engines,
        "queue_request": _q_queue,
        "status_request": _q_status,
        "history_request": _q_history,
        "stats_request": _q_stats,
        "task_request": _q_task,
        "db_request": _q_db,
        "hub_history_request": _q_hub_history,
        "tasks_status_request": _q_tasks_status,
        "result_request": _q_result,
        "purge_request": _q_purge,
        "shutdown_request": _q_shutdown,
    }


Hub._queries["registration_request"] = lambda hub, msg: hub._register(msg)

#: queries answered without reading task rows, only their counts (``cluster_status``
#: polled during a burst, ``monq status --watch``): the rows of pending tasks held for
#: their replies stay held (see Hub.flush), and ``status_request`` counts them as
#: pending; every other query writes them first.  Finished tasks are written before
#: any answer: a client that has seen its result sees it counted.
_ROWLESS = frozenset({"connect_request", "engines_request", "queue_request",
                      "status_request", "registration_request"})


_TIME_FIELDS = ("submitted", "started", "completed", "received")


def _only(opts: dict[str, Any], allowed: set[str], what: str) -> None:
    bad = set(opts) - allowed
    if bad:
        raise HubError(f"{what}: unknown filter(s) or option(s) {', '.join(sorted(bad))}; "
                       f"filters: {', '.join(FILTER_KEYS)}; options: "
                       f"{', '.join(sorted(allowed)) or 'none'}")


def _no_raw(msg: Message) -> bool:
    """Whether none of a verified message's buffers is raw (its header says which are)."""
    for s in msg.header["buffers"]:
        if s[1]:
            return False
    return True


#: |value * 10**6| below this: the product is within 1/8 of the exact one (see _epoch)
_EPOCH_EXACT = float(2 ** 51)


def _epoch(value: Any) -> float | None:
    """Times are kept to the microsecond, so they survive a trip through datetime.

    Exactly ``round(value, 6)``, which goes through a correctly rounded decimal
    string (~1 us, three times a task): for a float whose ``value * 1e6`` is
    below 2**51 the product is within 1/8 of the exact one, so when it lies
    less than 3/8 from an integer n, the exact product rounds to n too, and
    ``n / 1e6`` is the double nearest n / 10**6, which is what ``round``
    returns.  Three times in four for today's timestamps; the others (near a
    half microsecond) take ``round``.  (n is found as ``(p + 0.5) // 1``, no call:
    the sum may be rounded, but whatever integer it gives, one less than 3/8 from p
    is the one nearest it.)
    """
    if type(value) is float:
        p = value * 1e6
        if -_EPOCH_EXACT < p < _EPOCH_EXACT:
            n = (p + 0.5) // 1.0
            d = p - n
            if -0.375 < d < 0.375:
                return n / 1e6
    try:
        return None if value is None else round(float(value), 6)
    except (TypeError, ValueError):
        return None


def _positive(value: Any) -> float | None:
    try:
        v = None if value is None else float(value)
    except (TypeError, ValueError):
        return None
    return v if v is not None and v > 0 and math.isfinite(v) else None


def _kill_engine(pid: int) -> None:
    """SIGKILL a local engine process, after checking the pid is still a monq engine."""
    if pid <= 0:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return  # gone already (or not Linux: leave it to its supervisor)
    if b"monq.engine" not in cmdline:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        log.warning("killed engine process %d", pid)


def _short(value: Any, limit: int) -> Any:
    if value is None:
        return None
    s = value if isinstance(value, str) else str(value)
    return s if len(s) <= limit else s[: limit - 12] + "…[truncated]"


def _hide_password(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
