"""``monq dashboard``: choose live or post-mortem, open the database, serve until stopped.

Live: a cluster runs for the profile.  The token derives from its key, the
history is read from its database, the engines and queues come from its Hub.
Post-mortem: ``--db URL`` names a database, or no cluster runs and the
profile's ``history.db`` is read.  With no connection file there is no key,
so the token is random and printed.

Resource handling: :func:`run` owns the listening socket, the
:class:`HistoryReader` and the :class:`ClusterWatch`, and closes them in
``finally`` in the reverse order of opening.  uvicorn turns SIGINT and
SIGTERM into a graceful stop.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monq.connection import (
    DB_FILE,
    default_db_url,
    find_connection_file,
    load_connection_file,
    profile_dir,
)
from monq.errors import MonqError, NoClusterError

log = logging.getLogger(__name__)

__all__ = ["DashboardOptions", "run"]


@dataclass(frozen=True)
class DashboardOptions:
    """What ``monq dashboard`` was asked for."""

    profile: str = "default"
    home: Path | None = None
    #: a database to read post-mortem (None: the profile's cluster, else its history.db)
    db: str | None = None
    ip: str = "127.0.0.1"
    #: 0: any free port (the real one is printed)
    port: int = 8465


def _display_url(db_url: str) -> str:
    """A SQLite database as its path; any other URL without its password."""
    if db_url.startswith("sqlite:///"):
        return db_url[len("sqlite:///"):]
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(db_url).render_as_string(hide_password=True)
    return db_url


def _bind(ip: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _page_url(ip: str, port: int, token: str) -> str:
    host = "127.0.0.1" if ip in ("0.0.0.0", "") else "[::1]" if ip == "::" else ip
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/?token={token}"


def run(opts: DashboardOptions, out: Callable[[str], None] = print) -> int:
    """Serve the dashboard until SIGINT or SIGTERM; return an exit code (0: stopped cleanly).

    Raises :class:`NoClusterError` when there is neither a cluster nor a
    database to show, :class:`MonqError` when the database cannot be read,
    ``OSError`` when the port cannot be bound.
    """
    import uvicorn  # here, so that `monq --help` works without the extra

    from monq.dashboard.app import DashboardConfig, create_app
    from monq.dashboard.auth import random_token, token_for_key
    from monq.dashboard.data import HistoryReader
    from monq.dashboard.filters import QueryError
    from monq.dashboard.live import ClusterWatch

    conn_file = find_connection_file(opts.profile, home=opts.home)
    watch: ClusterWatch | None = None
    if opts.db is not None:
        mode, db_url, token = "post-mortem", opts.db, random_token()
    else:
        try:
            info = load_connection_file(conn_file)
        except NoClusterError:
            db_path = profile_dir(opts.profile, opts.home) / DB_FILE
            if not db_path.exists():
                raise NoClusterError(
                    f"no cluster running for profile {opts.profile!r} and no history at "
                    f"{db_path}; start one with `monq start`, or name a database with "
                    "--db sqlite:///PATH") from None
            mode, db_url, token = "post-mortem", f"sqlite:///{db_path}", random_token()
        else:
            db_url = info.db_url or default_db_url(profile_dir(opts.profile, opts.home))
            mode, token = "live", token_for_key(info.key)
    try:
        reader = HistoryReader(db_url)
    except QueryError as e:
        raise MonqError(str(e)) from e
    try:
        if mode == "live":
            watch = ClusterWatch(conn_file, db_url)
        # a database named by --db belongs to no profile the page could name
        config = DashboardConfig(token=token, mode=mode,
                                 profile="" if opts.db is not None else opts.profile,
                                 db=_display_url(db_url))
        app = create_app(config, reader, watch)
        sock = _bind(opts.ip, opts.port)
        try:
            port = sock.getsockname()[1]
            what = (f"live, cluster {opts.profile!r}" if mode == "live"
                    else "post-mortem, no cluster")
            out(f"monq dashboard ({what}) of {config.db}")
            out(f"open {_page_url(opts.ip, port, token)}")
            if opts.ip not in ("127.0.0.1", "::1", "localhost"):
                out(f"note: listening on {opts.ip}, not only this machine: whoever can reach "
                    "it and has the token can read the whole history (use SSH forwarding "
                    "or a VPN across networks; the page is plain HTTP)")
            out("Ctrl-C stops it")
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                   access_log=False, server_header=False))
            server.run(sockets=[sock])
        finally:
            sock.close()
    finally:
        if watch is not None:
            watch.close()
        reader.close()
    return 0
