"""Transport security: CurveZMQ keys, socket options and the controller's ZAP handler.

Two layers protect a cluster (see README, "Security"):

- every message is signed with the cluster key (HMAC-SHA256, monq.protocol):
  without the key nobody can make an engine run anything or ask the Hub
  anything;
- with ``monq start --curve``, every tcp connection is CurveZMQ: encrypted,
  and authenticated at connect time.  The controller is the Curve *server*
  on every socket it binds; engines and clients are Curve *clients* holding
  the cluster's client keypair, and a ZAP handler in the controller refuses
  any other client key.  A peer without the keys cannot even connect, so it
  can neither read traffic nor take a share of the load-balanced tasks nor
  replay what it captured.

The keys live in the connection file (mode 0600) beside the cluster key, as
Z85 text::

    "curve": {"server_public": "...", "server_secret": "...",
              "client_public": "...", "client_secret": "..."}

Both keypairs are in the file because every holder of the file is trusted
alike: engines and clients share the client keypair.  A restart with the same
profile reuses them, so engines and clients keep working.

Call sites: :func:`server_socket_setup` on each socket the controller binds
(before it binds), :func:`client_socket_setup` on each socket an engine or a
client connects (before it connects), :func:`start_authenticator` once in the
controller before anything binds.

Resource handling: the authenticator returned by :func:`start_authenticator`
belongs to the controller, which stops it before terminating the Context.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import zmq

from monq.connection import ConnectionInfo

log = logging.getLogger(__name__)

#: inbound message cap on sockets that only ever receive tiny messages (subscriptions to
#: the PUB sockets, heartbeat pongs): a peer sending more is disconnected by libzmq
SMALL_MSG = 4096

_FIELDS = ("server_public", "server_secret", "client_public", "client_secret")


@dataclass(frozen=True)
class CurveKeys:
    """The cluster's two CurveZMQ keypairs, Z85-encoded (40 bytes each)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def new(cls) -> CurveKeys:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def to_json(self) -> dict[str, str]:
        return {f: getattr(self, f).decode("ascii") for f in _FIELDS}

    @classmethod
    def from_json(cls, d: Any) -> CurveKeys:
        """Keys from the connection file's ``curve`` entry; ValueError when unusable."""
        if not isinstance(d, dict):
            raise ValueError("curve keys must be an object")
        try:
            keys = cls(*(str(d[f]).encode("ascii") for f in _FIELDS))
        except (KeyError, UnicodeEncodeError) as e:
            raise ValueError(f"curve keys incomplete: {e}") from None
        for f in _FIELDS:
            if len(getattr(keys, f)) != 40:
                raise ValueError(f"curve key {f} is not 40 Z85 characters")
        return keys


def curve_keys(info: ConnectionInfo) -> CurveKeys | None:
    """The cluster's Curve keys from its connection info, or None when Curve is off."""
    if not info.curve:
        return None
    return CurveKeys.from_json(info.curve)


def server_socket_setup(sock: zmq.Socket, keys: CurveKeys | None,
                        max_msg_size: int = -1) -> None:
    """Options for a socket the controller binds; call before ``bind``.

    With ``keys`` the socket is a Curve server (every peer must complete a
    Curve handshake and pass the ZAP handler).  ``max_msg_size`` > 0 caps the
    size of each inbound frame (a peer that sends more is disconnected).
    """
    if max_msg_size > 0:
        sock.maxmsgsize = max_msg_size
    if keys is not None:
        sock.curve_server = True
        sock.curve_secretkey = keys.server_secret


def client_socket_setup(sock: zmq.Socket, info: ConnectionInfo) -> None:
    """Options for a socket an engine or client connects to the controller; before ``connect``."""
    curve_client_setup(sock, curve_keys(info))


def curve_client_setup(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Curve client options from the keys themselves (the controller's own probe socket)."""
    if keys is not None:
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey = keys.client_public
        sock.curve_secretkey = keys.client_secret


class _AllowOne:
    """ZAP credentials provider: only the cluster's client public key gets in."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key == self.client_public
        if not ok:
            self.refused += 1
            log.warning("refused a CurveZMQ connection with an unknown client key")
        return ok


def start_authenticator(ctx: zmq.Context, keys: CurveKeys | None) -> Any:
    """Start the controller's ZAP handler (None when Curve is off); the caller stops it.

    It must run before any Curve server socket binds: without a ZAP handler
    libzmq admits every Curve client that knows the server's public key.
    """
    if keys is None:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("monq.security.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowOne(keys.client_public))
    return auth


_FAILED = {
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0x0800): "no detail",
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0x2000): "protocol",
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0x4000): "authentication",
}
_SUCCEEDED = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", 0x1000)
#: nothing listens there: no handshake to judge
_NOBODY = zmq.EVENT_CONNECT_RETRIED


def handshake_refusal(info: ConnectionInfo, timeout: float = 1.0) -> str | None:
    """Why the controller refuses this process's connections, or None if it does not.

    Opens one socket to the Hub port with this process's settings and watches
    the handshake.  Used to turn "no answer" into a clear error when the
    connection file's Curve keys (or their absence) do not match the cluster's.
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    mon = None
    try:
        sock.linger = 0
        client_socket_setup(sock, info)
        events = _SUCCEEDED | _NOBODY
        for e in _FAILED:
            events |= e
        mon = sock.get_monitor_socket(events)
        sock.connect(info.url("hub"))
        if not mon.poll(int(timeout * 1000)):
            return None
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(mon)["event"]
        if event in (_SUCCEEDED, _NOBODY):
            return None
        what = _FAILED.get(event, str(event))
        if curve_keys(info) is None:
            return (f"the controller at {info.url('hub')} refused the connection ({what}): it "
                    "requires CurveZMQ (`monq start --curve`) and this connection file has no "
                    "curve keys")
        return (f"the controller at {info.url('hub')} refused this client's CurveZMQ handshake "
                f"({what}): the curve keys in the connection file are not the cluster's")
    finally:
        if mon is not None:
            sock.disable_monitor()
            mon.close(linger=0)
        sock.close(linger=0)
        ctx.term()
