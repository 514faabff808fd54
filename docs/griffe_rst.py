"""Griffe extension (``extensions:`` in ``mkdocs.yml``): the docstrings' reST inline markup as Markdown.

The docstrings are NumPy style with reST inline markup, as ``help()`` shows them: ````code```` and
``:func:`name```. mkdocstrings renders Markdown, so before a docstring is parsed:

* ``:func:`x``` / ``:class:`x``` / ``:data:`x``` (``~`` prefix allowed) become a cross-reference when ``x`` is a
  public name of ``ringattn`` (``ringattn.__all__`` or the transformers integration's), else inline code;
* ````code```` becomes ```code```;
* a trailing ``::`` (a reST literal block follows) becomes ``:``;
* the type of a ``name : type`` line (Parameters, Returns) loses its backticks (mkdocstrings prints types as code),
  and a set of choices ``{a, b}`` reads ``a | b``: numpydoc would take ``a`` for the default, which the signature
  gives instead.

The docstrings themselves are left as they are (``help()`` reads them).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    from hooks import public_names
finally:
    sys.path.pop(0)

PUBLIC = set(public_names())
ROLE = re.compile(r":(?:func|class|data|meth|attr|mod|obj|exc):`~?([\w.]+)`")
TYPE_LINE = re.compile(r"^([\w*][\w*, ]*) : (.+)$")


def _target(name: str, module: str) -> str | None:
    for candidate in (name, f"{module}.{name}", f"ringattn.{name}", f"ringattn.integrations.transformers.{name}"):
        if candidate in PUBLIC:
            return candidate
    return None


def to_markdown(text: str, module: str) -> str:
    """``text`` (a docstring of an object of ``module``) with its reST inline markup as Markdown."""

    def role(match: re.Match) -> str:
        name = match.group(1)
        target = _target(name, module)
        short = name.rsplit(".", 1)[-1]
        return f"[`{short}`][{target}]" if target else f"`{short}`"

    lines = []
    for line in text.splitlines():
        line = ROLE.sub(role, line)
        typed = TYPE_LINE.match(line)
        if typed:
            kind = re.sub(r"\{([^{}]*)\}", lambda m: " | ".join(m.group(1).split(", ")), typed.group(2))
            line = f"{typed.group(1)} : {kind.replace('`', '')}"
        line = re.sub(r"``(.+?)``", r"`\1`", line)
        if line.endswith("::") and not line.strip() == "::":
            line = line[:-1]
        lines.append(line)
    return "\n".join(lines)


class RstInlineToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            module = obj.module.path if not obj.is_module else obj.path
            obj.docstring.value = to_markdown(obj.docstring.value, module)
