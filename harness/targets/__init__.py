"""Target implementations, by the name ``--target`` and ``harness up --target`` take.

A target class takes ``(guests, run_dir, progress, detached)``, implements
``harness.target.Target`` and has a classmethod ``capabilities_for(guests)`` (used to
skip scenarios at collection, before anything starts). New targets (``xen`` under QEMU,
``ssh://user@host``) register here; names with a scheme are matched on the scheme.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.target import Target

Progress = Callable[[str], None]

# name -> "module:Class", imported only when used (sim needs the driver package).
REGISTRY: dict[str, str] = {
    "sim": "harness.targets.sim:SimTarget",
    "direct": "harness.targets.direct:DirectTarget",
    "xen": "harness.targets.xen:XenTarget",  # Xen 4.17 + dom0 under QEMU, PV guests (xl)
    "xen-kernel": "harness.targets.xen:XenKernelFrontendTarget",  # same; guests' own xen-tpmfront
    "xen-kernel-tpm2": "harness.targets.xen:PatchedKernelFrontendTarget",  # patched, TPM 2.0
    "ssh": "harness.targets.xen_host:XenHostTarget",  # ssh://root@HOST: an existing Xen host
}
SCHEMES = frozenset({"ssh"})  # used as ``ssh://...``: the rest of the name says where
TARGETS = tuple(n for n in REGISTRY if n not in SCHEMES)  # names usable as they are


def target_class(name: str) -> Any:
    """The class implementing target ``name`` (ValueError naming the known ones)."""
    key = name.split("://", 1)[0] if "://" in name else name
    if key not in REGISTRY or (key in SCHEMES) != ("://" in name):
        known = [*TARGETS, *(f"{s}://..." for s in sorted(SCHEMES))]
        raise ValueError(f"unknown target {name!r}; known: {', '.join(known)}")
    module, cls = REGISTRY[key].split(":")
    return getattr(importlib.import_module(module), cls)


def make_target(
    name: str,
    guests: int,
    run_dir: Path | None = None,
    progress: Progress | None = None,
    detached: bool = False,
    **options: Any,
) -> Target:
    """Build (not start) the target called ``name``; ``detached`` ones outlive us.

    A target named by a URL (``ssh://root@HOST``) gets it as ``url=``; ``options`` are
    that target's own settings (e.g. ``host_guests``, ``ssh_key``).
    """
    if "://" in name:
        options = {"url": name, **options}
    target: Target = target_class(name)(guests, run_dir, progress, detached, **options)
    return target


def capabilities_of(name: str, guests: int, **options: Any) -> frozenset[str]:
    """What ``name`` can do with ``guests`` guests and its ``options``, without starting
    it (for skipping)."""
    caps: frozenset[str] = target_class(name).capabilities_for(guests, **options)
    return caps
