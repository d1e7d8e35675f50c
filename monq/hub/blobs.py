"""How a message's buffer frames are kept in one database column, and read back.

Each frame is stored as one flag byte (1 = raw), an 8-byte little-endian
length, then its bytes.  The Hub never unpickles what it stores; it hands the
frames back, signed anew, to a client that asks for a result.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from zmq import Frame

_HEAD = struct.Struct("<BQ")
#: zmq Frames up to this size are packed from their (cached) bytes, larger ones from a view
_COPY_MAX = 1 << 16


def total_size(frames: Sequence[Any]) -> int:
    n = 0
    for f in frames:
        n += f.nbytes if type(f) is memoryview else len(f)
    return n


def pack(frames: Sequence[Any], raw: Sequence[Any]) -> bytes:
    """``raw``: one flag per frame (any truth value)."""
    head = _HEAD.pack
    parts: list[Any] = []
    for f, r in zip(frames, raw):
        t = type(f)
        if t is Frame and len(f) <= _COPY_MAX:
            # its bytes, copied once and kept by the Frame: cheaper than a memoryview of
            # it, and a batch's tasks share their function's frame (copied once for all)
            f = f.bytes
        elif t is not bytes:
            f = memoryview(f)  # without a copy
            parts += (head(1 if r else 0, f.nbytes), f)
            continue
        parts += (head(1 if r else 0, len(f)), f)
    return b"".join(parts)


def unpack(blob: bytes) -> tuple[list[memoryview], list[bool]]:
    """Split a packed blob; ValueError if it is truncated or corrupt."""
    view = memoryview(blob)
    frames: list[memoryview] = []
    raw: list[bool] = []
    pos = 0
    while pos < len(view):
        if pos + _HEAD.size > len(view):
            raise ValueError("truncated frame header")
        flag, n = _HEAD.unpack_from(view, pos)
        pos += _HEAD.size
        if pos + n > len(view):
            raise ValueError("truncated frame")
        frames.append(view[pos : pos + n])
        raw.append(bool(flag))
        pos += n
    return frames, raw
