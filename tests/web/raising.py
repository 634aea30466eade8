"""Functions that raise the exceptions FastAPI answers itself, for worker processes."""

from __future__ import annotations

from typing import Any


def raise_fastapi_http(status: int, detail: Any, headers: dict[str, str] | None) -> None:
    from fastapi import HTTPException

    # Keywords, as FastAPI's documentation writes it: args stays empty.
    raise HTTPException(status_code=status, detail=detail, headers=headers)


def raise_starlette_http(status: int, detail: str) -> None:
    from starlette.exceptions import HTTPException

    raise HTTPException(status, detail=detail)


def raise_websocket_exception(code: int, reason: str) -> None:
    from fastapi import WebSocketException

    raise WebSocketException(code=code, reason=reason)


def raise_request_validation_error() -> None:
    from fastapi.exceptions import RequestValidationError

    raise RequestValidationError(
        [{"type": "missing", "loc": ("query", "q"), "msg": "Field required", "input": None}],
        body={"q": None},
    )


def raise_pydantic_validation_error() -> None:
    from pydantic import BaseModel

    class Model(BaseModel):
        x: int

    Model(x="not a number")  # type: ignore[arg-type]
