"""The engine: runs the tasks it is sent and answers with results and timings.

An engine joins the direct relay, registers with the Hub (which gives it an
integer id), then joins the load-balanced ``task`` relay; on both it is a
DEALER whose identity is its uuid.  Tasks run one at a time in the main
thread, with stdout and stderr captured; every reply carries the
received/started/completed times.

A second thread, the link (see :class:`_Link`), does what must happen while a
task runs: it tells the Hub about tasks running longer than a few
milliseconds, reads waiting messages into the engine's backlog and reports
them to the Hub as received (so the Hub knows what a dead engine held), and
registers again with a restarted controller.  The task and direct sockets
are shared by the two threads under one lock, which the main thread releases
while user code runs.  A task never crosses threads: the main thread reads,
runs and answers it.  An idle engine's threads all sleep until a message (or
a signal) comes.

Batches (see monq.protocol).  An ``apply_batch`` becomes one backlog item
per task, each reported in receipts and run as a single task is.  The
replies of a batch's tasks are held and sent together as one
``apply_batch_reply``, but never held long: they are sent when the next
task to run is not of the same batch (or there is none), when
``MAX_BATCH_TASKS`` or ``MAX_BATCH_BYTES`` are held, and, by the link thread,
once the oldest is ``reply_hold`` old and the task running has run that
long too, so a long task never delays the replies of the short ones before
it.  While the batch's tasks follow each other quickly they are not sent in
pieces (each piece is one more message for the engine, the relay, the Hub
and the client to handle; in a burst on a busy machine a batch's run often
outlasts ``reply_hold``), up to ``HOLD_CAP`` times ``reply_hold``.  A single
request's reply is never held.

A task with a ``timeout`` is interrupted by SIGALRM (a ``TaskTimeout`` raised
in it, answered ``timeout``); one that cannot be interrupted (C code holding
on) is ended by the Hub, which kills the engine for its supervisor to
replace.

A heartbeat thread forwards the Hub's pings back to it inside
``zmq.proxy``, which runs in C without the GIL: a task that spins in pure
Python for minutes still answers every ping.

Resource handling: :meth:`Engine.close` closes every socket and terminates
the Context (ending the heartbeat proxy and the link); safe to call twice.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import logging
import math
import os
import select
import signal
import socket as _socket
import sys
import threading
import time
import traceback
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from monq.connection import ConnectionInfo, pid_alive
from monq.engine.timer import make_timer
from monq.errors import MonqError, ProtocolError, SerializationError
from monq.protocol import (
    BATCH_REPLY,
    BATCH_REQUEST,
    MAX_BATCH_BYTES,
    MAX_BATCH_TASKS,
    RECENT_REPLIES,
    BatchBuilder,
    Message,
    Session,
)
from monq.security import client_socket_setup
from monq.serialize import recv_frames, send_frames, serialize, unpack_apply
from monq.shm import EngineShm

log = logging.getLogger(__name__)

_OUTPUT_CAP = 1 << 20
#: how often an engine looks for its controller's connection file when no ready pipe
#: tells it (see _wait_for_connection_file)
CONNECTION_POLL = 0.02
#: the replies an engine remembers after sending them, to tell a controller that
#: restarted (its Hub records those the old one died before writing: a finished
#: task's row waits up to the Hub's flush interval, longer in a burst): the last
#: RECENT_KEPT, sent within RECENT_SECONDS, each with its result if it is at most
#: RECENT_RESULT_BYTES (a larger one is told without it).  ~1.5 KB each, so a few MB
#: per engine at most (5,000 with 4 KB results measured +20-30 MB of RSS per engine)
RECENT_KEPT = 2000
RECENT_SECONDS = 10.0
RECENT_RESULT_BYTES = 1024
#: held replies wait at most this many times ``reply_hold`` while the batch's tasks run
#: (see the module's docstring; the link thread looks every ``started_notice_delay``)
HOLD_CAP = 8


class Stopping(BaseException):
    """Raised inside a running task when the engine is told to stop (SIGTERM, SIGINT).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` in
    the task does not swallow it.  The task is answered as ``aborted``.
    """


class RegistrationError(MonqError):
    """The Hub did not accept this engine."""


@dataclass(frozen=True)
class EngineConfig:
    registration_timeout: float = 30.0
    #: a task still running after this long is reported to the Hub as running
    started_notice_delay: float = 0.005
    output_cap: int = _OUTPUT_CAP
    #: the longest a finished task's reply waits to be sent with its batch's next ones
    reply_hold: float = 0.003


class _Capture(io.StringIO):
    """A text stream that keeps at most ``cap`` characters.

    ``cap`` and ``dropped`` are class attributes until set on an instance: two
    are made per task, and a Python ``__init__`` tripled their cost (1.9 against
    0.6 us here).
    """

    cap = _OUTPUT_CAP
    dropped = 0

    def write(self, s: str) -> int:
        room = self.cap - self.tell()
        if room <= 0:
            self.dropped += len(s)
            return len(s)
        if len(s) > room:
            self.dropped += len(s) - room
            super().write(s[:room])
            return len(s)
        return super().write(s)

    def text(self) -> str:
        v = self.getvalue()
        return v + (f"\n[... {self.dropped} characters dropped]" if self.dropped else "")


class TaskTimeout(BaseException):
    """Raised inside a running task when it overruns its timeout (answered ``timeout``)."""


@dataclass(slots=True)
class _Item:
    """A task read from a channel, waiting to run or running."""

    sock: zmq.Socket
    channel: str
    msg: Message
    received: float
    #: the batch message it came in (its msg_id), None for a single request
    batch: str | None = None


@dataclass(slots=True)
class _Held:
    """A finished task's reply, waiting to go with the replies of its batch."""

    item: _Item
    content: dict[str, Any]
    metadata: dict[str, Any]
    buffers: list[Any]
    raw: list[bool]
    #: the reply's buffer bytes (counted once: for MAX_BATCH_BYTES and RECENT_RESULT_BYTES)
    nbytes: int = 0


def _nbytes(buffers: list[Any]) -> int:
    """The bytes of a reply's buffers (a loop, not sum(<generator>): once per task)."""
    n = 0
    for b in buffers:
        n += len(b) if type(b) is bytes else memoryview(b).nbytes
    return n


class _Link(threading.Thread):
    """The engine's second thread: what must happen while a task runs.

    It owns the engine's socket to the Hub (identity = the engine's uuid) and,
    every ``delay`` seconds:

    - tells the Hub which task is running, for a task still running after
      ``delay`` (a task that ends sooner is reported by its reply alone, which
      keeps a short task to two messages through the Hub);
    - while the main thread runs a task, reads whatever waits on the task and
      direct channels into the engine's backlog (it takes the socket lock,
      which the main thread releases while user code runs);
    - reports to the Hub the msg_ids read but not yet answered.  With those
      receipts the Hub can tell which load-balanced tasks went to an engine
      that died before reading them (see monq.hub.tracker);
    - answers the Hub's ``reregister_request`` (a restarted controller does
      not know this engine yet).

    With nothing running, read or held it sleeps (on its Hub socket, a wake-up
    pipe and, on Linux, a timerfd; see monq.engine.timer).  A task's start
    arms the timer for ``delay`` later instead of waking the thread, so short
    tasks one after another wake it once, after the last; receipts to report
    wake it at once.
    """

    #: looks (every ``delay``) with nothing running, read or to report before it sleeps
    IDLE_LOOKS = 20

    def __init__(self, engine: Engine, sock: zmq.Socket, session: Session,
                 delay: float) -> None:
        super().__init__(name="engine-link", daemon=True)
        self.engine = engine
        self.sock = sock
        self.session = session
        self.delay = delay
        self._stopping = False
        #: True while the thread sleeps until a task starts (or the Hub says something);
        #: the main thread then wakes it through the pipe (see task_started)
        self.asleep = False
        #: how many times it woke up (tests count them: none while the engine is idle)
        self.wakeups = 0
        #: how many times a task's start woke it through the pipe (tests count them)
        self.pipe_wakes = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        #: wakes the sleeping thread ``delay`` after a task started, if it still runs then
        #: (None where there is no timerfd: a task start then wakes the thread at once)
        self.timer = make_timer()
        #: sleep after this many idle looks: at once with a timer (a task start then costs
        #: no wake-up), else after IDLE_LOOKS (each start while asleep costs one)
        self.idle_looks = 1 if self.timer is not None else self.IDLE_LOOKS

    def task_started(self) -> None:
        """Called by the main thread once ``engine.current`` is set.

        A sleeping link must look at the task if it runs longer than
        ``delay`` (or, with replies held, ``reply_hold``): with a timer it is
        armed for then, so a task that ends sooner wakes nobody (a stream of
        short tasks wakes it once, after the last).  Receipts to report (tasks
        read behind this one) wake it at once.
        """
        if not self.asleep:
            return  # awake: it looks every ``delay`` anyway
        eng = self.engine
        if self.timer is not None and not eng.receipts:
            hold = eng.config.reply_hold
            self.timer.arm(min(self.delay, hold) if eng.held else self.delay)
            return
        self.asleep = False
        self.pipe_wakes += 1
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")


    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def run(self) -> None:
        try:
            self._run()
        finally:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            if self.timer is not None:
                self.timer.close()

    def _run(self) -> None:
        eng = self.engine
        told: str | None = None
        ms = max(1, int(self.delay * 1000))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        timer_fd = -1
        if self.timer is not None:
            timer_fd = self.timer.fileno()
            poller.register(timer_fd, zmq.POLLIN)
        idle = 0
        try:
            while not self._stopping:
                events = dict(poller.poll(None if self.asleep else ms))
                self.wakeups += 1
                if self._wake_r in events:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                if timer_fd in events:
                    self.timer.clear()  # type: ignore[union-attr]
                self.asleep = False
                if self.sock in events:
                    self._drain_hub()
                cur = eng.current
                if cur is not None and cur[0] != told and time.time() - cur[1] >= self.delay:
                    told = cur[0]
                    self._send("task_started", {"msg_id": cur[0], "engine": eng.id,
                                                "engine_uuid": eng.uuid, "started": cur[1]})
                if (cur is not None or eng.held) and eng.lock.acquire(blocking=False):
                    try:
                        eng.read_available()
                        if eng.held and _flush_due(eng):
                            eng.send_held()
                    finally:
                        eng.lock.release()
                self._report_receipts()
                if cur is not None or eng.backlog or eng.held:
                    idle = 0
                    continue
                idle += 1
                if idle >= self.idle_looks:
                    # sleep until task_started(); a task that started meanwhile saw
                    # asleep False (and is seen here) or sees it True (and wakes us)
                    self.asleep = True
                    if eng.current is not None:
                        self.asleep = False
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("the engine's link thread failed")

    def _send(self, msg_type: str, content: dict[str, Any]) -> None:
        self.session.send(self.sock, msg_type, "link", content)

    def _report_receipts(self) -> None:
        ids: list[str] = []
        q = self.engine.receipts
        while q:
            ids.append(q.popleft())
        if ids:
            self._send("tasks_received", {"msg_ids": ids, "engine": self.engine.id,
                                          "engine_uuid": self.engine.uuid})

    def _drain_hub(self) -> None:
        while True:
            try:
                msg = self.session.recv(self.sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg is None:
                continue
            if msg.msg_type == "reregister_request":
                log.info("the Hub asks this engine to register again (controller restarted?)")
                self._send("registration_request", self.engine.registration_content())
                eng = self.engine
                for content, buffers, raw in recent_batches(eng.recent, eng.uuid):
                    self.session.send(self.sock, RECENT_REPLIES, "link", content,
                                      buffers=buffers, raw=raw)
            elif msg.msg_type == "registration_reply" and msg.content.get("status") == "ok":
                self.engine.id = int(msg.content["id"])
                log.info("registered again as engine %d", self.engine.id)


def _ids(items: list[_Item]) -> list[str]:
    """The msg_ids of one message's tasks: a batch's were checked strings (split_batch);
    a single request's header may lack one (``Message.msg_id`` says "" then)."""
    if items[0].batch is None:
        return [item.msg.msg_id for item in items]
    return [item.msg.header["msg_id"] for item in items]


def _flush_due(eng: Engine) -> bool:
    """Whether the link thread sends the held replies now (the caller holds ``eng.lock``):
    the oldest is ``reply_hold`` old and the task running is holding them up (it has run
    that long), or the oldest is ``HOLD_CAP`` times that old."""
    hold = eng.config.reply_hold
    age = time.monotonic() - eng.held_since
    if age < hold:
        return False
    cur = eng.current
    return (cur is not None and time.time() - cur[1] >= hold) or age >= HOLD_CAP * hold


def recent_batches(recent: collections.deque[tuple[Any, ...]], uuid: str,
                   now: float | None = None) -> list[tuple[dict[str, Any], list[Any], list[bool]]]:
    """The ``recent_replies`` messages (content, buffers, raw) telling the replies of
    ``recent`` sent in the last RECENT_SECONDS: one per channel and batch's worth."""
    cutoff = (time.monotonic() if now is None else now) - RECENT_SECONDS
    for _ in range(3):  # the main thread appends meanwhile
        try:
            kept = [r for r in list(recent) if r[0] >= cutoff]
            break
        except RuntimeError:
            continue
    else:
        return []
    out = []
    for channel in ("task", "direct"):
        b = BatchBuilder()
        for _, ch, (msg_id, session, date), content, metadata, buffers, raw in kept:
            if ch != channel:
                continue
            b.add({"parent": {"msg_id": msg_id, "session": session, "date": date,
                              "msg_type": "apply_request"},
                   "metadata": metadata, "content": content}, buffers, raw)
            if b.full():
                out.append(({"queue": channel, "engine_uuid": uuid, "tasks": b.entries},
                            b.buffers, b.raw))
                b = BatchBuilder()
        if len(b):
            out.append(({"queue": channel, "engine_uuid": uuid, "tasks": b.entries},
                        b.buffers, b.raw))
    return out


class Engine:
    """One engine process's worker.  ``Engine(info).run()`` until :meth:`stop`."""

    def __init__(self, info: ConnectionInfo, config: EngineConfig = EngineConfig()) -> None:
        self.info = info
        self.config = config
        self.uuid = _uuid.uuid4().hex
        self.id: int | None = None
        self.session = Session(info.key)
        #: large arguments and results through shared memory with local clients (monq.shm)
        self.shm = EngineShm(info.key, reach=info.ip)
        self.ctx = zmq.Context()
        self.ctx.linger = 0
        self._stop = False
        self._closed = False
        #: True while a task's own code runs (read by the signal handler)
        self.busy = False
        #: (msg_id, started) of the task running now, read by the link thread
        self.current: tuple[str, float] | None = None
        #: guards the task and direct sockets, ``self.session`` and the backlog: the main
        #: thread holds it except while a task's own code runs
        self.lock = threading.Lock()
        #: tasks read but not yet run, in the order they were read
        self.backlog: collections.deque[_Item] = collections.deque()
        #: msg_ids read but not answered at once, for the link thread to report
        self.receipts: collections.deque[str] = collections.deque()
        #: the last task taken to run at once without a receipt (its reply says it was
        #: read): reported before any later read, see _receipt
        self.unreceipted: str | None = None
        #: replies of a batch's finished tasks not sent yet (under ``lock``), and the
        #: monotonic time the oldest was held
        self.held: list[_Held] = []
        self.held_since = 0.0
        self._held_bytes = 0
        #: (monotonic time sent, channel, (msg_id, session, date) of the request, content,
        #: metadata, buffers, raw) of the replies sent last (see RECENT_KEPT); appended by
        #: the main thread
        self.recent: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=RECENT_KEPT)
        #: the stdout and stderr capture of the next task (see handle_apply)
        self._out, self._err = self._captures()
        self._heart: threading.Thread | None = None
        self._link: _Link | None = None
        #: readable when a signal arrived (main() passes signal.set_wakeup_fd's pipe): the
        #: loop's poll returns at once instead of at its next timeout, so a stop is quick
        self.wake_fd: int | None = None
        ident = self.uuid.encode()
        # the link socket (identity = uuid, so the Hub can address it) registers; the
        # main thread keeps its own Hub socket for the few notices it sends itself
        self.link = self.ctx.socket(zmq.DEALER)
        self.link.identity = ident
        self.hub = self.ctx.socket(zmq.DEALER)
        self.task = self.ctx.socket(zmq.DEALER)
        self.direct = self.ctx.socket(zmq.DEALER)
        for s in (self.task, self.direct):
            s.identity = ident
        self.channels = {self.task: "task", self.direct: "direct"}
        for s in (self.link, self.hub, self.task, self.direct):
            client_socket_setup(s, info)
        self.link.connect(info.url("hub"))
        self.hub.connect(info.url("hub"))

    # -- lifecycle ----------------------------------------------------------------

    def registration_content(self) -> dict[str, Any]:
        """What the Hub is told at registration; ``id`` and ``holding`` (the tasks read and
        not answered yet) matter when registering again with a restarted controller."""
        holding: list[str] = []
        cur = self.current
        if cur is not None:
            holding.append(cur[0])
        with contextlib.suppress(RuntimeError):  # the main thread may change it meanwhile
            holding += [item.msg.msg_id for item in list(self.backlog)]
        return {"uuid": self.uuid, "hostname": _socket.gethostname(), "pid": os.getpid(),
                "id": self.id, "holding": holding, "host_id": self.shm.host}

    def _connect_direct(self, timeout: float) -> None:
        """Join the direct relay and wait until it knows this engine's identity.

        The direct relay's ROUTER drops a message for an identity it has not
        seen: were the Hub to announce this engine first, a client's first
        direct task could vanish there.
        """
        mon = self.direct.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            self.direct.connect(self.info.url("direct_engine"))
            if mon.poll(int(timeout * 1000)):
                mon.recv_multipart()
            else:
                log.warning("no handshake with the direct relay within %.0fs", timeout)
        finally:
            self.direct.disable_monitor()
            mon.close(linger=0)

    def register(self) -> int:
        """Register with the Hub; returns the engine id given by the Hub."""
        self._connect_direct(self.config.registration_timeout)
        link_session = Session(self.info.key, self.session.session_id)
        hdr = link_session.send(self.link, "registration_request", "link",
                                self.registration_content())
        deadline = time.monotonic() + self.config.registration_timeout
        while time.monotonic() < deadline:
            if not self.link.poll(100):
                if self._stop:
                    raise RegistrationError("stopped before registering")
                continue
            msg = link_session.recv(self.link)
            if msg is None or msg.parent.get("msg_id") != hdr["msg_id"]:
                continue
            if msg.content.get("status") != "ok":
                raise RegistrationError(f"the Hub refused this engine: {msg.content}")
            self.id = int(msg.content["id"])
            break
        else:
            raise RegistrationError(f"no answer from the Hub at {self.info.url('hub')} within "
                                    f"{self.config.registration_timeout}s")
        # the task channel is joined only once the Hub knows this engine: no load-balanced
        # task can reach an engine the Hub does not count (see monq.hub.tracker)
        self.task.connect(self.info.url("task_engine"))
        self._heart = threading.Thread(target=self._heartbeat, name="heart", daemon=True)
        self._heart.start()
        self._link = _Link(self, self.link, link_session, self.config.started_notice_delay)
        self._link.start()
        log.info("engine %d registered (uuid %s)", self.id, self.uuid)
        return self.id

    def _heartbeat(self) -> None:
        """Echo the Hub's pings from C (zmq.proxy releases the GIL)."""
        sub = self.ctx.socket(zmq.SUB)
        back = self.ctx.socket(zmq.DEALER)
        try:
            sub.linger = back.linger = 0
            back.identity = self.uuid.encode()
            sub.subscribe(b"")
            client_socket_setup(sub, self.info)
            client_socket_setup(back, self.info)
            sub.connect(self.info.url("hb_ping"))
            back.connect(self.info.url("hb_pong"))
            zmq.proxy(sub, back)
        except zmq.ContextTerminated:
            pass
        finally:
            sub.close(linger=0)
            back.close(linger=0)

    def stop(self) -> None:
        """Ask the loop to end after the current task (safe from a signal handler)."""
        self._stop = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.id is not None:
            try:
                self.session.send(self.hub, "unregistration_request", "hub",
                                  {"uuid": self.uuid, "id": self.id})
                self.hub.linger = 500  # let the goodbye leave
            except zmq.ZMQError:
                pass
        for s in (self.task, self.direct):
            # a reply sent just now (a task aborted by the stop) is still in ZeroMQ's
            # queue: give it a moment to leave, as the goodbye gets
            s.close(linger=500)
        self.hub.close()
        if self._link is not None:
            # it owns a socket: it must be gone before the Context can end
            self._link.stop()
            self._link.join(timeout=2)
        self.link.close(linger=0)
        self.ctx.term()
        if self._heart is not None:
            self._heart.join(timeout=2)

    # -- loop ---------------------------------------------------------------------

    def read_available(self) -> None:
        """Read every message waiting on the task and direct channels into the backlog.

        The caller holds ``self.lock``.  Each task read is reported to the Hub
        as received (by the link thread); probes are only reported.
        """
        for sock, channel in self.channels.items():
            while True:
                try:
                    frames = recv_frames(sock, zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._accept(sock, channel, frames)

    def _accept(self, sock: zmq.Socket, channel: str, frames: list[Any]) -> None:
        try:
            msg = self.session.feed(frames)
        except ProtocolError as e:
            log.warning("dropped a message on %s: %s", channel, e)
            return
        if msg.msg_type == "probe":
            self._receipt(msg.msg_id)
            return
        items = self._items(sock, channel, msg)
        if items:
            self.backlog.extend(items)
            self._receipts(_ids(items))

    def _receipts(self, msg_ids: list[str]) -> None:
        """Queue receipts for ``msg_ids``, in order (the caller holds ``self.lock``): what
        :meth:`_receipt` does, once per message rather than once per task."""
        if self.unreceipted is not None:
            self.receipts.append(self.unreceipted)
            self.unreceipted = None
        self.receipts.extend(msg_ids)

    def _receipt(self, msg_id: str) -> None:
        """Queue a receipt for ``msg_id`` (the caller holds ``self.lock``).

        The Hub takes a load-balanced task that an engine has read past, and that
        it knows no engine has read, for one dealt to a dead engine (lost, sent
        again: monq.hub.tracker).  So the task taken before without a receipt is
        named first, whether it still runs, is about to start or is answered (its
        reply may reach the Hub after this receipt): otherwise, read by the link
        thread before the main thread marked that task current, a later task's
        receipt made the Hub report a running task lost and the client run it twice.
        """
        if self.unreceipted is not None:
            self.receipts.append(self.unreceipted)
            self.unreceipted = None
        self.receipts.append(msg_id)

    def _items(self, sock: zmq.Socket, channel: str, msg: Message) -> list[_Item]:
        """The tasks a verified message carries: one, or a batch's (none if unusable)."""
        now = time.time()
        if msg.msg_type == "apply_request":
            return [_Item(sock, channel, msg, now)]
        if msg.msg_type == BATCH_REQUEST:
            try:
                tasks = self.session.split_batch(msg)
            except ProtocolError as e:
                log.warning("dropped a batch on %s: %s", channel, e)
                return []
            batch = msg.msg_id
            return [_Item(sock, channel, m, now, batch) for m in tasks]
        log.warning("ignored %s on %s", msg.msg_type, channel)
        return []

    def _next(self, poller: zmq.Poller) -> _Item | None:
        """The next task to run: the backlog's oldest, else one read from the channels."""
        with self.lock:
            if not self.backlog:
                try:
                    # with a signal wake-up pipe, nothing needs a look while idle
                    events = poller.poll(200 if self.wake_fd is None else 5000)
                except zmq.ZMQError as e:
                    if e.errno == errno.EINTR:
                        return None
                    raise
                for sock, _ in events:
                    # one message per ready channel: the first runs at once and needs
                    # no receipt (its reply says it all); the rest wait in the backlog
                    try:
                        frames = recv_frames(sock, zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    try:
                        msg = self.session.feed(frames)
                    except ProtocolError as e:
                        log.warning("dropped a message on %s: %s", self.channels[sock], e)
                        continue
                    if msg.msg_type == "probe":
                        self._receipt(msg.msg_id)
                        continue
                    items = self._items(sock, self.channels[sock], msg)
                    if not items:
                        continue
                    # a batch's first task has a receipt too: the receipts of the others
                    # could reach the Hub before it is running (or answered), and the Hub
                    # would take it for one no engine read (a lost task)
                    if self.backlog or len(items) > 1:
                        self._receipts(_ids(items))
                    else:
                        self.unreceipted = items[0].msg.msg_id
                    self.backlog.extend(items)
            return self.backlog.popleft() if self.backlog else None

    def run(self) -> None:
        poller = zmq.Poller() if self.wake_fd is None else _WakingPoller(self.wake_fd)
        for s in self.channels:
            poller.register(s, zmq.POLLIN)
        while not self._stop:
            item = self._next(poller)
            if item is None:
                continue
            try:
                self.handle_apply(item)
            except Exception:
                log.exception("failed to answer %s", item.msg.msg_id)
        with self.lock:
            self.send_held()

    def abort_waiting(self, why: str) -> int:
        """Answer every task read but not started (and those still waiting on the
        sockets) as ``aborted``: a stopping engine leaves none of its tasks unanswered.

        Returns how many were answered.  Called once the loop has ended, before
        :meth:`close`.
        """
        n = 0
        with self.lock:
            try:
                self.send_held()
            except zmq.ZMQError as e:
                log.warning("could not send finished tasks' replies: %s", e)
            try:
                self.read_available()
            except zmq.ZMQError:
                pass
            while self.backlog:
                item = self.backlog.popleft()
                content = _error_content(Stopping(why), skip_frames=False)
                content["status"] = "aborted"
                now = time.time()
                metadata = {"engine": self.id, "engine_uuid": self.uuid,
                            "status": "aborted", "received": item.received,
                            "started": None, "completed": now, "stdout": "", "stderr": ""}
                try:
                    _, frames = self.session.serialize("apply_reply", item.channel, content,
                                                       parent=item.msg.header,
                                                       metadata=metadata)
                    send_frames(item.sock, [*item.msg.idents, *frames])
                    n += 1
                except zmq.ZMQError as e:
                    log.warning("could not answer %s as aborted: %s", item.msg.msg_id, e)
        return n

    # -- tasks --------------------------------------------------------------------

    def _captures(self) -> tuple[_Capture, _Capture]:
        out, err = _Capture(), _Capture()
        if self.config.output_cap != _OUTPUT_CAP:
            out.cap = err.cap = self.config.output_cap
        return out, err

    def handle_apply(self, item: _Item) -> None:
        msg = item.msg
        md = msg.metadata
        timeout = _timeout(md["timeout"]) if "timeout" in md else None
        started = time.time()
        if timeout is not None:
            # said by this thread, not the link thread: a task that holds the GIL in C code
            # must still be known to have started, so the Hub can end it when it overruns
            self.session.send(self.hub, "task_started", "hub", {
                "msg_id": msg.msg_id, "engine": self.id, "engine_uuid": self.uuid,
                "started": started, "timeout": timeout})
        msg_id = msg.header.get("msg_id")
        self.current = (msg_id if type(msg_id) is str else msg.msg_id, started)
        link = self._link
        if link is not None and link.asleep:  # (awake, it looks every ``delay`` anyway)
            link.task_started()
        out, err = self._out, self._err
        # the references to them now (ours, self's): more after the task means the task
        # kept one (a handler on sys.stdout...), and they are not used again
        refs = sys.getrefcount(out), sys.getrefcount(err)
        content: dict[str, Any]
        result: Any = None
        # what contextlib.redirect_stdout/stderr do, without their objects
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            f, args, kwargs = unpack_apply(self.shm.attach(msg))
            self.busy = True
            alarm = timeout is not None and _arm_alarm(timeout)
            try:
                result = f(*args, **kwargs)
            finally:
                if alarm:
                    _disarm_alarm()
                self.busy = False
            content = {"status": "ok"}
        except Stopping as e:
            content = _error_content(e)
            content["status"] = "aborted"
        except TaskTimeout as e:
            content = _error_content(e)
            content["status"] = "timeout"
        except BaseException as e:  # noqa: BLE001 - everything a task raises goes home
            content = _error_content(e)
        finally:
            sys.stdout, sys.stderr = saved
        completed = time.time()
        # (the link's timer is left armed: the next task's start moves it on, and a link
        # woken after the last task finds nothing to do and sleeps again)
        self.current = None
        buffers: list[Any] = []
        raw: list[bool] = []
        metadata = {
            "engine": self.id, "engine_uuid": self.uuid, "status": content["status"],
            "received": item.received, "started": started, "completed": completed,
            "stdout": out.text() if out.dropped else out.getvalue(),
            "stderr": err.text() if err.dropped else err.getvalue(),
        }
        # the capture streams serve the next task too when this one wrote nothing and kept
        # no reference to them (two StringIOs made and freed per task were ~2 % of a
        # no-op's cost); else the next gets fresh ones
        if out.tell() or err.tell() or out.dropped or err.dropped or \
                (sys.getrefcount(out), sys.getrefcount(err)) != refs:
            self._out, self._err = self._captures()
        if content["status"] == "ok":
            try:
                buffers, raw = serialize(result)
                buffers, raw = self.shm.reply(msg, buffers, raw, metadata)
            except SerializationError as e:
                content = _error_content(e, skip_frames=False)
                content["evalue"] = f"the task's result cannot be sent back: {e}"
                metadata["status"] = content["status"]
        # drop the task's objects, then say which shared-memory arguments are unmapped
        f = args = kwargs = result = None  # type: ignore[assignment]
        self.shm.finish(metadata)
        with self.lock:
            if item.batch is None:
                self._send_reply(item, content, metadata, buffers, raw)
                return
            held = self.held
            if not held:
                self.held_since = time.monotonic()
            # most results are one small pickle: no call to count it
            nbytes = len(buffers[0]) if len(buffers) == 1 and type(buffers[0]) is bytes \
                else _nbytes(buffers)
            held.append(_Held(item, content, metadata, buffers, raw, nbytes))
            self._held_bytes += nbytes
            backlog = self.backlog
            if not backlog or backlog[0].batch != item.batch or len(held) >= MAX_BATCH_TASKS \
                    or self._held_bytes >= MAX_BATCH_BYTES:
                self.send_held()

    def _send_reply(self, item: _Item, content: dict[str, Any], metadata: dict[str, Any],
                    buffers: list[Any], raw: list[bool]) -> None:
        """Answer one task alone (the caller holds ``self.lock``)."""
        _, frames = self.session.serialize("apply_reply", item.channel, content,
                                           parent=item.msg.header, metadata=metadata,
                                           buffers=buffers, raw=raw)
        send_frames(item.sock, [*item.msg.idents, *frames])
        self._remember(item, content, metadata, buffers, raw)

    def _remember(self, item: _Item, content: dict[str, Any], metadata: dict[str, Any],
                  buffers: list[Any], raw: list[bool]) -> None:
        """Keep a sent reply for a controller that may restart (see RECENT_KEPT)."""
        if buffers and _nbytes(buffers) > RECENT_RESULT_BYTES:
            buffers, raw = [], []
        hdr = item.msg.header
        # (a signed request may lack a msg_id: named "" then, as Message.msg_id does)
        self.recent.append((time.monotonic(), item.channel,
                            (str(hdr.get("msg_id", "")), hdr.get("session"), hdr.get("date")),
                            content, metadata, buffers, raw))

    def send_held(self) -> None:
        """Send the held replies: one ``apply_batch_reply`` per run of replies going to the
        same client on the same channel, a lone one as an ``apply_reply`` (the caller
        holds ``self.lock``)."""
        held, self.held, self._held_bytes = self.held, [], 0
        i, n = 0, len(held)
        while i < n:
            first = held[i].item
            if i + 1 == n or held[i + 1].item.sock is not first.sock or \
                    held[i + 1].item.msg.idents != first.msg.idents:
                h = held[i]
                self._send_reply(first, h.content, h.metadata, h.buffers, h.raw)
                i += 1
                continue
            # a run of replies to one client: what BatchBuilder.add/full do, inline (this
            # runs for every task of a burst)
            sock, idents, channel = first.sock, first.msg.idents, first.channel
            entries: list[dict[str, Any]] = []
            bufs: list[Any] = []
            raws: list[bool] = []
            index: dict[int, int] = {}
            total = 0
            j = i
            while j < n and j - i < MAX_BATCH_TASKS and total < MAX_BATCH_BYTES:
                h = held[j]
                it = h.item
                if it.sock is not sock or it.msg.idents != idents:
                    break
                hdr = it.msg.header
                idx: list[int] = []
                for b, r in zip(h.buffers, h.raw):
                    k = index.get(id(b))
                    if k is None or raws[k] != bool(r):
                        k = index[id(b)] = len(bufs)
                        bufs.append(b)
                        raws.append(bool(r))
                    idx.append(k)
                total += h.nbytes
                entries.append({"parent": {"msg_id": hdr["msg_id"], "session": hdr.get("session"),
                                           "date": hdr.get("date"), "msg_type": "apply_request"},
                                "metadata": h.metadata, "content": h.content, "b": idx})
                j += 1
            if j - i == 1:
                h = held[i]
                self._send_reply(first, h.content, h.metadata, h.buffers, h.raw)
                i = j
                continue
            _, frames = self.session.serialize(BATCH_REPLY, channel, {"tasks": entries},
                                               buffers=bufs, raw=raws)
            send_frames(sock, [*idents, *frames])
            # what _remember keeps, with one clock read for the run
            now = time.monotonic()
            remember = self.recent.append
            for e, h in zip(entries, held[i:j]):
                p = e["parent"]
                if h.nbytes > RECENT_RESULT_BYTES:
                    remember((now, channel, (p["msg_id"], p["session"], p["date"]), h.content,
                              h.metadata, [], []))
                else:
                    remember((now, channel, (p["msg_id"], p["session"], p["date"]), h.content,
                              h.metadata, h.buffers, h.raw))
            i = j


class _WakingPoller(zmq.Poller):
    """A Poller that also returns when ``fd`` (a signal wake-up pipe) is readable; it
    empties the pipe and leaves it out of what it returns."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.register(fd, zmq.POLLIN)

    def poll(self, timeout: int | None = None) -> list[tuple[Any, int]]:
        events = super().poll(timeout)
        for i, (sock, _) in enumerate(events):
            if sock == self.fd:
                with contextlib.suppress(OSError):
                    os.read(self.fd, 4096)
                del events[i]
                break
        return events


def _timeout(value: Any) -> float | None:
    try:
        t = None if value is None else float(value)
    except (TypeError, ValueError):
        return None
    return t if t is not None and t > 0 else None


def _on_alarm(signum: int, frame: Any) -> None:
    raise TaskTimeout("the task ran longer than its timeout")


def _arm_alarm(seconds: float) -> bool:
    """Interrupt the running task after ``seconds`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return True


