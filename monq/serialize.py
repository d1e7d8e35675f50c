"""Pickling of functions, arguments and results, and numpy arrays as raw frames.

Objects are pickled with cloudpickle at protocol 5.  Any buffer of at least
``OOB_THRESHOLD`` bytes (numpy arrays, bytes-like objects that support
out-of-band pickling) leaves the pickle stream as its own *raw* frame, sent
with ``copy=False`` and rebuilt on the other side as a view of the received
frame, without a copy.  The pickle stream itself is always the first frame and
always signed (see :mod:`monq.protocol`); raw frames are only ever handed to
``pickle.loads`` as ``buffers=``, i.e. as plain memory, never as a stream.
Non-contiguous arrays are made contiguous once before sending.

``send_array`` / ``recv_array`` are the same idea for any zmq socket: a small
JSON frame with dtype and shape, then the data frame.  ``send_frames`` /
``recv_frames`` send and receive a whole message in the same way (large frames
without a copy) at a fifth of pyzmq's ``send_multipart``'s CPU.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import pickle
import sys
import types
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cloudpickle
import zmq

from monq.errors import SerializationError

# whole messages over any zmq socket: kept importable from here
from monq.frames import COPY_BELOW, recv_frames, send_frames  # noqa: F401

if TYPE_CHECKING:
    import numpy as np

#: buffers smaller than this stay inside the (signed) pickle stream
OOB_THRESHOLD = 64 * 1024


def _prepare(obj: Any) -> Any:
    """Make non-contiguous top-level arrays contiguous so they travel out of band."""
    # numpy is not imported here (it would cost an engine ~0.15 s of start-up): an array
    # exists only once its owner has imported numpy, so look for it in sys.modules
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, np.ndarray) and \
            not (obj.flags.c_contiguous or obj.flags.f_contiguous):
        return np.ascontiguousarray(obj)
    return obj


def _code_reduce(code: types.CodeType) -> Any:
    """cloudpickle's code reducer, but keeping the real file name.

    cloudpickle replaces it with ``<dynamic-code>``; keeping it lets an
    engine on the same machine show the source lines in a remote traceback.
    """
    ctor, args = cloudpickle.cloudpickle._code_reduce(code)
    return ctor, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


class _Pickler(cloudpickle.Pickler):
    dispatch_table = {**cloudpickle.Pickler.dispatch_table, types.CodeType: _code_reduce}


def _dumps(obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool]) -> bytes:
    with io.BytesIO() as f:
        _Pickler(f, protocol=5, buffer_callback=buffer_callback).dump(obj)
        return f.getvalue()


_ATOMS = frozenset({type(None), bool, int, float, complex, str})
_CONTAINERS = frozenset({tuple, list, dict})
#: the most elements the plain-type walk looks at before leaving the object to cloudpickle
_PLAIN_BUDGET = 64


def _plain(obj: Any) -> bool:
    """Whether ``obj`` is small and made of built-in types only (exact types, not
    subclasses, which may live in ``__main__``): plain pickle then gives the same
    stream as cloudpickle, without its Pickler set-up (most task arguments and
    results, such as ``()``, ``(i,)`` or ``None``)."""
    todo = [obj]
    budget = _PLAIN_BUDGET
    while todo:
        x = todo.pop()
        t = type(x)
        if t in _ATOMS:
            continue
        if t is bytes:
            if len(x) >= OOB_THRESHOLD:
                return False
            continue
        if t not in _CONTAINERS:
            return False
        budget -= len(x)
        if budget < 0:
            return False
        todo.extend(x.keys() if t is dict else x)
        if t is dict:
            todo.extend(x.values())
    return True


def serialize(obj: Any) -> tuple[list[Any], list[bool]]:
    """Pickle ``obj``; return ``(frames, raw_flags)`` with the stream first.

    Raises SerializationError (with the original exception as cause) when the
    object cannot be pickled.
    """
    if _plain(obj):
        return [pickle.dumps(obj, protocol=5)], [False]
    raws: list[Any] = []

    def on_buffer(pb: pickle.PickleBuffer) -> bool:
        mv = pb.raw()
        if mv.nbytes < OOB_THRESHOLD:
            return True  # keep small buffers in band: one frame costs more than the bytes
        raws.append(mv)
        return False

    try:
        stream = _dumps(obj, on_buffer)
    except Exception as e:
        raise SerializationError(f"cannot pickle {_describe(obj)}: {type(e).__name__}: {e}") from e
    return [stream, *raws], [False] + [True] * len(raws)


def deserialize(frames: Sequence[Any]) -> Any:
    """Rebuild an object from ``serialize``'s frames (zmq Frames, bytes or views)."""
    if not frames:
        raise SerializationError("no frames to unpickle")
    if len(frames) == 1 and type(frames[0]) is bytes:  # most results: one small stream
        try:
            return pickle.loads(frames[0])
        except Exception as e:
            raise SerializationError(f"cannot unpickle: {type(e).__name__}: {e}") from e
    stream = _view(frames[0])
    raws = [_view(f) for f in frames[1:]]
    try:
        return pickle.loads(stream, buffers=raws)
    except Exception as e:
        raise SerializationError(f"cannot unpickle: {type(e).__name__}: {e}") from e


