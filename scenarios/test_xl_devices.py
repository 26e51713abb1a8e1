"""xl's own vTPM devices: ``xl vtpm-attach``, ``xl vtpm-list`` and ``xl vtpm-detach``
on a running guest, and a guest that ``xl create`` makes with a ``vtpm=`` line, with
libxl's xenstore layout (a ``uuid``, ``resume = False``, no ``instance``) served by our
backend and no step of ours in between (docs/xl.md).

Stock-kernel guests only (``xl-devices``): their ``xen-tpmfront`` binds the new device
as another chip beside the guest's own vTPM. The uuid's instance is kept in dom0's
``/var/lib/xenvtpm/vtpm-uuids.json``; re-attaching the uuid to the same running domain
finds the same vTPM, its PCRs as they were (the same boot goes on).
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from typing import Any

import pytest
from tpm_helpers import nv_define, nv_read_all, nv_remove, open_esapi

from harness.target import Dom0Shell, XlDevices
from harness.tpmwire import DEBUG_PCR, nv_index
from xenvtpm import tpm

pytestmark = [pytest.mark.device, pytest.mark.needs("xl-devices", "kernel-tpm", "dom0-shell")]

UUID_MAP = "/var/lib/xenvtpm/vtpm-uuids.json"
# xen-tpmfront probes in the guest's TCG kernel; 60 s is far above what it takes
CHIP_WITHIN_S = 60.0
# libxl's own wait for the backend (LIBXL_INIT_TIMEOUT, LIBXL_DESTROY_TIMEOUT)
LIBXL_TIMEOUT_S = 10.0

# Sends one command to a TPM device in the guest and prints the answer in hex.
_TRANSACT = (
    "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); "
    "os.write(fd, bytes.fromhex(sys.argv[2])); print(os.read(fd, 4096).hex())"
)


def chips(guest: Any) -> set[str]:
    rc, out, err = guest.run("ls /sys/class/tpm")
    assert rc == 0, err
    return {name for name in out.split() if name.startswith("tpm")}


def wait_chips(guest: Any, want: Any, what: str) -> set[str]:
    """The guest's chips once ``want(chips)`` holds, within :data:`CHIP_WITHIN_S`."""
    end = time.monotonic() + CHIP_WITHIN_S
    while not want(found := chips(guest)):
        assert time.monotonic() < end, f"{what}: {guest.name} has {sorted(found)}"
        time.sleep(0.5)
    return found


def transact(guest: Any, chip: str, command: bytes) -> bytes:
    rc, out, err = guest.run(f"python3 -c '{_TRANSACT}' /dev/{chip} {command.hex()}")
    assert rc == 0, err
    response = bytes.fromhex(out.strip())
    assert struct.unpack(">I", response[6:10])[0] == 0, f"{chip}: {response.hex()}"
    return response


def pcr(guest: Any, chip: str) -> bytes:
    return transact(guest, chip, tpm.pcr_read_command(DEBUG_PCR))[-32:]


def xl(dom0: Dom0Shell, command: str) -> tuple[str, float]:
    """Run an xl command in dom0; its output and how long libxl took."""
    started = time.monotonic()
    rc, out, err = dom0.dom0_run(f"xl {command}", timeout=120)
    took = time.monotonic() - started
    assert rc == 0, f"xl {command}: rc {rc}\n{out}{err}"
    assert "unable to" not in err, f"xl {command} gave up waiting on the backend:\n{err}"
    return out + err, took


def mapped(dom0: Dom0Shell) -> dict[str, int]:
    rc, out, err = dom0.dom0_run(f"cat {UUID_MAP}")
    assert rc == 0, err
    return dict(json.loads(out)["uuids"])


