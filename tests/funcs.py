"""Module-level functions that worker processes import by reference."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

from offload import offload


def add(a: int, b: int) -> int:
    return a + b


def noop() -> None:
    return None


def getpid() -> int:
    return os.getpid()


def echo(value: Any) -> Any:
    return value


def spin(seconds: float) -> int:
    """Burn CPU for ``seconds``; returns the iteration count."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def touch_then(path: str, value: Any = None) -> Any:
    Path(path).write_text("ran")
    return value


def exit_now(code: int = 3) -> None:
    os._exit(code)


def fork_then_exit(path: str, code: int) -> None:
    """Fork a child that inherits every descriptor (the worker's channel too) and
    lives until ``path`` exists (at most 60 s), then exit with ``code``."""
    if os.fork() == 0:
        deadline = time.monotonic() + 60
        while not Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(0)
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def abort_now() -> None:
    os.abort()


def fatal_python_error() -> None:
    """The interpreter's own fatal error: it prints its stack on stderr, turns the
    fault handler off, and aborts."""
    ctypes.pythonapi.Py_FatalError(b"a test of the interpreter's own fatal error")


def segfault_when_exists(path: str) -> None:
    """Return at once, leaving a thread that segfaults once ``path`` exists: the
    worker dies while idle, in a thread that is not the one that ran the call."""

    def crash_in_background() -> None:
        while not os.path.exists(path):
            time.sleep(0.01)
        ctypes.string_at(0)

    threading.Thread(target=crash_in_background, daemon=True).start()


def segfault_after_child_segfaults() -> None:
    """Fork a child that segfaults, wait for it, then segfault: only this process's
    stack may reach the worker's crash report (the child's goes to stderr)."""
    child = os.fork()
    if child == 0:
        _crash_in_child()
    os.waitpid(child, 0)
    ctypes.string_at(0)


def _crash_in_child() -> None:
    ctypes.string_at(0)


def flood_crash_report_then_segfault(megabytes: int) -> None:
    """A hostile function: it writes ``megabytes`` MiB into the worker's crash report
    (its descriptor is the worker's fourth argument), then segfaults."""
    fd = int(sys.argv[4])
    chunk = b"x" * (1 << 20)
    for _ in range(megabytes):
        os.write(fd, chunk)
    ctypes.string_at(0)


def close_channel_then_sleep(seconds: float) -> None:
    """Close the worker's channel (its first argument) and go on running: the caller
    sees the channel end without the worker exiting."""
    os.close(int(sys.argv[1]))
    time.sleep(seconds)


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


class Boom(Exception):
    pass


def boom(message: str) -> None:
    raise Boom(message)


def return_lock() -> Any:
    return threading.Lock()


@offload
def double(x: int) -> int:
    return 2 * x


@offload(kind="thread", timeout=5)
def thread_double(x: int) -> int:
    return 2 * x


@offload(kind="process")
def process_pid() -> int:
    return os.getpid()


# --- helpers for test_decorator / test_executor / pools/test_thread ---------------------

#: generous safety bound for helpers that block on an event the test controls
SAFETY_TIMEOUT = 10.0


def kw(**kwargs: Any) -> dict[str, Any]:
    """Return the keyword arguments it was called with, untouched."""
    return kwargs


def where() -> tuple[int, int]:
    """(process id, thread id) of whoever runs this."""
    return os.getpid(), threading.get_ident()


def thread_ident() -> int:
    return threading.get_ident()


def signature_probe(a: int, b: str = "x", *args: int, c: float = 1.0, **kwargs: Any) -> str:
    """A function with a rich signature."""
    return f"{a}{b}{args}{c}{kwargs}"


@offload()
def triple(x: int) -> int:
    """Three times ``x``."""
    return 3 * x


@offload
def bare_where() -> tuple[int, int]:
    """(pid, thread id) of whoever runs this; decorated with a bare ``@offload``."""
    return os.getpid(), threading.get_ident()


@offload(kind="process")
def decorated_signature(a: int, b: str = "x", *args: int, c: float = 1.0, **kwargs: Any) -> str:
    return f"{a}{b}{args}{c}{kwargs}"