#: pickled functions, by function: a task sent many times pickles its function once
#: (as Dask does; a by-value function's globals are captured at its first send)
_FN_STREAMS: weakref.WeakKeyDictionary[Callable[..., Any], bytes] = weakref.WeakKeyDictionary()
#: unpickled functions, by the digest of their stream (engine side)
_FN_OBJECTS: collections.OrderedDict[bytes, Callable[..., Any]] = collections.OrderedDict()
_FN_CACHE_SIZE = 256


def _function_stream(f: Callable[..., Any]) -> bytes:
    try:
        cached = _FN_STREAMS.get(f)
    except TypeError:  # not weak-referenceable or not hashable: no cache
        cached = None
    if cached is not None:
        return cached
    try:
        stream = _dumps(f, lambda pb: True)  # everything in band: one signed frame
    except Exception as e:
        raise SerializationError(f"cannot pickle {_describe(f)}: {type(e).__name__}: {e}") from e
    with contextlib.suppress(TypeError):
        _FN_STREAMS[f] = stream
    return stream


def pack_apply(f: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
               ) -> tuple[list[Any], list[bool]]:
    """Serialize a call ``f(*args, **kwargs)``: the function's stream, then the arguments'
    stream and their raw frames."""
    if not callable(f):
        raise TypeError(f"{f!r} is not callable")
    fn = _function_stream(f)
    frames, raw = serialize((tuple(_prepare(a) for a in args),
                             {k: _prepare(v) for k, v in kwargs.items()}))
    return [fn, *frames], [False, *raw]


#: the arguments' stream of a call without arguments: one object for every such task, so a
#: batch carries it once, as it does the function's stream
_NO_ARGS = pickle.dumps(((), {}), protocol=5)
#: the raw flags of a call whose arguments are one in-band stream (shared, never changed)
_IN_BAND = (False, False)
#: the function packed last: (weak reference, stream, name, frames of a call without
#: arguments); one tuple, replaced whole, so threads may share it
_LAST: list[Any] = [None]


