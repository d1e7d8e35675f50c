"""The web dashboard: live engines and queues, throughput, the task history, post-mortem.

Needs the ``dashboard`` extra (Starlette and uvicorn): ``pip install 'monq[dashboard]'``.
Importing this package imports neither; :mod:`monq.dashboard.app` does.
"""

from monq.dashboard.server import DashboardOptions, run

__all__ = ["DashboardOptions", "run"]
