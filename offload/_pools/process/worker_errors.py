"""How a worker describes an exception: pickled for the parent, or, when it will not
travel, by its type's name, its message and its traceback as text.

The user's hooks (``__str__``, ``__repr__``, ``__reduce__``, a metaclass's attributes)
may raise anything, ``SystemExit`` included: what describes an exception must not.
Workers import it at start: no typing; ``traceback`` loads when first needed.
"""

from __future__ import annotations

import pickle

from .framing import RAISED, RAISED_UNPICKLABLE

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from typing import Any

__all__ = ("describe", "exception_reply", "str_of", "traceback_of", "type_name")


def exception_reply(exc: BaseException) -> tuple[int, Any]:
    """``(status, value)`` for ``exc``: itself pickled, or what describes it."""
    tb = traceback_of(exc)
    try:
        blob = pickle.dumps(exc, protocol=5)
        pickle.loads(blob)  # the parent must be able to rebuild it, too
    except BaseException:
        try:  # an exception whose __init__ needs what its args lack (HTTPException)
            from .exception_pickling import dumps

            blob = dumps(exc)
            pickle.loads(blob)
        except BaseException:
            aborted = not isinstance(exc, Exception)  # SystemExit and its kin
            return RAISED_UNPICKLABLE, (type_name(exc), str_of(exc), tb, aborted)
    return RAISED, (blob, tb)


def type_name(exc: BaseException) -> str:
    try:
        kind = type(exc)
        return f"{kind.__module__}.{kind.__qualname__}"
    except BaseException:
        return "<unknown type>"


def str_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return "<str() failed>"


def describe(exc: BaseException) -> str:
    """``TypeError: cannot pickle '_thread.lock' object``."""
    try:
        name = type(exc).__qualname__
    except BaseException:
        name = type_name(exc)
    message = str_of(exc)
    return f"{name}: {message}" if message else name


def traceback_of(exc: BaseException) -> str:
    import traceback

    try:
        return "".join(traceback.format_exception(exc))
    except BaseException:
        pass
    try:  # its frames alone: no str() or repr() of anything of the user's
        frames = "".join(traceback.format_tb(exc.__traceback__))
    except BaseException:
        frames = ""
    return f"Traceback (most recent call last):\n{frames}{type_name(exc)}: {str_of(exc)}\n"