def pack_call(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[Sequence[Any], Sequence[bool], str]:
    """``pack_apply(f, args, kwargs)`` and ``func_name(f)``, for a client submitting many
    tasks: ``(frames, raw_flags, name)``, the same frames as pack_apply's.

    A burst sends one function again and again: the last one's stream and name are
    kept (no cache look-up, no name to build), and a call without arguments is the
    same two frames every time (nothing to pickle, no list to make).  Small plain
    arguments are pickled without cloudpickle (see :func:`serialize`).  The frames
    returned may be shared: callers never change them.
    """
    last = _LAST[0]
    if last is not None and last[0]() is f:
        _, fn, name, bare = last
    else:
        if not callable(f):
            raise TypeError(f"{f!r} is not callable")
        fn = _function_stream(f)
        name = func_name(f)
        bare = (fn, _NO_ARGS)
        with contextlib.suppress(TypeError):
            # kept only where _function_stream keeps it (a callable it cannot key is
            # pickled anew each time, its state as it is then)
            if _FN_STREAMS.get(f) is fn:
                _LAST[0] = (weakref.ref(f), fn, name, bare)
    if not args and not kwargs:
        return bare, _IN_BAND, name
    call = (args if type(args) is tuple else tuple(args), kwargs)
    if _plain(call):
        return (fn, pickle.dumps(call, protocol=5)), _IN_BAND, name
    frames, raw = serialize((tuple(_prepare(a) for a in args),
                             {k: _prepare(v) for k, v in kwargs.items()}))
    return [fn, *frames], [False, *raw], name


def _load_function(frame: Any) -> Any:
    stream = _view(frame)
    key = hashlib.blake2b(stream, digest_size=16).digest()
    f = _FN_OBJECTS.get(key)
    if f is not None:
        _FN_OBJECTS.move_to_end(key)
        return f
    f = deserialize([stream])
    _FN_OBJECTS[key] = f
    if len(_FN_OBJECTS) > _FN_CACHE_SIZE:
        _FN_OBJECTS.popitem(last=False)
    return f


def unpack_apply(frames: Sequence[Any]) -> tuple[Callable[..., Any], tuple[Any, ...],
                                                 dict[str, Any]]:
    if len(frames) < 2:
        raise SerializationError("request is not a (function, arguments) pair of streams")
    f = _load_function(frames[0])
    if not callable(f):
        raise SerializationError(f"request is not a call: {_describe(f)} is not callable")
    obj = deserialize(frames[1:])
    try:
        args, kwargs = obj
        args, kwargs = tuple(args), dict(kwargs)
    except (TypeError, ValueError):
        raise SerializationError("request arguments are not an (args, kwargs) pair") from None
    return f, args, kwargs


def func_name(f: Any) -> str:
    """A short human name for what runs, recorded in the history."""
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None)
    mod = getattr(f, "__module__", None)
    if name is None:
        return type(f).__name__
    return f"{mod}.{name}" if mod and mod not in ("__main__", "builtins") else str(name)


def _view(frame: Any) -> Any:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return frame


def _describe(obj: Any) -> str:
    try:
        r = repr(obj)
    except Exception:
        r = f"<{type(obj).__qualname__} object (repr failed)>"
    return r if len(r) <= 80 else r[:77] + "..."


# -- arrays over any zmq socket --------------------------------------------------


def send_array(socket: zmq.Socket, array: np.ndarray, flags: int = 0, copy: bool = False,
               track: bool = False) -> Any:
    """Send a numpy array as two frames: JSON ``{dtype, shape}`` then the raw data.

    The data frame is sent without a copy when the array is contiguous; a
    non-contiguous array is made contiguous first.  Object arrays are refused:
    they hold pointers, not data.
    """
    import numpy as np
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise TypeError("send_array cannot send object arrays; pickle them instead")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    dtype = np.lib.format.dtype_to_descr(array.dtype)
    md = json.dumps({"dtype": dtype, "shape": list(array.shape)}).encode()
    # as plain bytes: datetime64 arrays have no buffer interface, and nothing
    # may fail once the first frame has gone out with SNDMORE
    data = array.reshape(-1).view(np.uint8)
    socket.send(md, flags | zmq.SNDMORE)
    return socket.send(data, flags, copy=copy, track=track)  # type: ignore[call-overload]


def recv_array(socket: zmq.Socket, flags: int = 0, copy: bool = False) -> np.ndarray:
    """Receive an array sent by :func:`send_array`, as a view of the received frame."""
    import numpy as np

    md = json.loads(socket.recv(flags))
    data = socket.recv(flags, copy=copy)
    buf = data.buffer if isinstance(data, zmq.Frame) else data
    dtype = md["dtype"]
    dt = np.lib.format.descr_to_dtype(dtype)  # nested fields, padding, subarrays
    return np.frombuffer(buf, dtype=dt).reshape(md["shape"])