class Calc:
    """A module-level class with offloaded methods (pickled with its instance)."""

    def __init__(self, base: int) -> None:
        self.base = base

    @offload(kind="process")
    def add(self, x: int) -> tuple[int, int]:
        """(pid, base + x)."""
        return os.getpid(), self.base + x

    @offload(kind="thread")
    def mul(self, x: int) -> tuple[int, int]:
        """(thread id, base * x)."""
        return threading.get_ident(), self.base * x


class Tools:
    """A module-level class with an offloaded classmethod and staticmethod."""

    factor = 7

    @classmethod
    @offload(kind="process")
    def scale(cls, x: int) -> tuple[int, int]:
        """(pid, factor * x)."""
        return os.getpid(), cls.factor * x

    @classmethod
    @offload(kind="thread")
    def scale_in_thread(cls, x: int) -> tuple[int, int]:
        """(thread id, factor * x)."""
        return threading.get_ident(), cls.factor * x

    @staticmethod
    @offload(kind="process")
    def negate(x: int) -> tuple[int, int]:
        """(pid, -x)."""
        return os.getpid(), -x


@offload
def fib(n: int) -> int:
    """Calls itself: inside a worker, a decorated function runs inline."""
    if n < 2:
        return n
    return cast("int", fib(n - 1)) + cast("int", fib(n - 2))


def where_am_i() -> bool:
    from offload._where import in_worker

    return in_worker()


def barrier_wait(barrier: threading.Barrier) -> int:
    """Wait at ``barrier`` (a threading.Barrier with its own timeout); its arrival index."""
    return barrier.wait()


def block_on(
    release: threading.Event,
    started: threading.Event | None = None,
    finished: threading.Event | None = None,
    value: Any = None,
) -> Any:
    """Signal ``started``, block until ``release`` is set (or the safety bound), signal
    ``finished`` on the way out, return ``value``."""
    if started is not None:
        started.set()
    try:
        release.wait(SAFETY_TIMEOUT)
        return value
    finally:
        if finished is not None:
            finished.set()


def loop_until_cancelled(
    started: threading.Event, saw_cancel: threading.Event, release: threading.Event
) -> str:
    """Call ``check_cancelled()`` until it raises; record that in ``saw_cancel``."""
    from offload import CallCancelled, check_cancelled

    started.set()
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            check_cancelled()
        except CallCancelled:
            saw_cancel.set()
            raise
        if release.wait(0.01):
            return "released"
    return "gave up"


def check_cancelled_once() -> str:
    """``check_cancelled()`` in a call nobody gave up on: must not raise."""
    from offload import check_cancelled

    check_cancelled()
    return "ok"


def sleep_getpid(seconds: float) -> int:
    """Sleep, then return the worker's pid: concurrent calls land on distinct workers."""
    time.sleep(seconds)
    return os.getpid()


def write_pid_then_spin(path: str, seconds: float) -> int:
    """Publish this worker's pid in ``path`` (atomically), then burn CPU."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, path)
    return spin(seconds)


_initialized: list[str] = []


def remember(tag: str) -> None:
    """An initializer: records that it ran in this worker."""
    _initialized.append(tag)


def initialized() -> tuple[int, list[str]]:
    return os.getpid(), list(_initialized)


_ballast: list[bytes] = []


def grow(megabytes: int) -> int:
    """Hold on to ``megabytes`` of memory in this worker; returns its pid."""
    _ballast.append(b"x" * (megabytes << 20))
    return os.getpid()


def fail_if_exists(path: str) -> None:
    """An initializer that fails while ``path`` exists."""
    if os.path.exists(path):
        raise RuntimeError(f"{path} exists")


# --- helpers for pools/test_fault_matrix ------------------------------------------------


class UnpickleRefused(Exception):
    """Raised by the objects below when unpickled in a process they refuse."""


def _rebuild_here_only(pickled_in: int, tag: str) -> RefusesForeignReduce:
    here = os.getpid()
    if here != pickled_in:
        raise UnpickleRefused(
            f"{tag}: pickled in process {pickled_in}, refusing to unpickle in process {here}"
        )
    return RefusesForeignReduce(tag)


class RefusesForeignReduce:
    """Unpickles only in the process that pickled it: elsewhere its ``__reduce__``
    reconstructor raises :class:`UnpickleRefused` (naming both pids)."""

    def __init__(self, tag: str = "argument") -> None:
        self.tag = tag

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_here_only, (os.getpid(), self.tag))


class RefusesForeignSetstate:
    """Same as :class:`RefusesForeignReduce`, but refuses in ``__setstate__``."""

    def __init__(self, tag: str = "argument") -> None:
        self.tag = tag

    def __getstate__(self) -> dict[str, Any]:
        return {"tag": self.tag, "pid": os.getpid()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        here = os.getpid()
        if here != state["pid"]:
            raise UnpickleRefused(
                f"{state['tag']}: pickled in process {state['pid']}, "
                f"refusing to unpickle in process {here}"
            )
        self.tag = state["tag"]


def _segfault_unless_in(pickled_in: int) -> SegfaultsForeignUnpickle:
    if os.getpid() != pickled_in:
        ctypes.string_at(0)
    return SegfaultsForeignUnpickle()


class SegfaultsForeignUnpickle:
    """Segfaults the process that unpickles it, unless it is the one that pickled it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_segfault_unless_in, (os.getpid(),))


