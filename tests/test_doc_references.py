"""The README and docs/ name the test behind each promise (``file.py::test_name``);
those names must exist, or a promise points at nothing after a test moves.

Checked: every ``test_*.py`` file named exists in tests/ or scenarios/; every
``file.py::test_name`` is defined in that file; every bare ``::test_name`` (a test of
the file named just before it) is defined somewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SUITES = [p for d in ("tests", "scenarios") for p in sorted((REPO_ROOT / d).glob("*.py"))]


def defined() -> dict[str, set[str]]:
    """test name -> the files defining it."""
    out: dict[str, set[str]] = {}
    for path in SUITES:
        for name in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M):
            out.setdefault(name, set()).add(path.name)
    return out


def broken(text: str, tests: dict[str, set[str]], files: set[str]) -> list[str]:
    found = []
    for match in re.finditer(r"\b(test_\w+\.py)(?:::(test_\w+))?", text):
        file, name = match.groups()
        if file not in files:
            found.append(f"{file}: no such test file")
        elif name and file not in tests.get(name, set()):
            found.append(f"{file}::{name}: not defined there")
    for name in re.findall(r"(?<![\w.])::(test_\w+)", text):
        if name not in tests:
            found.append(f"::{name}: no such test")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_named_test_exists(doc: Path) -> None:
    assert not broken(doc.read_text(), defined(), {p.name for p in SUITES})


def test_the_check_sees_a_moved_test() -> None:
    tests = {"test_a": {"test_new.py"}}
    files = {"test_new.py"}
    text = "`test_old.py::test_a`, `test_new.py::test_b`, `::test_c`, `test_new.py::test_a`"
    assert broken(text, tests, files) == [
        "test_old.py: no such test file",
        "test_new.py::test_b: not defined there",
        "::test_c: no such test",
    ]
