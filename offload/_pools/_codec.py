"""What travels to a worker and back: the call (function, arguments) and its outcome.

Functions importable by name travel by reference; lambdas, closures and ``__main__``
functions by value (cloudpickle). Arguments go through plain pickle, falling back to
cloudpickle. Every failure is a :class:`SerializationError` naming the function.
"""

from __future__ import annotations

import pickle
import weakref
from collections.abc import Callable
from types import FunctionType
from typing import TYPE_CHECKING, Any

from .._errors import OffloadError, RemoteTraceback, SerializationError
from . import _wire

if TYPE_CHECKING:
    from .._call import Call

__all__ = ("decode_reply", "encode_request", "function_blob")


def function_blob(fn: Callable[..., Any]) -> bytes:
    """``fn`` pickled for a worker: by reference when the worker can import it,
    else by value with cloudpickle (lambdas, closures, ``__main__`` functions)."""
    if type(fn) is FunctionType:
        # A plain function by reference pickles to its name, the same bytes every
        # call: cached. (Not methods, partials or instances: they carry state.)
        blob = _by_reference.get(fn)
        if blob is not None:
            return blob
    if _importable(fn):
        try:
            blob = pickle.dumps(fn, protocol=5)
        except Exception:
            pass
        else:
            if type(fn) is FunctionType:
                _by_reference[fn] = blob
            return blob
    import cloudpickle

    return cloudpickle.dumps(fn, protocol=5)  # type: ignore[no-any-return]


#: blobs of plain functions sent by reference; weak, so a module's functions can go
_by_reference: weakref.WeakKeyDictionary[FunctionType, bytes] = weakref.WeakKeyDictionary()


def _importable(fn: object) -> bool:
    # A worker has its own __main__, and cannot reach into a function's locals.
    module = getattr(fn, "__module__", None)
    return module not in (None, "__main__") and "<locals>" not in getattr(fn, "__qualname__", "")


def encode_request(call: Call, max_payload: int, cross_memory: bool = False) -> _wire.Frame:
    """The call as a frame for a worker (``cross_memory``: see :func:`_wire.encode`).

    :raises SerializationError: the function or arguments do not pickle, or take more
        than ``max_payload`` bytes
    """
    try:
        blob = function_blob(call.fn)
    except Exception as exc:
        raise SerializationError(f"cannot send {call.name} to a worker process: {exc}") from exc
    args, kwargs = call.args, call.kwargs
    if bytes in map(type, args):
        args = tuple(map(_wire.out_of_band, args))
    if kwargs and bytes in map(type, kwargs.values()):
        kwargs = {name: _wire.out_of_band(value) for name, value in kwargs.items()}
    request = (blob, args, kwargs)
    try:
        parts = _wire.encode(request, cross_memory=cross_memory)
    except Exception:
        try:  # arguments that plain pickle refuses: lambdas, closures
            import cloudpickle

            parts = _wire.encode(request, cloudpickle.dumps, cross_memory)
        except Exception as exc:
            raise SerializationError(
                f"the arguments of {call.name} cannot be pickled: {exc}"
            ) from exc
    size = parts.size
    if size > max_payload:
        raise SerializationError(
            f"the call to {call.name} takes {size} bytes pickled, more than the pool's "
            f"max_payload ({max_payload} bytes)"
        )
    return parts


def decode_reply(call: Call, data: _wire.Received, buffers: list[_wire.Received]) -> Any:
    try:
        status, value = _wire.decode(data, buffers)
    except Exception as exc:
        raise SerializationError(f"the result of {call.name} cannot be unpickled: {exc}") from exc
    if status == _wire.OK:
        return value
    if status == _wire.RAISED:
        blob, tb = value
        try:
            error = pickle.loads(blob)
        except Exception as exc:
            raise SerializationError(
                f"the exception raised by {call.name} cannot be unpickled: {exc}"
            ) from RemoteTraceback(tb)
        try:
            raise error from RemoteTraceback(tb)
        finally:
            del error  # its traceback holds this frame: no cycle for the GC to find
    if status == _wire.RAISED_UNPICKLABLE:
        type_name, message, tb = value
        raise OffloadError(
            f"{call.name} raised {type_name}: {message} "
            "(the exception could not be sent from the worker: it does not pickle and unpickle)"
        ) from RemoteTraceback(tb)
    if status == _wire.BAD_REQUEST:
        raise SerializationError(
            f"the worker could not unpickle the call to {call.name}"
        ) from RemoteTraceback(value)
    if status == _wire.TOO_LARGE:
        raise SerializationError(
            f"the result of {call.name} takes {value[0]} bytes pickled, more than the pool's "
            f"max_payload ({value[1]} bytes)"
        )
    raise SerializationError(f"the result of {call.name} cannot be pickled") from RemoteTraceback(
        value
    )
