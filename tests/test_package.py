"""The package as a newcomer meets it: ``help(ringattn)`` opens with a map of the public API, and the license."""

from __future__ import annotations

import pydoc
import re
from pathlib import Path

import pytest

import ringattn
from ringattn import errors

ROOT = Path(__file__).resolve().parents[1]


def _mapped_names(doc: str) -> set[str]:
    """The names the module docstring's map gives a line each: ``  <name>  <what it is for>``."""
    return set(re.findall(r"^  ([A-Za-z_]\w*) {2,}\S", doc, flags=re.M))


def test_every_public_name_has_a_line_in_the_module_docstring_map() -> None:
    mapped = _mapped_names(ringattn.__doc__)
    assert mapped == set(ringattn.__all__), (set(ringattn.__all__) - mapped, mapped - set(ringattn.__all__))
    for name in ringattn.__all__:
        assert hasattr(ringattn, name), name


def test_help_opens_with_the_map_before_any_class_boilerplate() -> None:
    text = pydoc.plain(pydoc.render_doc(ringattn))
    first = text.splitlines()[:60]
    assert any("merge_states" in line for line in first) and any("ring_attention " in line for line in first)
    assert text.index("What to call for what") < text.index("CLASSES")


def test_every_exception_class_has_a_brief_docstring_and_its_documented_bases() -> None:
    classes = [getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)]
    assert classes and all(issubclass(cls, errors.RingAttnError) for cls in classes)
    for cls in classes:
        doc = cls.__doc__ or ""
        assert doc and len(doc.splitlines()) <= 3, cls  # brief: a sentence, not an essay
        assert cls.__name__ in ringattn.__doc__, cls
    assert issubclass(errors.ShapeError, ValueError) and issubclass(errors.ShapeError, RuntimeError)
    assert issubclass(errors.DTypeError, TypeError)


def test_license_file_and_metadata_are_the_declared_apache_2() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]  # PEP 639: SPDX alone