def return_refusing() -> RefusesForeignReduce:
    """A result that pickles in the worker and refuses to unpickle in the parent."""
    return RefusesForeignReduce("result")


def raise_memory_error(message: str) -> None:
    raise MemoryError(message)


class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_locked(message: str) -> None:
    raise LockedError(message)


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt: ``args`` holds only ``a``, and both ``__new__``
    and ``__init__`` need ``b`` (with ``__init__`` alone, the worker rebuilds it by
    ``__new__`` and its ``__dict__``)."""

    def __new__(cls, a: str, b: str) -> TwoArgError:
        return super().__new__(cls, a)

    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)
        self.b = b


def raise_two_arg(a: str, b: str) -> None:
    raise TwoArgError(a, b)


def write_pid_then_sleep(path: str, seconds: float) -> None:
    """Publish this worker's pid in ``path`` (atomically), then block in ``time.sleep``."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, path)
    time.sleep(seconds)


class InitializerFailed(Exception):
    pass


def failing_initializer(message: str) -> None:
    raise InitializerFailed(message)


def crashing_initializer(code: int) -> None:
    os._exit(code)


def segfaulting_initializer() -> None:
    ctypes.string_at(0)


def crashing_initializer_with_child(code: int) -> None:
    """Exit with ``code``, leaving a forked child that holds the worker's channel open:
    the parent sees the worker exit before its channel reaches EOF."""
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    os._exit(code)


def sleep_then_touch(seconds: float, path: str) -> None:
    time.sleep(seconds)
    Path(path).write_text("done")


def sleep_if_exists(path: str, seconds: float) -> None:
    """An initializer that takes ``seconds`` while ``path`` exists (a slow boot)."""
    if os.path.exists(path):
        time.sleep(seconds)


def make_bytes(size: int) -> bytes:
    return b"\xab" * size


def bytes_and_size(data: bytes, *, extra: bytes = b"") -> tuple[int, int, str]:
    return len(data), len(extra), type(data).__name__


def wait_for_file(path: str, value: Any = None) -> Any:
    """Block until ``path`` exists (or the safety bound), then return ``value``: a call
    that holds its worker until the test lets it go, across processes and hosts."""
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def wait_for_file_then_touch(path: str, marker: str) -> None:
    """``wait_for_file``, then write ``marker``: shows that a call ran on to its end."""
    wait_for_file(path)
    Path(marker).write_text("done")


def random_token() -> str:
    return os.urandom(8).hex()


def scheduler_workers(dask_scheduler: Any) -> list[str]:
    """Run on a Dask scheduler (``client.run_on_scheduler``): the workers it knows."""
    return [str(address) for address in dask_scheduler.workers]


def scheduler_worker_pids(dask_scheduler: Any) -> list[int]:
    """Run on a Dask scheduler: the process ids of the workers it knows."""
    return [int(worker.pid) for worker in dask_scheduler.workers.values()]


def scheduler_task_keys(dask_scheduler: Any) -> list[str]:
    """Run on a Dask scheduler: the keys of the tasks it holds."""
    return [str(key) for key in dask_scheduler.tasks]


def runaway(limit_mib: int) -> int:
    """Allocate (and touch) memory 1 MiB at a time, up to ``limit_mib``: a call whose
    memory runs away; returns the MiB it got if nothing stopped it."""
    chunks = []
    for _ in range(limit_mib):
        chunks.append(b"x" * (1 << 20))
    return len(chunks)


