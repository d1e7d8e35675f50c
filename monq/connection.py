"""Profiles and the connection file: where a cluster's state lives and how to reach it.

A profile is a directory ``$MONQ_HOME/<profile>`` (``MONQ_HOME`` defaults to
``~/.monq``) holding ``connection.json`` (mode 0600: it holds the cluster
key), ``history.db`` (the default history database) and ``logs/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monq.errors import NoClusterError

CONNECTION_FILE = "connection.json"
DB_FILE = "history.db"

#: every port the controller binds, by role
PORT_NAMES = (
    "task_client", "task_engine",        # load-balanced relay: ROUTER -> DEALER
    "direct_client", "direct_engine",    # per-engine relay: ROUTER -> ROUTER
    "hub",                               # Hub ROUTER: registration, task_started, queries
    "notify",                            # Hub PUB: engine came / went
    "hb_ping", "hb_pong",                # heartbeat: PUB ping, ROUTER pong
)


def monq_home(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    return Path(env.get("MONQ_HOME") or Path.home() / ".monq").expanduser()


def profile_dir(profile: str = "default", home: Path | None = None) -> Path:
    if not profile or "/" in profile or profile.startswith("."):
        raise ValueError(f"bad profile name {profile!r}")
    return (home or monq_home()) / profile


def default_db_url(pdir: Path) -> str:
    return f"sqlite:///{pdir / DB_FILE}"


def new_key() -> bytes:
    return secrets.token_bytes(32)


@dataclass(frozen=True)
class ConnectionInfo:
    """Everything a client or engine needs to join a running cluster."""

    key: bytes
    ip: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    controller_pid: int = 0
    supervisor_pid: int = 0
    db_url: str = ""
    profile: str = "default"
    heartbeat_period: float = 1.0
    #: the supervisor restarts this controller if it dies (clients wait for it)
    restarted: bool = False
    #: CurveZMQ keypairs (Z85 text, see monq.security), or None when Curve is off
    curve: dict[str, str] | None = None

    def url(self, name: str) -> str:
        ip = "127.0.0.1" if self.ip in ("0.0.0.0", "*", "") else self.ip
        return f"tcp://{ip}:{self.ports[name]}"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["key"] = self.key.hex()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ConnectionInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["key"] = bytes.fromhex(d["key"])
        d["ports"] = {k: int(v) for k, v in d.get("ports", {}).items()}
        return cls(**d)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically to a file readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_connection_file(path: Path, info: ConnectionInfo) -> None:
    write_private(path, json.dumps(info.to_json(), indent=2).encode())


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); look at its state where we can
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def load_connection_file(path: Path, check_alive: bool = True) -> ConnectionInfo:
    """Read a connection file; NoClusterError when there is no live cluster behind it."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise NoClusterError(f"no cluster running: no connection file at {path} "
                             "(start one with `monq start`)") from None
    try:
        info = ConnectionInfo.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise NoClusterError(f"connection file {path} is unreadable: {e}") from e
    if check_alive and not pid_alive(info.controller_pid):
        raise NoClusterError(f"no cluster running: the controller (pid {info.controller_pid}) "
                             f"named in {path} has exited")
    return info


def find_connection_file(profile: str = "default", connection_file: str | os.PathLike[str] |
                         None = None, home: Path | None = None) -> Path:
    if connection_file is not None:
        return Path(connection_file)
    return profile_dir(profile, home) / CONNECTION_FILE
