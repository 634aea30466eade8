"""``@offload``: forms, metadata, validation, which Offloader and pool it uses."""

from __future__ import annotations

import inspect
import os
import pickle
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

from offload import (
    Executor,
    OffloadedFunction,
    OffloadedGenerator,
    Offloader,
    OffloadSettings,
    PoolClosed,
    offload,
)

from . import funcs

# the contract every event loop keeps (see tests/conftest.py)
pytestmark = pytest.mark.all_loops
MAIN_PID = os.getpid()


# -- the three forms ----------------------------------------------------------------------


async def test_bare_decorator(ex: Executor) -> None:
    assert isinstance(funcs.double, OffloadedFunction)
    assert await funcs.double(21) == 42
    # the fixture's default pool is "process"
    pid, _ = await funcs.bare_where()
    assert pid != MAIN_PID
    assert ex.offloader.stats()["process"].completed == 2
    assert ex.offloader.stats()["thread"].completed == 0
    # positional, *args, keyword-only and **kwargs all reach the function
    got = await funcs.decorated_signature(1, "y", 2, 3, c=2.0, extra=4)
    assert got == funcs.signature_probe(1, "y", 2, 3, c=2.0, extra=4)
    assert await funcs.process_pid() != MAIN_PID


async def test_called_decorator(ex: Executor) -> None:
    assert isinstance(funcs.triple, OffloadedFunction)
    assert await funcs.triple(5) == 15
    assert ex.offloader.stats()["process"].completed == 1


async def test_decorator_with_options(ex: Executor) -> None:
    assert isinstance(funcs.thread_double, OffloadedFunction)
    assert await funcs.thread_double(4) == 8
    assert ex.offloader.stats()["thread"].completed == 1
    assert ex.offloader.stats()["process"].completed == 0


async def test_user_exception_propagates(ex: Executor) -> None:
    boom = offload(kind="thread")(funcs.boom)
    with pytest.raises(funcs.Boom, match="bang"):
        await boom("bang")
    boom_p = offload(kind="process")(funcs.boom)
    with pytest.raises(funcs.Boom, match="bang"):
        await boom_p("bang")


# -- metadata ----------------------------------------------------------------------------


def test_wrapped_is_the_original_and_callable_synchronously() -> None:
    original: Any = funcs.double.__wrapped__
    assert not isinstance(original, OffloadedFunction)
    assert inspect.isfunction(original)
    assert original(4) == 8
    assert funcs.triple.__wrapped__(2) == 6
    assert funcs.thread_double.__wrapped__(3) == 6


def test_wrapper_keeps_name_doc_module() -> None:
    triple: Any = funcs.triple  # OffloadedFunction does not declare __name__ for type checkers
    assert triple.__name__ == "triple"
    assert triple.__qualname__ == "triple"
    assert funcs.triple.__doc__ == "Three times ``x``."
    assert funcs.triple.__module__ == funcs.__name__


def test_decorating_a_plain_function_returns_wrapper_around_it() -> None:
    decorated = offload(funcs.add)
    assert decorated.__wrapped__ is funcs.add
    assert offload()(funcs.add).__wrapped__ is funcs.add
    assert offload(kind="thread", timeout=5)(funcs.add).__wrapped__ is funcs.add


def test_signature_is_the_originals() -> None:
    assert inspect.signature(funcs.decorated_signature) == inspect.signature(funcs.signature_probe)
    assert inspect.signature(offload(funcs.signature_probe)) == inspect.signature(
        funcs.signature_probe
    )
    assert inspect.signature(offload(kind="thread")(funcs.add)) == inspect.signature(funcs.add)


def test_decorated_function_pickles_by_reference() -> None:
    assert pickle.loads(pickle.dumps(funcs.double)) is funcs.double
    assert pickle.loads(pickle.dumps(funcs.Calc.add)) is funcs.Calc.add


# -- rejected at decoration -------------------------------------------------------------


async def _coro() -> int:
    return 1


async def _agen() -> AsyncIterator[int]:
    yield 1


@pytest.mark.parametrize("target", [_coro, _agen], ids=["async-def", "async-generator"])
def test_async_functions_rejected_at_decoration(target: Any) -> None:
    with pytest.raises(TypeError, match="async"):
        offload(target)
    with pytest.raises(TypeError, match="async"):
        offload()(target)
    with pytest.raises(TypeError, match="async"):
        offload(kind="thread", timeout=1)(target)


