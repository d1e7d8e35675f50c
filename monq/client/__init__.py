"""The client side: Client, views and results."""

from monq.client.client import Client
from monq.client.executor import MonqExecutor
from monq.client.results import AsyncMapResult, AsyncResult
from monq.client.view import DirectView, LoadBalancedView

__all__ = [
    "AsyncMapResult", "AsyncResult", "Client", "DirectView", "LoadBalancedView", "MonqExecutor",
]