#: a program that would run for a minute, and ignores SIGTERM
STUBBORN_PROGRAM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
)


def start_program(path: str, wait: bool) -> int:
    """Start a program that would run for a minute (ignoring SIGTERM) and write its pid
    to ``path``; wait for it if ``wait``, else leave it running. Returns its pid."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", STUBBORN_PROGRAM])
    Path(path + ".tmp").write_text(str(proc.pid))
    os.replace(path + ".tmp", path)
    if wait:
        proc.wait()
    return proc.pid


# --- helpers for pools/test_process_hostile --------------------------------------------


def many_arrays(count: int, size: int = 4) -> list[Any]:
    """``count`` small NumPy arrays: as many out-of-band buffers in one result."""
    import numpy as np

    return [np.full(size, i, dtype=np.int64) for i in range(count)]


def make_array(size: int) -> Any:
    """A NumPy array of ``size`` bytes, all ones."""
    import numpy as np

    return np.ones(size, dtype=np.uint8)


def sum_arrays(arrays: list[Any]) -> int:
    return int(sum(int(a.sum()) for a in arrays))


class Counter:
    """A callable object with state: each call counts one more."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        self.count += 1
        return self.count


class Tracked:
    """A callable object that counts its live instances in the process it is in."""

    live = 0

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = payload
        Tracked.live += 1

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        Tracked.live += 1

    def __del__(self) -> None:
        Tracked.live -= 1

    def __call__(self) -> int:
        return len(self.payload)


def live_tracked() -> int:
    import gc

    gc.collect()
    return Tracked.live


class LockedExit(BaseException):
    """A ``BaseException`` that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_base(kind: str) -> None:
    if kind == "exit":
        raise SystemExit(7)
    if kind == "interrupt":
        raise KeyboardInterrupt("from the function")
    if kind == "locked":
        raise LockedExit("holding a lock")
    raise GeneratorExit("from the function")


class ExitsWhenPickled:
    """Calls ``sys.exit`` as it is pickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit(5)


class ExitsWhenUnpickled:
    """Pickles fine; unpickling it calls ``sys.exit(6)``."""

    def __reduce__(self) -> tuple[Any, ...]:
        import sys

        return (sys.exit, (6,))


def return_exits_when_unpickled() -> ExitsWhenUnpickled:
    return ExitsWhenUnpickled()


def return_exits_when_pickled() -> ExitsWhenPickled:
    return ExitsWhenPickled()


class HostileError(Exception):
    """Will not pickle, and neither ``str()`` nor ``repr()`` of it works."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("no pickling this one")

    def __str__(self) -> str:
        raise ValueError("no str either")

    def __repr__(self) -> str:
        raise ValueError("no repr either")


class ExitingError(Exception):
    """Whose pickling and ``str()`` call ``sys.exit``."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit(8)

    def __str__(self) -> str:
        raise SystemExit(9)


def raise_hostile(kind: str) -> None:
    raise HostileError() if kind == "hostile" else ExitingError()