def _numbers() -> Iterator[int]:
    yield 1


def test_generator_function_becomes_a_stream_at_decoration() -> None:
    for decorate in (offload, offload(), offload(kind="thread"), offload(kind="process")):
        decorated = decorate(_numbers)
        assert isinstance(decorated, OffloadedGenerator)
        assert decorated.__wrapped__ is _numbers


@pytest.mark.parametrize("target", [3, "fn", object()], ids=["int", "str", "object"])
def test_non_callable_rejected_at_decoration(target: Any) -> None:
    with pytest.raises(TypeError):
        offload(target)
    with pytest.raises(TypeError):
        offload()(target)
    with pytest.raises(TypeError):
        offload(kind="thread")(target)


def test_decorator_factory_rejects_none() -> None:
    with pytest.raises(TypeError):
        offload()(None)  # type: ignore[call-overload]


@pytest.mark.parametrize("kind", [123, "", b"thread", 1.5], ids=repr)
def test_bad_kind_type(kind: Any) -> None:
    with pytest.raises(TypeError, match="kind"):
        offload(kind=kind)(funcs.add)


@pytest.mark.parametrize("timeout", ["x", "10", True, False, [1]], ids=repr)
def test_timeout_of_wrong_type(timeout: Any) -> None:
    with pytest.raises(TypeError, match="timeout must be a positive number"):
        offload(timeout=timeout)(funcs.add)


@pytest.mark.parametrize("timeout", [0, -1, -0.5, float("nan")], ids=repr)
def test_timeout_not_positive(timeout: Any) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        offload(timeout=timeout)(funcs.add)


def test_timeout_none_is_accepted() -> None:
    assert offload(timeout=None)(funcs.add).__wrapped__ is funcs.add
    assert offload(timeout=0.5)(funcs.add).__wrapped__ is funcs.add


async def test_unknown_kind_raises_lookup_error_at_call_time(ex: Executor) -> None:
    fn = offload(kind="gpu")(funcs.add)  # decoration does not check the name
    with pytest.raises(LookupError) as info:
        await fn(1, 2)
    message = str(info.value)
    assert "gpu" in message
    assert "thread" in message
    assert "process" in message
    with anyio.CancelScope() as scope:  # a checkpoint, even when refused at once
        scope.cancel()
        await fn(1, 2)
    assert scope.cancelled_caught


# -- which Offloader and which pool --------------------------------------------------------


@pytest.fixture
def thread_default() -> OffloadSettings:
    return OffloadSettings(default_pool="thread", process={"max_workers": 1}, shutdown_timeout=5)


async def test_bare_decorator_uses_active_offloaders_default_pool(
    thread_default: OffloadSettings,
) -> None:
    loop_thread = threading.get_ident()
    off = Offloader(thread_default)
    async with off:
        pid, ident = await funcs.bare_where()
        assert pid == MAIN_PID
        assert ident != loop_thread
        stats = off.stats()
        assert stats["thread"].completed == 1
        assert stats["process"].completed == 0


async def test_decorator_option_timeout_applies(ex: Executor) -> None:
    release = threading.Event()
    slow = offload(kind="thread", timeout=0.2)(funcs.block_on)
    try:
        with anyio.fail_after(3):
            with pytest.raises(TimeoutError):
                await slow(release)
    finally:
        release.set()
    assert ex.offloader.stats()["thread"].timed_out == 1


async def test_task_started_outside_the_block_uses_the_running_offloader(
    thread_default: OffloadSettings,
) -> None:
    """Like request tasks under a lifespan: not children of the task that entered."""
    loop_thread = threading.get_ident()
    off = Offloader(thread_default)
    entered = anyio.Event()
    results: list[tuple[int, int]] = []
    done = anyio.Event()

    async def request() -> None:
        await entered.wait()
        results.append(await funcs.bare_where())
        results.append(await funcs.bare_where())
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(request)
        async with off:
            entered.set()
            with anyio.fail_after(10):
                await done.wait()
            assert off.stats()["thread"].completed == 2
            assert off.stats()["process"].completed == 0
    assert len(results) == 2
    for pid, ident in results:
        assert pid == MAIN_PID  # the thread pool of `off`, not a default process pool
        assert ident != loop_thread


