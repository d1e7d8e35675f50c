"""The direct relay's cost: pyzmq's C monitored_queue against monq's checked Python loop.

Both relay ROUTER->ROUTER (identities swapped) in a thread of this process and
copy every message to an inproc XPUB nobody reads, like the controller.  One
echo engine process (a DEALER whose identity is its name) answers; one DEALER
client, in a process of its own, sends 6 small frames addressed to it and waits for the echo.  Runs
alternate between the two loops (the machine is shared and noisy); the figure
is the median over runs of each run's median round trip.

``--curve`` measures the same with CurveZMQ on every tcp connection (the C
loop only), to price encryption: ``--curve both`` runs with and without,
alternating, in the same process.

Run: python bench/direct_relay.py [--n 3000] [--runs 5] [--curve no|yes|both]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time

import zmq
from zmq.devices import monitored_queue

from monq.schedulers.routerqueue import router_router_queue

ENGINE = b"engine-1"


def echo(port: int, keys: dict[str, bytes] | None) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.identity = ENGINE
    if keys:
        s.curve_serverkey = keys["server_public"]
        s.curve_publickey = keys["client_public"]
        s.curve_secretkey = keys["client_secret"]
    s.connect(f"tcp://127.0.0.1:{port}")
    while True:
        m = s.recv_multipart()
        if m[-1] == b"stop":
            break
        s.send_multipart(m)
    s.close(0)
    ctx.term()


def _run(loop: str, n: int, keys: dict[str, bytes] | None) -> float:
    """One run: a fresh relay, engine and client; the median round trip in seconds."""
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.ROUTER)
    for s in (front, back):
        if keys:
            s.curve_server = True
            s.curve_secretkey = keys["server_secret"]
    p1 = front.bind_to_random_port("tcp://127.0.0.1")
    p2 = back.bind_to_random_port("tcp://127.0.0.1")
    mon = ctx.socket(zmq.XPUB)
    mon.bind("inproc://mon")

    def relay() -> None:
        try:
            if loop == "c":
                monitored_queue(front, back, mon, b"in.direct", b"out.direct")
            else:
                router_router_queue(front, back, mon, b"in.direct", b"out.direct")
        except zmq.ZMQError:
            pass
        finally:
            for s in (front, back, mon):
                s.close(0)

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    engine = mp.Process(target=echo, args=(p2, keys))
    engine.start()
    results: mp.Queue[float] = mp.Queue()
    client = mp.Process(target=measure, args=(p1, n, keys, results))
    client.start()
    median = results.get(timeout=300)
    client.join(10)
    engine.join(10)
    ctx.term()
    t.join(5)
    return median


def measure(port: int, n: int, keys: dict[str, bytes] | None, results: mp.Queue[float]) -> None:
    """The client, in its own process as in a real cluster: send, wait for the echo."""
    ctx = zmq.Context()
    c = ctx.socket(zmq.DEALER)
    c.identity = b"client-1"
    if keys:
        c.curve_serverkey = keys["server_public"]
        c.curve_publickey = keys["client_public"]
        c.curve_secretkey = keys["client_secret"]
    c.connect(f"tcp://127.0.0.1:{port}")
    # the router learns the engine's identity when it connects: retry until it answers
    while True:
        c.send_multipart([ENGINE, b"hello"])
        if c.poll(100):
            c.recv_multipart()
            break
    while c.poll(50):
        c.recv_multipart()
    ts = []
    for i in range(n + 300):
        t0 = time.perf_counter()
        c.send_multipart([ENGINE] + [b"x"] * 6)
        assert c.poll(5000)
        c.recv_multipart()
        if i >= 300:
            ts.append(time.perf_counter() - t0)
    c.send_multipart([ENGINE, b"stop"])
    c.close(0)
    ctx.term()
    results.put(statistics.median(ts))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--curve", choices=["no", "yes", "both"], default="no")
    a = p.parse_args()
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    keys = {"server_public": server_public, "server_secret": server_secret,
            "client_public": client_public, "client_secret": client_secret}
    if a.curve == "both":
        configs = [("c", None), ("c", keys)]
    else:
        k = keys if a.curve == "yes" else None
        configs = [("c", k), ("py", k)]
    results: dict[str, list[float]] = {}
    for _ in range(a.runs):
        for loop, k in configs:
            name = f"{loop}{' curve' if k else ''}"
            results.setdefault(name, []).append(_run(loop, a.n, k))
    base = None
    for name, runs in results.items():
        med = statistics.median(runs) * 1e6
        base = base or med
        print(f"{name:10s} round trip median of {a.runs} run medians: {med:6.0f} us "
              f"(runs: {', '.join(f'{r * 1e6:.0f}' for r in runs)}); ratio {med / base:.2f}")


if __name__ == "__main__":
    main()
