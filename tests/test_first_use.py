"""The built-in process pool of settings that leave it to explicit calls starts at
its first call; every other pool starts with the Offloader."""

from __future__ import annotations

import anyio
import pytest

from offload import (
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolSettings,
    PoolStartError,
    _offloader,
)

from . import funcs
from .conftest import children

ML = {"ml": PoolSettings(kind="process", max_workers=1)}


def worker_count() -> int:
    return sum("offload._pools.process.worker" in " ".join(p.cmdline()) for p in children())


@pytest.mark.parametrize(
    ("settings", "lazy"),
    [
        pytest.param(OffloadSettings(pools=ML), True, id="own-pools"),
        pytest.param(
            OffloadSettings(process={"max_workers": 1}, pools=ML), False, id="process-set"
        ),
        pytest.param(OffloadSettings(default_pool="process", pools=ML), False, id="default-set"),
        pytest.param(OffloadSettings(process={"max_workers": 1}), False, id="no-own-pools"),
        pytest.param(OffloadSettings(default_pool="thread"), True, id="default-thread"),
        pytest.param(
            OffloadSettings(default_pool="thread", process={"max_workers": 1}),
            False,
            id="default-thread-process-set",
        ),
    ],
)
async def test_which_pools_start_warm(settings: OffloadSettings, lazy: bool) -> None:
    async with Offloader(settings) as ex:
        stats = ex.offloader.stats()
        warm = 0 if lazy else settings.process.resolved_max_workers("process")
        assert stats["process"].workers == warm
        assert worker_count() == warm + (1 if "ml" in stats else 0)
        assert await ex.pool("process").run(funcs.add, 1, 2) == 3
        assert ex.offloader.stats()["process"].workers >= 1


async def test_concurrent_first_calls_share_one_start() -> None:
    settings = OffloadSettings(process={"max_workers": 2}, pools=ML)
    settings.model_fields_set.discard("process")  # as if only its size had a default
    async with Offloader(settings) as ex:
        assert ex.offloader.stats()["process"].workers == 0
        results = []

        async def call(i: int) -> None:
            results.append(await ex.run(funcs.add, i, i))

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(call, i)
        assert sorted(results) == [0, 2, 4, 6, 8, 10]
        assert ex.offloader.stats()["process"].workers == 2
        assert worker_count() == 3


async def test_the_deadline_covers_the_start() -> None:
    async with Offloader(OffloadSettings(pools=ML)) as ex:
        with pytest.raises(OffloadTimeout):
            await ex.options(timeout=0.001).run(funcs.add, 1, 1)
        assert await ex.run(funcs.add, 1, 1) == 2  # the start went on regardless


async def test_leaving_while_it_starts_leaves_no_worker() -> None:
    async with Offloader(OffloadSettings(pools=ML)) as ex:
        with anyio.move_on_after(0.001):
            await ex.run(funcs.add, 1, 1)
    assert worker_count() == 0


async def test_never_used_it_never_starts() -> None:
    async with Offloader(OffloadSettings(pools=ML)) as ex:
        assert await ex.pool("ml").run(funcs.add, 1, 1) == 2
        assert ex.offloader.stats()["process"].workers == 0
    assert worker_count() == 0


async def test_a_failed_start_fails_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_offloader, "starts_on_first_use", lambda settings: {"process"})
    settings = OffloadSettings(
        process=PoolSettings(
            max_workers=1,
            initializer="tests.funcs:failing_initializer",
            initializer_args=("no model here",),
        )
    )
    async with Offloader(settings) as ex:
        for _ in range(2):
            with pytest.raises(PoolStartError, match="no model here") as failed:
                await ex.run(funcs.add, 1, 1)
            assert isinstance(failed.value.__cause__, PoolStartError)  # a warm start's error
        assert await ex.pool("thread").run(funcs.add, 1, 1) == 2
    assert worker_count() == 0
