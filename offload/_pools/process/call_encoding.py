"""What travels to a worker and back: the call (function, arguments, the context it
carries) and its outcome.

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

from ..._errors import (
    CallAborted,
    OffloadError,
    RemoteTraceback,
    SerializationError,
    describe_error,
)
from . import framing
from .buffers import Buffer, Received, out_of_band

if TYPE_CHECKING:
    from ..._call import Call

__all__ = ("decode_reply", "encode_request", "function_blob")


def function_blob(fn: Callable[..., Any]) -> tuple[bytes, bool]:
    """``fn`` pickled for a worker, and whether the worker may keep it for later calls.

    By reference when the worker can import it, else by value with cloudpickle
    (lambdas, closures, ``__main__`` functions, and partials or methods that refer to
    them). Only a plain module-level function (or a decorated one) is kept: methods,
    partials and callable objects carry state, which each call sends anew and which
    the worker drops after the call.
    """
    if type(fn) is FunctionType:
        # A plain function by reference pickles to its name, the same bytes every
        # call: cached.
        blob = _by_reference.get(fn)
        if blob is not None:
            return blob, True
    if _importable(fn):
        try:
            blob = pickle.dumps(fn, protocol=5)
        except Exception:
            pass
        else:
            if not _refers_to_main(blob):
                if type(fn) is FunctionType:
                    _by_reference[fn] = blob
                    return blob, True
                return blob, bool(getattr(type(fn), "__offload_function__", False))
    import cloudpickle

    return cloudpickle.dumps(fn, protocol=5), False


def _refers_to_main(data: Buffer) -> bool:
    """Whether a pickle may name something in ``__main__``, which a worker has not (its
    own ``__main__`` is another): every such reference spells the module's name. A
    string that merely contains it costs a needless by-value pickle, nothing else."""
    return b"__main__" in data


#: blobs of plain functions sent by reference; weak, so a module's functions can go
_by_reference: weakref.WeakKeyDictionary[FunctionType, bytes] = weakref.WeakKeyDictionary()


def _importable(fn: object) -> bool:
    # A worker has its own __main__, and cannot reach into a function's locals.
    module = getattr(fn, "__module__", None)
    return module not in (None, "__main__") and "<locals>" not in getattr(fn, "__qualname__", "")


def encode_request(
    call: Call, max_payload: int, cross_memory: bool = False, stream: int = 0
) -> framing.Frame:
    """The call as a frame for a worker (``cross_memory``: see :func:`.framing.encode`);
    ``stream``: for a stream's generator, its buffer.

    :raises SerializationError: the function or arguments do not pickle, or take more
        than ``max_payload`` bytes
    """
    try:
        blob, cache = function_blob(call.fn)
    except BaseException as exc:
        _reraise_interrupt(exc)
        raise SerializationError(
            f"cannot send {call.name} to a worker process: {describe_error(exc)}"
        ) from exc
    args, kwargs = call.args, call.kwargs
    if bytes in map(type, args):
        args = tuple(map(out_of_band, args))
    if kwargs and bytes in map(type, kwargs.values()):
        kwargs = {name: out_of_band(value) for name, value in kwargs.items()}
    request: tuple[Any, ...] = (blob, cache, args, kwargs, call.context)
    if stream:
        request = (*request, stream)
    try:
        parts = framing.encode(request, cross_memory=cross_memory)
        if _refers_to_main(parts[1]):  # the pickle: header or table, pickle, buffers
            raise pickle.PicklingError("refers to __main__")
    except BaseException as exc:
        _reraise_interrupt(exc)
        try:  # what plain pickle refuses (lambdas, closures), or sends by a name
            import cloudpickle  # the worker cannot look up (``__main__``)

            parts = framing.encode(request, cloudpickle.dumps, cross_memory)
        except BaseException as exc:
            _reraise_interrupt(exc)
            _check_context(call)
            raise SerializationError(
                f"the arguments of {call.name} cannot be pickled: {describe_error(exc)}"
            ) from exc
    size = parts.size
    if size > max_payload:
        raise SerializationError(
            f"the call to {call.name} takes {size} bytes pickled, more than the pool's "
            f"max_payload ({max_payload} bytes)"
        )
    return parts


def _check_context(call: Call) -> None:
    """On the way to an error: if a carried context variable's value is what does not
    pickle, say so, naming it (the arguments are not to blame).

    :raises SerializationError: a context value does not pickle, even by value
    """
    if call.context is None:
        return
    import cloudpickle

    for name, value in call.context[0]:
        try:
            cloudpickle.dumps(value, protocol=5)
        except BaseException as exc:
            _reraise_interrupt(exc)
            raise SerializationError(
                f"cannot send {call.name} to a worker process: the value of the context "
                f"variable {name} (context_vars) cannot be pickled: {describe_error(exc)}"
            ) from exc


def decode_reply(call: Call, data: Received, buffers: list[Received]) -> Any:
    """The outcome of ``call`` from a worker's answer: its result, or its exception
    raised (a ``BaseException`` that is not an ``Exception`` as :class:`CallAborted`).
    An answer to a call the function ran (``(status, value, ran)``) sets ``call.ran``.

    :raises SerializationError: the result could not be pickled, unpickled or sent
    """
    try:
        reply = framing.decode(data, buffers)
    except BaseException as exc:
        _reraise_interrupt(exc)
        raise SerializationError(
            f"the result of {call.name} cannot be unpickled: {describe_error(exc)}"
        ) from exc
    return outcome(call, reply)


def outcome(call: Call, reply: Any) -> Any:
    """The result in a decoded answer of a worker, or its exception raised (see
    :func:`decode_reply`)."""
    status, value = reply[0], reply[1]
    if len(reply) > 2:
        call.ran = reply[2]
    if status == framing.OK:
        return value
    if status == framing.RAISED:
        blob, tb = value
        try:
            error = pickle.loads(blob)
        except BaseException as exc:
            _reraise_interrupt(exc)
            raise SerializationError(
                f"the exception raised by {call.name} cannot be unpickled: {describe_error(exc)}"
            ) from RemoteTraceback(tb)
        try:
            if not isinstance(error, Exception):
                error.__cause__ = RemoteTraceback(tb)
                raise CallAborted(
                    f"{call.name} raised {describe_error(error)}; it is not re-raised as such, "
                    "which would end this program"
                ) from error
            raise error from RemoteTraceback(tb)
        finally:
            del error  # its traceback holds this frame: no cycle for the GC to find
    if status == framing.RAISED_UNPICKLABLE:
        type_name, message, tb, aborted = value
        raise (CallAborted if aborted else OffloadError)(
            f"{call.name} raised {type_name}: {message} "
            "(the exception could not be sent from the worker: it does not pickle and unpickle)"
        ) from RemoteTraceback(tb)
    if status == framing.BAD_REQUEST:
        message, tb = value
        raise SerializationError(
            f"the worker could not unpickle the call to {call.name}: {message}"
        ) from RemoteTraceback(tb)
    if status == framing.TOO_LARGE:
        raise SerializationError(
            f"the result of {call.name} takes {value[0]} bytes pickled, more than the pool's "
            f"max_payload ({value[1]} bytes)"
        )
    message, tb = value
    raise SerializationError(
        f"the result of {call.name} cannot be pickled: {message}"
    ) from RemoteTraceback(tb)


def _reraise_interrupt(exc: BaseException) -> None:
    """Pickling or unpickling the user's objects may raise anything, down to a
    ``SystemExit`` from a ``__reduce__``: it fails only the call. Not a Ctrl-C, though,
    which is meant for this process."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc
