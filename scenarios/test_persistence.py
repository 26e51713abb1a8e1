"""Persistence: what a guest's vTPM keeps across restarts of the driver and guest reboots.

- NV contents and persistent keys survive everything: a frontend restart, a backend
  restart, a manager restart, and a guest reboot (``xl reboot``: new domain, same
  instance), because they live in the instance's swtpm state.
- A reboot and a save + restore each happen once per run (module fixtures ``rebooted``,
  ``saved_and_restored``), shared by the scenarios that check what they kept or reset:
  under TCG each costs minutes.
- A guest reboot is a TPM reset for that guest: PCRs go back to zeros and the TPM's
  resetCount goes up.
- A frontend or backend restart keeps the same domain bound to the instance, so the TPM
  is not reset: PCRs keep their values. So does a (planned) manager restart: the
  manager saves each swtpm's volatile state on the way down and restores it once on
  the way up (xenvtpm/manager/continuity.py). So does ``xl save`` + ``xl restore`` (a guest of
  the stock xen-tpmfront): a new domain, but the same boot.

Every ESAPI context is closed before the disturbance and a new one opened after it: a
restart may drop the guest's connection, and a TSS context does not outlive its channel.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from tpm2_pytss import ESAPI, ESYS_TR
from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE
from tpm_helpers import (
    handles,
    make_persistent,
    nv_define,
    nv_remove,
    open_esapi,
    persistent_remove,
    read_pcr,
    sha256_digests,
    storage_template,
)

from harness.target import Component, Guest, Reboots, Restarts, SaveRestore, Services
from harness.tpmwire import DEBUG_PCR, EK_PERSISTENT_RSA, nv_index, pcr_extended, persistent_handle

# A PCR that PCR_Reset cannot clear from locality 0: only a TPM reset zeroes it.
STATIC_PCR = 8


def _restart(component: Component) -> Callable[[Restarts, Guest], None]:
    def run(restarts: Restarts, guest: Guest) -> None:
        restarts.restart(component)

    return run


EVENTS = {
    "frontend-restart": pytest.param(
        _restart("frontend"), id="frontend-restart", marks=pytest.mark.needs("restart-frontend")
    ),
    "backend-restart": pytest.param(
        _restart("backend"), id="backend-restart", marks=pytest.mark.needs("restart-backend")
    ),
    "manager-restart": pytest.param(
        _restart("manager"), id="manager-restart", marks=pytest.mark.needs("restart-manager")
    ),
}
NV_OFFSET = {
    "frontend-restart": 0x30,
    "backend-restart": 0x31,
    "manager-restart": 0x32,
    "reboot": 0x33,
    "save-restore": 0x38,
}
KEY_OFFSET = {
    "frontend-restart": 0x34,
    "backend-restart": 0x35,
    "manager-restart": 0x36,
    "reboot": 0x37,
    "save-restore": 0x39,
}

Event = Callable[[Restarts, Guest], None]


def _reset_count(ctx: ESAPI) -> int:
    return int(ctx.read_clock().clockInfo.resetCount)


@pytest.mark.parametrize("event", list(EVENTS.values()))
def test_nv_survives(
    restarts: Restarts, guest: Any, event: Event, request: pytest.FixtureRequest
) -> None:
    """NV data written before the event reads back byte for byte after it."""
    index = nv_index(NV_OFFSET[request.node.callspec.id])
    data = os.urandom(48)
    try:
        with open_esapi(guest) as ctx:
            ctx.nv_write(nv_define(ctx, index, len(data)), data, 0)
        event(restarts, guest)
        with open_esapi(guest) as ctx:
            nv = ctx.tr_from_tpmpublic(index)
            assert bytes(ctx.nv_read(nv, len(data), 0)) == data
    finally:
        with open_esapi(guest) as ctx:
            nv_remove(ctx, index)


@pytest.mark.parametrize("event", list(EVENTS.values()))
def test_persistent_key_survives(
    restarts: Restarts, guest: Any, event: Event, request: pytest.FixtureRequest
) -> None:
    """A key made persistent before the event is still there after it, with the same
    public area, and still works as a parent (its private part survived too)."""
    handle = persistent_handle(KEY_OFFSET[request.node.callspec.id])
    with open_esapi(guest) as ctx:
        before = make_persistent(ctx, handle, storage_template()).marshal()
    try:
        event(restarts, guest)
        with open_esapi(guest) as ctx:
            assert handle in handles(ctx, handle, 1)
            pub, _, _ = ctx.read_public(ctx.tr_from_tpmpublic(handle))
            assert pub.publicArea.marshal() == before
            # A child created under the persistent key loads: the private part works.
            parent = ctx.tr_from_tpmpublic(handle)
            priv, child_pub, *_ = ctx.create(
                parent, TPM2B_SENSITIVE_CREATE(), storage_template("ecc256")
            )
            ctx.flush_context(ctx.load(parent, priv, child_pub))
    finally:
        with open_esapi(guest) as ctx:
            persistent_remove(ctx, handle)


def _extend_both(ctx: ESAPI) -> tuple[bytes, bytes]:
    """Extend the static PCR and PCR 16; return their new values."""
    ctx.pcr_reset(ESYS_TR.PCR16)
    ctx.pcr_event(ESYS_TR.PCR16, os.urandom(8))
    digest = hashlib.sha256(os.urandom(8)).digest()
    old = read_pcr(ctx, STATIC_PCR)
    ctx.pcr_extend(ESYS_TR.PCR8, sha256_digests(digest))
    static = read_pcr(ctx, STATIC_PCR)
    assert static == pcr_extended(old, digest)
    return static, read_pcr(ctx, DEBUG_PCR)


@pytest.mark.parametrize(
    "component",
    [
        pytest.param("frontend", marks=pytest.mark.needs("restart-frontend")),
        pytest.param("backend", marks=pytest.mark.needs("restart-backend")),
        pytest.param("manager", marks=pytest.mark.needs("restart-manager")),
    ],
)
def test_pcrs_kept_on_driver_restart(restarts: Restarts, guest: Any, component: Component) -> None:
    """A frontend, backend or manager restart (planned: SIGTERM) is not a TPM reset:
    same domain, PCRs and resetCount unchanged (for the manager, swtpm's volatile state
    is saved and restored once)."""
    with open_esapi(guest) as ctx:
        static, debug = _extend_both(ctx)
        resets = _reset_count(ctx)
    domid = guest.domid
    restarts.restart(component)
    assert guest.domid == domid
    with open_esapi(guest) as ctx:
        assert read_pcr(ctx, STATIC_PCR) == static
        assert read_pcr(ctx, DEBUG_PCR) == debug
        assert _reset_count(ctx) == resets


@pytest.mark.needs("services", "restart-backend")
def test_pcrs_kept_when_systemd_restarts_a_crashed_backend(services: Services, guest: Any) -> None:
    """dom0's backend crashes (SIGKILL): its unit's Restart=on-failure starts it again
    with no one's help (deploy/systemd), and the guest's TPM is not reset: the same
    domain, PCRs and resetCount. Only where the guest's frontend reconnects to a new
    backend (``restart-backend``): stock xen-tpmfront stays Connected to the dead one."""
    with open_esapi(guest) as ctx:
        static, debug = _extend_both(ctx)
        resets = _reset_count(ctx)
    domid = guest.domid
    services.crash_service("backend")
    assert guest.domid == domid
    with open_esapi(guest) as ctx:
        assert read_pcr(ctx, STATIC_PCR) == static
        assert read_pcr(ctx, DEBUG_PCR) == debug
        assert _reset_count(ctx) == resets


# -- a new domain for guest A, once per kind of event -----------------------------------
@dataclass
class Observed:
    """Guest A's (and guest B's) vTPM just before and just after one event that gives A
    a new domain: ``xl reboot`` (a TPM reset) or ``xl save`` + ``xl restore`` (the same
    boot going on). Read at once after the event, so that the module's other event
    cannot change what a scenario checks."""

    nv: tuple[int, bytes]  # index, data written before
    key: tuple[int, bytes]  # persistent handle, its public area before
    domid: tuple[int | None, int | None]  # before, after
    instance: tuple[int, int]
    static: tuple[bytes, bytes]  # PCR 8 (no PCR_Reset from locality 0)
    debug: tuple[bytes, bytes]  # PCR 16
    resets: tuple[int, int]  # resetCount
    ek: tuple[bytes, bytes]
    other_debug: tuple[bytes, bytes] | None  # guest B, if any: PCR 16 and
    other_resets: tuple[int, int] | None  # resetCount, before and after


def _observe_around(
    event: Callable[[Any], Any], guests: Any, nv_offset: int, key_offset: int
) -> Iterator[Observed]:
    a = guests[0]
    index, data = nv_index(nv_offset), os.urandom(48)
    handle = persistent_handle(key_offset)

    def state(ctx: ESAPI) -> tuple[bytes, bytes, int, bytes]:
        ek = ctx.read_public(ctx.tr_from_tpmpublic(EK_PERSISTENT_RSA))[0].publicArea.marshal()
        return read_pcr(ctx, STATIC_PCR), read_pcr(ctx, DEBUG_PCR), _reset_count(ctx), ek

    with open_esapi(a) as ctx:
        ctx.nv_write(nv_define(ctx, index, len(data)), data, 0)
        public = make_persistent(ctx, handle, storage_template()).marshal()
        _extend_both(ctx)
        before = state(ctx)
    b_before = None
    if len(guests) > 1:
        with open_esapi(guests[1]) as ctx:
            b_before = (_extend_both(ctx)[1], _reset_count(ctx))
    domid, instance = a.domid, a.instance
    try:
        event(a)
        with open_esapi(a) as ctx:
            after = state(ctx)
        b_after = None
        if b_before is not None:
            with open_esapi(guests[1]) as ctx:
                b_after = (read_pcr(ctx, DEBUG_PCR), _reset_count(ctx))
        yield Observed(
            (index, data),
            (handle, public),
            (domid, a.domid),
            (instance, a.instance),
            (before[0], after[0]),
            (before[1], after[1]),
            (before[2], after[2]),
            (before[3], after[3]),
            None if b_after is None or b_before is None else (b_before[0], b_after[0]),
            None if b_after is None or b_before is None else (b_before[1], b_after[1]),
        )
    finally:
        with open_esapi(a) as ctx:
            nv_remove(ctx, index)
            persistent_remove(ctx, handle)


@pytest.fixture(scope="module")
def rebooted(reboots: Reboots, guests: Any) -> Iterator[Observed]:
    """One ``xl reboot`` of guest A for every reboot scenario (about 2 min under TCG)."""
    yield from _observe_around(reboots.reboot, guests, NV_OFFSET["reboot"], KEY_OFFSET["reboot"])


@pytest.fixture(scope="module")
def saved_and_restored(save_restore: SaveRestore, guests: Any) -> Iterator[Observed]:
    """One ``xl save`` + ``xl restore`` of guest A for every such scenario."""
    yield from _observe_around(
        save_restore.save_restore, guests, NV_OFFSET["save-restore"], KEY_OFFSET["save-restore"]
    )


NEW_DOMAIN = [
    pytest.param("rebooted", id="reboot", marks=pytest.mark.needs("reboot")),
    pytest.param("saved_and_restored", id="save-restore", marks=pytest.mark.needs("save-restore")),
]


@pytest.mark.parametrize("event", NEW_DOMAIN)
def test_nv_survives_a_new_domain(event: str, guest: Any, request: pytest.FixtureRequest) -> None:
    """NV data written before the event reads back byte for byte after it; the guest has
    a new domain and keeps its vTPM instance."""
    seen: Observed = request.getfixturevalue(event)
    assert seen.domid[1] != seen.domid[0] and seen.instance[1] == seen.instance[0]
    index, data = seen.nv
    with open_esapi(guest) as ctx:
        assert bytes(ctx.nv_read(ctx.tr_from_tpmpublic(index), len(data), 0)) == data


@pytest.mark.parametrize("event", NEW_DOMAIN)
def test_persistent_key_survives_a_new_domain(
    event: str, guest: Any, request: pytest.FixtureRequest
) -> None:
    """The persistent key is there after the event with the same public area, and a
    child created under it loads (its private part survived too)."""
    seen: Observed = request.getfixturevalue(event)
    handle, public = seen.key
    with open_esapi(guest) as ctx:
        assert handle in handles(ctx, handle, 1)
        parent = ctx.tr_from_tpmpublic(handle)
        assert ctx.read_public(parent)[0].publicArea.marshal() == public
        priv, child_pub, *_ = ctx.create(
            parent, TPM2B_SENSITIVE_CREATE(), storage_template("ecc256")
        )
        ctx.flush_context(ctx.load(parent, priv, child_pub))


@pytest.mark.needs("save-restore", "tpm2-chip")
def test_the_tpm_stays_tpm0_across_save_restore(saved_and_restored: Observed, guests: Any) -> None:
    """After ``xl restore`` the guest's TPM is still ``/dev/tpm0``: the frontend's resume
    reconnected the same chip (the stock xen-tpmfront re-probes and leaks tpm0, so its
    chip comes back as tpm1; the patched one of linux/xen-tpmfront/ keeps it)."""
    assert saved_and_restored.domid[1] != saved_and_restored.domid[0]
    assert guests[0].tpm_device == "/dev/tpm0"


@pytest.mark.needs("reboot")
def test_pcrs_reset_on_reboot(rebooted: Observed) -> None:
    """After a guest reboot the extended PCRs read zeros and resetCount went up, while the
    guest has a new domid and keeps its vTPM instance (same EK)."""
    assert rebooted.domid[1] != rebooted.domid[0]
    assert rebooted.instance[1] == rebooted.instance[0]
    assert rebooted.static[0] != bytes(32) and rebooted.static[1] == bytes(32)
    assert rebooted.debug[0] != bytes(32) and rebooted.debug[1] == bytes(32)
    assert rebooted.resets[1] > rebooted.resets[0]
    assert rebooted.ek[1] == rebooted.ek[0]


@pytest.mark.needs("save-restore")
def test_pcrs_kept_across_save_and_restore(saved_and_restored: Observed) -> None:
    """``xl save`` + ``xl restore`` is the same boot going on in a new domain: the
    guest's kernel re-probes its vTPM (a new /dev/tpm0), and the PCRs and resetCount
    are those from before the save."""
    seen = saved_and_restored
    assert seen.domid[1] != seen.domid[0]
    assert seen.static[1] == seen.static[0] != bytes(32)
    assert seen.debug[1] == seen.debug[0] != bytes(32)
    assert seen.resets[1] == seen.resets[0]


@pytest.mark.needs("reboot", "multi-guest")
def test_reboot_leaves_other_guest_alone(rebooted: Observed) -> None:
    """Rebooting guest A resets A's PCRs only: guest B's extended PCR and resetCount
    keep their values."""
    assert rebooted.other_debug is not None and rebooted.other_resets is not None
    assert rebooted.other_debug[1] == rebooted.other_debug[0] != bytes(32)
    assert rebooted.other_resets[1] == rebooted.other_resets[0]