class HostileResult:
    """A result that will not pickle, and whose ``str()`` and ``repr()`` fail."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit(10)

    def __repr__(self) -> str:
        raise SystemExit(11)

    __str__ = __repr__


def return_hostile() -> HostileResult:
    return HostileResult()


def fork_and_return(value: int) -> tuple[int, int]:
    """Fork; parent and child both return without exiting: ``(value, the child's
    pid)`` and ``(-value, 0)``."""
    child = os.fork()
    return (value, child) if child else (-value, 0)


def python_objects(count: int) -> list[tuple[int, str, dict[str, float]]]:
    """A result made of Python objects, which unpickle one by one, holding the GIL."""
    return [(i, str(i), {"x": i / 2}) for i in range(count)]


class ExitsOnDelElsewhere:
    """A callable whose ``__del__`` calls ``sys.exit`` in any process but its maker."""

    def __init__(self) -> None:
        self.maker = os.getpid()

    def __call__(self) -> str:
        return "called"

    def __del__(self) -> None:
        if os.getpid() != self.maker:
            import sys

            sys.exit(12)


def channel_of_forked_child() -> list[str]:
    """What the descriptors of a process forked here point to (``/proc``), as the
    child sees them before it exits."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        links = []
        for name in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{name}"))
            except OSError:
                pass
        os.write(write, "\n".join(links).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(child, 0)
    return b"".join(chunks).decode().splitlines()


def scheduler_processing(dask_scheduler: Any) -> dict[int, list[str]]:
    """Run on a Dask scheduler: the keys it has handed to each worker, by worker pid
    (running or waiting there)."""
    return {
        int(worker.pid): [str(task.key) for task in worker.processing]
        for worker in dask_scheduler.workers.values()
    }


def wait_for_verdict(folder: str) -> str:
    """Block until the file named by this process's pid exists in ``folder``, then
    end the process at once if it says "crash", else return what it says. The test
    writes it whole (a rename)."""
    path = os.path.join(folder, str(os.getpid()))
    wait_for_file(path)
    with open(path) as f:
        verdict = f.read()
    if verdict == "crash":
        os._exit(3)
    return verdict


class BadRepr:
    """A callable object that will not pickle (it holds a lock) and whose ``repr()``
    fails: errors about it must still be offload's own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self) -> int:
        return 1

    def __repr__(self) -> str:
        raise ValueError("no repr")


def log_on_worker(name: str, level: int, message: str, *args: Any, **extra: Any) -> None:
    """Log one record on the logger ``name``, with ``extra`` attributes."""
    import logging

    logging.getLogger(name).log(level, message, *args, extra=extra or None)


def log_hostile_attribute(name: str) -> None:
    """Log one record whose extra attribute's ``repr()`` calls ``sys.exit``."""
    import logging

    logging.getLogger(name).error("exiting", extra={"thing": HostileResult()})


def worker_logging() -> tuple[list[str], str | None, str | None]:
    """Where a record made here goes: the root logger's handlers' classes, and the
    labels a record made in this call carries (``offload_pool``, ``offload_call``)."""
    import logging

    record = logging.getLogger("app").makeRecord("app", logging.WARNING, "f", 1, "m", (), None)
    handlers = [type(h).__name__ for h in logging.getLogger().handlers]
    return handlers, getattr(record, "offload_pool", None), getattr(record, "offload_call", None)


# --- helpers for test_map ---------------------------------------------------------------


def _wait_for_path(path: str) -> None:
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def finish_after(spec: tuple[str | None, str, Any]) -> Any:
    """``(wait_for, then_touch, value)``: wait until the file ``wait_for`` exists (if
    given), create ``then_touch``, return ``value``: items that finish in an order the
    test sets."""
    wait_for, then_touch, value = spec
    if wait_for is not None:
        _wait_for_path(wait_for)
    Path(then_touch).touch()
    return value


def hold_after(spec: tuple[int, int, str]) -> int:
    """``(i, fail_at, directory)``: items before ``fail_at`` return ``i``; ``fail_at``
    raises ``ValueError`` once a later item has started; later items write
    ``started-<i>`` (this worker's pid in it), then run until abandoned (threads, by
    ``check_cancelled``) or for the safety bound, and only then write ``finished-<i>``.
    """
    from offload import check_cancelled

    i, fail_at, directory = spec
    if i < fail_at:
        return i
    if i == fail_at:
        deadline = time.monotonic() + SAFETY_TIMEOUT
        while not any(Path(directory).glob("started-*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        raise ValueError(f"item {i}")
    tmp = f"{directory}/.started-{i}"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, f"{directory}/started-{i}")
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while time.monotonic() < deadline:
        check_cancelled()
        time.sleep(0.005)
    Path(f"{directory}/finished-{i}").touch()
    return i


def slow_at(spec: tuple[int, int]) -> int:
    """``(i, slow)``: return ``i`` at once, except item ``slow``, which runs until
    abandoned (threads) or for the safety bound."""
    from offload import check_cancelled

    i, slow = spec
    if i == slow:
        deadline = time.monotonic() + SAFETY_TIMEOUT
        while time.monotonic() < deadline:
            check_cancelled()
            time.sleep(0.005)
    return i


def identity(x: Any) -> Any:
    return x


def loaded(names: list[str]) -> list[str]:
    """Which of the modules ``names`` this process has imported."""
    return [name for name in names if name in sys.modules]
