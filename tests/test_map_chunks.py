"""``map``'s chunks: several items in one call, each item keeping its own outcome."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from offload import (
    CallAborted,
    Executor,
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    SerializationError,
    WorkerCrashed,
)
from offload._chunking import LARGE, ChunkSizer

from .chunk_funcs import (
    crash_in_chunk,
    exits_when_unpickled_at,
    large_result,
    nbytes,
    raise_at_13,
    system_exit_at,
    unpicklable_at,
)
from .funcs import identity, slow_at
from .processes import wait_until

KINDS = ["thread", "process"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


async def collect(results: AsyncIterator[Any], into: list[Any]) -> None:
    async for r in results:
        into.append(r)


def completed(ex: Executor, kind: str) -> int:
    return ex.pool(kind).stats().completed


async def test_many_tiny_items_take_far_fewer_calls(ex: Executor, kind: str) -> None:
    items = range(-3000, 0)
    async with ex.pool(kind).map(abs, items) as results:
        assert [r async for r in results] == [abs(i) for i in items]
    # Chosen from measured times: the first call is one item, the rest are chunks.
    assert 1 < completed(ex, kind) < len(items) / 4


async def test_chunksize_is_items_per_call(ex: Executor, kind: str) -> None:
    async with ex.pool(kind).map(abs, range(1000), chunksize=100) as results:
        assert [r async for r in results] == list(range(1000))
    assert completed(ex, kind) == 10
    # An unknown length (a generator), the last chunk short.
    gen = (i for i in range(250))
    assert [r async for r in ex.pool(kind).map(abs, gen, chunksize=100)] == list(range(250))
    assert completed(ex, kind) == 13


@pytest.mark.parametrize("chunksize", [None, 5])
async def test_error_at_13_of_20_after_exactly_13_results(
    ex: Executor, kind: str, chunksize: int | None
) -> None:
    got: list[int] = []
    with pytest.raises(ValueError, match="item 13") as caught:
        await collect(ex.pool(kind).map(raise_at_13, range(20), chunksize=chunksize), got)
    assert type(caught.value) is ValueError
    assert got == list(range(13))
    got = []
    with pytest.raises(ValueError, match="item 13"):
        await collect(
            ex.pool(kind).map(raise_at_13, range(20), chunksize=chunksize, ordered=False), got
        )
    assert 13 not in got
    assert set(got) <= set(range(20))


async def test_a_crash_fails_only_its_chunk(ex: Executor, tmp_path: Path) -> None:
    # Chunk [0-4] runs on the other worker while [5-9] crashes its own (item 7): it
    # finishes, and its results are delivered; then the crashed chunk's first item.
    items = [(i, str(tmp_path)) for i in range(20)]
    got: list[int] = []
    with pytest.raises(WorkerCrashed) as caught:
        await collect(ex.pool("process").map(crash_in_chunk, items, chunksize=5), got)
    assert got == [0, 1, 2, 3, 4]
    if sys.version_info >= (3, 11):
        assert caught.value.__notes__ == [
            "item 5 was in a chunk of 5 items (5 to 9), which failed as a whole"
        ]
    assert ex.pool("process").stats().crashed == 1
    # The pool goes on: a crash hurt no other chunk and no later map.
    assert [r async for r in ex.pool("process").map(abs, range(-50, 0), chunksize=10)] == list(
        range(50, 0, -1)
    )


async def test_a_deadline_fails_only_its_chunk(ex: Executor, kind: str) -> None:
    items = [(i, 5) for i in range(12)]
    got: list[int] = []
    with pytest.raises(OffloadTimeout, match=r"a chunk of 4 items \(4 to 7\)") as caught:
        await collect(ex.pool(kind).map(slow_at, items, chunksize=4, timeout=0.5), got)
    assert "did not finish within 2 s (0.5 s per item)" in str(caught.value)
    assert got == [0, 1, 2, 3]
    assert ex.pool(kind).stats().timed_out == 1


async def test_an_item_that_does_not_pickle_fails_alone(ex: Executor) -> None:
    items: list[Any] = [0, 1, 2, threading.Lock(), 4]
    got: list[Any] = []
    with pytest.raises(SerializationError, match=r"item 3 of the map of .*identity cannot be"):
        await collect(ex.pool("process").map(identity, items, chunksize=10), got)
    assert got == [0, 1, 2]


@pytest.mark.parametrize(
    ("fn", "at", "error", "match"),
    [
        (unpicklable_at, 3, SerializationError, "cannot be pickled"),
        (system_exit_at, 4, CallAborted, "SystemExit"),
    ],
)
async def test_an_outcome_that_cannot_travel_fails_its_item_alone(
    ex: Executor, fn: Any, at: int, error: type[Exception], match: str
) -> None:
    # Exactly the items before it: a chunk's outcomes come in its order, unordered too.
    for ordered in (True, False):
        got: list[Any] = []
        with pytest.raises(error, match=match):
            await collect(ex.pool("process").map(fn, range(8), chunksize=8, ordered=ordered), got)
        assert got == list(range(at))
    # The worker was not hurt.
    assert ex.pool("process").stats().crashed == 0


async def test_results_that_do_not_unpickle_here_fail_their_chunk(ex: Executor) -> None:
    # The results travel pickled together: which one is to blame, the parent cannot
    # tell: its chunk fails as a whole. This process goes on, and so does the pool.
    got: list[Any] = []
    with pytest.raises(SerializationError, match=r"results of .* cannot be unpickled") as caught:
        await collect(ex.pool("process").map(exits_when_unpickled_at, range(12), chunksize=4), got)
    # Item 2 exits when unpickled: its chunk is items 0 to 3.
    assert got == []
    if sys.version_info >= (3, 11):
        assert caught.value.__notes__ == [
            "item 0 was in a chunk of 4 items (0 to 3), which failed as a whole"
        ]
    assert ex.pool("process").stats().crashed == 0
    assert [r async for r in ex.pool("process").map(abs, range(5), chunksize=4)] == list(range(5))


async def test_large_items_go_alone(ex: Executor) -> None:
    # Each a call of its own, which sends its bytes out of band, not in a chunk's pickle.
    items = [bytes(LARGE)] * 6
    assert [r async for r in ex.pool("process").map(nbytes, items)] == [LARGE] * 6
    assert completed(ex, "process") == 6
    # Large results: once one is seen, the items go alone too.
    sizes = [len(r) async for r in ex.pool("process").map(large_result, range(10))]
    assert sizes == [1 << 17] * 10
    assert completed(ex, "process") == 16


async def test_items_taken_ahead_are_bounded_by_calls_in_flight(ex: Executor) -> None:
    taken = 0

    def items() -> Iterator[int]:
        nonlocal taken
        for i in range(10_000):
            taken += 1
            yield i

    async with ex.pool("thread").map(abs, items(), chunksize=10, max_in_flight=2) as results:
        assert await anext(results) == 0
        # Two calls of 10 items in flight (or waiting for the consumer); no more.
        await wait_until(lambda: completed(ex, "thread") == 2, 10, "2 calls")
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert taken == 20
        assert completed(ex, "thread") == 2


def test_the_automatic_size() -> None:
    sizer = ChunkSizer(None, workers=2, length=None)
    assert sizer.size() == 1  # nothing measured
    # 1 µs of work per item, 50 µs of price per call: 1000 items keep it at 5%.
    sizer.measured(1, latency=51e-6, ran=1e-6, nbytes=20)
    assert sizer.size() == 1000
    # Items known: at most a quarter of each worker's share, as the standard
    # library advises.
    sizer = ChunkSizer(None, workers=2, length=800)
    sizer.measured(1, latency=51e-6, ran=1e-6, nbytes=20)
    assert sizer.size() == 100
    # The probe's own time does not weigh more than a chunk's: per item, the recent
    # chunks, each by its number of items.
    sizer = ChunkSizer(None, workers=2, length=None)
    sizer.measured(1, latency=100e-6, ran=50e-6, nbytes=20)  # mostly the chunk's cost
    sizer.measured(1000, latency=1.05e-3, ran=1e-3, nbytes=20_000)
    assert sizer.work == pytest.approx((50e-6 / 2 + 1e-3) / (1 / 2 + 1000))
    # Slow items: one per call; large ones too.
    sizer = ChunkSizer(None, workers=2, length=None)
    sizer.measured(1, latency=0.0101, ran=0.01, nbytes=20)
    assert sizer.size() == 1
    sizer = ChunkSizer(None, workers=2, length=None)
    sizer.measured(1, latency=60e-6, ran=1e-6, nbytes=LARGE)
    assert sizer.size() == 1
    # Given, it is what it is.
    assert ChunkSizer(7, workers=2, length=3).size() == 7


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
async def test_a_bad_chunksize_is_refused_at_once(ex: Executor, value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="chunksize must be an int >= 1"):
        ex.map(abs, range(3), chunksize=value)


async def _cancelled_at(ex: Executor, kind: str, position: int, work: float = 0.0) -> list[int]:
    """The results a consumer got of a map with its results ready a hundred at a time,
    cancelling itself after the one at ``position``, ``work`` seconds of its own
    (blocking) spent on each."""
    got: list[int] = []
    with anyio.CancelScope() as scope:
        async with ex.pool(kind).map(abs, range(1000), chunksize=100) as results:
            async for r in results:
                got.append(r)
                time.sleep(work)
                if r == position:
                    scope.cancel()
    assert scope.cancelled_caught
    assert got == list(range(len(got)))
    return got


async def test_a_cancelled_consumer_stops_within_a_few_ready_results(
    ex: Executor, kind: str
) -> None:
    # Cancelled after the first, the consumer gets at most the few a tight loop takes
    # between two checks.
    from offload._map_results import _FIRST_UNCHECKED

    assert 1 <= len(await _cancelled_at(ex, kind, 0)) <= _FIRST_UNCHECKED


async def test_a_slow_consumer_checks_for_its_cancellation_at_every_result(
    ex: Executor, kind: str
) -> None:
    # A consumer that takes longer than the time between two checks, once timed (by
    # its first results), checks at each: cancelled, it gets no result more.
    from offload._map_results import _CHECK_EVERY, _FIRST_UNCHECKED

    got = await _cancelled_at(ex, kind, _FIRST_UNCHECKED + 5, work=_CHECK_EVERY * 2)
    assert len(got) == _FIRST_UNCHECKED + 6


@pytest.mark.parametrize("with_tblib", [False, True])
def test_each_item_of_a_failed_chunk_has_an_error_of_its_own(
    with_tblib: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copyreg

    from offload._chunking import _chunk_failed

    if with_tblib:
        # As importing distributed does: a reducer for exceptions whose copies share
        # the original's __dict__ (undone after the test).
        tblib = pytest.importorskip("tblib.pickling_support")
        for kind in (WorkerCrashed, OffloadTimeout, SerializationError):
            monkeypatch.setitem(copyreg.dispatch_table, kind, tblib.pickle_exception)

    crash = WorkerCrashed("the worker process died (SIGKILL) while running abs")
    failed = _chunk_failed(crash, 10, 3, None, "abs")
    errors = [f.error for f in failed]
    assert errors[0] is crash
    assert len({id(e) for e in errors}) == 3
    assert all(type(e) is WorkerCrashed and str(e) == str(crash) for e in errors)
    if sys.version_info >= (3, 11):
        assert [e.__notes__ for e in errors] == [
            [f"item {i} was in a chunk of 3 items (10 to 12), which failed as a whole"]
            for i in (10, 11, 12)
        ]
    bad = SerializationError("the results of abs cannot be unpickled")
    errors = [f.error for f in _chunk_failed(bad, 0, 2, None, "abs")]
    assert errors[0] is bad
    assert errors[1] is not bad
    if sys.version_info >= (3, 11):
        assert [len(e.__notes__) for e in errors] == [1, 1]
    timeouts = [f.error for f in _chunk_failed(OffloadTimeout("x"), 0, 2, 0.5, "abs")]
    assert [str(e) for e in timeouts] == [
        "abs: a chunk of 2 items (0 to 1) did not finish within 1 s (0.5 s per item)"
    ] * 2
    assert timeouts[0] is not timeouts[1]


@pytest.mark.parametrize("kind", KINDS)
async def test_growing_chunks_never_overload_the_pool(kind: str) -> None:
    # The first calls carry one item each, the next a thousand: calls in flight,
    # not items, must stay within what the pool queues.
    settings = OffloadSettings(
        thread={"max_workers": 1, "max_pending": 1},
        process={"max_workers": 1, "max_pending": 1},
    )
    async with Offloader(settings) as ex:
        for _ in range(3):
            results = ex.pool(kind).map(abs, range(-20_000, 0))
            assert [r async for r in results] == list(range(20_000, 0, -1))
        assert ex.pool(kind).stats().rejected == 0
