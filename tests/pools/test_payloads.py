"""Large and unusual payloads through the process pool: they come back equal, the
loop stays free while they travel, and a payload over ``max_payload`` fails alone."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from typing import Any

import anyio
import numpy as np
import pytest

from offload import (
    Executor,
    Offloader,
    OffloadSettings,
    PoolSettings,
    SerializationError,
    WorkerCrashed,
)
from offload._pools.process import buffers as _buffers
from offload._pools.process import cross_memory as _cross_memory
from offload._pools.process import remote_buffers as _remote_buffers
from offload._pools.process.pool import ProcessPool

from .. import funcs

MB = 1 << 20


@pytest.fixture
def ex(shared_ex: Executor) -> Executor:
    """The tests here that take ``ex`` only check what comes back: one start per module."""
    return shared_ex


def process(**pool: Any) -> OffloadSettings:
    return OffloadSettings(
        process=PoolSettings(kind="process", max_workers=1, **pool), thread={"max_workers": 1}
    )


def read_only(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    array.flags.writeable = False
    return array


CASES: dict[str, Any] = {
    "empty bytes": b"",
    "bytes just under the out-of-band size": os.urandom(_buffers.BIG_BYTES - 1),
    "bytes out of band": os.urandom(_buffers.BIG_BYTES),
    "bytes in a mapping": os.urandom(2 * MB),
    "bytearray in a mapping": bytearray(os.urandom(2 * MB)),
    "empty array": np.empty((0, 3)),
    "read-only array": read_only(np.arange(300_000, dtype=np.int64)),
    "non-contiguous array": np.arange(600_000, dtype=np.float64)[::3],
    "Fortran-order array": np.asfortranarray(np.arange(400_000.0).reshape(800, 500)),
    "object array": np.array([{"a": 1}, "text", 3, None], dtype=object),
    "bytes in a tuple": (os.urandom(2 * MB), "label"),
}


@pytest.mark.parametrize("value", CASES.values(), ids=CASES)
async def test_payloads_come_back_equal(ex: Executor, value: Any) -> None:
    back = await ex.pool("process").run(funcs.echo, value)
    assert type(back) is type(value)
    if isinstance(value, np.ndarray):
        assert back.dtype == value.dtype
        assert back.shape == value.shape
        assert np.array_equal(back, value)
    else:
        assert back == value


async def test_large_bytes_as_keyword_and_result(ex: Executor) -> None:
    pool = ex.pool("process")
    assert await pool.run(funcs.bytes_and_size, b"x" * 3 * MB, extra=b"y" * 2 * MB) == (
        3 * MB,
        2 * MB,
        "bytes",
    )
    made = await pool.run(funcs.make_bytes, 5 * MB)
    assert type(made) is bytes
    assert made == b"\xab" * 5 * MB


BIG = _buffers.BIG_BUFFER  # from here on, buffers are copied between memories
BIG_CASES: dict[str, Any] = {
    "bytes": os.urandom(BIG),
    "bytearray": bytearray(os.urandom(BIG + 1)),
    "array": np.random.default_rng(1).random(BIG // 8 + 3),
    "read-only array": read_only(np.arange(BIG // 4, dtype=np.int32)),
    "Fortran-order array": np.asfortranarray(np.arange(BIG // 8, dtype=np.float64).reshape(-1, 8)),
    "small and large together": {
        "small": np.arange(10),
        "large": np.ones(BIG // 8),
        "bytes": b"\x07" * BIG,
        "tiny": b"x",
    },
}


def pool_of(ex: Executor) -> ProcessPool:
    pool = ex.offloader.get_pool(ex.pool_name)
    assert isinstance(pool, ProcessPool)
    return pool


def assert_same(back: Any, value: Any) -> None:
    assert type(back) is type(value)
    if isinstance(value, dict):
        assert back.keys() == value.keys()
        for key in value:
            assert_same(back[key], value[key])
    elif isinstance(value, np.ndarray):
        assert (back.dtype, back.shape, back.flags.f_contiguous) == (
            value.dtype,
            value.shape,
            value.flags.f_contiguous,
        )
        assert np.array_equal(back, value)
    else:
        assert back == value


@pytest.mark.parametrize("cross_memory", [True, False], ids=["cross-memory", "channel"])
@pytest.mark.parametrize("value", BIG_CASES.values(), ids=BIG_CASES)
async def test_large_buffers_come_back_equal(value: Any, cross_memory: bool) -> None:
    async with Offloader(process(cross_memory=cross_memory)) as ex:
        pool = ex.pool("process")
        # Linux allows a parent to read its children here: the fast path is taken.
        assert pool_of(pool)._cross_memory is (cross_memory and sys.platform == "linux")
        assert_same(await pool.run(funcs.echo, value), value)
        assert_same(await pool.run(funcs.echo, value=value), value)  # a keyword too
        stats = pool.stats()
    assert (stats.completed, stats.crashed) == (2, 0)


def zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="copies between memories: Linux")
@pytest.mark.parametrize("copy", ["deliver", "fetch"], ids=["argument", "result"])
async def test_a_worker_killed_mid_copy_fails_that_call_alone(
    monkeypatch: pytest.MonkeyPatch, copy: str
) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    real = getattr(_remote_buffers, copy)

    def kill_then_copy(pid: int, *args: Any) -> Any:
        # In the copying thread, the worker dies for real (SIGKILL) before the copy.
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not zombie(pid):
            assert time.monotonic() < deadline, f"worker {pid} did not die"
            time.sleep(0.001)
        return real(pid, *args)

    async with Offloader(process()) as ex:
        pool = ex.pool("process")
        first = await pool.run(funcs.getpid)
        with monkeypatch.context() as patch:
            patch.setattr(_remote_buffers, copy, kill_then_copy)
            # an argument to copy in, or a result to copy out
            arg: Any = np.ones(BIG) if copy == "deliver" else BIG
            fn: Any = funcs.echo if copy == "deliver" else funcs.make_bytes
            with pytest.raises(WorkerCrashed, match=f"{first}.*killed by SIGKILL"):
                await pool.run(fn, arg)
        # A new worker serves the next calls, large ones included.
        assert await pool.run(funcs.make_bytes, BIG) == b"\xab" * BIG
        assert await pool.run(funcs.getpid) != first
        stats = pool.stats()
    assert (stats.workers, stats.crashed) == (1, 1)
    # No shared memory segment involved, none left. (Semaphores: other processes'
    # multiprocessing, running alongside.)
    new = set(os.listdir("/dev/shm")) - shm_before
    assert not [name for name in new if not name.startswith("sem.")]


async def test_a_worker_whose_memory_cannot_be_read_gets_the_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_cross_memory, "readable", lambda pid, address: False)
    async with Offloader(process()) as ex:
        pool = ex.pool("process")
        assert not pool_of(pool)._cross_memory
        value = np.arange(BIG, dtype=np.uint8)
        assert_same(await pool.run(funcs.echo, value), value)
        assert pool.stats().workers == 1


async def lag_during(work: Any) -> float:
    """The longest a 1 ms sleeper on the loop woke up late while ``work`` ran."""
    worst = 0.0
    done = anyio.Event()

    async def sleeper(
        *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        nonlocal worst
        status = task_status
        while not done.is_set():
            asked = time.perf_counter() + 0.001
            status.started()  # asleep before ``work`` starts: its first step is seen too
            status = anyio.TASK_STATUS_IGNORED
            await anyio.sleep(0.001)
            worst = max(worst, time.perf_counter() - asked)

    async with anyio.create_task_group() as tg:
        await tg.start(sleeper)
        try:
            await work()
        finally:
            done.set()
    return worst


async def lag_copying(*values: Any) -> float:
    """``lag_during`` while the loop itself copies ``values``, in one step: what a
    whole-frame copy on the loop costs on this machine, under its present load."""
    kept: list[bytes] = []

    async def work() -> None:
        kept.extend(bytes(memoryview(value).cast("B")) for value in values)

    worst = await lag_during(work)
    assert [len(copy) for copy in kept] == [memoryview(value).nbytes for value in values]
    return worst


#: rounds of each measurement: the machine's other work only ever adds lag, so the
#: least of a few rounds is what the code itself holds the loop for
ROUNDS = 3


async def test_the_loop_stays_free_while_64_mb_travel() -> None:
    array = np.ones(8 * MB)  # 64 MB
    blob = b"\x01" * (64 * MB)
    async with Offloader(process()) as ex:
        pool = ex.pool("process")
        await pool.run(funcs.echo, array)  # the worker's first big allocation

        kept = []  # freeing 64 MB takes milliseconds too: not while measuring

        async def work() -> None:
            for value in (array, blob):
                kept.append(await pool.run(funcs.echo, value))

        travel, whole = [], []
        for _ in range(ROUNDS):  # in turns, so that both meet the same load
            travel.append(await lag_during(work))
            assert [len(back) for back in kept] == [len(array), len(blob)]
            kept.clear()
            whole.append(await lag_copying(array, blob))
    # A whole-frame copy on the loop holds it as long as the copy takes; in pieces,
    # with the bytes made in a thread, for a small share of that. Both grow with the
    # machine's load, so the bound is a share of a copy of the same bytes, timed here.
    held, copy = min(travel), min(whole)
    assert held < copy / 2, f"held {held * 1000:.1f} ms, a copy on the loop {copy * 1000:.1f} ms"


async def test_arguments_over_max_payload_fail_alone_and_fast() -> None:
    huge = b"\x00" * (200 * MB)
    async with Offloader(process(max_payload="100MB")) as ex:
        pool = ex.pool("process")

        async def work() -> None:
            with pytest.raises(SerializationError, match="max_payload"):
                await pool.run(funcs.echo, huge)

        refused, whole = [], []
        for _ in range(ROUNDS):
            refused.append(await lag_during(work))
            whole.append(await lag_copying(huge))
        # refused before a byte is copied: far less than one copy of the payload
        held, copy = min(refused), min(whole)
        assert held < copy / 4, f"held {held * 1000:.1f} ms, a copy {copy * 1000:.1f} ms"
        assert await pool.run(funcs.add, 1, 2) == 3
        stats = pool.stats()
    assert (stats.failed, stats.completed, stats.crashed) == (ROUNDS, 1, 0)


async def test_a_result_over_max_payload_fails_alone() -> None:
    async with Offloader(process(max_payload="1MB")) as ex:
        pool = ex.pool("process")
        pid = await pool.run(funcs.getpid)
        with pytest.raises(SerializationError, match=r"result of .*make_bytes.*max_payload"):
            await pool.run(funcs.make_bytes, 2 * MB)
        assert await pool.run(funcs.getpid) == pid  # the same worker, still serving


async def test_no_descriptor_leaks_from_large_frames() -> None:
    async with Offloader(process()) as ex:
        pool = ex.pool("process")
        await pool.run(funcs.make_bytes, 2 * MB)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            await pool.run(funcs.make_bytes, 2 * MB)
            await pool.run(funcs.echo, np.ones(MB // 2))
        cancelled = pool.stats().cancelled
        async with anyio.create_task_group() as tg:  # cancelled mid-call: the frame is dropped
            tg.start_soon(pool.run, funcs.make_bytes, 64 * MB)
            with anyio.fail_after(5):
                while not pool.stats().busy:  # the call has reached its worker
                    await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
        assert pool.stats().cancelled == cancelled + 1
        await pool.run(funcs.add, 1, 1)
        after = len(os.listdir("/proc/self/fd"))
    assert after <= before + 1  # +1: a replacement's pidfd may be open, not more


async def test_callables_with_state_are_pickled_anew_each_call(ex: Executor) -> None:
    # Plain functions' pickles are cached; bound methods and partials carry state
    # that may change between calls, and must not be.
    pool = ex.pool("process")
    calc = funcs.Calc(10)
    assert (await calc.add(1))[1] == 11
    calc.base = 20
    assert (await calc.add(1))[1] == 21
    assert await pool.run(functools.partial(funcs.add, 1), 2) == 3
    assert await pool.run(functools.partial(funcs.add, 5), 2) == 7
