"""monq: a compute cluster for Python on ZeroMQ, whose Hub records every task.

The names below are imported on first use (PEP 562), not with the package:
the engine and controller processes import ``monq.engine`` / ``monq.hub``,
which imports this package first, and neither needs the client side (nor
asyncio, concurrent.futures and the rest that come with it).  ``import monq;
monq.Client`` works as before; so does ``from monq import Client``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monq.client import AsyncMapResult, AsyncResult, Client, DirectView, LoadBalancedView
    from monq.errors import (
        AuthenticationError,
        EngineDied,
        HubError,
        MonqError,
        NoClusterError,
        ProtocolError,
        RemoteError,
        SerializationError,
        TaskTimeout,
        TimeoutError,
    )
    from monq.records import TaskRecord
    from monq.serialize import recv_array, send_array

__version__ = "0.1.0"

#: public name -> the module that defines it
_WHERE = {
    **dict.fromkeys(("AsyncMapResult", "AsyncResult", "Client", "DirectView",
                     "LoadBalancedView"), "monq.client"),
    **dict.fromkeys(("AuthenticationError", "EngineDied", "HubError", "MonqError",
                     "NoClusterError", "ProtocolError", "RemoteError", "SerializationError",
                     "TaskTimeout", "TimeoutError"), "monq.errors"),
    "TaskRecord": "monq.records",
    "recv_array": "monq.serialize",
    "send_array": "monq.serialize",
}

__all__ = [
    "AsyncMapResult", "AsyncResult", "AuthenticationError", "Client", "DirectView",
    "EngineDied", "HubError", "LoadBalancedView", "MonqError", "NoClusterError",
    "ProtocolError", "RemoteError", "SerializationError", "TaskRecord", "TaskTimeout",
    "TimeoutError",
    "recv_array", "send_array",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is not None:
        value = getattr(importlib.import_module(where), name)
        globals()[name] = value  # once found, a plain module attribute
        return value
    if not name.startswith("_"):
        # a submodule (monq.errors, monq.client ...): `import monq` used to load several,
        # and code may reach them as attributes
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'monq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
