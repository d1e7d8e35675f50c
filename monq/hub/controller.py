"""The controller process: the Hub and the relays, in one process.

Why one process with the relays as threads: the relays' loop is C with the
GIL released, so it does not compete with the Hub's Python; and the monitor
copies travel over ``inproc://``, which passes message references instead of
bytes (a separate relay process would copy every payload once more through a
socket).  Measured with bench/relay_choice.py on a 2-core machine (medians of
three alternating runs, 64-byte messages): one hop takes 293 us as a thread
with an inproc monitor and 354 us as a process with a tcp monitor, p99 565
against 1,567 us, bursts at the same rate (19k vs 18k messages/s).

The controller binds everything, then writes the connection file
(mode 0600) that clients and engines read.

Shutdown order, on SIGTERM or SIGINT: the Hub loop ends and flushes its last
batch; the Hub closes its sockets and the store; terminating the Context then
ends the relay loops (ETERM), which close their own sockets; the connection
file is removed if it is still ours.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import zmq

from monq.connection import (
    CONNECTION_FILE,
    ConnectionInfo,
    default_db_url,
    new_key,
    pid_alive,
    write_connection_file,
)
from monq.hub.filters import parse_duration, parse_size
from monq.hub.hub import MONITOR_URL, Hub, HubConfig
from monq.hub.retention import RetentionPolicy
from monq.hub.store import TaskStore
from monq.protocol import Session
from monq.schedulers import Relay
from monq.security import (
    CurveKeys,
    curve_client_setup,
    server_socket_setup,
    start_authenticator,
)

log = logging.getLogger(__name__)


def _previous(path: Path) -> tuple[bytes, dict[str, int]]:
    """The key and ports of a previous controller of this profile.

    Keeping both lets the engines and clients of a controller that crashed
    reconnect to its successor by themselves (zmq reconnects; the key still
    signs).
    """
    try:
        d = json.loads(path.read_text())
        key = bytes.fromhex(d["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return new_key(), {}
    try:
        ports = {str(k): int(v) for k, v in d.get("ports", {}).items()}
    except (ValueError, TypeError, AttributeError):
        ports = {}
    return key, ports


def _reuse_curve(path: Path) -> CurveKeys:
    """Keep the Curve keys of a previous controller of this profile (as the key); else new."""
    try:
        return CurveKeys.from_json(json.loads(path.read_text())["curve"])
    except (OSError, ValueError, KeyError, TypeError):
        return CurveKeys.new()


#: seconds a thread of the controller may hold the GIL while another waits for it
SWITCH_INTERVAL = 0.0005


def serve(profile_dir: Path, profile: str, db_url: str | None, config: HubConfig,
          supervisor_pid: int = 0, restarted: bool = False, curve: bool = False,
          ready_fd: int = -1) -> int:
    """Run the controller until SIGTERM / SIGINT (or a client's shutdown request).

    ``ready_fd``: a pipe to write one byte to (then close) once the connection
    file is written: the supervisor and the engines started beside this
    controller wait on it instead of polling for the file.
    """
    profile_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn_path = profile_dir / CONNECTION_FILE
    key, old_ports = _previous(conn_path)
    keys = _reuse_curve(conn_path) if curve else None
    db_url = db_url or default_db_url(profile_dir)
    # the direct relay's loop is Python and shares the GIL with the Hub, which drains
    # copies in long batches: a short switch interval lets a message through within
    # 0.5 ms instead of waiting up to 5 ms for the Hub to let go
    sys.setswitchinterval(SWITCH_INTERVAL)
    ctx = zmq.Context()
    ctx.linger = 0
    # the ZAP handler first: a Curve socket bound before it would admit any client key
    auth = start_authenticator(ctx, keys)
    store = TaskStore(db_url, payload_cap=config.payload_cap)
    hub = Hub(ctx, Session(key), store, config, db_url)
    hub.socket_setup = lambda sock, max_msg: server_socket_setup(sock, keys, max_msg)

    def shutdown() -> None:
        # a supervisor stops the engines first, then us; alone, we just stop
        if supervisor_pid and pid_alive(supervisor_pid):
            os.kill(supervisor_pid, signal.SIGTERM)
        else:
            hub.stop()

    hub.on_shutdown = shutdown
    relays: list[Relay] = []
    info: ConnectionInfo | None = None
    wake: tuple[int, int] | None = None
    try:
        ports = hub.bind(old_ports)
        for name, kind in (("task", zmq.DEALER), ("direct", zmq.ROUTER)):
            relay = Relay(ctx, name, kind, config.ip, MONITOR_URL,
                          (old_ports.get(f"{name}_client", 0), old_ports.get(f"{name}_engine", 0)),
                          # ZMTP heartbeats on the engine side stall the C task relay under
                          # Curve (it blocks in a recv mid-message); the Hub's own heartbeats
                          # and the supervisor still notice a dead engine
                          heartbeat=0 if keys else config.heartbeat_period,
                          rejected=hub.rejected,
                          socket_setup=lambda sock: server_socket_setup(sock, keys))
            client_port, engine_port = relay.start_and_wait(hub.monitor)
            ports[f"{name}_client"], ports[f"{name}_engine"] = client_port, engine_port
            relays.append(relay)
        hub.connect_probe(f"tcp://{_connect_ip(config.ip)}:{ports['task_client']}",
                          lambda sock: curve_client_setup(sock, keys))
        info = ConnectionInfo(key=key, ip=config.ip, ports=ports, controller_pid=os.getpid(),
                              supervisor_pid=supervisor_pid, db_url=db_url, profile=profile,
                              heartbeat_period=config.heartbeat_period, restarted=restarted,
                              curve=keys.to_json() if keys else None)
        write_connection_file(conn_path, info)
        _tell_ready(ready_fd)
        log.info("controller ready: connection file %s, history %s", conn_path, db_url)
        signal.signal(signal.SIGTERM, lambda *_: hub.stop())
        signal.signal(signal.SIGINT, lambda *_: hub.stop())
        # a signal also writes to this pipe, which the Hub's loop polls: it ends at once
        # instead of at its next poll timeout (the handler runs inside the poll, which
        # would otherwise wait on)
        wake = os.pipe()
        for fd in wake:
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake[1])
        hub.wake_fd = wake[0]
        hub.run()
        hub.settle()
    finally:
        if wake is not None:
            signal.set_wakeup_fd(-1)
            for fd in wake:
                os.close(fd)
        hub.close()
        if auth is not None:
            auth.stop()
        ctx.term()  # ends the relay loops with ETERM; they close their sockets
        for r in relays:
            r.join(timeout=5)
        if info is not None and _still_ours(conn_path):
            conn_path.unlink(missing_ok=True)
        log.info("controller stopped")
    return 0


def _tell_ready(fd: int) -> None:
    if fd < 0:
        return
    try:
        os.write(fd, b"1")
    except OSError as e:  # nobody listens any more: the connection file still tells
        log.debug("ready pipe: %s", e)
    finally:
        os.close(fd)


def _connect_ip(ip: str) -> str:
    return "127.0.0.1" if ip in ("0.0.0.0", "*", "") else ip


def _still_ours(path: Path) -> bool:
    try:
        return int(json.loads(path.read_text()).get("controller_pid", 0)) == os.getpid()
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monq.hub", description="monq controller")
    p.add_argument("--profile-dir", required=True, type=Path)
    p.add_argument("--profile", default="default")
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: sqlite in the profile)")
    p.add_argument("--ip", default="127.0.0.1")
    p.add_argument("--heartbeat-period", type=float, default=1.0)
    p.add_argument("--supervisor-pid", type=int, default=0)
    p.add_argument("--restarted", action="store_true",
                   help="the supervisor restarts this controller if it dies")
    p.add_argument("--curve", action="store_true",
                   help="CurveZMQ on every channel (keys kept in the connection file)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--ready-fd", type=int, default=-1,
                   help="write a byte to this (inherited) pipe once the connection file is written")
    p.add_argument("--retain", default=None, type=parse_duration, metavar="DURATION",
                   help="delete finished tasks completed longer ago (7d, 12h, 30m)")
    p.add_argument("--max-tasks", default=None, type=int, metavar="N",
                   help="keep at most N tasks (the oldest finished ones go)")
    p.add_argument("--max-bytes", default=None, type=parse_size, metavar="SIZE",
                   help="keep stored payloads and output under SIZE (500MB); payloads go first")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [controller] %(name)s: %(message)s")
    retention = RetentionPolicy(retain=a.retain, max_tasks=a.max_tasks, max_bytes=a.max_bytes)
    return serve(a.profile_dir, a.profile, a.db,
                 HubConfig(ip=a.ip, heartbeat_period=a.heartbeat_period, retention=retention),
                 a.supervisor_pid, a.restarted, curve=a.curve, ready_fd=a.ready_fd)
