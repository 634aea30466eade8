"""Copies straight between the memory of the parent and of a worker process.

Linux's ``process_vm_readv`` and ``process_vm_writev`` ("cross-memory attach") copy
from one process's memory into another's in one system call: one copy, where a
socket makes two (into the kernel's buffers, out of them) in many calls, and where
shared memory needs segments to name, size, reuse, and clean up after a crash.

The parent makes every copy: it reads a result out of the worker's memory, and writes
a call's arguments into buffers the worker made for them. It may, because the worker
is its child: the kernel allows a process ``ptrace`` access to its own children
(Yama's default scope 1 included); a worker could not read its parent's memory.
The calls go through ctypes, which releases the GIL around them.

:func:`available` says whether this process may use them: Linux, a C library with the
calls, no seccomp filter refusing them (containers), and Yama's scope below 2. The
pool then checks each new worker once (:func:`readable`), since a security module may
still refuse access to a particular process.

This module imports neither anyio nor pydantic: workers load it.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Sequence

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from typing import Any

__all__ = ("PROBE", "address_of", "available", "huge_pages", "read", "readable", "write")

_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
#: what :func:`readable` reads from a new worker, at the address it gives
PROBE = b"offload cross-memory probe"


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _PyBuffer(ctypes.Structure):  # Py_buffer, part of the stable ABI since 3.11
    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("process_vm_readv", "process_vm_writev"):
        fn = getattr(libc, name)
        fn.restype = ctypes.c_ssize_t
        fn.argtypes = (
            ctypes.c_int,
            ctypes.POINTER(_Iovec),
            ctypes.c_ulong,
            ctypes.POINTER(_Iovec),
            ctypes.c_ulong,
            ctypes.c_ulong,
        )
    return libc


@functools.cache
def _buffer_api() -> tuple[Any, Any]:
    """``PyObject_GetBuffer`` and ``PyBuffer_Release``, their prototypes set once."""
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
    release = ctypes.pythonapi.PyBuffer_Release
    release.argtypes = (ctypes.POINTER(_PyBuffer),)
    return get, release


def address_of(buffer: Any) -> int:
    """Address of the first byte of a C-contiguous buffer (any object that has one).

    Valid while the buffer lives and is not resized: the callers hold a memoryview
    of it, whose export forbids a resize.
    """
    get, release = _buffer_api()
    view = _PyBuffer()
    if get(buffer, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes
        raise BufferError("not a contiguous buffer")
    try:
        return view.buf or 0
    finally:
        release(ctypes.byref(view))


def huge_pages(buffer: Any) -> None:
    """Ask for transparent huge pages under ``buffer``, best effort. For a fresh
    large ``bytes``, whose memory malloc maps for it alone: ``madvise`` changes no
    content, only how the pages not yet touched are provided."""
    start = address_of(buffer)
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    end = (start + memoryview(buffer).nbytes) // page * page
    if end > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), _MADV_HUGEPAGE)


def _transfer(name: str, pid: int, pairs: Sequence[tuple[int, int, int]]) -> None:
    """Copy each ``(local address, remote address, length)`` of ``pairs``."""
    call = getattr(_libc(), name)
    local = _Iovec()
    remote = _Iovec()
    for here, there, length in pairs:
        done = 0
        while done < length:  # one call moves at most ~2 GiB
            local.base, local.len = here + done, length - done
            remote.base, remote.len = there + done, length - done
            n = call(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            if n <= 0:
                errno = ctypes.get_errno() if n < 0 else 0
                raise OSError(
                    errno, f"{name}({pid}): {os.strerror(errno) if errno else 'no progress'}"
                )
            done += n


def read(pid: int, pairs: Sequence[tuple[int, int, int]]) -> None:
    """Copy from process ``pid`` into this one: ``(here, there, length)`` pairs.

    :raises OSError: ``ESRCH`` once the process is gone, ``EFAULT`` for an address
        it does not map, ``EPERM`` if this process may not read it
    """
    _transfer("process_vm_readv", pid, pairs)


def write(pid: int, pairs: Sequence[tuple[int, int, int]]) -> None:
    """Copy from this process into process ``pid``: ``(here, there, length)`` pairs."""
    _transfer("process_vm_writev", pid, pairs)


def readable(pid: int, address: int) -> bool:
    """Whether the :data:`PROBE` that process ``pid`` holds at ``address`` can be read."""
    probe = ctypes.create_string_buffer(len(PROBE))
    try:
        read(pid, [(ctypes.addressof(probe), address, len(PROBE))])
    except OSError:
        return False
    return probe.raw == PROBE


@functools.cache
def available() -> bool:
    """Whether this process can use cross-memory copies at all (see the module)."""
    if sys.platform != "linux":
        return False
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", "rb") as scope:
            if int(scope.read()) >= 2:  # only administrators (2) or nobody (3)
                return False
    except (OSError, ValueError):
        pass  # no Yama
    try:
        _libc()
    except (OSError, AttributeError):
        return False
    return readable(os.getpid(), address_of(PROBE))
