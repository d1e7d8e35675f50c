"""Measure ONE system in this process and write its figures as JSON (run by bench/run.py).

Run: python bench/measure.py --system monq --engines 2 --out result.json [--quick]
     [--only latency,throughput,data,history,start] [--repeat 3]

Every suite runs in its own try/except: a failure is recorded under
"errors" and the other suites still run.  Whatever happens, the adapter is
stopped in ``finally`` and any process it started that is still alive is
killed by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import systems
from common import RSSSampler
from systems.base import System

SUITES = ("start", "latency", "throughput", "data", "history")
MB = 2**20


@dataclass(frozen=True)
class Plan:
    """How much of everything to run; --quick shrinks it to a smoke run."""

    latency_n: int = 1000
    tasks: tuple[int, ...] = (10_000, 100_000)
    map_n: int = 100_000
    sizes_mb: tuple[int, ...] = (1, 10, 100)
    history_rows: int = 1_000_000
    repeat: int = 3

    @classmethod
    def quick(cls, repeat: int) -> Plan:
        return cls(latency_n=200, tasks=(1000, 5000), map_n=10_000, sizes_mb=(1, 10),
                   history_rows=50_000, repeat=repeat)


def run(adapter: System, engines: int, only: set[str], plan: Plan, out: Path) -> dict[str, Any]:
    """Run the suites; ``out`` is rewritten after each, so a run killed at its timeout
    still leaves what it measured."""
    res: dict[str, Any] = {"system": adapter.name, "engines": engines, "figures": {},
                           "detail": {}, "errors": {}}
    fig, detail = res["figures"], res["detail"]

    def attempt(suite: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:
            res["errors"][suite] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        out.write_text(json.dumps(res, indent=2, default=str))

    procs: list[Any] = []
    sampler = None
    try:
        t0 = time.perf_counter()
        try:
            adapter.start(engines)
        finally:
            procs = started_processes()
        fig["start_s"] = time.perf_counter() - t0
        res["versions"] = adapter.versions()
        hub = adapter.hub_pid()
        sampler = RSSSampler(hub) if hub else None
        if "latency" in only:
            attempt("latency", lambda: latency(adapter, plan, fig))
        if "throughput" in only:
            attempt("throughput", lambda: throughput(adapter, plan, fig, detail,
                                                     plan.tasks[:-1], plan.repeat))
        if "history" in only:
            attempt("history", lambda: history(adapter, plan, fig, detail))
        if "data" in only:
            attempt("data", lambda: data(adapter, plan, fig))
        if "throughput" in only:
            # the largest burst runs once and last: it takes many minutes for the slow
            # systems, and a run cut at its time limit keeps everything else
            attempt("throughput", lambda: throughput(adapter, plan, fig, detail,
                                                     plan.tasks[-1:], 1, with_map=False))
    finally:
        if sampler is not None:
            detail["hub_rss_whole_run"] = rss = sampler.stop()
            fig["hub_rss_run_mb"] = rss["vm_hwm_mb"] or rss["sampled_peak_mb"]
        t0 = time.perf_counter()
        try:
            adapter.stop()
            fig["stop_s"] = time.perf_counter() - t0
        finally:
            kill_leftovers(procs + started_processes())
            # also when cut at the time limit (SIGTERM): keep the stop time and the Hub's RSS
            out.write_text(json.dumps(res, indent=2, default=str))
    if "start" not in only:
        fig.pop("start_s", None)
        fig.pop("stop_s", None)
    return res


def latency(adapter: System, plan: Plan, fig: dict[str, Any]) -> None:
    for kind in ("lb", "direct"):
        ts = adapter.noop_latency(kind, plan.latency_n)
        if ts is None:
            continue
        ts.sort()
        fig[f"lat_{kind}_median_us"] = statistics.median(ts) * 1e6
        fig[f"lat_{kind}_p99_us"] = ts[min(len(ts) - 1, int(len(ts) * 0.99))] * 1e6


def throughput(adapter: System, plan: Plan, fig: dict[str, Any], detail: dict[str, Any],
               sizes: tuple[int, ...], repeat: int, with_map: bool = True) -> None:
    for n in sizes:
        runs = [r for r in (adapter.throughput(n) for _ in range(repeat)) if r is not None]
        if not runs:
            return
        detail[f"tput_{n}"] = runs
        fig[f"tput_{n}_per_s"] = n / statistics.median(r["seconds"] for r in runs)
        rec = [r.get("recorded") for r in runs]
        fig[f"tput_{n}_recorded"] = min(x for x in rec if x is not None) if None not in rec \
            else None
    if not with_map:
        return
    times = [t for t in (adapter.map(plan.map_n) for _ in range(plan.repeat)) if t is not None]
    if times:
        fig["map_per_s"] = plan.map_n / statistics.median(times)


def data(adapter: System, plan: Plan, fig: dict[str, Any]) -> None:
    for mb in plan.sizes_mb:
        t = adapter.roundtrip(mb * MB, plan.repeat)
        if t is not None:
            fig[f"data_{mb}MB_MBps"] = 2 * mb / t  # bytes out and back over the round trip
        # other paths of the same system, in the same run (monq: shared memory off)
        variants = getattr(adapter, "roundtrip_variants", None)
        for name, tv in (variants(mb * MB, plan.repeat) if variants else {}).items():
            fig[f"data_{mb}MB_{name}_MBps"] = 2 * mb / tv
    big = max(plan.sizes_mb)
    t = adapter.pair_roundtrip(big * MB, plan.repeat)
    if t is not None:
        fig[f"pair_{big}MB_MBps"] = 2 * big / t


def history(adapter: System, plan: Plan, fig: dict[str, Any], detail: dict[str, Any]) -> None:
    h = adapter.history(plan.history_rows, max(5, plan.repeat))
    if h is None:
        return
    detail["history"] = h
    fig["hist_rows"] = h["rows"]
    for q in ("error_limit100", "time_range_60s", "db_query_engine"):
        if h.get(f"{q}_s") is not None:
            fig[f"hist_{q}_ms"] = h[f"{q}_s"] * 1e3
    fig["hist_bytes_per_task"] = h.get("db_bytes_per_task")
    rss = h.get("hub_rss") or {}
    fig["hist_hub_rss_mb"] = rss.get("vm_hwm_mb") or rss.get("sampled_peak_mb")


def main() -> None:
    # bench/run.py ends a system that overruns with SIGTERM: unwind, so `finally` stops it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"{sys.argv[0]}: terminated"))
    p = argparse.ArgumentParser()
    p.add_argument("--system", required=True, choices=systems.ALL)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--only", default=",".join(SUITES))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    only = set(a.only.split(","))
    plan = Plan.quick(a.repeat or 2) if a.quick else Plan(repeat=a.repeat or 3)
    res = run(systems.load(a.system), a.engines, only, plan, a.out)
    a.out.write_text(json.dumps(res, indent=2, default=str))


def started_processes() -> list[Any]:
    """Every live descendant of this process (psutil.Process objects, which know their
    start time: a pid reused later by someone else's process is never mistaken for ours)."""
    import psutil

    return psutil.Process().children(recursive=True)


def kill_leftovers(procs: list[Any]) -> None:
    """SIGKILL, by pid, whatever the adapter started and did not stop."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                p.kill()


if __name__ == "__main__":
    main()
