"""Fixtures shared by the whole suite.

Event loops. Every async test runs once per loop (the ``anyio_backend`` fixture):

- on asyncio and trio, the two anyio backends, by default;
- on asyncio, uvloop and trio when marked ``all_loops`` (a test, or a whole module
  with ``pytestmark = pytest.mark.all_loops``): the contract every loop must keep
  (the executor, the decorator, the fault matrix of the process pool);
- on the loops it names when it parametrises ``anyio_backend`` itself
  (``@pytest.mark.parametrize("anyio_backend", ["asyncio"])``): a test that only
  makes sense on one loop.

``anyio_backend`` is module-scoped, so a module-scoped async fixture (``shared_ex``:
pools started once per module and loop) keeps its loop across the module's tests;
pytest runs a module's tests grouped by loop.

Processes. ``pytest -n 2`` (the README's command) runs the suite in two pytest-xdist
workers, a module's tests in one of them (``--dist loadfile``, in pyproject's
addopts). No test needs the machine to itself: a test that measures CPU time or
loop lag compares it with a baseline measured in the same test, so it passes beside
the other worker, or beside any other load.

Order. A worker takes the next module when it is nearly done with its own, in the
order of collection (``--no-loadscope-reorder``): the longest modules come first
(``LONGEST_MODULES``), then the others, most tests first, so that the run ends
with short modules on both workers rather than one long one on a single worker.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import Any

import psutil
import pytest
from blockbuster import blockbuster_ctx

from offload import Executor, Offloader, OffloadSettings

Backend = str | tuple[str, dict[str, Any]]

ASYNCIO = pytest.param("asyncio", id="asyncio")
# what uvicorn runs on when uvloop is installed (uvicorn[standard], fastapi[standard])
UVLOOP = pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")
TRIO = pytest.param("trio", id="trio")


#: The modules that take longest, longest first (seconds measured with ``pytest -n 2
#: --durations``, on a clean checkout: mypy without its cache). A module missing here
#: is only scheduled later; a new long one belongs in this list.
LONGEST_MODULES = (
    "tests/pools/test_fault_matrix.py",
    "tests/test_static.py",
    "tests/pools/test_process_confinement.py",
    "tests/test_map.py",
    "tests/pools/test_dask_external.py",
    "tests/web/test_server_count.py",
    "tests/test_fork.py",
    "tests/test_soak.py",
    "tests/test_docs.py",
    "tests/test_executor.py",
    "tests/pools/test_dask_embedded.py",
    "tests/pools/test_process_lifecycle.py",
    "tests/web/test_disconnect.py",
    "tests/pools/test_payloads.py",
    "tests/pools/test_process_faults.py",
    "tests/pools/test_process_forensics.py",
    "tests/test_stream.py",
    "tests/pools/test_dask_streams.py",
    "tests/test_default.py",
    "tests/pools/test_fault_matrix_process.py",
    "tests/pools/test_process_logs.py",
    "tests/test_decorator.py",
    "tests/test_readme.py",
    "tests/pools/test_thread.py",
    "tests/test_demo.py",
    "tests/pools/test_process_hostile.py",
    "tests/web/test_shapes.py",
    "tests/pools/test_nesting.py",
    "tests/test_map_chunks.py",
    "tests/test_map_memory.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules in the order a worker should take them: see the module's docstring."""
    sizes = Counter(item.nodeid.partition("::")[0] for item in items)
    rank = {module: i for i, module in enumerate(LONGEST_MODULES)}

    def order(item: pytest.Item) -> tuple[int, int]:
        module = item.nodeid.partition("::")[0]
        return (rank.get(module, len(rank)), -sizes[module])

    items.sort(key=order)  # stable: a module's tests keep their order


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Give every async test its event loops: see the module's docstring."""
    if "anyio_backend" not in metafunc.fixturenames:
        return
    if metafunc.module is not None and hasattr(metafunc.module, "anyio_backend"):
        return  # a module that names its one loop with a fixture of its own
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if "anyio_backend" in (names.split(",") if isinstance(names, str) else names):
            return  # a test that only makes sense on the loops it names
    loops = (
        [ASYNCIO, UVLOOP, TRIO]
        if metafunc.definition.get_closest_marker("all_loops")
        else [ASYNCIO, TRIO]
    )
    metafunc.parametrize("anyio_backend", loops, indirect=True, scope="module")


