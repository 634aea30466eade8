"""The worker's side of log forwarding: its records become LOG frames to the parent.

The parent sends its logger levels in a LOG frame (``logs.py``) before the boot
message, and again before a call (or a stream's MORE) whenever they changed. The
first one turns forwarding on: a handler goes on the worker's root logger, and the
worker's loggers take the parent's levels, so that ``logger.debug(...)`` below the
parent's level makes no record at all. During a call (or the initializer), the
handler renders each record into plain values and sends it as a LOG frame, without
blocking: when the channel has no room, the record is dropped and counted, and the
count goes to the parent before the reply. Outside a call, records stay in the
worker: its stderr, as logging's last resort writes them.

Workers import it at start. The handler (``worker_log_handler.py``) and ``logging``
load once the worker has answered the boot, unless the initializer has imported
``logging`` by then: a worker's start does not wait for them.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys

from .framing import HEADER, LOG

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from typing import Any

    from .worker_log_handler import Forwarder

__all__ = ("apply_levels", "forwarder", "install", "install_if_imported", "take_levels")

#: the handler on the root logger, once forwarding is on
forwarder: Forwarder | None = None
#: the levels received before ``logging`` was imported, and the channel they came on
_pending: tuple[Any, socket.socket] | None = None


def take_levels(sock: socket.socket, scratch: memoryview, n: int) -> int:
    """Apply the LOG frames (the parent's levels) at the start of the ``n`` bytes read
    into ``scratch``, reading more as needed; return how many bytes of the next frame,
    which is no LOG frame, are then at its start."""
    while True:
        while n < HEADER.size:
            k = sock.recv_into(scratch[n:])
            if not k:
                raise EOFError("connection closed")
            n += k
        length, count = HEADER.unpack_from(scratch)
        if count != LOG:
            return n
        end = HEADER.size + length
        if end > len(scratch):  # never, for a few levels: still read right
            data = bytearray(length)
            view = memoryview(data)
            got = n - HEADER.size
            view[:got] = scratch[HEADER.size : n]
            while got < length:
                k = sock.recv_into(view[got:])
                if not k:
                    raise EOFError("connection closed")
                got += k
            n = 0
        else:
            while n < end:
                k = sock.recv_into(scratch[n:])
                if not k:
                    raise EOFError("connection closed")
                n += k
            data = bytearray(scratch[HEADER.size : end])
            scratch[: n - end] = scratch[end:n]
            n -= end
        _levels(pickle.loads(data), sock)


def apply_levels(data: bytes, sock: socket.socket) -> None:
    """Apply the levels of a LOG frame from the parent, ``data`` its pickle, read on
    ``sock``: one read between a stream's items."""
    _levels(pickle.loads(data), sock)


def _levels(levels: Any, sock: socket.socket) -> None:
    global _pending
    if forwarder is not None:
        forwarder.set_levels(levels)
    else:
        _pending = levels, sock
        install_if_imported()


def install_if_imported() -> Forwarder | None:
    """Turn forwarding on, if the parent asked for it, provided ``logging`` is already
    imported (by the initializer's module, say); the forwarder, or None."""
    if _pending is not None and "logging" in sys.modules:
        return install()
    return forwarder


def install() -> Forwarder | None:
    """Turn forwarding on if the parent asked for it (imports ``logging``)."""
    global forwarder, _pending
    if _pending is None:
        return forwarder
    levels, sock = _pending
    _pending = None
    import logging

    from .worker_log_handler import Forwarder

    handler = Forwarder(sock, levels)
    logging.root.addHandler(handler)
    forwarder = handler
    os.register_at_fork(after_in_child=handler.forked)
    return handler
