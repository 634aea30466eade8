"""Exceptions that FastAPI answers itself cross the process boundary as themselves."""

from __future__ import annotations

import pytest
from fastapi import HTTPException, WebSocketException
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from offload import Executor, RemoteTraceback

from . import raising


class KeywordError(Exception):
    """Built with keywords its ``__init__`` requires: ``args`` stays empty."""

    def __init__(self, *, code: int) -> None:
        self.code = code


def raise_keyword_error(code: int) -> None:
    raise KeywordError(code=code)


@pytest.fixture
def ex(shared_ex: Executor) -> Executor:
    """Every test here only checks what comes back: one start per module."""
    return shared_ex


async def error_of(ex: Executor, fn, *args) -> BaseException:
    with pytest.raises(Exception) as info:
        await ex.pool("process").run(fn, *args)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    return info.value


async def test_fastapi_http_exception_keeps_status_detail_and_headers(ex: Executor) -> None:
    error = await error_of(ex, raising.raise_fastapi_http, 404, "no such item", {"X-A": "1"})
    assert type(error) is HTTPException
    assert (error.status_code, error.detail, error.headers) == (404, "no such item", {"X-A": "1"})


async def test_starlette_http_exception(ex: Executor) -> None:
    error = await error_of(ex, raising.raise_starlette_http, 418, "tea")
    assert type(error) is StarletteHTTPException
    assert (error.status_code, error.detail) == (418, "tea")


async def test_websocket_exception(ex: Executor) -> None:
    error = await error_of(ex, raising.raise_websocket_exception, 1008, "policy")
    assert type(error) is WebSocketException
    assert (error.code, error.reason) == (1008, "policy")


async def test_request_validation_error(ex: Executor) -> None:
    error = await error_of(ex, raising.raise_request_validation_error)
    assert type(error) is RequestValidationError
    assert error.errors()[0]["loc"] == ("query", "q")
    assert error.body == {"q": None}


async def test_pydantic_validation_error(ex: Executor) -> None:
    error = await error_of(ex, raising.raise_pydantic_validation_error)
    assert isinstance(error, ValidationError)
    assert error.errors()[0]["loc"] == ("x",)


async def test_any_exception_built_with_required_keywords(ex: Executor) -> None:
    # A class of this module travels by reference: the worker imports it too.
    error = await error_of(ex, raise_keyword_error, 7)
    assert type(error) is KeywordError
    assert error.code == 7
