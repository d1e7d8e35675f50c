"""Round-trip latency and CPU per task of monq, optionally A/B against another checkout.

One run starts a 2-engine cluster, then

- times ``n`` sequential ``apply_sync(noop)`` on a load-balanced view and on a
  direct view (one engine), after a warm-up: median and p99 in microseconds;
- submits a burst of ``burst`` ``apply_async(noop)`` and waits for them all,
  reading the CPU time (user + system, /proc/<pid>/stat) of the client, the
  engines and the controller before and after: microseconds of CPU per task.

With ``--ab DIR`` the same run is made alternately with PYTHONPATH pointing
at DIR (a checkout of the base commit) and at this checkout, ``--rounds``
times each, each in a fresh process and cluster; the table shows every
round and the median over rounds.

Run: PYTHONPATH=$PWD python bench/latency.py [--n 1000] [--burst 10000]
     PYTHONPATH=$PWD python bench/latency.py --ab /tmp/lat-base --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def one_run(n: int, burst: int, engines: int) -> dict[str, Any]:
    from monq_basics import latency  # bench/ (this script's directory) is on sys.path

    import monq
    from monq.cluster import Cluster, ClusterConfig

    def noop() -> None:
        return None

    home = Path(tempfile.mkdtemp(prefix="monq-lat-"))
    cluster = Cluster(ClusterConfig(n=engines, home=home, log_level="WARNING"))
    out: dict[str, Any] = {"monq": str(Path(monq.__file__).parent.parent)}
    try:
        cluster.start(timeout=120)
        with monq.Client(connection_file=cluster.connection_file) as client:
            client.wait_for_engines(engines, timeout=60)
            views = {"lb": client.load_balanced_view(), "direct": client[client.ids[0]]}
            ctl = cluster.pids["controller"]
            for kind, view in views.items():
                # the controller's CPU over the sequential loop (its warm-up included): the
                # Hub records each task beside the round trip, on the same cores
                c0 = cpu_seconds(ctl)
                r = latency(view, n, noop, warm=200)
                out[f"{kind}_median_us"] = r["median_us"]
                out[f"{kind}_p99_us"] = r["p99_us"]
                out[f"{kind}_controller_cpu_us_per_task"] = \
                    (cpu_seconds(ctl) - c0) / (n + 200) * 1e6
            pids = cluster.pids
            eng = [p for name, p in pids.items() if name.startswith("engine")]
            ctl = pids["controller"]
            lb = views["lb"]
            me = os.getpid()
            before = (cpu_seconds(me), sum(cpu_seconds(p) for p in eng), cpu_seconds(ctl))
            t0 = time.perf_counter()
            ars = [lb.apply_async(noop) for _ in range(burst)]
            for ar in ars:
                ar.get(600)
            wall = time.perf_counter() - t0
            after = (cpu_seconds(me), sum(cpu_seconds(p) for p in eng), cpu_seconds(ctl))
            out["burst_tasks_per_s"] = burst / wall
            for i, who in enumerate(("client", "engines", "controller")):
                out[f"{who}_cpu_us_per_task"] = (after[i] - before[i]) / burst * 1e6
            # idle cost: 2 s doing nothing
            before = (sum(cpu_seconds(p) for p in eng),)
            time.sleep(2.0)
            out["idle_engines_cpu_pct"] = (sum(cpu_seconds(p) for p in eng) - before[0]) / 2.0 * 100
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)
    return out


KEYS = ["lb_median_us", "lb_p99_us", "direct_median_us", "direct_p99_us",
        "lb_controller_cpu_us_per_task", "direct_controller_cpu_us_per_task",
        "client_cpu_us_per_task",
        "engines_cpu_us_per_task", "controller_cpu_us_per_task", "burst_tasks_per_s",
        "idle_engines_cpu_pct"]


def ab(base: str, rounds: int, argv: list[str]) -> None:
    trees = {"base": base, "new": str(HERE.parent)}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for r in range(rounds):
        for label, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree}
            # cwd=tree: a monq before b9442af starts its controller and engines with
            # `python -m`, which imports the monq of the working directory, whatever
            # PYTHONPATH says (from this repository, both sides ran this one's)
            p = subprocess.run([sys.executable, str(HERE / "latency.py"), "--json", *argv],
                               env=env, capture_output=True, text=True, timeout=1800, cwd=tree)
            if p.returncode:
                print(p.stderr, file=sys.stderr)
                raise SystemExit(f"{label} round {r} failed")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            results[label].append(res)
            print(f"round {r} {label:4}: " + " ".join(f"{k}={res[k]:.0f}" for k in KEYS),
                  flush=True)
    print(f"\n{'median of rounds':28} {'base':>9} {'new':>9} {'new/base':>9}")
    for k in KEYS:
        b = statistics.median(x[k] for x in results["base"])
        n = statistics.median(x[k] for x in results["new"])
        print(f"{k:28} {b:9.0f} {n:9.0f} {n / b if b else float('nan'):9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="sequential round trips per view")
    p.add_argument("--burst", type=int, default=10000, help="apply_async in the burst")
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--ab", metavar="DIR", help="a checkout to compare with (PYTHONPATH)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON line (for --ab)")
    a = p.parse_args()
    if a.ab:
        ab(a.ab, a.rounds, ["--n", str(a.n), "--burst", str(a.burst),
                            "--engines", str(a.engines)])
        return
    res = one_run(a.n, a.burst, a.engines)
    if a.json:
        print(json.dumps(res))
    else:
        for k in KEYS:
            print(f"{k:28} {res[k]:9.0f}")


if __name__ == "__main__":
    main()
