"""The client's I/O thread: the one owner of the client's zmq sockets.

Sockets are not thread-safe, and a client is used from any thread (and from
asyncio), so every socket lives in this thread.  Callers hand it signed
frames through an ``inproc`` PUSH socket guarded by a lock; the thread
forwards them to the right channel and routes what comes back (replies,
query answers, notifications) to the waiting futures.

Resource handling: :meth:`IOThread.stop` asks the thread to end; the thread
closes its own sockets; the caller then terminates the Context.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from monq.connection import ConnectionInfo, pid_alive
from monq.errors import ProtocolError
from monq.protocol import DELIM, Message, Session
from monq.security import client_socket_setup

log = logging.getLogger(__name__)

#: first frame of a pipe message: which socket it goes to
CHANNELS = {b"task": "task_client", b"direct": "direct_client", b"hub": "hub"}
_STOP = b"stop"
#: how long a closing client waits for the tasks it submitted to leave (a client that
#: exits right after submitting has them run and recorded)
CLOSE_LINGER_MS = 5000
_LOCAL = ("127.0.0.1", "localhost", "0.0.0.0", "*", "", "::1")


class Outbox:
    """Messages waiting for the I/O thread, in send order, with one wake-up per batch.

    Waking a thread costs far more than queueing a message (the waker and the
    woken fight for the GIL), so a caller only rings the pipe when the box
    was empty; the I/O thread then takes everything queued at once.  ``lock``
    also guards the caller's message numbering, so queue order is send order.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._items: collections.deque[tuple[bytes, list[Any]]] = collections.deque()
        self._rung = False

    def put(self, channel: bytes, frames: list[Any], bell: zmq.Socket) -> None:
        """Queue one message; the caller holds ``lock``."""
        self._items.append((channel, frames))
        if not self._rung:
            self._rung = True
            bell.send(b"")

    def take(self) -> list[tuple[bytes, list[Any]]]:
        with self.lock:
            items = list(self._items)
            self._items.clear()
            self._rung = False
        return items


class IOThread(threading.Thread):
    """Forwards outgoing frames and dispatches incoming messages.

    ``on_reply(msg)`` gets task replies, ``on_hub(msg)`` query answers,
    ``on_notify(msg)`` notifications and ``on_auth_error(parent_msg_id)`` the
    controller's refusal of a wrong key.  Callbacks run in this thread and
    must not block.
    """

    def __init__(self, ctx: zmq.Context, info: ConnectionInfo, session: Session,
                 pipe_url: str, on_reply: Callable[[Message], None],
                 on_hub: Callable[[Message], None], on_notify: Callable[[Message], None],
                 on_auth_error: Callable[[str], None], outbox: Outbox,
                 on_hub_lost: Callable[[float], None],
                 on_unsent: Callable[[str], None] = lambda msg_id: None) -> None:
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

    def run(self) -> None:
        sockets: dict[str, zmq.Socket] = {}
        try:
            pipe = self.ctx.socket(zmq.PULL)
            sockets["pipe"] = pipe
            pipe.bind(self.pipe_url)
            ident = self.session.session_id.encode()
            for name in ("task_client", "direct_client", "hub"):
                s = self.ctx.socket(zmq.DEALER)
                s.identity = ident
                s.sndhwm = 0  # queue rather than block or drop when submitting in bursts
                s.rcvhwm = 0
                client_socket_setup(s, self.info)
                s.connect(self.info.url(name))
                sockets[name] = s
            sub = self.ctx.socket(zmq.SUB)
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
            self.ready.set()
            return
        self.ready.set()
        try:
            self._loop(sockets)
        except zmq.ContextTerminated:
            pass
        except BaseException:
            log.exception("client I/O thread failed")
        finally:
            for s in sockets.values():
                s.close()

    def _loop(self, sockets: dict[str, zmq.Socket]) -> None:
        pipe = sockets["pipe"]
        poller = zmq.Poller()
        for s in sockets.values():
            poller.register(s, zmq.POLLIN)
        by_socket = {s: name for name, s in sockets.items()}
        last_loop = time.monotonic()
        while True:
            events = poller.poll(1000)
            now = time.monotonic()
            if now - last_loop > 3.0:
                # this thread itself did not run (the process was suspended or starved):
                # the silence says nothing about the controller
                self.last_beat = now
            last_loop = now
            silent = now - self.last_beat
            if silent > self.grace and not (silent < self.local_grace and self._local_alive()):
                self.on_hub_lost(silent)
            for sock, _ in events:
                name = by_socket[sock]
                if name == "pipe":
                    # read the bells first, then take the box: a message queued
                    # after take() rings again, so none is left behind
                    stop = False
                    while True:
                        try:
                            bell = pipe.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        stop = stop or bell == _STOP
                    for channel, out in self.outbox.take():
                        try:
                            # never blocks on a live connection (unlimited HWM); only a
                            # connection the controller refused (Curve) has no pipe left
                            sockets[CHANNELS[channel]].send_multipart(out, zmq.NOBLOCK,
                                                                      copy=False)
                        except zmq.Again:
                            log.warning("could not send a message to %s: no connection "
                                        "(refused?)", CHANNELS[channel])
                            self.on_unsent(_msg_id(out))
                    if stop:
                        # what was submitted before close() still goes out (see run())
                        for name in ("task_client", "direct_client"):
                            sockets[name].linger = CLOSE_LINGER_MS
                        return
                    continue
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._dispatch(name, frames)
                    except Exception:
                        log.exception("error handling a message from %s", name)

    def _local_alive(self) -> bool:
        """A controller on this machine that is alive (maybe busy), or being restarted."""
        return bool((self.local_pid and pid_alive(self.local_pid)) or
                    (self.supervisor_pid and pid_alive(self.supervisor_pid)))

    def _dispatch(self, name: str, frames: list[Any]) -> None:
        if name == "notify":
            frames = frames[1:]  # the topic
        try:
            msg = self.session.feed(frames)
        except ProtocolError as e:
            if name == "hub":
                self._check_auth_error(frames, e)
            return
        if name == "hub":
            self.on_hub(msg)
        elif name == "notify":
            self.last_beat = time.monotonic()
            self.on_notify(msg)
        else:
            self.on_reply(msg)

    def _check_auth_error(self, frames: list[Any], err: ProtocolError) -> None:
        # the one unsigned message a controller sends: "your signature is wrong"
        try:
            i = [f.bytes for f in frames[:17]].index(DELIM)
            if frames[i + 1].bytes != b"":
                return
            header = json.loads(frames[i + 2].bytes)
            parent = json.loads(frames[i + 3].bytes)
        except (ValueError, IndexError):
            return
        if header.get("msg_type") == "auth_error":
            self.on_auth_error(str(parent.get("msg_id", "")))

    @staticmethod
    def stop_frame() -> bytes:
        return _STOP


def _msg_id(frames: list[Any]) -> str:
    """The msg_id in a signed message's header frame ('' if it cannot be read)."""
    try:
        raw = [bytes(f) if not isinstance(f, bytes) else f for f in frames]
        header = json.loads(raw[raw.index(DELIM) + 2])
        return str(header.get("msg_id", ""))
    except (ValueError, IndexError, TypeError):
        return ""