def _disarm_alarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def _error_content(e: BaseException, skip_frames: bool = True) -> dict[str, Any]:
    tb = e.__traceback__
    if skip_frames and tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # drop the engine's own frame: show the user's code
    lines = traceback.format_exception(type(e), e, tb)
    return {"status": "error", "ename": type(e).__name__, "evalue": str(e),
            "traceback": "".join(lines)}


def _wait_for_connection_file(path: Path, controller_pid: int, timeout: float,
                              ready_fd: int = -1) -> ConnectionInfo:
    """Read the connection file; with a controller pid, wait until that controller wrote it.

    ``ready_fd``: the read end of the controller's ready pipe (see
    monq.cluster), which polls readable once the file is written: the wait
    then costs nothing and ends at once.  Without it (or once it has said
    something) the file is looked at every CONNECTION_POLL seconds.
    """
    deadline = time.monotonic() + timeout
    ready: select.poll | None = None
    if ready_fd >= 0:
        ready = select.poll()
        ready.register(ready_fd, select.POLLIN)
    try:
        while True:
            try:
                info = ConnectionInfo.from_json(json.loads(path.read_text()))
                if not controller_pid or info.controller_pid == controller_pid:
                    return info
            except (OSError, ValueError, KeyError, TypeError):
                if not controller_pid:
                    raise RegistrationError(f"cannot read the connection file {path}") from None
            if controller_pid and not pid_alive(controller_pid):
                raise RegistrationError(f"controller pid {controller_pid} exited before it "
                                        "was ready")
            left = deadline - time.monotonic()
            if left < 0:
                raise RegistrationError(f"no connection file from controller pid "
                                        f"{controller_pid} at {path} within {timeout}s")
            if ready is not None:
                # readable (written) or hung up (the controller is exiting): it stays so,
                # so from now on the file is looked at every CONNECTION_POLL
                if ready.poll(max(1, math.ceil(min(left, 1.0) * 1000))):
                    ready = None
            else:
                time.sleep(CONNECTION_POLL)
    finally:
        if ready_fd >= 0:
            os.close(ready_fd)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m monq.engine", description="a monq engine")
    p.add_argument("--connection-file", required=True, type=Path)
    p.add_argument("--controller-pid", type=int, default=0,
                   help="wait for a connection file written by this controller")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--ready-fd", type=int, default=-1,
                   help="the read end of the controller's ready pipe (inherited)")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s")
    try:
        info = _wait_for_connection_file(a.connection_file, a.controller_pid,
                                         EngineConfig().registration_timeout, a.ready_fd)
    except RegistrationError as e:
        log.error("%s", e)
        return 3
    engine = Engine(info)

    def on_signal(signum: int, frame: Any) -> None:
        # stop now, whatever the state: a running task is interrupted and answered
        # as aborted, so a stop never waits for a long task (nor orphans one)
        engine.stop()
        if engine.busy:
            raise Stopping(f"the engine was stopped (signal {signum}) while the task ran")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # a signal also writes to this pipe, which the task loop polls: a SIGTERM wakes an idle
    # engine at once (the handler alone runs inside the poll, which then waits on)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    engine.wake_fd = wake_r
    try:
        engine.register()
        engine.run()
    except RegistrationError as e:
        log.error("%s", e)
        return 3
    except (KeyboardInterrupt, Stopping):
        pass
    finally:
        if engine.id is not None:
            n = engine.abort_waiting("the engine was stopped before the task started")
            if n:
                log.info("answered %d waiting task(s) as aborted", n)
        engine.close()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    return 0
