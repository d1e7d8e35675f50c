"""Why the relays are threads of the controller with the monitor on inproc://.

Measures one relay hop (client -> monitored_queue -> echo engine -> back) and
a burst, with the monitor copies consumed by a Python loop standing in for
the Hub, in two layouts:

- thread: relay thread in the Hub's process, monitor over inproc:// (monq's choice)
- process: relay in its own process, monitor over tcp:// to the Hub's process

Run: python bench/relay_choice.py [--n 3000] [--size 64]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time

import zmq
from bare_relay import _relay, echo  # the same echo engine and relay thread as the floor
from zmq.devices import monitored_queue


def relay_process(ports: mp.Queue, mon_url: str) -> None:
    ctx = zmq.Context()
    front, back, mon = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER), ctx.socket(zmq.PUB)
    mon.sndhwm = 0
    mon.connect(mon_url)
    ports.put((front.bind_to_random_port("tcp://127.0.0.1"),
               back.bind_to_random_port("tcp://127.0.0.1")))
    try:
        monitored_queue(front, back, mon, b"in", b"out")
    except zmq.ContextTerminated:
        pass


def hub_loop(sub: zmq.Socket, counter: list[int], stop: threading.Event) -> None:
    """Consume monitor copies the way the Hub does: receive, touch every frame."""
    while not stop.is_set():
        if sub.poll(50):
            while True:
                try:
                    frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                counter[0] += 1
                _ = sum(len(f) for f in frames)


def run(layout: str, n: int, size: int) -> dict[str, float]:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = 0
    sub.subscribe(b"")
    procs: list[mp.Process] = []
    if layout == "thread":
        sub.bind("inproc://mon")
        front, back, mon = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER), ctx.socket(zmq.XPUB)
        mon.sndhwm = 0
        mon.connect("inproc://mon")
        sub.getsockopt(zmq.EVENTS)
        mon.poll(2000)
        mon.recv()
        fport = front.bind_to_random_port("tcp://127.0.0.1")
        bport = back.bind_to_random_port("tcp://127.0.0.1")
        t = threading.Thread(target=_relay, args=(front, back, mon), daemon=True)
        t.start()
    else:
        mport = sub.bind_to_random_port("tcp://127.0.0.1")
        q: mp.Queue = mp.Queue()
        rp = mp.Process(target=relay_process, args=(q, f"tcp://127.0.0.1:{mport}"))
        rp.start()
        procs.append(rp)
        fport, bport = q.get(timeout=10)
    counter = [0]
    stop = threading.Event()
    hub = threading.Thread(target=hub_loop, args=(sub, counter, stop))
    hub.start()
    ep = mp.Process(target=echo, args=(bport,))
    ep.start()
    procs.append(ep)
    client = ctx.socket(zmq.DEALER)
    client.connect(f"tcp://127.0.0.1:{fport}")
    payload = [b"h" * 64, b"x" * size]
    time.sleep(0.5)  # let the PUB/SUB over tcp settle (the process layout has no XPUB wait)
    lat = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        client.send_multipart(payload)
        assert client.poll(5000)
        client.recv_multipart()
        if i >= 200:
            lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    burst = max(100, min(20_000, int(200e6 // max(size, 1))))
    for _ in range(burst):
        client.send_multipart(payload)
    for _ in range(burst):
        assert client.poll(10_000)
        client.recv_multipart()
    rate = burst / (time.perf_counter() - t0)
    client.send_multipart([b"stop"])
    ep.join(10)
    stop.set()
    hub.join(5)
    lat.sort()
    out = {"median_us": statistics.median(lat) * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
           "msgs_per_s": rate, "copies_seen": counter[0]}
    client.close(0)
    sub.close(0)
    for p in procs:
        p.terminate()
        p.join(5)
    ctx.destroy(0)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"thread": [], "process": []}
    for _ in range(a.repeat):  # alternate, so both layouts see the same noise
        for layout in runs:
            runs[layout].append(run(layout, a.n, a.size))
    res = {layout: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for layout, rs in runs.items()}
    print(f"medians of {a.repeat} alternating runs")
    for layout, r in res.items():
        print(f"{layout:8s} median {r['median_us']:7.0f} us  p99 {r['p99_us']:7.0f} us  "
              f"burst {r['msgs_per_s']:8.0f} msg/s  monitor copies {r['copies_seen']}")
    t, pr = res["thread"], res["process"]
    print(f"process/thread: latency x{pr['median_us'] / t['median_us']:.2f}, "
          f"burst rate x{pr['msgs_per_s'] / t['msgs_per_s']:.2f}")


if __name__ == "__main__":
    main()
