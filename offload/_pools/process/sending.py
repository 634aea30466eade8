"""Sending a frame's parts: in batches one ``sendmsg`` takes, resumed after a
partial send.

A frame is a list of parts (header, pickle, one per out-of-band buffer) written
with scatter-gather I/O: no part is copied to be sent. One ``sendmsg`` takes at most
IOV_MAX parts, and a socket may take fewer bytes than offered: what is left is a
list of views on the parts (:func:`remaining`).

Workers import it at start: it keeps to the modules they load anyway (no typing, no
contextlib), as does ``worker.py``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from .buffers import Buffer

__all__ = ("MAX_PARTS", "first_batch", "first_bytes", "remaining", "send_parts")


def remaining(parts: Sequence[Buffer], sent: int) -> list[Buffer]:
    """What is left of ``parts`` once ``sent`` bytes of them are written."""
    views: list[Buffer] = []
    for part in parts:
        size = len(part)
        if sent >= size:
            sent -= size
            continue
        views.append(memoryview(part)[sent:])
        sent = 0
    return views


def first_bytes(parts: Sequence[Buffer], limit: int) -> Sequence[Buffer]:
    """The first ``limit`` bytes of ``parts`` (all of them if shorter); like
    :func:`remaining`, for the 1-D byte buffers ``framing.encode`` makes."""
    views: list[Buffer] = []
    for part in parts:
        if len(part) >= limit:
            views.append(memoryview(part)[:limit])
            return views
        views.append(part)
        limit -= len(part)
    return parts


def _iov_max() -> int:
    try:
        return max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
    except (AttributeError, ValueError, OSError):
        return 16  # the least POSIX allows


#: parts one ``sendmsg`` takes at most: past the system's IOV_MAX (1024 on Linux) it
#: fails with EMSGSIZE, and a frame has a part per out-of-band buffer
MAX_PARTS = _iov_max()


def first_batch(parts: Sequence[Buffer]) -> Sequence[Buffer]:
    """The first parts of ``parts`` that one ``sendmsg`` takes."""
    return parts if len(parts) <= MAX_PARTS else parts[:MAX_PARTS]


def send_parts(sock: socket.socket, parts: Sequence[Buffer]) -> None:
    """Write every part on a blocking socket: one ``sendmsg`` unless it is large."""
    views = parts
    while views:
        views = remaining(views, sock.sendmsg(first_batch(views)))