def test_xl_vtpm_attach_list_and_detach_on_a_running_guest(
    dom0_shell: Dom0Shell, guest: Any
) -> None:
    """``xl vtpm-attach`` gives the running guest a second chip on its own instance
    (the uuid's, isolated from the guest's first vTPM); ``xl vtpm-list`` lists it;
    ``xl vtpm-detach`` takes it away within libxl's wait; attaching the uuid again
    brings back the same vTPM, its extended PCR as it was."""
    vtpm_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{guest.name}.xenvtpm.test"))
    own = str(getattr(guest, "tpm_device", "/dev/tpm0")).rsplit("/", 1)[-1]
    before = chips(guest)
    own_pcr = pcr(guest, own)
    xl(dom0_shell, f"vtpm-attach {guest.name} backend=0 uuid={vtpm_uuid}")
    try:
        (chip,) = wait_chips(guest, lambda c: len(c - before) == 1, "no new chip") - before
        instance = mapped(dom0_shell)[vtpm_uuid]
        assert instance >= 0x10000 and instance != guest.instance
        listing, _ = xl(dom0_shell, f"vtpm-list {guest.name}")
        assert len(listing.strip().splitlines()) >= 3, listing  # a header and two devices
        transact(guest, chip, tpm.pcr_extend_command(DEBUG_PCR, b"\x18" * 32))
        extended = pcr(guest, chip)
        assert pcr(guest, own) == own_pcr, "the guest's own vTPM saw the other's extend"

        _, took = xl(dom0_shell, f"vtpm-detach {guest.name} {vtpm_uuid}")
        assert took < LIBXL_TIMEOUT_S, f"xl vtpm-detach took {took:.1f} s"
        wait_chips(guest, lambda c: c == before, "the detached chip stays")

        xl(dom0_shell, f"vtpm-attach {guest.name} backend=0 uuid={vtpm_uuid}")
        (chip,) = wait_chips(guest, lambda c: len(c - before) == 1, "no chip again") - before
        assert mapped(dom0_shell)[vtpm_uuid] == instance
        assert pcr(guest, chip) == extended
    finally:
        dom0_shell.dom0_run(f"xl vtpm-detach {guest.name} {vtpm_uuid}", timeout=120)
    wait_chips(guest, lambda c: c == before, "the detached chip stays")
    assert len(transact(guest, own, tpm.get_random_command(8))) == 20


def test_a_guest_xl_creates_with_a_vtpm_line_keeps_its_nv_across_destroy_and_create(
    xl_devices: XlDevices, dom0_shell: Dom0Shell, guests: Any
) -> None:
    """``vtpm = ["backend=0,uuid=U"]`` in the guest's configuration and ``xl create``:
    the guest's kernel finds its TPM with nothing of ours in between; NV written then is
    still there after ``xl destroy`` and ``xl create`` with the same uuid (the same
    instance, from dom0's uuid map). The guest is then made as the harness makes it."""
    guest = guests[-1]  # the first guest stays served throughout
    vtpm_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{guest.name}.vtpm-line.xenvtpm.test"))
    index = nv_index(0x71)
    xl_devices.destroy(guest)
    try:
        xl_devices.create_with_xl_vtpm(guest, vtpm_uuid)
        instance = mapped(dom0_shell)[vtpm_uuid]
        assert instance >= 0x10000 and instance != guest.instance
        with open_esapi(guest) as ctx:
            nv_define(ctx, index, 16)
            ctx.nv_write(ctx.tr_from_tpmpublic(index), b"xl-created-guest", 0)
        xl_devices.destroy(guest)
        xl_devices.create_with_xl_vtpm(guest, vtpm_uuid)
        assert mapped(dom0_shell)[vtpm_uuid] == instance
        with open_esapi(guest) as ctx:
            assert nv_read_all(ctx, index) == b"xl-created-guest"
            nv_remove(ctx, index)
    finally:
        if guest.domid is not None:
            xl_devices.destroy(guest)
        xl_devices.create(guest)
    own = str(guest.tpm_device).rsplit("/", 1)[-1]
    assert len(transact(guest, own, tpm.get_random_command(8))) == 20
