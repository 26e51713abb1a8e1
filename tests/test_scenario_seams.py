"""Scenarios reach a target only through fixtures and capability protocols
(docs/architecture.md): no scenario imports a target module or reads a target's
internals, so a target can change its parts without breaking a scenario.

Read from the source (``ast``), so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT

SCENARIOS = sorted((REPO_ROOT / "scenarios").glob("*.py"))
# What a target holds inside: its processes, its hypervisor's stores, its directories.
INTERNALS = frozenset({"backend", "xenstore", "run_dir", "dom0", "session", "machine"})


def violations(source: str, name: str) -> list[str]:
    """Imports of ``harness.targets`` and reads of ``target.<internal>`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harness.targets"):
            found.append(f"{name}:{node.lineno}: from {node.module} import")
        elif isinstance(node, ast.Import):
            found += [
                f"{name}:{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("harness.targets")
            ]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in INTERNALS
            and isinstance(node.value, ast.Name)
            and node.value.id in {"target", "tgt"}
        ):
            found.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_a_scenario_uses_no_target_internals(path: Path) -> None:
    assert not violations(path.read_text(), path.name)


def test_the_check_sees_what_it_looks_for() -> None:
    source = (
        "from harness.targets.sim import SimTarget\n"
        "def test_x(target):\n"
        "    import harness.targets.xen\n"
        "    return target.backend.pid, target.run_dir\n"
    )
    assert sorted(violations(source, "s.py")) == [
        "s.py:1: from harness.targets.sim import",
        "s.py:3: import harness.targets.xen",
        "s.py:4: target.backend",
        "s.py:4: target.run_dir",
    ]
