"""The Client: connects to a running cluster, submits work, asks the Hub.

Resource handling: a Client owns a zmq Context, the I/O thread and its
sockets; :meth:`Client.close` (or leaving a ``with`` block) stops the thread,
fails every task still waiting with an error (nothing hangs) and terminates
the Context.  Safe to call twice.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import zmq

from monq import errors, security
from monq.client.executor import MonqExecutor
from monq.client.futures import _DONE
from monq.client.io import IOThread, Outbox, Queued, QueuedTask
from monq.client.results import AsyncResult, TaskFuture, _dt
from monq.client.view import DirectView, LoadBalancedView, View
from monq.connection import find_connection_file, load_connection_file, pid_alive
from monq.hub.filters import TIME_FILTERS, parse_duration
from monq.protocol import Message, Session
from monq.records import TaskRecord, to_epoch
from monq.serialize import deserialize, pack_call
from monq.shm import ClientShm

log = logging.getLogger(__name__)

_TIME_FIELDS = ("submitted", "started", "completed", "received")


class Client:
    """A connection to a monq cluster.

    ``Client()`` finds the default profile's running cluster; ``profile=``
    names another, ``connection_file=`` points at one directly.  Raises
    :class:`monq.NoClusterError` within ``timeout`` seconds when no cluster
    answers, and :class:`monq.AuthenticationError` when the key is wrong.
    """

    def __init__(self, profile: str = "default", connection_file: str | os.PathLike[str] |
                 None = None, home: str | os.PathLike[str] | None = None,
                 timeout: float = 5.0, query_timeout: float = 60.0) -> None:
        path = find_connection_file(profile, connection_file, Path(home) if home else None)
        self.info = load_connection_file(path)
        self.connection_file = path
        self.query_timeout = query_timeout
        self.session = Session(self.info.key)
        self._ctx = zmq.Context()
        self._ctx.linger = 0
        self._outbox = Outbox()
        self._lock = self._outbox.lock  # guards the bell, the outbox and the numbering
        self._tasks: dict[str, TaskFuture] = {}
        #: metadata shared by tasks alike (see _task_md)
        self._mds: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._queries: dict[str, Any] = {}
        self._engines: dict[int, str] = {}
        self._closed = False
        self._listeners: list[Callable[[str, int, str], None]] = []
        #: set by the I/O thread when the Hub announces an engine (wait_for_engines)
        self._engine_news = threading.Event()
        #: the session of the controller's Hub; another one means it restarted
        self._hub_session: str | None = None
        #: (session, seq) of the last notice from the Hub: a jump in its numbers means
        #: notices were missed (a task_lost among them would leave tasks pending)
        self._notice_seq: tuple[Any, int] = (None, 0)
        #: notices missed so far (tests read it)
        self.notice_gaps = 0
        #: large buffers through shared memory with engines on this host (monq.shm)
        self.shm = ClientShm(self.info.key, reach=self.info.ip)
        if self.info.curve:
            # peer-to-peer transfers are authenticated but not encrypted: with CurveZMQ on,
            # large buffers stay on the encrypted channels
            self.shm.bulk.config.enabled = False
        pipe_url = f"inproc://monq-client-{self.session.session_id}"
        self._io = IOThread(self._ctx, self.info, self.session, pipe_url, self._on_reply,
                            self._on_hub, self._on_notify, self._on_auth_error,
                            self._outbox, self._on_hub_lost, self._on_unsent,
                            self._awaiting, lambda: len(self._engines) or 1)
        self._io.start()
        self._io.ready.wait(10)
        if self._io.error is not None:
            self._ctx.term()
            raise errors.NoClusterError(f"cannot open sockets: {self._io.error}")
        self._pipe = self._ctx.socket(zmq.PUSH)
        self._pipe.linger = 0
        self._pipe.sndhwm = 0
        self._pipe.connect(pipe_url)
        try:
            reply = self._query("connect_request", {}, timeout=timeout, connecting=True)
        except (errors.TimeoutError, errors.NoClusterError):
            # no answer, or the request could not even leave (a refused connection)
            self.close()
            refusal = security.handshake_refusal(self.info)
            if refusal is not None:
                raise errors.AuthenticationError(refusal) from None
            raise errors.NoClusterError(
                f"no cluster answered at {self.info.url('hub')} within {timeout}s "
                f"(connection file {path})") from None
        except BaseException:
            self.close()
            raise
        self._set_engines(reply["engines"])
        self.shm.set_hosts(reply.get("hosts"))
        self._hub_session = reply.get("hub_session")

    # -- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        """Stop the I/O thread, fail what still waits, free the sockets."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # under the lock: no send can start after this
            with contextlib.suppress(zmq.ZMQError):
                self._outbox.ring(self._pipe)  # a caller receiving stops its turn
        self._io.stop()
        self._io.join(timeout=5)
        self._pipe.close(linger=0)
        if self._io.is_alive():
            # its sockets are still open, so terminating the Context would hang: leak it
            log.warning("the client's I/O thread did not stop within 5 s")
        else:
            self._ctx.term()
        err = errors.MonqError("the client was closed before the task finished")
        for fut in list(self._tasks.values()):
            if not fut.done():
                fut.set_exception(err)
        for fut in list(self._queries.values()):
            if not fut.done():
                fut.set_exception(err)
        self._tasks.clear()
        self._queries.clear()
        self.shm.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # -- sending ------------------------------------------------------------------

    def _send(self, channel: str, msg_type: str, content: dict[str, Any],
              metadata: dict[str, Any] | None = None, buffers: Sequence[Any] = (),
              raw: Sequence[bool] | None = None, idents: Sequence[bytes] = (),
              register: Callable[[dict[str, Any]], None] | None = None,
              sync: bool = False) -> dict[str, Any]:
        """Sign and send a request whose answer someone awaits.

        ``sync``: the caller waits for the answer next (and so receives it, see
        :meth:`_wait_for`); otherwise the I/O thread is woken to receive it.
        """
        got: list[Any] = []
        with self._lock:
            if self._closed:
                raise errors.MonqError("this client is closed")
            # numbering and sending under one lock: the channel's order is the send order
            hdr, frames = self.session.serialize(msg_type, channel, content,
                                                 metadata=metadata, buffers=buffers, raw=raw)
            if register is not None:
                register(hdr)  # before sending, so the reply always finds its future
            wake = self._emit(channel.encode(), [*idents, *frames], got) and not sync
        self._after_emit(wake, got)
        return hdr

    def _emit(self, channel: bytes, frames: Queued, got: list[Any]) -> bool:
        """Send now if nobody holds the sockets, else queue for the holder (the caller
        holds ``self._lock``).  True when sent while the I/O thread is passive.

        ``frames``: a signed message, or a task to be signed when sent (alone
        when sent now; queued, maybe in a batch with the tasks queued around it).
        """
        io = self._io
        if io.lock.acquire(blocking=False):
            try:
                if len(self._outbox):
                    # what was queued before goes first, this task maybe in its batch
                    items = self._outbox.take_locked()
                    items.append((channel, frames))
                    io.send_all(items, got)
                else:
                    io.send_item(channel, frames, got)
            finally:
                io.lock.release()
            return not io.active
        self._outbox.put(channel, frames, self._pipe)
        return False

    def _after_emit(self, wake: bool, got: list[Any]) -> None:
        if wake:
            self._io.wake()
        if got:
            self._io.dispatch(got)  # messages that could not be sent: fail their futures

    def _awaiting(self) -> bool:
        """Whether any reply is awaited (the I/O thread receives while one is)."""
        return bool(self._tasks or self._queries)

    # -- receiving in the caller's thread --------------------------------------------

    def _wait_for(self, fut: cf.Future[Any], timeout: float | None) -> bool:
        """Wait until ``fut`` is done or ``timeout`` passes; True if done.

        While nobody else holds the sockets, this thread receives (and
        dispatches) the replies itself: no other thread is woken.  Otherwise
        the holder (the I/O thread or another caller) resolves ``fut``, and this
        thread looks again every 0.1 s in case the holder leaves first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not fut.done():
            self._receive(fut, deadline)
            left = None if deadline is None else deadline - time.monotonic()
            if fut.done() or (left is not None and left <= 0):
                break
            with contextlib.suppress(cf.TimeoutError, cf.CancelledError):
                fut.exception(0.1 if left is None else min(0.1, left))
        return fut.done()

    def _receive(self, fut: cf.Future[Any], deadline: float | None) -> None:
        """Receive in this thread until ``fut`` is done, the deadline, or the sockets
        are taken by another thread; then wake the I/O thread if replies are still
        awaited."""
        io = self._io
        if io.active:
            # replies are awaited that no caller receives (a burst of apply_async, futures
            # in asyncio): the I/O thread receives them all, and this caller's too
            return
        try:
            while not fut.done() and not self._closed:
                ms = 500  # look at fut and the client's state at least this often
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    ms = min(ms, int(left * 1000) + 1)
                if not io.lock.acquire(blocking=False):
                    return
                got: list[Any] = []
                try:
                    io.turn(None, ms, got)
                finally:
                    got += io.release()
                io.dispatch(got)
        finally:
            io.activate_if_needed()

    def _send_apply(self, channel: str, f: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any], engine: int | None = None,
                    label: str | None = None, retries: int = 0,
                    timeout: float | None = None, sync: bool = False) -> TaskFuture:
        """Submit one task; its future."""
        fut: TaskFuture = self._submit_task(channel, f, args, kwargs, engine, label, retries,
                                            timeout, sync, False, None)
        return fut

    def _submit_task(self, channel: str, f: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any], engine: int | None, label: str | None,
                     retries: int, timeout: float | None, sync: bool, wrap: bool,
                     waiter: Callable[[cf.Future[Any], float | None], bool] | None) -> Any:
        """Pack, number, register and send (or queue) one task: its TaskFuture, or with
        ``wrap`` its AsyncResult.

        A burst of ``apply_async`` passes here once per task, so it makes as few
        objects as it can that live until the reply: the frames and raw flags of a
        call without arguments are shared (see monq.serialize.pack_call), and so
        is the metadata of tasks alike (see _task_md); what stays per task is the
        header, the queued task and the two futures.
        """
        buffers, raw, name = pack_call(f, args, kwargs)
        idents: Sequence[bytes] = ()
        if channel == "direct":
            assert engine is not None
            idents = [self._engine_uuid(engine).encode()]
        segs = None
        if True in raw:  # large buffers may go through shared memory or be served
            md = _new_md(name, label, timeout, retries)
            buffers, raw, segs = self.shm.offload(list(buffers), list(raw), md, engine)
        else:
            md = self._task_md(name, label, timeout, retries, engine)
        fut: TaskFuture | None = None
        try:
            got: list[Any] = []
            with self._lock:
                if self._closed:
                    raise errors.MonqError("this client is closed")
                hdr = self.session.header("apply_request", channel)
                queued = QueuedTask(hdr, md, buffers, raw, idents)
                # arguments in shared memory: signed now and sent alone, never batched
                # (a batch carries only the host spec, for results sent that way)
                task: Queued = queued if segs is None else queued.frames(self.session)
                msg_id = hdr["msg_id"]
                fut = TaskFuture(msg_id, hdr["date"], channel, engine)
                if segs:
                    # its segments are freed before its AsyncResult is settled (a caller
                    # woken by the result finds them freed): tracked first
                    self.shm.track(fut, segs)
                # watched before it is registered: its reply cannot come first
                out = AsyncResult._of(fut, waiter) if wrap else fut
                if channel == "task":
                    fut.request = queued
                    if retries:
                        fut.retries_left = int(retries)
                # registered before sending, so the reply always finds its future
                self._tasks[msg_id] = fut
                wake = self._emit(channel.encode(), task, got) and not sync
            if wake or got:
                self._after_emit(wake, got)
        except BaseException:
            if fut is None:
                self.shm.drop(segs)
            raise
        return out

    def _task_md(self, name: str, label: str | None, timeout: float | None, retries: int,
                 engine: int | None) -> dict[str, Any]:
        """The metadata of a task without raw buffers: one dict shared by every task of
        the same function, label, timeout, retries and shared-memory spec (nobody
        changes a task's metadata once made: a resend makes its own)."""
        tag = self.shm.tag(engine)
        key = (name, None if label is None else str(label),
               None if timeout is None else float(timeout), int(retries),
               None if tag is None else tag[0])
        md = self._mds.get(key)
        if md is None or (tag is not None and md[tag[0]] is not tag[1]):
            md = _new_md(name, label, timeout, retries)
            if tag is not None:
                md[tag[0]] = tag[1]
            if len(self._mds) >= 256:
                self._mds.clear()
            self._mds[key] = md
        return md

    def _resend(self, fut: TaskFuture, why: str) -> bool:
        """Send a load-balanced task again, under the same msg_id; False if it cannot be."""
        if fut.request is None or fut.done():
            return False
        q = fut.request
        md = {**q.metadata, "retries_done": int(q.metadata.get("retries_done", 0)) + 1}
        got: list[Any] = []
        with self._lock:
            if self._closed:
                return False
            hdr = self.session.header("apply_request", "task", msg_id=fut.msg_id)
            fut.request = q = QueuedTask(hdr, md, q.buffers, q.raw, q.idents)
            frames = q.frames(self.session)
            self._tasks[fut.msg_id] = fut
            fut.metadata["status"] = "pending"
            fut.metadata["retries"] = md["retries_done"]
            wake = self._emit(b"task", frames, got)
        self._after_emit(wake, got)
        log.info("task %s sent again: %s", fut.msg_id, why)
        return True

    def _engine_uuid(self, engine: int) -> str:
        uuid = self._engines.get(engine)
        if uuid is None:
            self._refresh_engines()
            uuid = self._engines.get(engine)
        if uuid is None:
            raise errors.MonqError(f"no engine {engine} (engines: {sorted(self._engines)})")
        return uuid

    # -- receiving (in the I/O thread) -----------------------------------------------

    def _on_reply(self, msg: Message) -> None:
        fut = self._tasks.pop(str(msg.parent.get("msg_id", "")), None)
        if fut is None or fut._state in _DONE:
            self.shm.discard_reply(msg)
            return
        try:
            buffers = self.shm.on_reply(msg)  # shared-memory buffers mapped in place
        except errors.SerializationError as e:
            fut.set_exception(e)
            return
        md = msg.metadata
        status = msg.content.get("status", "error")
        if status == "ok":  # the usual case, with as few calls as can be
            fut.request = None
            try:
                value = deserialize(buffers)
            except errors.SerializationError as e:
                fut.replied(md, status)
                fut.set_exception(e)
                return
            fut.settle(value, md)
            return
        fut.replied(md, status)
        if status == "timeout" and fut.retries_left > 0:
            fut.retries_left -= 1
            if self._resend(fut, "it overran its timeout"):
                return
        fut.request = None
        self._resolve(fut, msg.content, buffers, md.get("engine"))

    def _resolve(self, fut: TaskFuture, content: dict[str, Any], buffers: Sequence[Any],
                 engine: int | None) -> None:
        if content.get("status") == "ok":
            try:
                fut.set_result(deserialize(buffers))
            except errors.SerializationError as e:
                fut.set_exception(e)
        elif content.get("status") == "timeout":
            fut.set_exception(errors.TaskTimeout(
                f"task {fut.msg_id} {content.get('evalue') or 'overran its timeout'}",
                engine if isinstance(engine, int) else None, fut.msg_id,
                str(content.get("traceback") or "")))
        else:
            fut.set_exception(_remote_error(content, engine, fut.msg_id))

    def _on_hub(self, msg: Message) -> None:
        fut = self._queries.pop(str(msg.parent.get("msg_id", "")), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _on_notify(self, msg: Message) -> None:
        c = msg.content
        h = msg.header
        session, seq = h.get("session"), h.get("seq")
        if isinstance(seq, int):
            last_session, last = self._notice_seq
            self._notice_seq = (session, seq)
            if session == last_session and seq > last + 1:
                self._missed_notices(seq - last - 1)
        if msg.msg_type == "engine_registered":
            self._engines[int(c["id"])] = str(c["uuid"])
            self.shm.engine_added(int(c["id"]), str(c.get("host", "")))
            self._engine_news.set()
            self._tell("registered", int(c["id"]), "")
        elif msg.msg_type == "engine_unregistered":
            self._engines.pop(int(c["id"]), None)
            self.shm.engine_removed(int(c["id"]))
            self._tell("unregistered", int(c["id"]), str(c.get("reason", "")))
        elif msg.msg_type == "task_lost":
            self._on_lost(c)
        elif msg.msg_type == "hub_beat":
            hub = c.get("hub")
            if isinstance(hub, str) and self._hub_session is not None and \
                    hub != self._hub_session:
                self._hub_session = hub
                log.warning("the controller restarted: reconciling this client's tasks")
                threading.Thread(target=self._reconcile, name="monq-reconcile",
                                 daemon=True).start()

    def on_engines(self, callback: Callable[[str, int, str], None]) -> None:
        """Call ``callback(event, engine_id, reason)`` when an engine comes or goes.

        ``event`` is ``"registered"`` or ``"unregistered"``; ``reason`` says why
        an engine went (``stopped``, ``missed heartbeats``, ``its process exited
        ...``).  Callbacks run in the client's I/O thread: keep them short.
        """
        self._listeners.append(callback)

    def _tell(self, event: str, engine: int, reason: str) -> None:
        for cb in list(self._listeners):
            try:
                cb(event, engine, reason)
            except Exception:
                log.exception("an engine listener failed")

    #: after a controller restart, how many times (and how often, seconds) the tasks
    #: the new Hub still holds as unfinished are looked at again (see _reconcile)
    RECONCILE_LOOKS = 8
    RECONCILE_EVERY = 1.0

    def _reconcile(self, restarted: bool = True) -> None:
        """Settle every task still waiting here from what the Hub knows of it.

        After a controller restart (``restarted``): the new Hub knows what the
        old one recorded.  A task it has finished is fetched from the history;
        one it holds as unfinished will be answered or reported lost; one it
        never heard of was lost with the old controller before being recorded,
        and is treated as never started.

        An answer sent while this client was not yet connected to the new
        controller's relay is dropped there (a ROUTER drops what it cannot
        route) although the Hub records it, so the tasks it still held as
        unfinished are looked at again a few times, a second apart: one
        finished meanwhile whose answer did not come is fetched from the
        history.  A batch's answer carries many tasks: this matters more with
        batching.

        After missed notices (not ``restarted``): one look.  A task the Hub
        recorded lost is handled as its ``task_lost`` notice would have been
        (sent again if it never started); one it does not know yet is still on
        its way to it.  A task whose notice does come meanwhile is left to it:
        only a future still on the try that was looked up is settled here.
        """
        ids: list[str] = []
        for look in range(self.RECONCILE_LOOKS if restarted else 1):
            if look:
                time.sleep(self.RECONCILE_EVERY)
                ids = [m for m in ids if (f := self._tasks.get(m)) is not None and
                       not f.done()]
            try:
                if not look:
                    if restarted:
                        self._refresh_engines()
                    ids = [m for m, f in list(self._tasks.items()) if not f.done()]
                if not ids or self._closed:
                    return
                tries = {m: f.request for m in ids if (f := self._tasks.get(m)) is not None}
                known = self._query("tasks_status_request", {"msg_ids": ids})["statuses"]
            except errors.MonqError as e:
                log.warning("could not look up this client's tasks at the controller: %s", e)
                return
            unknown = []
            settled = False
            for msg_id in ids:
                status = known.get(msg_id)
                if status is None:
                    unknown.append(msg_id)
                elif status not in ("pending", "running"):
                    with self._lock:
                        fut = self._tasks.get(msg_id)
                        if fut is None or fut.done() or fut.request is not tries.get(msg_id):
                            continue  # settled meanwhile, or sent again
                        del self._tasks[msg_id]
                    try:
                        self._fetch_result(fut, lost=None if restarted else self._lost)
                    except errors.MonqError as e:
                        fut.set_exception(e)
                    if not fut.done():
                        # sent again (it is registered anew), or not finished after all:
                        # its answer or notice must still find it
                        self._tasks.setdefault(msg_id, fut)
                    settled = True
            if settled:
                self._ring()  # a caller receiving notices its future settled
            if unknown and not look and restarted:
                self._on_lost({"msg_ids": unknown, "started": False, "status": "lost",
                               "reason": "the controller restarted before recording it"})
            ids = [m for m in ids if known.get(m) in ("pending", "running")]

    def _on_lost(self, c: dict[str, Any]) -> None:
        """The Hub says tasks will not be answered: send them again, or fail them."""
        failed = False
        for msg_id in c.get("msg_ids", []):
            fut = self._tasks.pop(msg_id, None)
            if fut is not None and not fut.done():
                failed |= not self._lost(fut, c)
        if failed:
            self._ring()

    def _lost(self, fut: TaskFuture, c: dict[str, Any]) -> bool:
        """Send a lost task again, or fail it; True when sent again.

        A load-balanced task that never started is always sent again (it has had
        no effect yet); one that started, or overran its timeout, only while its
        view's ``retries`` last.  Direct tasks belong to their engine: they fail.
        """
        reason = str(c.get("reason") or "engine died")
        status = str(c.get("status", "lost"))
        if fut.request is not None:
            if not c.get("started", True):
                if self._resend(fut, reason):
                    return True
            elif fut.retries_left > 0:
                fut.retries_left -= 1
                if self._resend(fut, reason):
                    return True
        fut.request = None
        fut.metadata["status"] = status
        if status == "timeout":
            fut.set_exception(errors.TaskTimeout(f"task {fut.msg_id}: {reason}",
                                                 c.get("engine"), fut.msg_id))
        else:
            fut.set_exception(errors.EngineDied(f"task {fut.msg_id} was lost: {reason}",
                                                c.get("engine")))
        return False

    def _missed_notices(self, n: int) -> None:
        """``n`` notices from the Hub never came (dropped on the way, or sent while
        this client reconnected): settle from the history the tasks they may have
        been about (see _reconcile)."""
        self.notice_gaps += n
        log.warning("%d notice(s) from the controller were missed: looking up this "
                    "client's unfinished tasks", n)
        if self._tasks and not self._closed:
            threading.Thread(target=self._reconcile, kwargs={"restarted": False},
                             name="monq-reconcile", daemon=True).start()

    def _on_hub_lost(self, silent: float) -> None:
        """The controller has been silent too long: fail everything that waits on it."""
        with self._lock:
            waiting = [f for f in [*self._tasks.values(), *self._queries.values()]
                       if not f.done()]
            self._tasks.clear()
            self._queries.clear()
        if not waiting:
            return
        self._ring()
        err = errors.NoClusterError(
            f"lost contact with the controller ({self.info.url('hub')}): no heartbeat for "
            f"{silent:.0f}s; {len(waiting)} task(s) or queries failed")
        for f in waiting:
            if isinstance(f, TaskFuture):
                f.metadata["status"] = "lost"
            f.set_exception(err)

    def _ring(self) -> None:
        """Wake whoever holds the sockets (a caller receiving notices its future failed)."""
        with self._lock, contextlib.suppress(zmq.ZMQError):
            if not self._closed:
                self._outbox.ring(self._pipe)

    def _on_unsent(self, msg_id: str, why: str | None = None) -> None:
        """A message that could not be sent: fail whoever waits for its answer.

        ``why``: it could not be signed (else the connection was refused or dropped).
        """
        fut = self._tasks.pop(msg_id, None) or self._queries.pop(msg_id, None)
        if fut is None or fut.done():
            return
        if why is not None:
            fut.set_exception(errors.SerializationError(
                f"message {msg_id} could not be signed and was not sent: {why}"))
        else:
            fut.set_exception(errors.NoClusterError(
                f"message {msg_id} could not be sent: the controller refused or dropped "
                "this client's connection"))

    def _on_auth_error(self, parent_msg_id: str) -> None:
        fut = self._queries.pop(parent_msg_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(errors.AuthenticationError(
                "the controller refused this client's signature: the cluster key in "
                f"{self.connection_file} is not the running cluster's"))

    # -- queries ------------------------------------------------------------------------

    def _query(self, msg_type: str, content: dict[str, Any], timeout: float | None = None,
               connecting: bool = False) -> dict[str, Any]:
        """Ask the Hub; the content of its answer."""
        return self._query_msg(msg_type, content, timeout).content

    def _query_msg(self, msg_type: str, content: dict[str, Any], timeout: float | None = None
                   ) -> Message:
        """Ask the Hub; its answer, or HubError / monq.TimeoutError."""
        holder: list[cf.Future[Message]] = []

        def register(hdr: dict[str, Any]) -> None:
            fut: cf.Future[Message] = cf.Future()
            self._queries[hdr["msg_id"]] = fut
            holder.append(fut)

        hdr = self._send("hub", msg_type, content, register=register, sync=True)
        timeout = self.query_timeout if timeout is None else timeout
        try:
            self._wait_for(holder[0], timeout)
            msg = holder[0].result(0)
        except cf.TimeoutError:
            self._queries.pop(hdr["msg_id"], None)
            raise errors.TimeoutError(
                f"the Hub did not answer {msg_type} within {timeout}s") from None
        if msg.content.get("status") != "ok":
            raise errors.HubError(f"{msg.content.get('ename', 'error')}: "
                                  f"{msg.content.get('evalue', '')}")
        return msg

    def _set_engines(self, engines: dict[str, str]) -> None:
        self._engines = {int(k): v for k, v in engines.items()}

    def _refresh_engines(self) -> None:
        reply = self._query("engines_request", {})
        self._set_engines(reply["engines"])
        self.shm.set_hosts(reply.get("hosts"))

    # -- engines and views ------------------------------------------------------------------

    @property
    def ids(self) -> list[int]:
        """The ids of the engines registered now, sorted."""
        self._refresh_engines()
        return sorted(self._engines)

    def wait_for_engines(self, n: int, timeout: float = 30.0) -> list[int]:
        """Wait until at least ``n`` engines are registered; return their ids."""
        deadline = time.monotonic() + timeout
        while True:
            self._engine_news.clear()
            ids = self.ids
            if len(ids) >= n:
                return ids
            left = deadline - time.monotonic()
            if left < 0:
                raise errors.TimeoutError(
                    f"{len(ids)} of {n} engines registered after {timeout}s")
            # woken by the Hub's announcement of a registration; asking again every 0.25 s
            # covers one announced before this client's subscription was in place
            self._engine_news.wait(min(0.25, left))

    def load_balanced_view(self, block: bool = False, label: str | None = None,
                           retries: int = 0, timeout: float | None = None
                           ) -> LoadBalancedView:
        """A view whose tasks go to whichever engine is free next.

        ``retries``: how many more times a task runs when its engine dies under it
        or it overruns ``timeout`` (seconds; None: no limit).  A task whose engine
        died before it started is always sent again, retries or not.
        """
        return LoadBalancedView(self, block=block, label=label, retries=retries,
                                timeout=timeout)

    def direct_view(self, targets: int | list[int] | None = None, block: bool = False,
                    label: str | None = None, timeout: float | None = None) -> DirectView:
        """A view on chosen engines (all of them when ``targets`` is None)."""
        return DirectView(self, self.ids if targets is None else targets, block, label,
                          timeout=timeout)

    def executor(self, targets: int | list[int] | None = None) -> MonqExecutor:
        """A concurrent.futures.Executor: load-balanced, or on ``targets``."""
        view: View = (self.load_balanced_view() if targets is None
                      else DirectView(self, targets))
        return MonqExecutor(view)

    def __getitem__(self, key: int | slice | list[int]) -> DirectView:
        ids = self.ids
        if isinstance(key, int):
            if key not in ids:
                raise IndexError(f"no engine {key} (engines: {ids})")
            return DirectView(self, key)
        if isinstance(key, slice):
            return DirectView(self, ids[key])
        missing = [k for k in key if k not in ids]
        if missing:
            raise IndexError(f"no engine(s) {missing} (engines: {ids})")
        return DirectView(self, list(key))

    # -- the Hub's history ----------------------------------------------------------------

    def history(self, status: str | Sequence[str] | None = None,
                engine: int | Sequence[int] | None = None, client: str | None = None,
                since: Any = None, until: Any = None, limit: int | None = None,
                order: str = "-submitted", *, cursor: str | None = None,
                **filters: Any) -> HistoryPage:
        """Tasks recorded by the Hub, filtered and sorted in the database, then limited.

        Filters (all must match): ``status``, ``engine``, ``client``,
        ``label`` (one value or a list), ``msg_id`` (a prefix), ``since`` /
        ``until`` (submission), ``started_since`` / ``started_until``,
        ``completed_since`` / ``completed_until``, ``min_duration`` /
        ``max_duration`` (seconds, a timedelta or "2s"), ``search`` (words in
        stdout, stderr or the traceback).  Times take datetimes, epoch
        seconds, ISO strings or phrases like ``"10 minutes ago"``.

        Returns a list of :class:`TaskRecord` whose ``next_cursor`` is None
        on the last page, else a string: pass it as ``cursor=`` (same
        filters and order) for the next ``limit`` rows.
        """
        content = _filter_content(dict(status=status, engine=engine, client=client,
                                       since=since, until=until, **filters))
        content["order"] = order
        if limit is not None:
            content["limit"] = limit
        if cursor is not None:
            content["cursor"] = cursor
        reply = self._query("history_request", content)
        return HistoryPage([TaskRecord.from_row(r) for r in reply["records"]],
                           reply.get("next_cursor"))

    def iter_history(self, order: str = "-submitted", page_size: int = 1000,
                     **filters: Any) -> Iterator[TaskRecord]:
        """Every matching record, fetched from the Hub ``page_size`` at a time."""
        cursor: str | None = None
        while True:
            page = self.history(limit=page_size, order=order, cursor=cursor, **filters)
            yield from page
            cursor = page.next_cursor
            if cursor is None:
                return

    def export(self, file: str | os.PathLike[str] | IO[str], format: str = "csv",
               order: str = "-submitted", **filters: Any) -> int:
        """Write the matching records to a path or text file as CSV or JSON Lines.

        Rows are streamed a page at a time (a million rows never sit in
        memory); returns how many were written.
        """
        from monq.export import write_records

        rows = self.iter_history(order=order, **filters)
        if isinstance(file, (str, os.PathLike)):
            with open(file, "w", newline="", encoding="utf-8") as f:
                return write_records(rows, f, format)
        return write_records(rows, file, format)

    def count(self, **filters: Any) -> int:
        """How many recorded tasks match (history's filters), counted by the database."""
        return int(self._query("stats_request", {"what": "count",
                                                 **_filter_content(filters)})["count"])

    def task_stats(self, by: str = "status", **filters: Any) -> dict[Any, int]:
        """Counts of the matching tasks by ``status``, ``engine``, ``label``, ``client``,
        ``queue``, ``minute`` or ``hour`` (the bucket's start as a UTC datetime)."""
        groups = self._query("stats_request", {"what": "groups", "by": by,
                                               **_filter_content(filters)})["groups"]
        if by in ("minute", "hour"):
            return {_dt(k): n for k, n in groups}
        return {k: n for k, n in groups}

    def duration_percentiles(self, by: str | None = None,
                             percentiles: Sequence[float] = (50, 90, 99),
                             **filters: Any) -> Any:
        """Duration (completed - started, seconds) percentiles of the matching tasks.

        ``{"n": ..., "min": ..., "max": ..., "p50": ..., "p90":
        ..., "p99": ...}``; with ``by="engine"`` or ``by="label"``, one such
        dict per engine or label.
        """
        groups = self._query("stats_request", {
            "what": "percentiles", "by": by, "percentiles": list(percentiles),
            **_filter_content(filters)})["groups"]
        if by is None:
            if not groups:
                return {"n": 0}
            return {k: v for k, v in groups[0].items() if k != "key"}
        return {g["key"]: {k: v for k, v in g.items() if k != "key"} for g in groups}

    def task_record(self, msg_id: str) -> TaskRecord:
        """The full record of one task, by msg_id or a unique prefix of it."""
        return TaskRecord.from_row(self._query("task_request", {"msg_id": msg_id})["record"])

    def db_query(self, query: dict[str, Any], keys: Sequence[str] | None = None
                 ) -> list[dict[str, Any]]:
        """ipyparallel-style query: ``{"engine": 0, "completed": {"$gt": t}}``.

        Operators: $lt $gt $lte $gte $eq $ne $in $nin $glob.  Times may be
        given as datetimes; time fields come back as UTC datetimes.
        """
        content = {"query": _epochs(query), "keys": list(keys) if keys is not None else None}
        rows = self._query("db_request", content)["records"]
        for r in rows:
            for k in _TIME_FIELDS:
                if r.get(k) is not None:
                    r[k] = datetime.fromtimestamp(r[k], timezone.utc)
        return rows  # type: ignore[no-any-return]

    def hub_history(self) -> list[str]:
        """Every msg_id the Hub has recorded, in submission order."""
        return list(self._query("hub_history_request", {})["msg_ids"])

    def get_result(self, msg_id: str, timeout: float | None = None) -> AsyncResult:
        """The result of any recorded task, from the Hub (this client's or another's).

        If the task is still running, the AsyncResult resolves when it ends.
        """
        local = self._tasks.get(msg_id)
        if local is not None:
            return AsyncResult([local], waiter=self._wait_for)
        fut = TaskFuture(msg_id, 0.0, "")
        self._fetch_result(fut)
        if not fut.done():
            threading.Thread(target=self._poll_result, args=(fut,), daemon=True,
                             name=f"monq-result-{msg_id[-8:]}").start()
        return AsyncResult([fut])

    def _fetch_result(self, fut: TaskFuture,
                      lost: Callable[[TaskFuture, dict[str, Any]], Any] | None = None) -> None:
        """Settle ``fut`` from its record in the history (if it is finished there).

        ``lost``: what to do with a task recorded lost or timed out while it may be
        sent again (``Client._lost``, given the notice the record stands for).
        """
        reply = self._query_msg("result_request", {"msg_id": fut.msg_id})
        content = reply.content
        rec = content["record"]
        status = rec.get("status")
        if lost is not None and content.get("done") and fut.request is not None and \
                status in ("lost", "timeout"):
            lost(fut, {"status": status, "reason": rec.get("evalue"),
                       "engine": rec.get("engine"), "started": rec.get("started") is not None})
            return
        for k in ("engine", "status", "stdout", "stderr", "queue"):
            fut.metadata[k] = rec.get(k)
        for k in _TIME_FIELDS:
            fut.metadata[k] = _dt(rec.get(k))
        if not content.get("done"):
            return
        if status == "ok":
            if not content.get("has_result"):
                why = ("evicted by the history's retention or a purge at "
                       f"{_dt(rec['payload_evicted'])}" if rec.get("payload_evicted")
                       else "above the Hub's payload cap")
                fut.set_exception(errors.HubError(
                    f"the result of {fut.msg_id} was not kept ({rec.get('result_bytes')} "
                    f"bytes: {why})"))
                return
            try:
                fut.set_result(deserialize(reply.buffers))
            except errors.SerializationError as e:
                fut.set_exception(e)
        elif status == "lost":
            fut.set_exception(errors.EngineDied(rec.get("evalue") or "engine died",
                                                rec.get("engine")))
        elif status == "timeout":
            fut.set_exception(errors.TaskTimeout(f"task {fut.msg_id}: {rec.get('evalue')}",
                                                 rec.get("engine"), fut.msg_id,
                                                 rec.get("traceback") or ""))
        else:
            fut.set_exception(_remote_error(rec, rec.get("engine"), fut.msg_id))

    def _poll_result(self, fut: TaskFuture) -> None:
        while not fut.done() and not self._closed:
            time.sleep(0.1)
            try:
                self._fetch_result(fut)
            except errors.MonqError as e:
                if not fut.done():
                    fut.set_exception(e)

    def queue_status(self) -> dict[Any, Any]:
        """Per engine: ``queue`` (tasks waiting there: addressed to it, or load-balanced
        ones it has read), ``tasks`` (running), ``completed``; and ``unassigned``:
        load-balanced tasks no engine has read yet."""
        q = self._query("queue_request", {})["queue"]
        return {(int(k) if k.isdigit() else k): v for k, v in q.items()}

    def cluster_status(self) -> dict[str, Any]:
        """Engines, task counts by status, queues and rejected-message counts."""
        st = self._query("status_request", {})
        st["queue"] = {(int(k) if k.isdigit() else k): v for k, v in st["queue"].items()}
        return st

    def purge_results(self, msg_ids: Sequence[str] | None = None,
                      engine: int | Sequence[int] | None = None,
                      status: str | Sequence[str] | None = None,
                      before: Any = None, everything: bool = False, *,
                      payloads_only: bool = False, **filters: Any) -> int:
        """Delete finished tasks from the history; returns how many were deleted.

        Takes history's filters (``label=``, ``since=``, ``search=`` ...),
        ``msg_ids`` and ``before`` (completed before).  Pending and running
        tasks are never deleted.  ``payloads_only`` keeps the records and
        drops their stored request and result.
        """
        content = _filter_content(dict(engine=engine, status=status, **filters))
        if msg_ids is not None:
            content["msg_ids"] = [msg_ids] if isinstance(msg_ids, str) else list(msg_ids)
        if before is not None:
            content["before"] = to_epoch(before)
        if everything:
            content["everything"] = True
        if payloads_only:
            content["payloads_only"] = True
        return int(self._query("purge_request", content)["purged"])

    def shutdown(self, wait: float = 10.0) -> None:
        """Stop the whole cluster (engines, then the controller) and close this client.

        Waits up to ``wait`` seconds for a local controller to exit.
        """
        self._query("shutdown_request", {})
        pid = self.info.controller_pid
        self.close()
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __repr__(self) -> str:
        return f"<monq.Client {self.connection_file} engines={sorted(self._engines)}>"


def _remote_error(content: dict[str, Any], engine: Any, msg_id: str) -> errors.MonqError:
    return errors.RemoteError(str(content.get("ename") or "Error"),
                              str(content.get("evalue") or ""),
                              str(content.get("traceback") or ""),
                              engine if isinstance(engine, int) else None, msg_id)


class HistoryPage(list):  # type: ignore[type-arg]
    """A page of :meth:`Client.history`: a list of TaskRecords, and where the next starts."""

    def __init__(self, records: Iterable[TaskRecord], next_cursor: str | None = None) -> None:
        super().__init__(records)
        #: pass as ``cursor=`` for the next page; None on the last page
        self.next_cursor = next_cursor


def _filter_content(filters: dict[str, Any]) -> dict[str, Any]:
    """History filters as the Hub takes them: times in epoch seconds, lists for several."""
    out: dict[str, Any] = {}
    for k, v in filters.items():
        if v is None:
            continue
        if k in TIME_FILTERS:
            out[k] = to_epoch(v)
        elif k in ("min_duration", "max_duration"):
            out[k] = v.total_seconds() if isinstance(v, timedelta) else (
                parse_duration(v) if isinstance(v, str) else v)
        elif isinstance(v, (tuple, set, frozenset)):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def _epochs(query: dict[str, Any]) -> dict[str, Any]:
    """Turn datetimes in a db_query into epoch seconds, as the Hub stores them."""

    def conv(v: Any) -> Any:
        if isinstance(v, datetime):
            return to_epoch(v)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in query.items()}


def _new_md(name: str, label: str | None, timeout: float | None, retries: int
            ) -> dict[str, Any]:
    """A task's own metadata: its function's name, and its label, timeout and retries
    when given."""
    md: dict[str, Any] = {"func": name}
    if label is not None:
        md["label"] = str(label)
    if timeout is not None:
        md["timeout"] = float(timeout)
    if retries:
        md["retries"] = int(retries)
    return md


__all__ = ["Client", "HistoryPage"]
