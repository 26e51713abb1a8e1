"""The own-build flags (``--xen FILE``, ``--tpmfront FILE.ko``...) as pytest options: a
plugin the root conftest loads, so that the flags and their early check live beside
:mod:`harness.own_build` rather than in the fixtures' file."""

from __future__ import annotations

import pytest

from harness.own_build import HELP, OwnBuild
from harness.target import XEN_TARGETS
from harness.targets import target_class


def pytest_addoption(parser: pytest.Parser) -> None:
    own = parser.getgroup("xenvtpm own build", "replace a bundled piece for this run (xen)")
    for flag, (metavar, text) in HELP.items():
        own.addoption(flag, default=None, metavar=metavar, help=text)


def own_build(config: pytest.Config) -> OwnBuild | None:
    """The flags given, checked now: a wrong file fails before anything starts."""
    own = OwnBuild.from_flags({flag: config.getoption(flag) for flag in HELP})
    if not own:
        return None
    target = config.getoption("--target")
    if "://" in target:
        kind = config.getoption("--guest-kind")
    elif target in XEN_TARGETS:
        kind = target_class(target).FRONTEND.kind
    else:
        raise ValueError(f"{', '.join(own.given())}: for xen targets, not --target {target}")
    own.check(on_a_host="://" in target, guest_kind=kind)
    return own
