"""Out-of-band buffers: what travels beside a frame's pickle, and what it is read into.

Pickle protocol 5 hands large buffers (a NumPy array's memory, a ``bytearray``) to a
callback instead of copying them into its stream, so that they are written from
their own memory and read into a fresh buffer (``framing.py`` lays them out). This
module marks large ``bytes`` to travel that way too, makes the buffers a frame is
read into, and lets go of them once decoded.

Workers import it at start: it keeps to the modules they load anyway (no typing, no
contextlib), as does ``worker.py``.
"""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import Sequence

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from typing import Any, SupportsIndex

__all__ = (
    "BIG_BUFFER",
    "BIG_BYTES",
    "Buffer",
    "MappedBuffer",
    "Received",
    "out_of_band",
    "receive_buffer",
    "release",
    "slow_to_decode",
)

Buffer = bytes | bytearray | memoryview | mmap.mmap
#: a buffer a frame is read into (:func:`receive_buffer`), or that the copy of a
#: REMOTE buffer makes (``remote_buffers.py``)
Received = bytes | bytearray | mmap.mmap

#: ``bytes`` at least this long travel out of band too (pickle would copy them into
#: its stream): top-level arguments and results, see :func:`out_of_band`
BIG_BYTES = 1 << 16
#: a buffer at least this large (4 MiB) is read into a fresh mapping, not a bytearray:
#: bytearray(n) zero-fills n bytes at once, a mapping gets its pages as they are
#: written; on Linux the mapping is a memfd's, so that the ``bytes`` made from it
#: come from ``os.pread``, a copy made without holding the GIL
BIG_BUFFER = 1 << 22


class _OutOfBand:
    """A ``bytes`` that pickles out of band (pickle protocol 5 keeps ``bytes`` in
    band, and ``reducer_override`` is never asked about them)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return _bytes_from, (pickle.PickleBuffer(self.data),)


def out_of_band(obj: Any) -> Any:
    """``obj``, marked to travel out of band if it is a large ``bytes``."""
    if type(obj) is bytes and len(obj) >= BIG_BYTES:
        return _OutOfBand(obj)
    return obj


def _bytes_from(buffer: Buffer) -> bytes:
    # pickle hands over a memoryview of the buffer it was given
    owner = buffer.obj if isinstance(buffer, memoryview) else buffer
    if type(owner) is bytes and len(buffer) == len(owner):
        return owner  # made by remote_buffers.fetch or make_room: no copy
    if isinstance(owner, MappedBuffer) and owner.fd >= 0 and len(buffer) == len(owner):
        return os.pread(owner.fd, len(owner), 0)
    return bytes(buffer)


class MappedBuffer(mmap.mmap):
    """A received buffer in a fresh mapping; ``fd`` is its memfd until decoded."""

    __slots__ = ("fd",)
    fd: int

    def __del__(self) -> None:  # not decoded: a cancelled call, a bad frame
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1


def receive_buffer(size: int) -> Received:
    """Room to read an out-of-band buffer (or a pickle) of ``size`` bytes into."""
    if size < BIG_BUFFER:
        return bytearray(size)
    fd = -1
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("offload-frame", os.MFD_CLOEXEC)
        except OSError:  # refused by a seccomp profile: an anonymous mapping will do
            pass
        else:
            os.ftruncate(fd, size)
    mapping = MappedBuffer(fd, size)
    mapping.fd = fd
    return mapping


def release(parts: Sequence[Buffer]) -> None:
    """Let go of the mappings among a decoded frame's ``parts``."""
    for part in parts:
        if isinstance(part, MappedBuffer):
            if part.fd >= 0:
                os.close(part.fd)  # the mapping, and what views it, stay valid
                part.fd = -1
            # Unmapping 64 MB takes milliseconds: here, in the decoding thread, rather
            # than wherever the last reference goes. Arrays made on the mapping
            # still export it, and keep it.
            try:
                part.close()
            except BufferError:
                pass


def slow_to_decode(parts: Sequence[Buffer]) -> bool:
    """Whether decoding these parts may take long (``bytes`` made from mappings)."""
    return any(isinstance(part, MappedBuffer) for part in parts)
