"""The task store alone: CPU per task of ``TaskStore.write``, on batches a real Hub wrote.

Two steps:

``capture``: replay a Hub recording (``bench/hub_replay.py record``) into a
Hub as ``hub_replay.py replay`` does, and write down every batch the Hub
hands :meth:`monq.hub.store.TaskStore.write` (inserts and updates, as
passed); the batches go to a pickle file.

``replay``: write the batches, in order, into a fresh store with a
temporary SQLite file and report process CPU per task spent in ``write``
(time.process_time, so other load does not count), several runs per
process.  ``--compare DIR`` also replays with the monq package of another
checkout, alternating, so before and after are measured in the same
conditions.  ``--profile F`` writes a cProfile of one replay.

Run:
    python bench/hub_replay.py record --tasks 20000 --out /tmp/hub-rec.pkl
    python bench/store_replay.py capture /tmp/hub-rec.pkl --out /tmp/batches.pkl
    python bench/store_replay.py replay /tmp/batches.pkl --compare ../base
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def capture(recording: Path, out: Path) -> None:
    sys.path.insert(0, str(HERE))
    import hub_replay

    from monq.hub.store import TaskStore

    batches: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
    write = TaskStore.write

    def rec_write(self: TaskStore, inserts: Any, updates: Any) -> None:
        batches.append((copy.deepcopy(list(inserts)), copy.deepcopy(list(updates))))
        write(self, inserts, updates)

    TaskStore.write = rec_write  # type: ignore[method-assign]
    rec = hub_replay._load(recording)
    with tempfile.TemporaryDirectory(prefix="monq-store-replay-") as d:
        _, n = hub_replay.replay_cpu(rec, Path(d), "capture.db")
    with open(out, "wb") as f:
        pickle.dump({"tasks": n, "batches": batches}, f)
    rows = sum(len(i) + len(u) for i, u in batches)
    print(f"captured {len(batches)} batches ({rows} rows) of {n} tasks to {out}")


def replay_cpu(batches: list[Any], db: Path, profile: str | None = None) -> float:
    """Process CPU seconds of writing every batch into a fresh store at ``db``."""
    from monq.hub.store import TaskStore

    store = TaskStore(f"sqlite:///{db}")
    try:
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
        gc.collect()
        cpu = 0.0
        for ins, ups in batches:
            t0 = time.process_time()
            if prof is not None:
                prof.enable()
            store.write(ins, ups)
            if prof is not None:
                prof.disable()
            cpu += time.process_time() - t0
        if prof is not None and profile:
            prof.dump_stats(profile)
        return cpu
    finally:
        store.close()


def _one(path: str, repeat: int, profile: str | None) -> dict[str, Any]:
    with open(path, "rb") as f:
        cap = pickle.load(f)
    cpus = []
    with tempfile.TemporaryDirectory(prefix="monq-store-replay-") as d:
        for i in range(repeat):
            cpu = replay_cpu(cap["batches"], Path(d) / f"r{i}.db",
                             profile if i == 0 else None)
            cpus.append(cpu / cap["tasks"] * 1e6)
    return {"tasks": cap["tasks"], "cpu_us": cpus}


def replay(path: Path, repeat: int, compare: Path | None, rounds: int,
           profile: str | None) -> None:
    sides = {"this": HERE.parent} | ({"other": compare} if compare else {})
    results: dict[str, list[float]] = {k: [] for k in sides}
    tasks = 0
    for _ in range(rounds if compare else 1):
        for side, root in sides.items():
            env = dict(os.environ, PYTHONPATH=str(root))
            cmd = [sys.executable, __file__, "_replay", str(path), str(repeat)]
            if profile and side == "this":
                cmd.append(profile)
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[side] += r["cpu_us"]
            tasks = r["tasks"]
    for side, cpus in results.items():
        cpus.sort()
        print(f"{side} ({sides[side]}): {tasks} tasks; store CPU per task "
              f"min {cpus[0]:.1f} us, median {cpus[len(cpus) // 2]:.1f} us "
              f"({len(cpus)} runs)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_replay":
        print(json.dumps(_one(sys.argv[2], int(sys.argv[3]),
                              sys.argv[4] if len(sys.argv) > 4 else None)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("recording", type=Path)
    c.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("replay")
    q.add_argument("batches", type=Path)
    q.add_argument("--repeat", type=int, default=3, help="replays per process")
    q.add_argument("--compare", type=Path, default=None,
                   help="a checkout whose monq to replay too, alternating")
    q.add_argument("--rounds", type=int, default=3, help="alternations with --compare")
    q.add_argument("--profile", default=None, help="write a cProfile of one replay here")
    a = p.parse_args()
    if a.cmd == "capture":
        capture(a.recording, a.out)
    else:
        replay(a.batches, a.repeat, a.compare, a.rounds, a.profile)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