@pytest.fixture(scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> Backend:
    # Explicit, so that a missing trio or uvloop fails loudly instead of shrinking the
    # suite. Module-scoped: a module-scoped async fixture (a pool started once per
    # module and loop) needs its loop to outlive one test.
    backend: Backend = request.param
    return backend


def loop_name(backend: Backend) -> str:
    """``"asyncio"``, ``"uvloop"`` or ``"trio"``: a test's event loop, for scripts and reports."""
    if isinstance(backend, str):
        return backend
    return "uvloop" if backend[1].get("use_uvloop") else backend[0]


def small_settings() -> OffloadSettings:
    return OffloadSettings(
        process={"max_workers": 2},
        thread={"max_workers": 4},
        shutdown_timeout=5,
    )


@pytest.fixture
def settings() -> OffloadSettings:
    return small_settings()


@pytest.fixture
async def ex(settings: OffloadSettings) -> AsyncIterator[Executor]:
    """An Offloader of the test's own: its stats count only this test's calls."""
    async with Offloader(settings) as executor:
        yield executor


@pytest.fixture(scope="module")
async def shared_ex() -> AsyncIterator[Executor]:
    """An Offloader like ``ex``'s, started once per module and loop.

    For a test that only makes calls and checks what they return: not for one that
    reads stats, kills, replaces or counts workers, changes settings or stops pools
    (those use ``ex``). Its workers run before each test starts, so
    ``no_leftover_children`` does not count them; its exit is checked here.
    """
    before = {p.pid for p in children()}
    async with Offloader(small_settings()) as executor:
        yield executor
    leftover = [p.pid for p in children() if p.pid not in before]
    assert not leftover, f"the shared pools left processes behind: {leftover}"


def children() -> list[psutil.Process]:
    """Live (non-zombie) child processes of this test process.

    Direct children only: a server that a test starts has workers of its own, which
    that test checks itself. Not multiprocessing's resource tracker: whatever uses
    multiprocessing's spawn in this process starts it, once per interpreter; it
    belongs to no pool and exits with the interpreter. (The embedded Dask cluster's
    tracker is a child of the cluster's host process, not of this one.)
    """
    alive = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and not _is_resource_tracker(child):
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def _is_resource_tracker(proc: psutil.Process) -> bool:
    return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())


@pytest.fixture(scope="session", autouse=True)
def xdist_main_is_main() -> Iterator[None]:
    """Under pytest-xdist, the worker's main program runs as a module named
    ``__channelexec__``, and every test below its top-level frame: to offload's guard
    against pools started while a module is imported, that frame would be such a
    module. It is the program's main: named so, as under plain pytest."""
    renamed = []
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == (
            "__channelexec__"
        ):
            frame.f_globals["__name__"] = "__main__"
            renamed.append(frame.f_globals)
        frame = frame.f_back
    try:
        yield
    finally:
        for globs in renamed:
            globs["__name__"] = "__channelexec__"


@pytest.fixture(scope="session", autouse=True)
def dask_scratch_in_pytest_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Dask's schedulers and workers (embedded clusters, `dask worker`) keep their
    scratch space in pytest's temporary directory, not in /tmp/dask-scratch-space,
    which distributed leaves behind by design (lock files shared by every run)."""
    old = os.environ.get("DASK_TEMPORARY_DIRECTORY")
    os.environ["DASK_TEMPORARY_DIRECTORY"] = str(tmp_path_factory.mktemp("dask"))
    yield
    if old is None:
        del os.environ["DASK_TEMPORARY_DIRECTORY"]
    else:
        os.environ["DASK_TEMPORARY_DIRECTORY"] = old


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every test must leave no worker process behind."""
    before = {p.pid for p in children()}
    yield
    leftover = [p for p in children() if p.pid not in before]
    if leftover:
        # Do not let one test's leak fail the next: kill, then report.
        for p in leftover:
            p.kill()
        pytest.fail(f"child processes left behind: {[p.pid for p in leftover]}")


@pytest.fixture(autouse=True)
def no_blocking_on_the_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """On asyncio, a blocking call made by offload's code in the event loop's thread
    (sleep, blocking socket or file I/O, waiting for a process) fails the test.

    blockbuster patches those functions and raises ``BlockingError`` when they are
    called from a module of ``offload`` while an asyncio loop runs in the thread;
    the tests' own blocking calls (a deliberate ``time.sleep``) are not scanned.
    """
    if (
        "anyio_backend" not in request.fixturenames
        or loop_name(request.getfixturevalue("anyio_backend")) == "trio"
    ):
        yield
        return
    with blockbuster_ctx(scanned_modules=["offload"]) as bb:
        # /proc/<pid>/statm is made by the kernel on read: no disk, microseconds.
        bb.functions["io.BufferedReader.read"].can_block_in(
            "offload/_pools/process/worker_handle.py", "rss"
        )
        yield