async def test_innermost_entered_offloader_wins(thread_default: OffloadSettings) -> None:
    outer = Offloader(thread_default)
    inner = Offloader(thread_default)
    async with outer:
        async with inner:
            await funcs.bare_where()
            assert inner.stats()["thread"].completed == 1
            assert outer.stats()["thread"].completed == 0
        await funcs.bare_where()
        assert outer.stats()["thread"].completed == 1
        assert inner.stats()["thread"].completed == 1


async def test_decorated_methods_process_pool(ex: Executor) -> None:
    calc = funcs.Calc(10)
    pid, value = await calc.add(5)
    assert value == 15
    assert pid != MAIN_PID
    assert ex.offloader.stats()["process"].completed == 1
    # the class attribute is the decorated function itself; unbound call works too
    pid2, value2 = await funcs.Calc.add(funcs.Calc(1), 2)
    assert value2 == 3
    assert pid2 != MAIN_PID


async def test_decorated_methods_thread_pool(ex: Executor) -> None:
    ident, value = await funcs.Calc(3).mul(4)
    assert value == 12
    assert ident != threading.get_ident()


async def test_run_a_decorated_method_bound_to_its_instance(ex: Executor) -> None:
    calc = funcs.Calc(10)
    for pool in ("process", "thread"):
        _, value = await ex.pool(pool).run(calc.add, 5)
        assert value == 15
        _, value = await ex.pool(pool).run(calc.mul, 5)
        assert value == 50
    assert ex.stats().completed == 2


async def test_classmethod_above_offload(ex: Executor) -> None:
    pid, value = await funcs.Tools.scale(3)
    assert (value, pid != MAIN_PID) == (21, True)
    pid, value = await funcs.Tools().scale(4)  # through an instance, as a classmethod
    assert (value, pid != MAIN_PID) == (28, True)
    ident, value = await funcs.Tools.scale_in_thread(2)
    assert (value, ident != threading.get_ident()) == (14, True)
    assert await ex.pool("thread").run(funcs.Tools.scale, 5) == (MAIN_PID, 35)
    _, value = await ex.pool("process").run(funcs.Tools.scale_in_thread, 6)
    assert value == 42


async def test_staticmethod_above_offload(ex: Executor) -> None:
    pid, value = await funcs.Tools.negate(3)
    assert (value, pid != MAIN_PID) == (-3, True)
    _, value = await ex.pool("process").run(funcs.Tools().negate, 4)
    assert value == -4


async def test_decorated_function_calls_itself_in_a_worker(ex: Executor) -> None:
    # Inside a worker a decorated function runs inline: there is no loop to await on.
    assert await funcs.fib(15) == 610
    assert await ex.pool("thread").run(funcs.fib, 12) == 144
    assert await ex.pool("process").run(funcs.fib, 12) == 144


async def test_workers_know_they_are_workers(ex: Executor) -> None:
    assert not funcs.where_am_i()
    assert await ex.pool("thread").run(funcs.where_am_i)
    assert await ex.pool("process").run(funcs.where_am_i)


def test_offload_above_classmethod_says_which_order() -> None:
    with pytest.raises(TypeError, match="@classmethod above @offload"):
        offload(classmethod(funcs.add))  # type: ignore[arg-type,call-overload]


def test_decorated_method_wrapped_callable_synchronously() -> None:
    calc = funcs.Calc(2)
    assert funcs.Calc.add.__wrapped__(calc, 3) == (os.getpid(), 5)


async def test_decorated_call_while_its_offloader_drains_is_refused(
    thread_default: OffloadSettings,
) -> None:
    # Not handed to a default Offloader that would start behind the closing one's back.
    release = threading.Event()
    started = threading.Event()
    off = Offloader(thread_default)
    errors: list[BaseException] = []

    async def hold(ex: Executor) -> None:
        await ex.pool("thread").run(funcs.block_on, release, started)

    async def call_while_draining() -> None:
        try:
            with anyio.fail_after(10):
                while off.running:
                    await anyio.sleep(0.01)
                await funcs.bare_where()
        except BaseException as exc:
            errors.append(exc)
        finally:
            release.set()

    try:
        async with anyio.create_task_group() as tg, off as ex:
            tg.start_soon(hold, ex)
            await anyio.to_thread.run_sync(started.wait, 10)
            tg.start_soon(call_while_draining)
    finally:
        release.set()
    assert len(errors) == 1
    assert isinstance(errors[0], PoolClosed), errors
