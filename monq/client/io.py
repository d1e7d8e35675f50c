"""The client's sockets, who may use them when, and the I/O thread.

Sockets are not thread-safe, and a client is used from any thread (and from
asyncio), so the sockets to the controller's task, direct and hub channels
are shared under one lock, :attr:`IOThread.lock`: whoever holds it may send,
poll and receive on them.  Going through another thread costs a wake-up per
message each way (the waker and the woken fight for the GIL), so:

- a caller that sends finds the lock free (the usual case) and sends at once
  from its own thread; otherwise it queues the message in the :class:`Outbox`
  and rings a bell that the holder polls, and the holder sends it;
- a caller that waits for a reply (``apply_sync``, ``AsyncResult.get``, a Hub
  query) takes the lock, if it is free, and receives its reply itself (see
  ``Client._receive``), dispatching whatever else arrives meanwhile;
- the I/O thread takes the lock only while replies are awaited that no caller
  is receiving (``apply_async`` without ``get``, futures in asyncio, callbacks)
  and is otherwise *passive*: it then polls only its own notify socket (the
  Hub's beats and announcements) and a wake-up pipe.  A sequential
  ``apply_sync`` loop thus never wakes it.

Rules that keep this correct (``outbox.lock`` is the client's send lock):

- messages of a channel leave in the order of their numbers (see
  monq.protocol.ReplayGuard): numbering, queueing and a direct send happen
  under ``outbox.lock``, and a direct send first sends what is queued;
- whoever releases the sockets first sends what is queued, under
  ``outbox.lock`` (:meth:`IOThread.release`): nothing waits in the outbox
  while nobody holds them;
- received messages are verified under :attr:`IOThread.lock`, in the order
  received (the replay guard needs that), and dispatched (futures resolved,
  callbacks run) after it is released;
- a caller that stops receiving while replies are still awaited wakes the
  I/O thread unless it is active (:meth:`IOThread.activate_if_needed`), under
  ``outbox.lock``, where the I/O thread also decides to stay active or not.

Batching.  A task submitted while another thread holds the sockets (a burst
of ``apply_async``) is numbered and registered at once but queued *unsigned*
(a :class:`QueuedTask`); whoever sends what is queued packs each run of
consecutive queued tasks bound for the same place into ``apply_batch``
messages (:func:`pack`; monq.protocol describes them): one signature and one
trip through the relay for up to ``MAX_BATCH_TASKS`` tasks.  Batching is
natural: tasks are only batched when they had to wait anyway, so a lone
task is never delayed, and a sequential ``apply_sync`` still sends single
``apply_request`` messages.  A batch is numbered with the highest number of
the tasks it packs, so the channel's order rule above still holds.

Resource handling: :meth:`IOThread.stop` asks the thread to end; the thread
takes the lock for good and closes every socket; the caller then terminates
the Context.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import zmq

from monq.connection import ConnectionInfo, pid_alive
from monq.errors import ProtocolError
from monq.protocol import (
    BATCH_REPLY,
    BATCH_REQUEST,
    DELIM,
    MAX_BATCH_BYTES,
    MAX_BATCH_TASKS,
    BatchBuilder,
    Message,
    Session,
)
from monq.security import client_socket_setup
from monq.serialize import recv_frames, send_frames

log = logging.getLogger(__name__)

#: the channel a message is queued for: which socket it goes to
CHANNELS = {b"task": "task_client", b"direct": "direct_client", b"hub": "hub"}
SHARED = ("task_client", "direct_client", "hub")
#: how long a closing client waits for the tasks it submitted to leave (a client that
#: exits right after submitting has them run and recorded)
CLOSE_LINGER_MS = 5000
#: messages read from one socket before looking at the others
BATCH = 1000
#: a socket's ZMQ_EVENTS through the Cython call, with int flags (pyzmq's enum
#: arithmetic and sugar layers cost more than the look itself)
_get = zmq.backend.Socket.get
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_LOCAL = ("127.0.0.1", "localhost", "0.0.0.0", "*", "", "::1")

#: what a turn on the sockets received, to dispatch once the lock is released:
#: ("reply" | "hub", Message), ("replies", [Message, ...]) (a batch's),
#: ("auth_error", parent msg_id) or ("unsent", msg_id) or
#: ("unsent", (msg_id, why)): a task that could not be signed
Received = tuple[str, Any]


@dataclass(slots=True)
class QueuedTask:
    """A task queued unsigned: signed (alone or in a batch) by whoever sends it.

    ``header`` was numbered when the task was queued (under ``outbox.lock``).
    """

    header: dict[str, Any]
    #: the metadata, frames and raw flags may be shared with other tasks (see
    #: Client._submit_task): nobody changes them
    metadata: dict[str, Any]
    buffers: Sequence[Any]
    raw: Sequence[bool]
    idents: Sequence[bytes]

    def frames(self, session: Session) -> list[Any]:
        """The task signed as a single ``apply_request`` (with its routing idents)."""
        _, frames = session.serialize("apply_request", self.header["channel"], {},
                                      metadata=self.metadata, buffers=self.buffers,
                                      raw=self.raw, header=self.header)
        return [*self.idents, *frames]


#: what the Outbox holds: a signed message's frames, or a task to sign when sent
Queued = list[Any] | QueuedTask


def pack(items: list[tuple[bytes, Queued]], session: Session, engines: int
         ) -> Iterator[tuple[bytes, list[Any], list[str]]]:
    """Sign what was queued, in order: ``(channel, frames, msg_ids)`` per message.

    Each run of consecutive queued tasks for the same channel and target is
    packed into batches of at most ``MAX_BATCH_TASKS`` tasks and about
    ``MAX_BATCH_BYTES``; on the load-balanced channel also of at most
    ``ceil(run / engines)`` tasks, so that a small burst of long tasks still
    spreads over the engines (the task relay deals out messages, not tasks).
    A batch of one task is a plain ``apply_request``.  ``msg_ids`` are the
    tasks' ids (for a message that cannot be sent), or the message's own.
    """
    i, n = 0, len(items)
    while i < n:
        channel, item = items[i]
        if not isinstance(item, QueuedTask):
            yield channel, item, [_msg_id(item)]
            i += 1
            continue
        # the run of queued tasks for the same place, gathered in one pass
        run = [item]
        idents = item.idents
        j = i + 1
        while j < n:
            c, other = items[j]
            if c != channel or not isinstance(other, QueuedTask) or other.idents != idents:
                break
            run.append(other)
            j += 1
        i = j
        cap = -(-len(run) // max(1, engines)) if channel == b"task" else len(run)
        k = 0
        while k < len(run):
            b = BatchBuilder()
            entries = b.entries
            start = k
            # what BatchBuilder.full() says, without two calls per task
            end = min(len(run), k + min(cap, MAX_BATCH_TASKS))
            # the frames, raw flags and buffer indices of the task before: a burst's tasks
            # share their frames (monq.serialize.pack_call), and then their indices
            same: tuple[Any, Any, list[int]] | None = None
            while k < end and b.nbytes < MAX_BATCH_BYTES:
                t = run[k]
                h = t.header
                if same is not None and t.buffers is same[0] and t.raw is same[1]:
                    # what b.add would find: every frame in the batch already
                    entries.append({"msg_id": h["msg_id"], "date": h["date"],
                                    "metadata": t.metadata, "b": same[2]})
                else:
                    entry = {"msg_id": h["msg_id"], "date": h["date"], "metadata": t.metadata}
                    b.add(entry, t.buffers, t.raw)
                    same = (t.buffers, t.raw, entry["b"])
                k += 1
            group = run[start:k]
            if len(group) == 1:
                yield channel, group[0].frames(session), [group[0].header["msg_id"]]
                continue
            last = group[-1].header
            hdr = {**last, "msg_id": session.new_msg_id(), "msg_type": BATCH_REQUEST}
            _, frames = session.serialize(BATCH_REQUEST, last["channel"],
                                          {"tasks": b.entries}, buffers=b.buffers,
                                          raw=b.raw, header=hdr)
            yield channel, [*item.idents, *frames], [t.header["msg_id"] for t in group]


class Outbox:
    """Messages waiting for whoever holds the sockets, in send order, one bell per batch.

    ``lock`` also guards the caller's message numbering, so queue order is send
    order.  A caller only rings the bell when the box was empty; the holder
    then takes everything queued at once.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._items: collections.deque[tuple[bytes, Queued]] = collections.deque()
        self._rung = False

    def put(self, channel: bytes, frames: Queued, bell: zmq.Socket) -> None:
        """Queue one message (or task); the caller holds ``lock``."""
        self._items.append((channel, frames))
        if not self._rung:
            self._rung = True
            bell.send(b"")

    def ring(self, bell: zmq.Socket) -> None:
        """Wake whoever holds the sockets (the caller holds ``lock``)."""
        if not self._rung:
            self._rung = True
            bell.send(b"")

    def __len__(self) -> int:
        return len(self._items)

    def take_locked(self) -> list[tuple[bytes, Queued]]:
        """Everything queued; the caller holds ``lock``."""
        self._rung = False
        if not self._items:
            return []
        items = list(self._items)
        self._items.clear()
        return items

    def take(self) -> list[tuple[bytes, Queued]]:
        if not self._items:
            return []  # the lock is contended in a burst: do not take it for nothing
        with self.lock:
            return self.take_locked()


