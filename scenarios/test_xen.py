"""Xen only: the vTPM's life beside real domains, driven as xl and a guest's kernel see it.

Each scenario checks what a guest and dom0 observe: ``/dev/tpm0`` and
``/sys/class/tpm/tpm0`` in the guest, the xenstore directories, and what the backend
holds in dom0 (``target.backend_resources()``: gntdev mappings in its address space,
dom0 userspace event channels, its fds and threads). Persistence across ``xl reboot``
(NV kept, PCRs reset) is ``test_persistence.py``'s ``reboot`` cases, which run here too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
from tpm2_pytss import ESYS_TR
from tpm_helpers import nv_define, nv_read_all, nv_remove, open_esapi, read_pcr

from harness.target import Xl
from harness.tpmwire import DEBUG_PCR, EK_PERSISTENT_RSA, assert_channel_works, nv_index

pytestmark = pytest.mark.needs("xl")

GONE_WITHIN_S = 15.0


def device_present(guest: Any) -> bool:
    rc, _, _ = guest.run("test -c /dev/tpm0 && test -e /sys/class/tpm/tpm0")
    return bool(rc == 0)


def wait_gone(guest: Any) -> None:
    end = time.monotonic() + GONE_WITHIN_S
    while device_present(guest):
        assert time.monotonic() < end, f"/dev/tpm0 still in {guest.name} after {GONE_WITHIN_S} s"
        time.sleep(0.5)


def ek_public(guest: Any) -> bytes:
    with open_esapi(guest) as ctx:
        pub, _, _ = ctx.read_public(ctx.tr_from_tpmpublic(EK_PERSISTENT_RSA))
        return bytes(pub.publicArea.unique.rsa)


def test_tpm0_follows_the_frontend(xl: Xl, guest: Any) -> None:
    """Stopping the frontend removes /dev/tpm0 from the guest; starting it brings it
    back, on the same vTPM: NV written before is still there."""
    index = nv_index(0x70)
    with open_esapi(guest) as ctx:
        nv_define(ctx, index, 16)
        ctx.nv_write(ctx.tr_from_tpmpublic(index), b"frontend-restart", 0)
    try:
        xl.stop_frontend(guest)
        wait_gone(guest)
        xl.start_frontend(guest)
        xl.wait_for_device(guest)
        with open_esapi(guest) as ctx:
            assert nv_read_all(ctx, index) == b"frontend-restart"
    finally:
        if not device_present(guest):
            xl.start_frontend(guest)
            xl.wait_for_device(guest)
        with open_esapi(guest) as ctx:
            nv_remove(ctx, index)


def test_vtpm_attached_to_a_running_guest(xl: Xl, guests: Sequence[Any]) -> None:
    """xl vtpm-detach then vtpm-attach on a running guest: /dev/tpm0 goes and comes
    back, it is the same vTPM (same EK), and the other guest is served throughout."""
    guest, other = guests[-1], guests[0]
    ek = ek_public(guest)
    xl.detach_vtpm(guest)
    wait_gone(guest)
    with other.transport() as t:
        assert_channel_works(t)
    xl.attach_vtpm(guest)
    assert device_present(guest)
    assert ek_public(guest) == ek
    with guest.transport() as t:
        assert_channel_works(t)


def test_xl_destroy_leaves_the_other_guest_served_and_nothing_leaked(
    xl: Xl, guests: Sequence[Any]
) -> None:
    """xl destroy of one guest (no shutdown, its frontend never says goodbye): the
    backend drops that guest's mappings and event channel, keeps serving the other
    guest, and holds exactly what it held before once the guest is created again (its
    NV data intact, its PCRs reset)."""
    victim, other = guests[-1], guests[0]
    index = nv_index(0x71)
    with open_esapi(victim) as ctx:
        nv_define(ctx, index, 8)
        ctx.nv_write(ctx.tr_from_tpmpublic(index), b"survives", 0)
        ctx.pcr_event(ESYS_TR.PCR16, b"before destroy")
    baseline = xl.backend_resources()
    xl.destroy(victim)
    deadline = time.monotonic() + GONE_WITHIN_S
    while True:
        now = xl.backend_resources()
        if now["mappings"] < baseline["mappings"] and now["ports"] < baseline["ports"]:
            break
        assert time.monotonic() < deadline, f"backend still holds the guest's share: {now}"
        time.sleep(0.5)
    with other.transport() as t:
        for _ in range(20):
            assert_channel_works(t)
    xl.create(victim)
    assert xl.backend_resources() == baseline
    with open_esapi(victim) as ctx:
        assert nv_read_all(ctx, index) == b"survives"
        assert read_pcr(ctx, DEBUG_PCR) == bytes(32)  # a new domain: a power-cycled TPM
        nv_remove(ctx, index)
