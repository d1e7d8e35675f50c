"""The engine: runs the tasks it is sent and answers with results and timings.

An engine registers with the Hub and gets an integer id, then reads two
channels: the load-balanced ``task`` channel and its own ``direct`` channel,
both as a DEALER whose identity is the engine's uuid.  Tasks run one at a
time in the main thread, with stdout and stderr captured.  A task still
running after a few milliseconds is reported to the Hub as started
(``task_started``, see _StartNotifier); every reply carries the
received/started/completed times.

A heartbeat thread forwards the Hub's pings back to it inside
``zmq.proxy``, which runs in C without the GIL: a task that spins in pure
Python for minutes still answers every ping.

Resource handling: :meth:`Engine.close` closes every socket and terminates
the Context (ending the heartbeat proxy); safe to call twice.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
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
from monq.errors import MonqError, ProtocolError, SerializationError
from monq.protocol import Message, Session
from monq.security import client_socket_setup
from monq.serialize import serialize, unpack_apply

log = logging.getLogger(__name__)

_OUTPUT_CAP = 1 << 20


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


class _Capture(io.StringIO):
    """A text stream that keeps at most ``cap`` characters."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.dropped = 0

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


class _StartNotifier(threading.Thread):
    """Tells the Hub which task is running, for tasks that run long enough to matter.

    A notice per task would be a third message per task through the Hub and
    more than half of a short task's cost on the engine; a task that ends
    within ``delay`` seconds is reported by its reply alone (which carries the
    started time).  So the engine only records the current task, and this
    thread, looking every ``delay`` seconds, reports one still running.  It
    owns its own socket to the Hub.
    """

    def __init__(self, ctx: zmq.Context, url: str, session: Session, engine: Engine,
                 delay: float) -> None:
        super().__init__(name="started-notifier", daemon=True)
        self.ctx = ctx
        self.url = url
        self.session = session
        self.engine = engine
        self.delay = delay
        #: (msg_id, started) of the task running now, set by the engine's main thread
        self.current: tuple[str, float] | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        try:
            sock.linger = 0
            client_socket_setup(sock, self.engine.info)
            sock.connect(self.url)
            told: str | None = None
            while not self._stop_event.wait(self.delay):
                cur = self.current
                if cur is None or cur[0] == told or time.time() - cur[1] < self.delay:
                    continue
                told = cur[0]
                self.session.send(sock, "task_started", "started", {
                    "msg_id": cur[0], "engine": self.engine.id,
                    "engine_uuid": self.engine.uuid, "started": cur[1]})
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(linger=0)


