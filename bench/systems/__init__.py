"""The systems the benchmark compares: one adapter module each, loaded by name."""

from __future__ import annotations

import importlib
import importlib.util

from systems.base import System

#: system name -> the package that must be importable for it to run
REQUIRES = {
    "monq": "monq",
    "ipyparallel": "ipyparallel",
    "dask": "distributed",
    "ray": "ray",
    "floor": "zmq",
}
ALL = tuple(REQUIRES)


def installed(name: str) -> bool:
    return importlib.util.find_spec(REQUIRES[name]) is not None


def load(name: str) -> System:
    """A fresh adapter for ``name`` (imports the system only now, in the measuring process)."""
    if name not in REQUIRES:
        raise ValueError(f"unknown system {name!r}; one of {', '.join(ALL)}")
    module = importlib.import_module(f"systems.{name}")
    return module.Adapter()  # type: ignore[no-any-return]
