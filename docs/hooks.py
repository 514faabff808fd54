"""MkDocs hook (``hooks:`` in ``mkdocs.yml``): what a strict build checks beyond MkDocs' own link checks.

Before every build:

* every public name (``ringattn.__all__``, ``ringattn.integrations.transformers.__all__``) has a docstring, read
  statically by griffe as mkdocstrings reads it, and a reference entry (``::: <path>``) in ``docs/reference/``;
* the schedule pictures are drawn again from ``ring/schedule.py`` (``docs/gen_figures.py``) into ``docs/img/``, so
  a page never shows a schedule the code no longer runs.

A failure raises ``PluginError``: the build stops, strict or not.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
PUBLIC_MODULES = ("ringattn", "ringattn.integrations.transformers")


def public_names() -> list[str]:
    """Full paths of every public name, read from the modules' ``__all__`` without importing them."""
    names = []
    for module in PUBLIC_MODULES:
        parts = module.split(".")
        source = ROOT / "src" / Path(*parts)
        source = source / "__init__.py" if source.is_dir() else source.with_suffix(".py")
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                names += [f"{module}.{name}" for name in ast.literal_eval(node.value)]
    return names


def reference_entries() -> set[str]:
    """The paths of every ``::: path`` entry of the reference pages."""
    entries = set()
    for page in (DOCS / "reference").glob("*.md"):
        entries |= set(re.findall(r"^::: *([\w.]+)", page.read_text(), flags=re.M))
    return entries


def problems() -> list[str]:
    """What the build refuses: public names without a reference entry or without a docstring."""
    import griffe

    found = []
    entries = reference_entries()
    packages = {m: griffe.load(m, search_paths=[str(ROOT / "src")]) for m in PUBLIC_MODULES}
    for path in public_names():
        module, name = path.rsplit(".", 1)
        if path not in entries:
            found.append(f"{path}: no reference entry ('::: {path}') in docs/reference/")
        obj = packages[module][name]
        if not (obj.docstring and obj.docstring.value.strip()):
            found.append(f"{path}: no docstring")
    return found


def on_pre_build(config, **kwargs) -> None:
    from mkdocs.exceptions import PluginError

    found = problems()
    if found:
        raise PluginError("public API without documentation:\n  " + "\n  ".join(found))
    sys.path.insert(0, str(DOCS))
    try:
        import gen_figures
    finally:
        sys.path.remove(str(DOCS))
    gen_figures.main(DOCS / "img")
