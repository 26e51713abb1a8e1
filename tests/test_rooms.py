"""The rooms of ``xenvtpm/`` import each other as docs/architecture.md says: in one
direction, without circles, standard library only, so that a deployment can leave out
the rooms it does not need (``sim/`` and ``tools/`` on a production dom0 or guest).

Read from the source (``ast``), not by importing, so that an import hidden in a
function or under ``TYPE_CHECKING`` counts too.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "xenvtpm"
ROOMS = ("frontend", "backend", "manager", "xen", "sim", "tools")
# room -> the rooms it may import (the shared top-level modules are always allowed)
MAY_IMPORT: dict[str, set[str]] = {
    "frontend": {"xen"},
    "backend": {"xen"},
    "manager": set(),
    "xen": set(),  # and sim/, lazily: see test_xen_imports_sim_only_when_asked
    "sim": {"xen"},
    "tools": {"xen", "manager", "backend", "frontend"},
    "": {"xen"},  # the shared modules: daemon.py opens the hypervisor, xenbus.py uses it
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # what it imports, dotted (a module, or a name's module)
    top_level: bool  # at module level (not in a function)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports() -> Iterator[Import]:
    known = modules()
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(name, alias.name, id(node) in top)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import"
                base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    yield Import(name, full if full in known else base, id(node) in top)


def room(module: str) -> str:
    """``xenvtpm.backend.device`` -> ``backend``; a shared module -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else ""


def ours(found: list[Import]) -> list[Import]:
    return [i for i in found if i.target.split(".")[0] == "xenvtpm"]


def test_only_the_standard_library() -> None:
    outside = sorted(
        {
            f"{i.module}: {i.target}"
            for i in imports()
            if i.target.split(".")[0] not in {"xenvtpm", "__future__"}
            and i.target.split(".")[0] not in sys.stdlib_module_names
        }
    )
    assert not outside


def wrong_imports(found: list[Import], importer: str) -> list[str]:
    """What modules of room ``importer`` import from rooms they may not."""
    allowed = MAY_IMPORT[importer] | {importer, ""}
    return sorted(
        f"{i.module} imports {i.target}"
        for i in ours(found)
        if room(i.module) == importer
        and room(i.target) not in allowed
        and not (importer == "xen" and room(i.target) == "sim" and not i.top_level)
    )


def circles(found: list[Import]) -> list[str]:
    """Every import circle among the modules that ``found`` names, as a path."""
    graph: dict[str, set[str]] = {}
    for i in ours(found):
        graph.setdefault(i.module, set())
        if i.target != i.module:
            graph[i.module].add(i.target)
    seen: list[str] = []
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                seen.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    return seen


@pytest.mark.parametrize("importer", [*ROOMS, ""])
def test_rooms_import_in_one_direction(importer: str) -> None:
    assert not wrong_imports(list(imports()), importer)


def test_xen_imports_sim_only_when_asked() -> None:
    """The Linux adapter's package loads without ``sim/``: its one import of the
    simulated adapter is inside ``open_hypervisor``, taken when XENVTPM_SIM_* is set."""
    to_sim = [
        i for i in ours(list(imports())) if room(i.module) == "xen" and room(i.target) == "sim"
    ]
    assert to_sim and not [i for i in to_sim if i.top_level]


def test_no_import_circles() -> None:
    assert not circles(list(imports()))


def test_the_checks_see_what_they_look_for() -> None:
    """A manager importing the backend, a module-level import of sim/ from xen/, and a
    circle (backend.py <-> device.py, as it once was) are each found."""
    found = [
        Import("xenvtpm.manager.manager", "xenvtpm.backend.device", True),
        Import("xenvtpm.xen", "xenvtpm.sim.adapter", True),
        Import("xenvtpm.backend.backend", "xenvtpm.backend.device", True),
        Import("xenvtpm.backend.device", "xenvtpm.backend.backend", False),
    ]
    assert wrong_imports(found, "manager") == [
        "xenvtpm.manager.manager imports xenvtpm.backend.device"
    ]
    assert wrong_imports(found, "xen") == ["xenvtpm.xen imports xenvtpm.sim.adapter"]
    assert circles(found) == [
        "xenvtpm.backend.backend -> xenvtpm.backend.device -> xenvtpm.backend.backend"
    ]
