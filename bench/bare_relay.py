"""The floor: a bare pyzmq monitored_queue relay thread and a Python echo engine.

One DEALER client sends 6 small frames through ROUTER->DEALER and waits for the
echo; the monitor copies go to an inproc PUB nobody reads.  monq's own round
trip (bench/monq_basics.py) is compared against this in the same run.

Run: python bench/bare_relay.py [--n 3000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time

import zmq
from zmq.devices import monitored_queue


def echo(port: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    while True:
        m = s.recv_multipart(copy=False)  # zero-copy, as a floor for array round trips must be
        if len(m[-1]) == 4 and m[-1].bytes == b"stop":
            break
        s.send_multipart(m, copy=False)
    s.close(0)
    ctx.term()


def _relay(front: zmq.Socket, back: zmq.Socket, mon: zmq.Socket) -> None:
    try:
        monitored_queue(front, back, mon, b"in", b"out")
    except zmq.ZMQError:
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=3000)
    a = p.parse_args()
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    p1 = front.bind_to_random_port("tcp://127.0.0.1")
    back = ctx.socket(zmq.DEALER)
    p2 = back.bind_to_random_port("tcp://127.0.0.1")
    mon = ctx.socket(zmq.PUB)
    mon.bind("inproc://mon")
    threading.Thread(target=_relay, args=(front, back, mon), daemon=True).start()
    engine = mp.Process(target=echo, args=(p2,))
    engine.start()
    c = ctx.socket(zmq.DEALER)
    c.connect(f"tcp://127.0.0.1:{p1}")
    ts = []
    for i in range(a.n + 300):
        t0 = time.perf_counter()
        c.send_multipart([b"x"] * 6)
        assert c.poll(5000)
        c.recv_multipart()
        if i >= 300:
            ts.append(time.perf_counter() - t0)
    ts.sort()
    print(f"bare relay round trip: median {ts[len(ts) // 2] * 1e6:.0f} us, "
          f"p99 {ts[int(len(ts) * 0.99)] * 1e6:.0f} us")
    c.send(b"stop")
    engine.join(10)
    c.close(0)
    ctx.destroy(0)


if __name__ == "__main__":
    main()
