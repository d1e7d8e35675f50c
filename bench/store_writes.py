"""The task store's writes into a long history: CPU and system calls per write.

Fills a fresh store with ``--history`` finished no-op tasks (2,000 per write),
then times ``--writes`` writes of each size in ``--sizes`` (a sequential
stream's flush holds ~20-30 rows, a burst's 2,000) and reports, per write,
the thread's CPU (median) and the read and write system calls it made
(/proc/self/io: SQLite reads a page it does not cache with one ``pread`` and
appends each page it changes to the WAL with two ``pwrite``).  ``--ids``
chooses how msg_ids are made: ``session`` (monq's, time first) or ``random``
(128 random bits, as before), to compare the two in the same conditions.

Run: PYTHONPATH=$PWD python bench/store_writes.py [--history 300000] [--ids random]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def syscalls() -> tuple[int, int]:
    """(read, write) system calls of this process so far."""
    d = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(d["syscr"]), int(d["syscw"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--history", type=int, default=300_000)
    p.add_argument("--sizes", default="23,500", help="rows per timed write, comma-separated")
    p.add_argument("--writes", type=int, default=100, help="timed writes per size")
    p.add_argument("--ids", choices=("session", "random"), default="session")
    a = p.parse_args()
    from monq.hub import blobs
    from monq.hub.store import TaskStore
    from monq.protocol import Session

    new_id: Callable[[], str] = Session(b"k" * 32).new_msg_id if a.ids == "session" else \
        (lambda: os.urandom(16).hex())
    request = blobs.pack([b"F" * 400, b"args"], [False, False])  # one function, no arguments
    result = blobs.pack([b"N."], [False])
    rng = random.Random(1)
    clock = [time.time()]

    def rows(n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            t = clock[0] = clock[0] + 1e-3
            started = t + 2e-4
            out.append({
                "msg_id": new_id(), "submitted": t, "client": "c" * 32, "queue": "task",
                "status": "ok", "func": "noop", "engine": rng.randint(0, 1),
                "engine_uuid": "e" * 32, "request": request, "request_bytes": len(request),
                "started": started, "completed": started + rng.uniform(5e-5, 5e-4),
                "received": started + 6e-4, "stdout": "", "stderr": "", "result": result,
                "result_bytes": len(result)})
        return out

    with tempfile.TemporaryDirectory() as d:
        store = TaskStore(f"sqlite:///{d}/history.db")
        try:
            for _ in range(a.history // 2000):
                store.write(rows(2000), [])
            print(f"{a.history} tasks in the history, msg_ids: {a.ids}")
            for size in (int(x) for x in a.sizes.split(",")):
                cpu = []
                r0, w0 = syscalls()
                for _ in range(a.writes):
                    batch = rows(size)
                    c = time.thread_time()
                    store.write(batch, [])
                    cpu.append(time.thread_time() - c)
                r1, w1 = syscalls()
                med = statistics.median(cpu) * 1e6
                print(f"{size:5d} rows per write: CPU {med:8.0f} us ({med / size:4.0f} us/row), "
                      f"{(w1 - w0) / a.writes:6.0f} writes, {(r1 - r0) / a.writes:5.0f} reads")
        finally:
            store.close()


if __name__ == "__main__":
    main()
