"""Persistence: what a guest's vTPM keeps across restarts of the driver and guest reboots.

- NV contents and persistent keys survive everything: a frontend restart, a backend
  restart, a manager restart, and a guest reboot (``xl reboot``: new domain, same
  instance), because they live in the instance's swtpm state.
- A guest reboot is a TPM reset for that guest: PCRs go back to zeros and the TPM's
  resetCount goes up.
- A frontend or backend restart keeps the same domain bound to the instance, so the TPM
  is not reset: PCRs keep their values. So does a (planned) manager restart: the
  manager saves each swtpm's volatile state on the way down and restores it once on
  the way up (xenvtpm/continuity.py). So does ``xl save`` + ``xl restore`` (a guest of
  the stock xen-tpmfront): a new domain, but the same boot.

Every ESAPI context is closed before the disturbance and a new one opened after it: a
restart may drop the guest's connection, and a TSS context does not outlive its channel.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import pytest
from tpm2_pytss import ESAPI, ESYS_TR
from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE
from tpm_helpers import (
    DEBUG_PCR,
    EK_PERSISTENT_RSA,
    handles,
    make_persistent,
    nv_define,
    nv_index,
    nv_remove,
    open_esapi,
    pcr_extended,
    persistent_handle,
    persistent_remove,
    read_pcr,
    sha256_digests,
    storage_template,
)

# A PCR that PCR_Reset cannot clear from locality 0: only a TPM reset zeroes it.
STATIC_PCR = 8


def _restart(component: str) -> Callable[[Any, Any], None]:
    def run(target: Any, guest: Any) -> None:
        target.restart(component)
    return run


def _reboot(target: Any, guest: Any) -> None:
    target.reboot(guest)


def _save_restore(target: Any, guest: Any) -> None:
    target.save_restore(guest)


EVENTS = {
    "frontend-restart": pytest.param(_restart("frontend"), id="frontend-restart",
                                     marks=pytest.mark.needs("restart-frontend")),
    "backend-restart": pytest.param(_restart("backend"), id="backend-restart",
                                    marks=pytest.mark.needs("restart-backend")),
    "manager-restart": pytest.param(_restart("manager"), id="manager-restart",
                                    marks=pytest.mark.needs("restart-manager")),
    "reboot": pytest.param(_reboot, id="reboot", marks=pytest.mark.needs("reboot")),
    "save-restore": pytest.param(_save_restore, id="save-restore",
                                 marks=pytest.mark.needs("save-restore")),
}
NV_OFFSET = {"frontend-restart": 0x30, "backend-restart": 0x31, "manager-restart": 0x32,
             "reboot": 0x33, "save-restore": 0x38}
KEY_OFFSET = {"frontend-restart": 0x34, "backend-restart": 0x35, "manager-restart": 0x36,
              "reboot": 0x37, "save-restore": 0x39}

Event = Callable[[Any, Any], None]


def _reset_count(ctx: ESAPI) -> int:
    return int(ctx.read_clock().clockInfo.resetCount)


@pytest.mark.parametrize("event", list(EVENTS.values()))
def test_nv_survives(target: Any, guest: Any, event: Event,
                     request: pytest.FixtureRequest) -> None:
    """NV data written before the event reads back byte for byte after it."""
    index = nv_index(NV_OFFSET[request.node.callspec.id])
    data = os.urandom(48)
    try:
        with open_esapi(guest) as ctx:
            ctx.nv_write(nv_define(ctx, index, len(data)), data, 0)
        event(target, guest)
        with open_esapi(guest) as ctx:
            nv = ctx.tr_from_tpmpublic(index)
            assert bytes(ctx.nv_read(nv, len(data), 0)) == data
    finally:
        with open_esapi(guest) as ctx:
            nv_remove(ctx, index)


@pytest.mark.parametrize("event", list(EVENTS.values()))
def test_persistent_key_survives(target: Any, guest: Any, event: Event,
                                 request: pytest.FixtureRequest) -> None:
    """A key made persistent before the event is still there after it, with the same
    public area, and still works as a parent (its private part survived too)."""
    handle = persistent_handle(KEY_OFFSET[request.node.callspec.id])
    with open_esapi(guest) as ctx:
        before = make_persistent(ctx, handle, storage_template()).marshal()
    try:
        event(target, guest)
        with open_esapi(guest) as ctx:
            assert handle in handles(ctx, handle, 1)
            pub, _, _ = ctx.read_public(ctx.tr_from_tpmpublic(handle))
            assert pub.publicArea.marshal() == before
            # A child created under the persistent key loads: the private part works.
            parent = ctx.tr_from_tpmpublic(handle)
            priv, child_pub, *_ = ctx.create(parent, TPM2B_SENSITIVE_CREATE(),
                                             storage_template("ecc256"))
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


@pytest.mark.needs("reboot")
def test_pcrs_reset_on_reboot(target: Any, guest: Any) -> None:
    """After a guest reboot the extended PCRs read zeros and resetCount went up, while the
    guest gets a new domid and keeps its vTPM instance (same EK)."""
    with open_esapi(guest) as ctx:
        _extend_both(ctx)
        resets = _reset_count(ctx)
        ek = ctx.read_public(ctx.tr_from_tpmpublic(EK_PERSISTENT_RSA))[0].publicArea.marshal()
    domid, instance = guest.domid, guest.instance
    target.reboot(guest)
    assert guest.domid != domid and guest.instance == instance
    with open_esapi(guest) as ctx:
        assert read_pcr(ctx, STATIC_PCR) == bytes(32)
        assert read_pcr(ctx, DEBUG_PCR) == bytes(32)
        assert _reset_count(ctx) > resets
        pub = ctx.read_public(ctx.tr_from_tpmpublic(EK_PERSISTENT_RSA))[0]
        assert pub.publicArea.marshal() == ek


@pytest.mark.parametrize("component", [
    pytest.param("frontend", marks=pytest.mark.needs("restart-frontend")),
    pytest.param("backend", marks=pytest.mark.needs("restart-backend")),
    pytest.param("manager", marks=pytest.mark.needs("restart-manager")),
])
def test_pcrs_kept_on_driver_restart(target: Any, guest: Any, component: str) -> None:
    """A frontend, backend or manager restart (planned: SIGTERM) is not a TPM reset:
    same domain, PCRs and resetCount unchanged (for the manager, swtpm's volatile state
    is saved and restored once)."""
    with open_esapi(guest) as ctx:
        static, debug = _extend_both(ctx)
        resets = _reset_count(ctx)
    domid = guest.domid
    target.restart(component)
    assert guest.domid == domid
    with open_esapi(guest) as ctx:
        assert read_pcr(ctx, STATIC_PCR) == static
        assert read_pcr(ctx, DEBUG_PCR) == debug
        assert _reset_count(ctx) == resets


@pytest.mark.needs("save-restore")
def test_pcrs_kept_across_save_and_restore(target: Any, guest: Any) -> None:
    """``xl save`` + ``xl restore`` is the same boot going on in a new domain: the
    guest's kernel re-probes its vTPM (a new /dev/tpm0), and the PCRs and resetCount
    are those from before the save."""
    with open_esapi(guest) as ctx:
        static, debug = _extend_both(ctx)
        resets = _reset_count(ctx)
    domid = guest.domid
    target.save_restore(guest)
    assert guest.domid != domid
    with open_esapi(guest) as ctx:
        assert read_pcr(ctx, STATIC_PCR) == static
        assert read_pcr(ctx, DEBUG_PCR) == debug
        assert _reset_count(ctx) == resets


@pytest.mark.needs("reboot", "multi-guest")
def test_reboot_leaves_other_guest_alone(target: Any, guests: Any) -> None:
    """Rebooting guest A resets A's PCRs only: guest B's extended PCR keeps its value."""
    a, b = guests[0], guests[1]
    with open_esapi(b) as ctx:
        _, debug_b = _extend_both(ctx)
        resets_b = _reset_count(ctx)
    target.reboot(a)
    with open_esapi(b) as ctx:
        assert read_pcr(ctx, DEBUG_PCR) == debug_b
        assert _reset_count(ctx) == resets_b
