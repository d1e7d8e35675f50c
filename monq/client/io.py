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

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from monq.connection import ConnectionInfo
from monq.errors import ProtocolError
from monq.protocol import DELIM, Message, Session

log = logging.getLogger(__name__)

#: first frame of a pipe message: which socket it goes to
CHANNELS = {b"task": "task_client", b"direct": "direct_client", b"hub": "hub"}
_STOP = b"stop"


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
                 on_auth_error: Callable[[str], None]) -> None:
        super().__init__(name="monq-client-io", daemon=True)
        self.ctx = ctx
        self.info = info
        self.session = session
        self.pipe_url = pipe_url
        self.on_reply = on_reply
        self.on_hub = on_hub
        self.on_notify = on_notify
        self.on_auth_error = on_auth_error
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
                s.connect(self.info.url(name))
                sockets[name] = s
            sub = self.ctx.socket(zmq.SUB)
            sub.subscribe(b"notify")
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
                s.close(linger=0)

    def _loop(self, sockets: dict[str, zmq.Socket]) -> None:
        pipe = sockets["pipe"]
        poller = zmq.Poller()
        for s in sockets.values():
            poller.register(s, zmq.POLLIN)
        by_socket = {s: name for name, s in sockets.items()}
        while True:
            for sock, _ in poller.poll():
                name = by_socket[sock]
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if name == "pipe":
                        if frames[0].bytes == _STOP:
                            return
                        target = sockets[CHANNELS[frames[0].bytes]]
                        target.send_multipart(frames[1:], copy=False)
                        continue
                    try:
                        self._dispatch(name, frames)
                    except Exception:
                        log.exception("error handling a message from %s", name)

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
    def stop_frame() -> list[bytes]:
        return [_STOP]
