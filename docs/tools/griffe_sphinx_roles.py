"""Griffe extension: offload's docstrings use Sphinx roles; render them as Markdown.

mkdocstrings parses the ``:param:`` / ``:raises:`` fields itself (``docstring_style:
sphinx``), but leaves inline roles such as ``:class:`~offload.Offloader``` as they are.
This turns a role naming an ``offload`` object into a cross-reference (``[`Offloader`]
[offload.Offloader]``), any other role into plain code, and a paragraph ending in
``::`` (reStructuredText's "a literal block follows") into one ending in ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([\w.]+)`")
_LITERAL_ALONE = re.compile(r"^[ \t]*::[ \t]*$", re.M)
_LITERAL = re.compile(r"::$", re.M)


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    label = target.rsplit(".", 1)[-1] if short else target
    if target.startswith("offload."):
        return f"[`{label}`][{target}]"
    return f"`{label}`"


def convert(text: str) -> str:
    """The docstring ``text`` with its Sphinx roles and ``::`` made Markdown."""
    text = _ROLE.sub(_role, text)
    text = _LITERAL_ALONE.sub("", text)
    return _LITERAL.sub(":", text)


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
