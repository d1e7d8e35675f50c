"""The one error tree of monq: every exception monq raises derives from MonqError."""

from __future__ import annotations

import builtins
from typing import Any


class MonqError(Exception):
    """Root of every error monq raises."""


class NoClusterError(MonqError):
    """No cluster is running where the client looked for one."""


class AuthenticationError(MonqError):
    """The controller rejected this process's signature: its cluster key is wrong."""


class ProtocolError(MonqError):
    """A message is malformed, unsigned, badly signed or replayed."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SerializationError(MonqError):
    """An object could not be pickled or unpickled."""


class TimeoutError(MonqError, builtins.TimeoutError):  # noqa: A001 - also the builtin one
    """A wait ran out of time (the task may still finish later)."""


class EngineDied(MonqError):
    """The engine that held a task died before answering it."""

    def __init__(self, msg: str, engine: int | None = None) -> None:
        super().__init__(msg)
        self.engine = engine


class TaskTimeout(MonqError):
    """A task ran longer than the ``timeout`` of its view and was ended."""

    def __init__(self, msg: str, engine: int | None = None, msg_id: str | None = None,
                 traceback: str = "") -> None:
        super().__init__(msg)
        self.engine = engine
        self.msg_id = msg_id
        self.traceback = traceback


class HubError(MonqError):
    """The Hub could not answer a query (bad filter, unknown msg_id, ...)."""


class RemoteError(MonqError):
    """An exception raised by the task on an engine, carried back as plain data.

    ``ename`` and ``evalue`` are the remote exception's type name and message,
    ``traceback`` the formatted remote traceback, ``engine`` the engine id.
    """

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: str = "",
        engine: int | None = None,
        msg_id: str | None = None,
    ) -> None:
        super().__init__(ename, evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.engine = engine
        self.msg_id = msg_id

    def __str__(self) -> str:
        where = f" on engine {self.engine}" if self.engine is not None else ""
        return f"{self.ename}: {self.evalue}{where}"

    def render_traceback(self) -> str:
        """The remote traceback followed by the one-line summary."""
        return f"{self.traceback.rstrip()}\n[engine {self.engine}] {self.ename}: {self.evalue}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.ename, self.evalue, self.traceback, self.engine, self.msg_id))
