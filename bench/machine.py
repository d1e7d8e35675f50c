"""What the figures were measured on: CPU, RAM, Python, package versions, date."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("pyzmq", "numpy", "SQLAlchemy", "cloudpickle", "ipyparallel", "distributed", "ray",
            "psutil")


def describe(repo: Path) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "ram_gb": round(_mem_kb() / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "monq_commit": _git(repo, "rev-parse", "--short", "HEAD"),
        "packages": {},
    }
    for p in PACKAGES:
        try:
            info["packages"][p] = version(p)
        except PackageNotFoundError:
            pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_kb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _git(repo: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def header(m: dict[str, Any], engines: int) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return (f"{m['date_utc']} · {m['cpu']} · {m['nproc']} CPUs · {m['ram_gb']} GB RAM · "
            f"Python {m['python']} · monq {m['monq_commit']} · {engines} engines · "
            f"load average at start {m['loadavg_at_start'][0]:.1f}\n{pk}")