class IOThread(threading.Thread):
    """Opens the client's sockets, owns the notify socket, and receives when nobody else does.

    ``on_reply(msg)`` gets task replies, ``on_hub(msg)`` query answers,
    ``on_notify(msg)`` notifications, ``on_auth_error(parent_msg_id)`` the
    controller's refusal of a wrong key and ``on_unsent(msg_id)`` a message
    that could not be sent.  ``awaiting()`` says whether any reply is still
    awaited.  Notifications are dispatched in this thread; replies in
    whichever thread received them.  Callbacks must not block.
    """

    def __init__(self, ctx: zmq.Context, info: ConnectionInfo, session: Session,
                 pipe_url: str, on_reply: Callable[[Message], None],
                 on_hub: Callable[[Message], None], on_notify: Callable[[Message], None],
                 on_auth_error: Callable[[str], None], outbox: Outbox,
                 on_hub_lost: Callable[[float], None],
                 on_unsent: Callable[..., None] = lambda msg_id, why=None: None,
                 awaiting: Callable[[], bool] = lambda: True,
                 engines: Callable[[], int] = lambda: 1) -> None:
        super().__init__(name="monq-client-io", daemon=True)
        self.ctx = ctx
        self.info = info
        self.session = session
        self.pipe_url = pipe_url
        self.on_reply = on_reply
        self.on_hub = on_hub
        self.on_notify = on_notify
        self.on_auth_error = on_auth_error
        self.outbox = outbox
        self.on_hub_lost = on_hub_lost
        #: called with the msg_id of a message that could not be sent
        self.on_unsent = on_unsent
        self.awaiting = awaiting
        #: how many engines take load-balanced tasks (caps a batch's size, see pack)
        self.engines = engines
        #: messages sent, by type: "apply_request", "apply_batch" (+ "tasks in batches"),
        #: other (tests count them)
        self.sent: collections.Counter[str] = collections.Counter()
        #: the right to use the shared sockets (and the bell's receiving end)
        self.lock = threading.Lock()
        #: whether this thread takes the sockets on its next turn without being woken;
        #: changed and read under ``outbox.lock``
        self.active = False
        #: turns this thread took on the shared sockets, and times it was woken through
        #: its pipe: a sequential apply_sync loop changes neither (tests count them)
        self.turns = 0
        self.wakeups = 0
        # verification shares one replay memory: the notify channel's messages are
        # verified here, the others by whoever holds ``lock``
        self._feed_lock = threading.Lock()
        self._stop_flag = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self.sockets: dict[str, zmq.Socket] = {}
        self._names: dict[Any, str] = {}
        self._shared_poller = zmq.Poller()
        # the Hub beats on the notify channel; silence longer than this means it is gone
        self.grace = max(5.0, 5 * info.heartbeat_period)
        # a controller on this machine whose process is alive may just be busy (a long
        # query): give it much longer before giving up on it
        self.local_grace = 12 * self.grace
        self.local_pid = info.controller_pid if info.ip in _LOCAL else 0
        # a live local supervisor restarts a controller that died: wait for its successor
        self.supervisor_pid = info.supervisor_pid if info.ip in _LOCAL and info.restarted else 0
        self.last_beat = time.monotonic()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    # -- opening and closing --------------------------------------------------------

    def run(self) -> None:
        sockets = self.sockets
        try:
            bell = self.ctx.socket(zmq.PULL)
            sockets["bell"] = bell
            bell.bind(self.pipe_url)
            ident = self.session.session_id.encode()
            for name in SHARED:
                s = self.ctx.socket(zmq.DEALER)
                s.identity = ident
                s.sndhwm = 0  # queue rather than block or drop when submitting in bursts
                s.rcvhwm = 0
                client_socket_setup(s, self.info)
                s.connect(self.info.url(name))
                sockets[name] = s
            sub = self.ctx.socket(zmq.SUB)
            sub.rcvhwm = 0  # a busy client queues the Hub's notices rather than drop them
            sub.subscribe(b"notify")
            client_socket_setup(sub, self.info)
            sub.connect(self.info.url("notify"))
            sockets["notify"] = sub
            for s in sockets.values():
                s.linger = 0
        except BaseException as e:
            self.error = e
            for s in sockets.values():
                s.close(linger=0)
            self._close_pipe()
            self.ready.set()
            return
        self._names = {s: name for name, s in sockets.items()}
        for name in (*SHARED, "bell"):
            self._shared_poller.register(sockets[name], zmq.POLLIN)
        self.ready.set()
        try:
            self._loop()
        except zmq.ContextTerminated:
            pass
        except BaseException:
            log.exception("client I/O thread failed")
        finally:
            self._close()

    def _close(self) -> None:
        # the sockets are closed under the lock, which is never released again: a caller
        # still receiving finishes its turn first, and nobody uses them afterwards
        if not self.lock.acquire(timeout=5):
            log.warning("a thread kept the client's sockets for 5 s after close(): "
                        "closing them anyway")
        for name in ("task_client", "direct_client"):
            # what was submitted before close() still goes out
            with contextlib.suppress(zmq.ZMQError, KeyError):
                self.sockets[name].linger = CLOSE_LINGER_MS
        for s in self.sockets.values():
            s.close()
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self) -> None:
        """Ask the thread to end (it closes the sockets); safe from any thread, twice."""
        self._stop_flag = True
        self.wake()

    def wake(self) -> None:
        """Have the thread look at the sockets (or at its stop flag) now."""
        if not self._woken:
            self._woken = True
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    # -- the loop -------------------------------------------------------------------

    def _loop(self) -> None:
        notify = self.sockets["notify"]
        passive = zmq.Poller()
        passive.register(notify, zmq.POLLIN)
        passive.register(self._wake_r, zmq.POLLIN)
        active = zmq.Poller()
        for name in (*SHARED, "bell", "notify"):
            active.register(self.sockets[name], zmq.POLLIN)
        active.register(self._wake_r, zmq.POLLIN)
        last_loop = time.monotonic()
        while not self._stop_flag:
            got: list[Received] = []
            if self._take():
                self.turns += 1
                try:
                    ready = self.turn(active, 1000, got)
                finally:
                    got += self.release(keep_active=True)
            else:
                ready = {self._names.get(s, s) for s, _ in passive.poll(1000)}
            self.dispatch(got)
            if self._wake_r in ready:
                self.wakeups += 1
                self._woken = False
                with contextlib.suppress(OSError):
                    while os.read(self._wake_r, 4096):
                        pass
            if "notify" in ready:
                self._drain_notify(notify)
            now = time.monotonic()
            if now - last_loop > 3.0:
                # this thread itself did not run (the process was suspended or starved):
                # the silence says nothing about the controller
                self.last_beat = now
            last_loop = now
            silent = now - self.last_beat
            if silent > self.grace and not (silent < self.local_grace and self._local_alive()):
                self.on_hub_lost(silent)

    def _take(self) -> bool:
        """Take the sockets if replies are awaited and nobody else holds them."""
        if self.active and self.lock.acquire(blocking=False):
            return True  # no change of state: no need for outbox.lock (busy in a burst)
        with self.outbox.lock:
            if not (self.active or self.awaiting()):
                return False
            if self.lock.acquire(blocking=False):
                self.active = True
                return True
            # a caller receives: it wakes this thread when it stops, if need be
            self.active = False
            return False

    def _drain_notify(self, notify: zmq.Socket) -> None:
        for _ in range(BATCH):
            try:
                frames = recv_frames(notify, zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                with self._feed_lock:
                    msg = self.session.feed(frames[1:])  # [0] is the topic
            except ProtocolError:
                continue
            self.last_beat = time.monotonic()
            try:
                self.on_notify(msg)
            except Exception:
                log.exception("error handling a notification")

    def _local_alive(self) -> bool:
        """A controller on this machine that is alive (maybe busy), or being restarted."""
        return bool((self.local_pid and pid_alive(self.local_pid)) or
                    (self.supervisor_pid and pid_alive(self.supervisor_pid)))

    # -- a turn on the shared sockets (by this thread or a receiving caller) -----------

    def turn(self, poller: zmq.Poller | None, timeout_ms: int, got: list[Received]
             ) -> set[Any]:
        """Send what is queued, wait up to ``timeout_ms`` for input and read it all.

        The caller holds ``lock``.  Verified messages (and failures to report)
        are appended to ``got``, to :meth:`dispatch` once the lock is released.
        Returns the names (or file descriptors) of the other ready pollees.
        """
        self.flush(got)
        events = (poller or self._shared_poller).poll(timeout_ms)
        others: set[Any] = set()
        for sock, _ in events:
            name = self._names.get(sock, sock)
            if name == "bell":
                with contextlib.suppress(zmq.Again):
                    while True:
                        sock.recv(zmq.NOBLOCK)
                self.flush(got)
            elif name in SHARED:
                self._read(sock, name, got)
            else:
                others.add(name)
        return others

    def flush(self, got: list[Received], locked: bool = False) -> None:
        """Send everything queued (the caller holds ``lock``; ``locked``: and
        ``outbox.lock``)."""
        self.send_all(self.outbox.take_locked() if locked else self.outbox.take(), got)

    def send_all(self, items: list[tuple[bytes, Queued]], got: list[Received]) -> None:
        """Sign and send what was queued, queued tasks packed in batches (see :func:`pack`)."""
        if not items:
            return
        done: set[str] = set()
        try:
            for channel, frames, ids in pack(items, self.session, self.engines()):
                self.send(channel, frames, got, ids)
                done.update(ids)
        except Exception as e:
            # signing failed (cannot happen with the metadata monq builds, but this may be
            # the I/O thread, whose end would leave every caller waiting): what was not
            # sent fails with the reason, and the thread goes on
            log.exception("could not sign queued messages")
            why = f"{type(e).__name__}: {e}"
            for _, item in items:
                m = item.header["msg_id"] if isinstance(item, QueuedTask) else _msg_id(item)
                if m not in done:
                    got.append(("unsent", (m, why)))

    def send_item(self, channel: bytes, item: Queued, got: list[Received]) -> None:
        """Send one message, or one task alone, now (the caller holds ``lock``)."""
        if isinstance(item, QueuedTask):
            self.send(channel, item.frames(self.session), got, [item.header["msg_id"]])
        else:
            self.send(channel, item, got)

    def send(self, channel: bytes, frames: list[Any], got: list[Received],
             msg_ids: list[str] | None = None) -> None:
        """Send one message now (the caller holds ``lock``)."""
        try:
            # never blocks on a live connection (unlimited HWM); only a connection the
            # controller refused (Curve) has no pipe left
            send_frames(self.sockets[CHANNELS[channel]], frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("could not send a message to %s: no connection (refused?)",
                        CHANNELS[channel])
            got.extend(("unsent", m) for m in (msg_ids or [_msg_id(frames)]))
            return
        if channel != b"hub":
            if msg_ids is not None and len(msg_ids) > 1:
                self.sent[BATCH_REQUEST] += 1
                self.sent["tasks in batches"] += len(msg_ids)
            else:
                self.sent["apply_request"] += 1

    def _read(self, sock: zmq.Socket, name: str, got: list[Received]) -> None:
        for i in range(BATCH):
            # a sequential round trip reads one reply: asking the socket whether a second
            # waits (3 us) is cheaper than the raised zmq.Again that would say so (10 us);
            # a burst reads on until zmq.Again
            if i == 1 and not int(_get(sock, _EVENTS)) & _POLLIN:
                return
            try:
                frames = recv_frames(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            if not i:
                # the controller relayed this: it is alive, even if its Hub, busy with a
                # burst, has not beaten for a while
                self.last_beat = time.monotonic()
            try:
                with self._feed_lock:
                    msg = self.session.feed(frames)
            except ProtocolError:
                if name == "hub":
                    parent = _auth_error_parent(frames)
                    if parent is not None:
                        got.append(("auth_error", parent))
                continue
            if name == "hub":
                got.append(("hub", msg))
            elif msg.msg_type == BATCH_REPLY:
                try:
                    with self._feed_lock:
                        tasks = self.session.split_batch(msg, own_headers=False)
                except ProtocolError:
                    continue
                got.append(("replies", tasks))
            else:
                got.append(("reply", msg))

    def release(self, keep_active: bool = False) -> list[Received]:
        """Give the sockets up, after sending what is queued; returns what to dispatch.

        ``keep_active``: this thread's own release; it stays active while replies
        are awaited (and takes the sockets again on its next turn).
        """
        got: list[Received] = []
        try:
            while True:
                with self.outbox.lock:
                    items = self.outbox.take_locked()
                    if not items:
                        # nothing queued, and nothing can be queued until the lock is
                        # free (senders hold outbox.lock): a sender finds it free next
                        if keep_active:
                            self.active = self.awaiting()
                        self.lock.release()
                        return got
                # sent outside outbox.lock: a sender waiting on it (holding the GIL
                # meanwhile) would make every frame sent here a thread switch
                self.send_all(items, got)
        except BaseException:
            if self.lock.locked():
                self.lock.release()
            raise

    def activate_if_needed(self) -> None:
        """A caller stopped receiving: wake this thread if replies are still awaited."""
        with self.outbox.lock:
            need = not self.active and not self._stop_flag and self.awaiting()
        if need:
            self.wake()

    def dispatch(self, got: list[Received]) -> None:
        """Hand received messages to the client (not holding ``lock``)."""
        for kind, x in got:
            if kind == "replies":  # a batch's: one entry for its tasks
                on_reply = self.on_reply
                for m in x:
                    try:
                        on_reply(m)
                    except Exception:
                        log.exception("error handling a reply")
                continue
            try:
                if kind == "reply":
                    self.on_reply(x)
                elif kind == "hub":
                    self.on_hub(x)
                elif kind == "auth_error":
                    self.on_auth_error(x)
                elif kind == "unsent":
                    if isinstance(x, tuple):
                        self.on_unsent(*x)
                    else:
                        self.on_unsent(x)
            except Exception:
                log.exception("error handling a %s", kind)


def _auth_error_parent(frames: list[Any]) -> str | None:
    """The parent msg_id of the one unsigned message a controller sends ("your
    signature is wrong"), or None if ``frames`` are not that."""
    try:
        raw = [f if isinstance(f, bytes) else bytes(f) for f in frames[:17]]
        i = raw.index(DELIM)
        if bytes(frames[i + 1]) != b"":
            return None
        header = orjson.loads(bytes(frames[i + 2]))
        parent = orjson.loads(bytes(frames[i + 3]))
    except (ValueError, IndexError, TypeError):
        return None
    if isinstance(header, dict) and header.get("msg_type") == "auth_error" and \
            isinstance(parent, dict):
        return str(parent.get("msg_id", ""))
    return None


def _msg_id(frames: list[Any]) -> str:
    """The msg_id in a signed message's header frame ('' if it cannot be read)."""
    try:
        raw = [bytes(f) if not isinstance(f, bytes) else f for f in frames]
        header = orjson.loads(raw[raw.index(DELIM) + 2])
        return str(header.get("msg_id", ""))
    except (ValueError, IndexError, TypeError, AttributeError):
        return ""
