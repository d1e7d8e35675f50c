"""The dashboard's web application: one page, its static assets, and a read-only JSON API.

Endpoints (all GET; any other method is answered 405):

``/``                        the page (``static/index.html``)
``/static/...``              its script, style sheet and icon, served from the package
``/api/overview``            mode, engines with state and load, queue depth, task counts
``/api/tasks``               a page of tasks; filters as in ``history()`` (see filters.py)
``/api/tasks/{msg_id}``      one task: timings, error, traceback, stdout, stderr
``/api/throughput``          tasks finished per bucket over a recent window

Everything behind :class:`~monq.dashboard.auth.TokenMiddleware`.  The app
does not own the reader or the watch it is given: whoever made them closes
them (see :mod:`monq.dashboard.server`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import MultiDict
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from monq.dashboard.auth import TokenMiddleware
from monq.dashboard.data import HistoryReader
from monq.dashboard.filters import QueryError, parse_task_query
from monq.dashboard.live import ClusterWatch, overview
from monq.errors import HubError

log = logging.getLogger(__name__)

__all__ = ["DashboardConfig", "create_app"]

STATIC = Path(__file__).resolve().parent / "static"
#: throughput windows the page offers: window seconds -> bucket seconds (about 60 bars)
#: seconds an overview (engines, counts: a few queries and a Hub round trip) is reused
OVERVIEW_TTL = 1.0
WINDOWS = {60: 1, 300: 5, 900: 15, 3600: 60, 6 * 3600: 360, 86400: 1440}


@dataclass(frozen=True)
class DashboardConfig:
    """What the page says about itself, and the token that guards it."""

    token: str
    #: "live" (a cluster's profile, live when its Hub answers) or "post-mortem" (a file)
    mode: str = "live"
    profile: str = "default"
    #: the history database, for display (password hidden)
    db: str = ""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(config: DashboardConfig, reader: HistoryReader,
               watch: ClusterWatch | None = None) -> Starlette:
    """The ASGI app of a dashboard on ``reader``'s database (and ``watch``'s cluster, if any)."""

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    cache: list[tuple[float, dict[str, Any]]] = []
    cache_lock = threading.Lock()

    def api_overview(request: Request) -> Response:
        # every open tab polls this; within OVERVIEW_TTL they share one answer
        with cache_lock:
            now = time.monotonic()
            if cache and now - cache[0][0] < OVERVIEW_TTL:
                body = dict(cache[0][1])
            else:
                try:
                    body = overview(reader, watch)
                except HubError as e:
                    return _error(500, str(e))
                cache[:] = [(now, body)]
                body = dict(body)
        body.update(mode=config.mode, profile=config.profile, db=config.db)
        return JSONResponse(body)

    def api_tasks(request: Request) -> Response:
        try:
            # ?token= may ride along on a script's call; it is no filter
            query = parse_task_query(MultiDict(
                [(k, v) for k, v in request.query_params.multi_items() if k != "token"]))
            page = reader.tasks(query)
        except QueryError as e:
            return _error(400, str(e))
        except HubError as e:
            return _error(500, str(e))
        return JSONResponse({"tasks": page.tasks, "total": page.total,
                             "next_cursor": page.next_cursor,
                             "query": {k: v for k, v in asdict(page.query).items()
                                       if v not in (None, ())}})

    def api_task(request: Request) -> Response:
        msg_id = request.path_params["msg_id"]
        try:
            task = reader.task(msg_id)
        except HubError as e:
            return _error(500, str(e))
        if task is None:
            return _error(404, f"no task {msg_id!r} in this history")
        return JSONResponse({"task": task})

    def api_throughput(request: Request) -> Response:
        raw = request.query_params.get("window", "300")
        try:
            window = int(raw)
        except ValueError:
            window = -1
        if window not in WINDOWS:
            return _error(400, f"window must be one of {', '.join(map(str, WINDOWS))} seconds")
        bucket = WINDOWS[window]
        live = watch is not None and watch.status() is not None
        try:
            # post-mortem, "recent" means before the last task ended, not before now
            end = None if live else reader.last_completed()
            end = time.time() if end is None else end + bucket
            points = reader.throughput(end, window, bucket)
        except (QueryError, HubError) as e:
            return _error(500, str(e))
        return JSONResponse({"window": window, "bucket": bucket, "end": end, "live": live,
                             "points": points})

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/overview", api_overview, methods=["GET"]),
        Route("/api/tasks", api_tasks, methods=["GET"]),
        Route("/api/tasks/{msg_id:str}", api_task, methods=["GET"]),
        Route("/api/throughput", api_throughput, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes,
                     middleware=[Middleware(TokenMiddleware, token=config.token)])
