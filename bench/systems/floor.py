"""The floor: bare pyzmq ``monitored_queue`` relay thread + Python echo engines.

The relay and the echo engine are bench/bare_relay.py's.  A DEALER client
sends a request shaped like a small task (6 frames) and waits for the echo;
the monitor copies go to an inproc PUB nobody reads.  There is no Hub, no
signing, no pickling: what is left is ZeroMQ plus one Python process per
engine, the least any relay-based cluster can cost.  ``pair_roundtrip`` goes
further down: a DEALER talking straight to an echo engine, no relay at all.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from importlib.metadata import version
from typing import Any

import zmq
from bare_relay import _relay, echo
from common import median_time, time_calls

from systems.base import System

SMALL = [b"x" * 64] * 6  # about the frame count of a no-op request


class Adapter(System):
    name = "floor"

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] | None = None
        self.engines: list[mp.process.BaseProcess] = []
        self.client: zmq.Socket[Any] | None = None

    def start(self, n: int) -> None:
        mpc = mp.get_context("spawn")  # a fresh interpreter, like an engine
        ctx = self.ctx = zmq.Context()
        # no high-water marks: a burst of 100,000 requests sent before any reply is read
        # would otherwise fill the client's pipe, and a ROUTER drops what it cannot queue
        ctx.sndhwm = ctx.rcvhwm = 0
        front, back, mon = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER), ctx.socket(zmq.PUB)
        p1 = front.bind_to_random_port("tcp://127.0.0.1")
        p2 = back.bind_to_random_port("tcp://127.0.0.1")
        mon.bind("inproc://floor-mon")
        threading.Thread(target=_relay, args=(front, back, mon), daemon=True).start()
        for _ in range(n):
            e = mpc.Process(target=echo, args=(p2,))
            e.start()
            self.engines.append(e)
        self.client = ctx.socket(zmq.DEALER)
        self.client.connect(f"tcp://127.0.0.1:{p1}")
        # ready = every engine has echoed once (the DEALER deals round-robin to connected peers)
        deadline = time.monotonic() + 60
        seen = 0
        while seen < 4 * n and time.monotonic() < deadline:
            self._echo(SMALL)
            seen += 1

    def _echo(self, frames: list[Any]) -> list[Any]:
        assert self.client is not None
        self.client.send_multipart(frames, copy=False)
        if not self.client.poll(30_000):
            raise TimeoutError("the echo engine did not answer in 30 s")
        return self.client.recv_multipart(copy=False)

    def stop(self) -> None:
        if self.client is not None:
            for _ in self.engines:
                self.client.send(b"stop")  # dealt round-robin: one per engine
        for e in self.engines:
            e.join(5)
            if e is not None and e.is_alive():
                e.kill()
                e.join(5)
        self.engines = []
        if self.ctx is not None:
            self.ctx.destroy(0)  # ends the relay thread (ETERM) and closes every socket
            self.ctx = self.client = None

    def versions(self) -> dict[str, str]:
        return {"pyzmq": version("pyzmq"), "libzmq": zmq.zmq_version()}

    def noop_latency(self, kind: str, n: int) -> list[float] | None:
        if kind != "lb":
            return None
        return time_calls(lambda: self._echo(SMALL), n)

    def throughput(self, n: int) -> dict[str, Any]:
        assert self.client is not None
        t0 = time.perf_counter()
        for _ in range(n):
            self.client.send_multipart(SMALL)
        for _ in range(n):
            if not self.client.poll(30_000):
                raise TimeoutError("echo burst stalled")
            self.client.recv_multipart()
        return {"seconds": time.perf_counter() - t0, "recorded": None}

    def roundtrip(self, nbytes: int, repeat: int) -> float:
        frames: list[Any] = [b"header", bytearray(nbytes)]
        self._echo(frames)
        return median_time(lambda: self._echo(frames), repeat)

    def pair_roundtrip(self, nbytes: int, repeat: int) -> float:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        e: mp.process.BaseProcess | None = None
        try:
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            e = mp.get_context("spawn").Process(target=echo, args=(port,))
            e.start()
            frames: list[Any] = [b"header", bytearray(nbytes)]

            def once() -> None:
                sock.send_multipart(frames, copy=False)
                if not sock.poll(30_000):
                    raise TimeoutError("the echo engine did not answer in 30 s")
                sock.recv_multipart(copy=False)

            once()
            t = median_time(once, repeat)
            sock.send(b"stop")
            e.join(5)
            return t
        finally:
            if e is not None and e.is_alive():
                e.kill()
            sock.close(0)
            ctx.term()
