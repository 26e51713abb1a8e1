"""Target implementations, by the name ``--target`` and ``harness up --target`` take."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.target import Target

Progress = Callable[[str], None]


def make_target(
    name: str,
    guests: int,
    run_dir: Path | None = None,
    progress: Progress | None = None,
    detached: bool = False,
) -> Target:
    """Build (not start) the target called ``name``; ``detached`` ones outlive us."""
    if name == "direct":
        from harness.targets.direct import DirectTarget

        return DirectTarget(guests, run_dir, progress, detached)
    if name == "sim":
        from harness.targets.sim import SimTarget

        return SimTarget(guests, run_dir, progress, detached)
    raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")


def capabilities_of(name: str, guests: int) -> frozenset[str]:
    """What ``name`` can do with ``guests`` guests, without starting it (for skipping)."""
    if name == "direct":
        from harness.targets.direct import DirectTarget

        return DirectTarget.capabilities_for(guests)
    if name == "sim":
        from harness.targets.sim import SimTarget

        return SimTarget.capabilities_for(guests)
    raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")


TARGETS = ("sim", "direct")
