"""monq side by side with its peers and the floor, on one machine, in one run.

Run:  python bench/run.py --engines 2 --json out.json
      [--systems monq,ipyparallel,dask,ray,floor] [--quick]
      [--only latency,throughput,data,history,start] [--repeat 3] [--timeout S]

Each system is measured by bench/measure.py in its own process (its
threads and memory do not disturb the next one, and a crash or a hang
costs only its own column), one after the other, with a time limit each.
Then one table: every figure per system, and monq / peer ratios.  The
machine is noisy (other work shares its cores): read the ratios, which
were measured minutes apart in the same run, rather than the absolute
figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import machine
import systems
import table
from measure import SUITES, Plan

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# the checkout's monq counts as installed even when pip points elsewhere
sys.path.insert(1, str(REPO))
#: the order systems run in: the floor first, then monq, then the peers
ORDER = ("floor", "monq", "ipyparallel", "dask", "ray")


def measure(name: str, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run bench/measure.py for one system; its JSON, or a record of how it failed."""
    out, log = workdir / f"{name}.json", workdir / f"{name}.log"
    cmd = [sys.executable, str(BENCH / "measure.py"), "--system", name,
           "--engines", str(a.engines), "--only", a.only, "--out", str(out)]
    cmd += ["--quick"] if a.quick else []
    cmd += ["--repeat", str(a.repeat)] if a.repeat else []
    env = dict(os.environ)
    # the checkout's monq, installed or not (engines inherit this too)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: running (log {log})", flush=True)
    t0 = time.monotonic()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code: int | str = proc.wait(a.timeout)
        except subprocess.TimeoutExpired:
            code = f"timed out after {a.timeout} s"
            _end(proc)
        finally:
            if proc.poll() is None:
                _end(proc)
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"figures": {}}
    res["seconds"] = time.monotonic() - t0
    if code != 0:
        res.setdefault("errors", {})["process"] = f"exit {code}; see {log}"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {res['seconds']:.0f} s"
          + (f", errors: {res['errors']}" if res.get("errors") else ""), flush=True)
    return res


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (measure.py then stops its system in `finally`), then SIGKILL its group."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated, from {','.join(ORDER)} (default: all installed)")
    p.add_argument("--only", default=",".join(SUITES), help="suites to run")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--repeat", type=int, default=None, help="repeats per measurement")
    p.add_argument("--timeout", type=float, default=None, help="seconds per system")
    a = p.parse_args()
    a.timeout = a.timeout or (900 if a.quick else 3600)
    asked = a.systems.split(",") if a.systems else [s for s in ORDER if systems.installed(s)]
    bad = [s for s in asked if s not in systems.ALL]
    if bad:
        p.error(f"unknown system(s) {', '.join(bad)}; from {', '.join(ORDER)}")
    missing = [s for s in asked if not systems.installed(s)]
    names = [s for s in ORDER if s in asked and s not in missing]
    plan = Plan.quick(a.repeat or 2) if a.quick else Plan(repeat=a.repeat or 3)
    sizes = {"small": plan.tasks[0], "big": plan.tasks[-1], "map_n": plan.map_n}
    info = machine.describe(REPO)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="monq-bench-run-") as tmp:
        for name in names:
            results[name] = measure(name, a, Path(tmp))
            if a.json:  # after each system, so an interrupted run keeps what it has
                _write(a.json, info, a, plan, results, missing)
    print()
    print(machine.header(info, a.engines))
    if missing:
        print(f"not installed (skipped): {', '.join(missing)}")
    print()
    print(table.render(results, sizes))
    print()
    print(table.RATIO_NOTE)
    for name, r in results.items():
        for suite, err in (r.get("errors") or {}).items():
            print(f"{name} {suite}: {err}")
    if a.json:
        _write(a.json, info, a, plan, results, missing)
        print(f"\nwrote {a.json}")


def _write(path: Path, info: dict[str, Any], a: argparse.Namespace, plan: Plan,
           results: dict[str, Any], missing: list[str]) -> None:
    doc = {"machine": info, "engines": a.engines, "quick": a.quick, "only": a.only,
           "plan": dataclasses.asdict(plan),
           "skipped_not_installed": missing, "results": results}
    path.write_text(json.dumps(doc, indent=2, default=str))


if __name__ == "__main__":
    main()
