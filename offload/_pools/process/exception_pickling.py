"""Exceptions that pickle cannot rebuild, sent from a worker all the same.

Pickle rebuilds an exception as ``type(exc)(*exc.args)``, then restores its
``__dict__``. ``args`` holds only the positional arguments the exception was built
with, and Starlette's ``HTTPException`` and ``WebSocketException`` (FastAPI's too)
never pass theirs to ``Exception.__init__``: one built with keywords,
``HTTPException(status_code=404, detail=...)`` as FastAPI's documentation writes it,
has empty ``args``, and ``HTTPException()`` fails in the parent for want of
``status_code``. Any exception whose ``__init__`` requires arguments it does not
keep in ``args`` fails the same way. :func:`dumps` sends such an exception to be
rebuilt without calling ``__init__``: ``BaseException.__new__`` with its ``args``,
then its ``__dict__`` (``status_code``, ``detail``, ``headers``), which is all
``__init__`` had made.

Imported by a worker only when plain pickling failed; the parent imports it when it
unpickles what :func:`dumps` made.
"""

from __future__ import annotations

import pickle

TYPE_CHECKING = False  # not typing's: a worker imports this module, and never typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ("dumps", "rebuild")


def rebuild(
    cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any] | None
) -> BaseException:
    """An instance of ``cls`` with ``args`` and ``state``, without calling ``__init__``."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    if state:
        exc.__dict__.update(state)
    return exc


class _Rebuilt:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        return rebuild, (type(exc), exc.args, getattr(exc, "__dict__", None) or None)


def dumps(exc: BaseException) -> bytes:
    """``exc`` pickled to be rebuilt by :func:`rebuild`.

    :raises Exception: what pickling its class, ``args`` or ``__dict__`` raises
    """
    return pickle.dumps(_Rebuilt(exc), protocol=5)
