"""How a message's buffer frames are kept in one database column, and read back.

Each frame is stored as one flag byte (1 = raw), an 8-byte little-endian
length, then its bytes.  The Hub never unpickles what it stores; it hands the
frames back, signed anew, to a client that asks for a result.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
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


def pack(frames: Sequence[Any], raw: Iterable[Any]) -> bytes:
    """``raw``: one flag per frame (any truth value; at least as many as frames)."""
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


class Packer:
    """Packs the buffers of many messages, none of them raw: ``(blob, their size)``,
    the blob None when they are over ``cap`` bytes (not kept).

    The tasks of a burst mostly carry the same bytes (one pickled function, the
    same empty arguments; results the same pickled ``None``): one blob for all
    of them costs one lookup each instead of a pack, and their rows hold one
    object (the payload store then finds equal blobs by identity).  Buffers
    are compared by content when they are ``bytes`` (how the Hub receives
    frames under 64 KB), by identity otherwise (a zmq Frame).  Meant to live
    for one batch: it keeps what it has seen.
    """

    __slots__ = ("_cap", "_known")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._known: dict[tuple[Any, ...], tuple[bytes | None, int]] = {}

    def pack(self, frames: Sequence[Any]) -> tuple[bytes | None, int]:
        key = tuple(frames)
        try:
            got = self._known.get(key)
        except TypeError:  # an unhashable buffer (a writable memoryview)
            return self._pack(frames)
        if got is None:
            got = self._known[key] = self._pack(frames)
        return got

    def _pack(self, frames: Sequence[Any]) -> tuple[bytes | None, int]:
        size = total_size(frames)
        return (None if size > self._cap else pack(frames, NOT_RAW)), size


#: ``raw`` for :func:`pack` when no frame is raw: one "not raw" flag per frame, however many
NOT_RAW = itertools.repeat(0)


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
