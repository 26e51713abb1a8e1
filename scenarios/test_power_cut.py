"""A power cut: what a guest was told is written is on dom0's disk (issue 14, point 6).

Once a guest has the answer to NV_Write it may act on it (count a boot, release a
secret), so the value must survive the host losing power, not only a daemon's death.
The manager fsyncs swtpm's state file and its directory before the answer goes back
(``xenvtpm/manager/durability.py``). Here the whole machine dies: QEMU is SIGKILLed the moment
the guest has its answer, and dom0's page cache dies with it (QEMU's drives are
write-back caches that only a flush from dom0 empties); the same disks boot cold, the
guests come back with the same vTPM instances, and the guest reads the value back.

Opt-in (``-m powercut``: a cold boot of Xen, its guests and the driver under TCG takes
about 4 minutes), on the Xen targets (capability ``power-cut``)::

    flock /tmp/xenvtpm-qemu.lock nox -s xen -- --kind python -m powercut

Without the fsync it fails, the guest reading the value from before its acknowledged
write: run it with ``XENVTPM_MANAGER_FLAGS=--no-fsync`` (dom0's manager then answers
before swtpm's state is on disk).

Raw commands (a password session with an empty password) so that the acknowledgement
is the TPM's answer to NV_Write itself, with no TSS round trip before the cut.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import pytest

from harness import tpmwire
from harness.target import Dom0Shell, Guest, PowerCut
from harness.tpmwire import EK_PERSISTENT_RSA, nv_index
from harness.transport import RawTransport

INDEX = nv_index(0x90)
SIZE = 64
NOT_FOUND = 0x18B  # TPM_RC_HANDLE + TPM_RC_1: no such NV index


def _send(tpm: RawTransport, command: bytes) -> tpmwire.Response:
    return tpmwire.Response.from_bytes(tpm.transmit(command))


def _ok(resp: tpmwire.Response, what: str) -> tpmwire.Response:
    assert resp.code == tpmwire.RC.SUCCESS, f"{what}: the TPM answered {resp.code:#x}"
    return resp


def _ek(guest: Guest) -> bytes:
    """The guest's EK public area: the same one after the cut means the same instance."""
    with guest.transport() as tpm:
        return _ok(_send(tpm, tpmwire.read_public(EK_PERSISTENT_RSA)), "ReadPublic").body


@pytest.mark.powercut
@pytest.mark.needs("power-cut", "dom0-shell")
def test_an_acknowledged_nv_write_survives_a_power_cut(
    dom0_shell: Dom0Shell, power_cut: PowerCut, guests: Sequence[Guest]
) -> None:
    """The guest writes its NV index and gets TPM_RC_SUCCESS; at that moment the machine
    loses power. After a cold boot every guest has its own vTPM again (the same EK), and
    the guest reads what it was told was written, not the value from before."""
    guest = guests[0]
    before, after = os.urandom(SIZE), os.urandom(SIZE)
    eks = {g.name: _ek(g) for g in guests}
    with guest.transport() as tpm:
        tpm.transmit(tpmwire.nv_undefine_space(INDEX))  # left by an earlier run: any answer
        _ok(_send(tpm, tpmwire.nv_define_space(INDEX, SIZE)), "NV_DefineSpace")
        _ok(_send(tpm, tpmwire.nv_write(INDEX, before)), "NV_Write")
    # Everything so far on disk, so that only the next write is at stake.
    dom0_shell.dom0_run("sync", timeout=120)
    tpm = guest.transport()
    try:
        _ok(_send(tpm, tpmwire.nv_write(INDEX, after)), "NV_Write")  # acknowledged
        power_cut.power_cut_and_cold_boot()
    finally:
        with contextlib.suppress(Exception):
            tpm.close()  # its SSH connection died with the machine
    try:
        with guest.transport() as tpm:
            resp = _send(tpm, tpmwire.nv_read(INDEX, SIZE))
        assert resp.code != NOT_FOUND, "the NV index is gone: its definition was lost too"
        value = tpmwire.parse_nv_read(_ok(resp, "NV_Read"))
        assert value != before, (
            "the acknowledged NV_Write was lost in the power cut: the guest reads the "
            "value from before it"
        )
        assert value == after, f"NV reads {value.hex()}, neither value written"
        assert {g.name: _ek(g) for g in guests} == eks, "a guest came back with another vTPM"
    finally:
        with guest.transport() as tpm:
            tpm.transmit(tpmwire.nv_undefine_space(INDEX))
