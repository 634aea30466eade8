"""Type variables shared across modules."""

from __future__ import annotations

from typing import ParamSpec, TypeVar

__all__ = ("P", "T")

P = ParamSpec("P")
T = TypeVar("T")
