"""MonitoredQueue relays: the C loop that moves tasks and copies them to the Hub.

A :class:`Relay` is a thread that owns three sockets, created in that thread:
the client-facing ROUTER, the engine-facing DEALER (load-balanced ``task``
channel) or ROUTER (``direct`` channel, where the two routing identities are
swapped so a client addresses an engine by its uuid), and the monitor socket
that copies every message, prefixed with ``in.<name>`` or ``out.<name>``, to
the Hub.  The load-balanced loop is pyzmq's ``monitored_queue``, which runs
in C with the GIL released.  The direct (ROUTER->ROUTER) loop is monq's own
:func:`~monq.schedulers.routerqueue.router_router_queue`: the C loop swaps
identities without checking frame counts, so one stray single-frame message
would stall the channel and cost the next real message (see that module).
It drops and counts (in ``rejected``) messages too short to route.  It costs
more than the C loop: through the relay alone and an echo engine
(bench/direct_relay.py, 2 shared cores, medians of 5 alternating runs) a
round trip took 296 us with the C loop and 490 us with monq's (x1.66; 369
against 706 us on a busier machine).  Inside the controller it also needs the
GIL, which it shares with the Hub: on a loaded machine a direct round trip
then costs well over that difference (A/B runs of whole clusters, noisy:
1.3-3.1 ms with the C loop, 3.5-7.8 ms with monq's).  Moving this loop to C
(pyzmq's loop plus an RCVMORE check) would remove both costs; until then the
load-balanced path, where the volume is, keeps the C loop.

The monitor socket is an XPUB connected to the Hub's SUB over ``inproc://``
(same process, so a copy costs a reference count, not bytes).  An XPUB rather
than a PUB because an XPUB *tells* us when the Hub's subscription has arrived:
the relay waits for it before it forwards anything, so not even the first
message can be dropped for want of a subscriber.  Both ends use an unlimited
high-water mark: the copies queue in memory rather than being dropped.

Resource handling: the thread closes its sockets when the loop ends, which
happens when the shared Context is terminated (ETERM).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable

import zmq
from zmq.devices import monitored_queue

from monq.schedulers.routerqueue import router_router_queue

log = logging.getLogger(__name__)


class RelayError(RuntimeError):
    pass


class Relay(threading.Thread):
    """One monitored relay; ``ports`` is ``(client_port, engine_port)`` once started."""

    def __init__(self, ctx: zmq.Context, name: str, engine_side: int, ip: str,
                 monitor_url: str, ports: tuple[int, int] = (0, 0),
                 heartbeat: float = 0.0, rejected: Counter[str] | None = None,
                 socket_setup: Callable[[zmq.Socket], None] | None = None) -> None:
        """``rejected`` counts what the relay drops (the Hub's counter: only this
        thread writes its keys); ``socket_setup`` is applied to both bound
        sockets before they bind (CurveZMQ server options, see monq.security)."""
        super().__init__(name=f"relay-{name}", daemon=True)
        if engine_side not in (zmq.DEALER, zmq.ROUTER):
            raise ValueError("engine side must be DEALER or ROUTER")
        self.ctx = ctx
        self.channel = name
        self.engine_side = engine_side
        self.ip = ip
        self.monitor_url = monitor_url
        self.rejected: Counter[str] = rejected if rejected is not None else Counter()
        self.socket_setup = socket_setup
        self._ready: queue.Queue[tuple[int, int] | BaseException] = queue.Queue()
        #: ports to bind if free (a restarted controller keeps its predecessor's, so
        #: engines and clients reconnect by themselves); 0 or taken: a random one
        self.want = ports
        #: ZMTP heartbeat interval on the engine side (0: off): a frozen or cut-off
        #: engine's connection is closed after 3 silent intervals, so the DEALER stops
        #: handing it tasks
        self.heartbeat = heartbeat
        self.ports: tuple[int, int] = (0, 0)

    def start_and_wait(self, monitor: zmq.Socket, timeout: float = 10.0) -> tuple[int, int]:
        """Start the thread; return its ports once it relays (or raise).

        ``monitor`` is the Hub's SUB socket, owned by the calling thread: a
        bound inproc socket only takes in a new peer (and sends it its
        subscription) when its own thread touches it, so we touch it while we
        wait.
        """
        self.start()
        deadline = time.monotonic() + timeout
        while True:
            monitor.getsockopt(zmq.EVENTS)  # lets the SUB process the relay's connect
            try:
                got = self._ready.get(timeout=0.005)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RelayError(f"relay {self.channel} did not start within {timeout}s"
                                     ) from None
        if isinstance(got, BaseException):
            raise RelayError(f"relay {self.channel} failed to start: {got}") from got
        self.ports = got
        return got

    def run(self) -> None:
        sockets: list[zmq.Socket] = []
        try:
            front = self.ctx.socket(zmq.ROUTER)
            back = self.ctx.socket(self.engine_side)
            mon = self.ctx.socket(zmq.XPUB)
            sockets = [front, back, mon]
            for s in (front, back):
                s.linger = 0
                # never drop a task at the relay: queue instead of dropping
                s.sndhwm = 0
                s.rcvhwm = 0
                if self.socket_setup is not None:
                    self.socket_setup(s)
            mon.linger = 0
            mon.sndhwm = 0
            if self.heartbeat > 0:
                ms = max(1, int(self.heartbeat * 1000))
                back.heartbeat_ivl = ms
                back.heartbeat_timeout = 3 * ms
            addr = f"tcp://{self.ip}"
            ports = (bind_port(front, addr, self.want[0]), bind_port(back, addr, self.want[1]))
            mon.connect(self.monitor_url)
            # wait for the Hub's subscription: after this no copy can be dropped
            if not mon.poll(10_000):
                raise RelayError("the Hub never subscribed to the monitor")
            mon.recv()
        except BaseException as e:  # report to start_and_wait, then end the thread
            for s in sockets:
                s.close(linger=0)
            self._ready.put(e)
            return
        self._ready.put(ports)
        log.info("relay %s: clients on %d, engines on %d", self.channel, *ports)
        in_prefix, out_prefix = f"in.{self.channel}".encode(), f"out.{self.channel}".encode()
        try:
            if self.engine_side == zmq.ROUTER:
                router_router_queue(front, back, mon, in_prefix, out_prefix, self.rejected,
                                    f"{self.channel} relay: too few frames")
            else:
                monitored_queue(front, back, mon, in_prefix, out_prefix)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as e:
            log.error("relay %s stopped: %s", self.channel, e)
        finally:
            for s in sockets:
                s.close(linger=0)


def bind_port(sock: zmq.Socket, addr: str, port: int = 0) -> int:
    """Bind ``port`` if given and free, else a random port; return the port bound."""
    if port:
        try:
            sock.bind(f"{addr}:{port}")
            return port
        except zmq.ZMQError as e:
            log.warning("port %d is taken (%s): binding another; clients and engines of the "
                        "previous controller must be restarted", port, e)
    return sock.bind_to_random_port(addr)
