"""The fixtures that hand a scenario one capability of the target (``conftest.py``
registers them): the target as that capability's protocol (``harness.target``), or the
scenario skipped as ``@pytest.mark.needs`` skips it, naming what the target lacks.

The check uses the capabilities the collection hook stored (:data:`CAPS_KEY`), so a
scenario skipped here never brings the target up. A fixture used by module-scoped ones
(``rebooted``, ``baseline``) is session-scoped; a skip there skips each test asking.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest

from harness.errors import UnsupportedOperation
from harness.target import (
    COMPONENT_CAPABILITY,
    Capability,
    CrashWatch,
    Dom0Shell,
    Faults,
    HostileToolstack,
    PowerCut,
    Reboots,
    Restarts,
    SaveRestore,
    Services,
    Xl,
    XlDevices,
)

CAPS_KEY = pytest.StashKey[tuple[str, frozenset[str]]]()  # the target's name and capabilities


def _capable(request: pytest.FixtureRequest, *capabilities: str) -> Any:
    """The target, once it has every one of ``capabilities``; else skip the scenario as
    ``needs`` does, naming the first one missing (before the target is brought up)."""
    known = request.config.stash.get(CAPS_KEY, None)
    if known is None:  # no collection hook ran (pytester): ask the target itself
        tgt = request.getfixturevalue("target")
        known = (tgt.name, tgt.capabilities)
    name, caps = known
    for cap in capabilities:
        if cap not in caps:
            pytest.skip(f"target {name} lacks capability {cap}")
    return request.getfixturevalue("target")


@pytest.fixture(scope="session")
def faults(request: pytest.FixtureRequest) -> Faults:
    return cast(Faults, _capable(request, Capability.KILL_SWTPM))


@pytest.fixture(scope="session")
def reboots(request: pytest.FixtureRequest) -> Reboots:
    return cast(Reboots, _capable(request, Capability.REBOOT))


@pytest.fixture
def restarts(request: pytest.FixtureRequest) -> Restarts:
    """Restarts of the scenario's ``component`` parameter, if it has one; otherwise of
    any component (the scenario's ``needs`` marker names which)."""
    params = getattr(request.node, "callspec", None)
    component = params.params.get("component") if params is not None else None
    needed = [COMPONENT_CAPABILITY[component]] if component in COMPONENT_CAPABILITY else []
    return cast(Restarts, _capable(request, *needed))


@pytest.fixture(scope="session")
def services(request: pytest.FixtureRequest) -> Services:
    return cast(Services, _capable(request, Capability.SERVICES))


@pytest.fixture(scope="session")
def dom0_shell(request: pytest.FixtureRequest) -> Dom0Shell:
    return cast(Dom0Shell, _capable(request, Capability.DOM0_SHELL))


@pytest.fixture(scope="session")
def xl(request: pytest.FixtureRequest) -> Xl:
    return cast(Xl, _capable(request, Capability.XL))


@pytest.fixture(scope="session")
def xl_devices(request: pytest.FixtureRequest) -> XlDevices:
    return cast(XlDevices, _capable(request, Capability.XL_DEVICES))


@pytest.fixture(scope="session")
def save_restore(request: pytest.FixtureRequest) -> SaveRestore:
    return cast(SaveRestore, _capable(request, Capability.SAVE_RESTORE))


@pytest.fixture(scope="session")
def power_cut(request: pytest.FixtureRequest) -> PowerCut:
    return cast(PowerCut, _capable(request, Capability.POWER_CUT))


@pytest.fixture(scope="session")
def crash_watch(request: pytest.FixtureRequest) -> CrashWatch:
    return cast(CrashWatch, _capable(request, Capability.CRASH_WATCH))


@pytest.fixture(scope="module")
def hostile_toolstack(request: pytest.FixtureRequest) -> Iterator[HostileToolstack]:
    """dom0's part for a rogue frontend (``target.hostile_toolstack()``), closed after
    the module; skipped on targets that cannot add its vTPM device."""
    tgt = _capable(request, Capability.XEN_PROBE)
    make = getattr(tgt, "hostile_toolstack", None)
    try:
        if make is None:
            raise UnsupportedOperation(tgt.name, "hostile-toolstack")
        toolstack: HostileToolstack = make()
    except UnsupportedOperation:
        pytest.skip(f"no toolstack for the rogue frontend on target {tgt.name}")
    try:
        yield toolstack
    finally:
        toolstack.close()
