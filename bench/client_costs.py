"""The client's CPU per task in a burst of no-op tasks, against a fake controller.

The client (this process) connects to a fake controller in a subprocess that
answers at once: the Hub's queries, and every task batch with one batch reply
(the shape an engine gives, ``None`` results).  Nothing else runs in this
process, so its CPU (``time.process_time``, and per thread from
/proc/self/task) is the client's alone: submitting ``N`` tasks with
``apply_async``, sending them, receiving and dispatching the replies, and
reading every result.  The fake's CPU is in another process and not counted.

Run: PYTHONPATH=<tree> python bench/client_costs.py [--tasks 20000] [--rounds 5]
A/B: run it alternately with PYTHONPATH at two trees (--ab TREE_A TREE_B).
Prints one JSON line per round (µs per task: total, main thread, I/O thread).
Under callgrind: valgrind --tool=callgrind python bench/client_costs.py --tasks 2000
(the fake is an exec'd subprocess, not traced); the counts vary from run to run,
as valgrind's thread scheduling changes the batch sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def fake(conn_path: str) -> None:
    """The fake controller: binds, writes the connection file, answers until killed."""
    import zmq

    from monq.connection import ConnectionInfo, write_connection_file
    from monq.protocol import BATCH_REPLY, BATCH_REQUEST, BatchBuilder, Session
    from monq.shm import host_id

    key = os.urandom(32)
    ctx = zmq.Context()
    socks: dict[str, zmq.Socket] = {}
    ports: dict[str, int] = {}
    for name in ("task_client", "direct_client", "hub"):
        s = ctx.socket(zmq.ROUTER)
        s.sndhwm = s.rcvhwm = 0
        ports[name] = s.bind_to_random_port("tcp://127.0.0.1")
        socks[name] = s
    pub = ctx.socket(zmq.PUB)
    ports["notify"] = pub.bind_to_random_port("tcp://127.0.0.1")
    for extra in ("registration", "heartbeat", "monitor", "iopub", "task_engine",
                  "direct_engine", "control_client", "control_engine"):
        ports.setdefault(extra, 1)
    info = ConnectionInfo(key=key, ports=ports, controller_pid=os.getpid(),
                          heartbeat_period=1.0)
    write_connection_file(Path(conn_path), info)
    session = Session(key)
    host = host_id()
    engines = {"0": "e0" * 16, "1": "e1" * 16}
    hosts = {"0": host, "1": host}
    result = pickle.dumps(None, protocol=5)
    poller = zmq.Poller()
    for s in socks.values():
        poller.register(s, zmq.POLLIN)
    names = {s: n for n, s in socks.items()}
    n = 0
    while True:
        for s, _ in poller.poll(1000):
            name = names[s]
            frames = s.recv_multipart()
            msg = session.feed(frames)
            if name == "hub":
                content = {"status": "ok", "engines": engines, "hosts": hosts,
                           "hub_session": session.session_id, "queue": {},
                           "received": {}, "rejected": {}}
                session.send(s, msg.msg_type.replace("_request", "_reply"), "hub", content,
                             parent=msg.header, idents=msg.idents)
                continue
            now = time.time()
            md = {"engine": n % 2, "engine_uuid": engines[str(n % 2)], "status": "ok",
                  "received": now, "started": now, "completed": now, "stdout": "",
                  "stderr": ""}
            n += 1
            tasks = session.split_batch(msg) if msg.msg_type == BATCH_REQUEST else [msg]
            if len(tasks) == 1:
                session.send(s, "apply_reply", "task", {"status": "ok"}, parent=msg.header,
                             metadata=md, buffers=[result], idents=msg.idents)
                continue
            b = BatchBuilder()
            for t in tasks:
                h = t.header
                b.add({"parent": {"msg_id": h["msg_id"], "session": h.get("session"),
                                  "date": h.get("date"), "msg_type": "apply_request"},
                       "metadata": md, "content": {"status": "ok"}}, [result], [False])
            session.send(s, BATCH_REPLY, "task", {"tasks": b.entries}, buffers=b.buffers,
                         raw=b.raw, idents=msg.idents)


def _thread_cpu(tid: int) -> float:
    """Seconds of CPU of one thread of this process (utime + stime)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(tasks: int, rounds: int) -> None:
    import threading

    import monq

    def noop() -> None:
        return None

    with tempfile.TemporaryDirectory(prefix="monq-client-costs-") as d:
        conn = Path(d) / "conn.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:1] + [
            os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, str(HERE), "--fake", str(conn)], env=env)
        try:
            deadline = time.monotonic() + 30
            while not conn.exists():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the fake controller did not start")
                time.sleep(0.05)
            with monq.Client(connection_file=conn) as c:
                v = c.load_balanced_view()
                for _ in range(50):
                    v.apply_sync(noop)
                main = threading.get_native_id()
                io = c._io.native_id
                assert io is not None
                for _ in range(rounds):
                    c0, m0, i0 = time.process_time(), _thread_cpu(main), _thread_cpu(io)
                    w0 = time.perf_counter()
                    ars = [v.apply_async(noop) for _ in range(tasks)]
                    for ar in ars:
                        ar.get(60)
                    wall = time.perf_counter() - w0
                    c1, m1, i1 = time.process_time(), _thread_cpu(main), _thread_cpu(io)
                    del ars
                    print(json.dumps({
                        "us_per_task": round((c1 - c0) / tasks * 1e6, 1),
                        "main_us": round((m1 - m0) / tasks * 1e6, 1),
                        "io_us": round((i1 - i0) / tasks * 1e6, 1),
                        "tasks_per_s": round(tasks / wall)}), flush=True)
        finally:
            proc.kill()
            proc.wait()


def ab(a: str, b: str, tasks: int, rounds: int) -> None:
    """Alternate runs of trees ``a`` and ``b``; print the median µs per task of each."""
    out: dict[str, list[float]] = {a: [], b: []}
    for r in range(rounds):
        for tree in ((a, b) if r % 2 == 0 else (b, a)):
            env = {**os.environ, "PYTHONPATH": tree}
            res = subprocess.run([sys.executable, str(HERE), "--tasks", str(tasks),
                                  "--rounds", "2"], env=env, capture_output=True, text=True,
                                 timeout=600, check=True)
            lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
            out[tree] += [x["us_per_task"] for x in lines[1:]]  # the first round warms up
            print(tree, lines, flush=True)
    for tree, xs in out.items():
        print(f"{tree}: median {statistics.median(xs):.1f} µs/task over {len(xs)} rounds "
              f"{sorted(xs)}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fake", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--nogc", action="store_true", help="diagnosis: the cyclic GC off")
    p.add_argument("--ab", nargs=2, default=None, metavar=("TREE_A", "TREE_B"))
    a = p.parse_args()
    if a.fake:
        fake(a.fake)
    elif a.ab:
        ab(a.ab[0], a.ab[1], a.tasks, a.rounds)
    else:
        if a.nogc:
            import gc
            gc.disable()
        measure(a.tasks, a.rounds)


if __name__ == "__main__":
    main()
