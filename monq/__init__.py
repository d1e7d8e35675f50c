"""monq: a compute cluster for Python on ZeroMQ, whose Hub records every task."""

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

__all__ = [
    "AsyncMapResult", "AsyncResult", "AuthenticationError", "Client", "DirectView",
    "EngineDied", "HubError", "LoadBalancedView", "MonqError", "NoClusterError",
    "ProtocolError", "RemoteError", "SerializationError", "TaskRecord", "TaskTimeout",
    "TimeoutError",
    "recv_array", "send_array",
]
