"""The relays that carry every task between clients and engines."""

from monq.schedulers.relay import Relay

__all__ = ["Relay"]
