"""The default Offloader: what a decorated function uses when no Offloader runs.

It starts on first use, one per event loop, inside a system task of that loop
(asyncio: a plain task; trio: ``spawn_system_task``), so it belongs to no caller
and lives as long as the loop. When the loop ends (``asyncio.run`` returns, the
trio run finishes) that task is cancelled and the pools stop; at interpreter exit
any worker still there is killed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from anyio.lowlevel import RunVar

from ._offloader import Offloader, active_offloader
from ._settings import OffloadSettings

__all__ = ("current_offloader",)


class _DefaultOffloader:
    """One event loop's default Offloader: started by :meth:`run` in a system task;
    ``ready`` is set once ``offloader`` runs, or ``error`` says why it could not."""

    __slots__ = ("error", "offloader", "ready", "task")

    def __init__(self) -> None:
        self.offloader: Offloader | None = None
        self.error: BaseException | None = None
        self.ready = anyio.Event()
        self.task: Any = None

    async def run(self) -> None:
        offloader = Offloader(OffloadSettings())
        offloader._register = False
        try:
            async with offloader:
                self.offloader = offloader
                self.ready.set()
                await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            # A system task must not raise (trio would crash the run): the callers
            # waiting for the default Offloader get the error instead.
            self.error = exc
        finally:
            self.ready.set()


_default: RunVar[_DefaultOffloader] = RunVar("offload_default")


async def current_offloader() -> Offloader:
    """The Offloader to use here: the running one, else this loop's default."""
    offloader = active_offloader()
    if offloader is not None:
        return offloader
    default = _default.get(None)
    if default is None or default.error is not None:
        default = _DefaultOffloader()
        _default.set(default)
        _spawn_system_task(default)
    if default.offloader is None:
        await default.ready.wait()
        if default.error is not None:
            raise default.error
    assert default.offloader is not None
    return default.offloader


def _spawn_system_task(default: _DefaultOffloader) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        trio.lowlevel.spawn_system_task(default.run, name="offload-default-offloader")
    else:
        default.task = loop.create_task(default.run(), name="offload-default-offloader")