class Engine:
    """One engine process's worker.  ``Engine(info).run()`` until :meth:`stop`."""

    def __init__(self, info: ConnectionInfo, config: EngineConfig = EngineConfig()) -> None:
        self.info = info
        self.config = config
        self.uuid = _uuid.uuid4().hex
        self.id: int | None = None
        self.session = Session(info.key)
        self.ctx = zmq.Context()
        self.ctx.linger = 0
        self._stop = False
        self._closed = False
        #: True while a task's own code runs (read by the signal handler)
        self.busy = False
        self._heart: threading.Thread | None = None
        self._notifier: _StartNotifier | None = None
        ident = self.uuid.encode()
        self.hub = self.ctx.socket(zmq.DEALER)
        self.task = self.ctx.socket(zmq.DEALER)
        self.direct = self.ctx.socket(zmq.DEALER)
        for s in (self.task, self.direct):
            s.identity = ident
        for s in (self.hub, self.task, self.direct):
            client_socket_setup(s, info)
        self.hub.connect(info.url("hub"))

    # -- lifecycle ----------------------------------------------------------------

    def register(self) -> int:
        """Register with the Hub; returns the engine id given by the Hub."""
        hdr = self.session.send(self.hub, "registration_request", "hub", {
            "uuid": self.uuid, "hostname": _socket.gethostname(), "pid": os.getpid()})
        deadline = time.monotonic() + self.config.registration_timeout
        while time.monotonic() < deadline:
            if not self.hub.poll(100):
                if self._stop:
                    raise RegistrationError("stopped before registering")
                continue
            msg = self.session.recv(self.hub)
            if msg is None or msg.parent.get("msg_id") != hdr["msg_id"]:
                continue
            if msg.content.get("status") != "ok":
                raise RegistrationError(f"the Hub refused this engine: {msg.content}")
            self.id = int(msg.content["id"])
            break
        else:
            raise RegistrationError(f"no answer from the Hub at {self.info.url('hub')} within "
                                    f"{self.config.registration_timeout}s")
        self.task.connect(self.info.url("task_engine"))
        self.direct.connect(self.info.url("direct_engine"))
        self._heart = threading.Thread(target=self._heartbeat, name="heart", daemon=True)
        self._heart.start()
        self._notifier = _StartNotifier(self.ctx, self.info.url("hub"),
                                        Session(self.info.key, self.session.session_id), self,
                                        self.config.started_notice_delay)
        self._notifier.start()
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
            s.close(linger=0)
        self.hub.close()
        if self._notifier is not None:
            # it owns a socket: it must be gone before the Context can end
            self._notifier.stop()
            self._notifier.join(timeout=2)
        self.ctx.term()
        if self._heart is not None:
            self._heart.join(timeout=2)

    # -- loop ---------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        channels = {self.task: "task", self.direct: "direct"}
        for s in channels:
            poller.register(s, zmq.POLLIN)
        poller.register(self.hub, zmq.POLLIN)
        while not self._stop:
            try:
                events = poller.poll(200)
            except zmq.ZMQError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            for sock, _ in events:
                if sock is self.hub:
                    self.session.recv(self.hub, zmq.NOBLOCK)  # nothing expected; drain
                    continue
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                try:
                    msg = self.session.feed(frames)
                except ProtocolError as e:
                    log.warning("dropped a message on %s: %s", channels[sock], e)
                    continue
                if msg.msg_type != "apply_request":
                    log.warning("ignored %s on %s", msg.msg_type, channels[sock])
                    continue
                try:
                    self.handle_apply(sock, channels[sock], msg)
                except Exception:
                    log.exception("failed to answer %s", msg.msg_id)

    # -- tasks --------------------------------------------------------------------

    def handle_apply(self, sock: zmq.Socket, channel: str, msg: Message) -> None:
        received = time.time()
        started = time.time()
        notifier = self._notifier
        if notifier is not None:
            notifier.current = (msg.msg_id, started)
        out, err = _Capture(self.config.output_cap), _Capture(self.config.output_cap)
        content: dict[str, Any]
        result: Any = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                f, args, kwargs = unpack_apply(msg.buffers)
                self.busy = True
                try:
                    result = f(*args, **kwargs)
                finally:
                    self.busy = False
                content = {"status": "ok"}
            except Stopping as e:
                content = _error_content(e)
                content["status"] = "aborted"
            except BaseException as e:  # noqa: BLE001 - everything a task raises goes home
                content = _error_content(e)
        completed = time.time()
        if notifier is not None:
            notifier.current = None
        buffers: list[Any] = []
        raw: list[bool] = []
        if content["status"] == "ok":
            try:
                buffers, raw = serialize(result)
            except SerializationError as e:
                content = _error_content(e, skip_frames=False)
                content["evalue"] = f"the task's result cannot be sent back: {e}"
        metadata = {
            "engine": self.id, "engine_uuid": self.uuid, "status": content["status"],
            "received": received, "started": started, "completed": completed,
            "stdout": out.text(), "stderr": err.text(),
        }
        self.session.send(sock, "apply_reply", channel, content, parent=msg.header,
                          metadata=metadata, buffers=buffers, raw=raw, idents=msg.idents)


def _error_content(e: BaseException, skip_frames: bool = True) -> dict[str, Any]:
    tb = e.__traceback__
    if skip_frames and tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # drop the engine's own frame: show the user's code
    lines = traceback.format_exception(type(e), e, tb)
    return {"status": "error", "ename": type(e).__name__, "evalue": str(e),
            "traceback": "".join(lines)}


def _wait_for_connection_file(path: Path, controller_pid: int, timeout: float
                              ) -> ConnectionInfo:
    """Read the connection file; with a controller pid, wait until that controller wrote it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = ConnectionInfo.from_json(json.loads(path.read_text()))
            if not controller_pid or info.controller_pid == controller_pid:
                return info
        except (OSError, ValueError, KeyError, TypeError):
            if not controller_pid:
                raise RegistrationError(f"cannot read the connection file {path}") from None
        if controller_pid and not pid_alive(controller_pid):
            raise RegistrationError(f"controller pid {controller_pid} exited before it was ready")
        if time.monotonic() > deadline:
            raise RegistrationError(f"no connection file from controller pid {controller_pid} "
                                    f"at {path} within {timeout}s")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="python -m monq.engine", description="a monq engine")
    p.add_argument("--connection-file", required=True, type=Path)
    p.add_argument("--controller-pid", type=int, default=0,
                   help="wait for a connection file written by this controller")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s")
    try:
        info = _wait_for_connection_file(a.connection_file, a.controller_pid,
                                         EngineConfig().registration_timeout)
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
    try:
        engine.register()
        engine.run()
    except RegistrationError as e:
        log.error("%s", e)
        return 3
    except (KeyboardInterrupt, Stopping):
        pass
    finally:
        engine.close()
    return 0
