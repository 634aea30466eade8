"""What a dead worker leaves behind: its fault handler's report, read by the parent.

The parent makes each worker an anonymous file before starting it (a memfd, else an
unlinked temporary file) and passes it on the command line; the worker points
:mod:`faulthandler` at it. Nothing writes to it while calls run: only a fatal signal
(SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL), whose handler writes the Python stack of
every thread before the process dies. The parent reads the file once it sees the
worker dead, from its start and at most :data:`READ_LIMIT` bytes however much the
worker wrote, and closes it with the worker's handle (``WorkerHandle.close``).

A process the function forks (``os.fork``, which runs the worker's fork hooks) writes
its own report to the inherited stderr and holds ``/dev/null`` where the file was
(``worker._after_fork_in_child``): it cannot write into the worker's report.
"""

from __future__ import annotations

import os

__all__ = ("READ_LIMIT", "create", "excerpt", "read")

#: the most the parent reads of a report: faulthandler writes at most 100 frames per
#: thread, the most recent first, and the crashing thread's are what matter
READ_LIMIT = 64 << 10
#: frames of the crashing thread quoted in an error's message
MESSAGE_FRAMES = 8


def create() -> int:
    """A new, empty, anonymous file for one worker's report: its descriptor, not
    inheritable (``pass_fds`` passes it on to the worker alone)."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("offload-crash-report", os.MFD_CLOEXEC)
        except OSError:
            pass  # a kernel without memfd, or a seccomp filter that refuses it
    import tempfile  # only here: it imports random, shutil...

    fd, path = tempfile.mkstemp(prefix="offload-crash-report-")
    os.unlink(path)
    return fd


def read(fd: int) -> str | None:
    """The report in ``fd`` (cut at :data:`READ_LIMIT` bytes), or None when the worker
    wrote none."""
    try:
        data = os.pread(fd, READ_LIMIT + 1, 0)
    except OSError:
        return None
    if not data.strip():
        return None
    text = data[:READ_LIMIT].decode("utf-8", "backslashreplace")
    if len(data) > READ_LIMIT:
        whole_lines = text.rpartition("\n")[0]
        text = f"{whole_lines}\n... (cut at {READ_LIMIT >> 10} KiB)\n"
    return text


def excerpt(report: str) -> str:
    """The head of ``report`` for a message: the fatal error, then the crashing
    thread's most recent frames (faulthandler lists every thread, the newest first,
    and marks the crashing one ``Current thread``)."""
    lines = report.splitlines()
    head = lines[:1]
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if start is None:  # another layout: its first lines
        return "\n".join(lines[: MESSAGE_FRAMES + 2])
    frames = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        frames.append(line)
    if len(frames) > MESSAGE_FRAMES:
        frames[MESSAGE_FRAMES:] = ["  ..."]
    if start == 0:
        head = []
    return "\n".join([*head, lines[start], *frames])
