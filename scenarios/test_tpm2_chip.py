"""The guest kernel's own view of its vTPM: a TPM 2.0 chip, which the kernel's own
users (the hardware RNG here) drive with TPM 2.0 commands, with no errors.

The stock ``xen-tpmfront`` fails both (issue 17, docs/xen-under-qemu.md): it never
probes for TPM 2.0, so its kernel registers a TPM 1.2 chip, makes no ``/dev/tpmrm0``,
and hwrng's TPM 1.2 GetRandom draws "TPM error (132)" every few seconds. Our frontend's
``tpm_vtpm_proxy`` chip and the patched ``xen-tpmfront`` (``--target xen-kernel-tpm2``)
are TPM 2.0 chips.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

pytestmark = [pytest.mark.device, pytest.mark.needs("kernel-tpm", "tpm2-chip")]
TPM_ERRORS = re.compile(r"tpm.*(error|fail|timed out)|TPM error", re.IGNORECASE)


def chip(guest: Any) -> str:
    """The chip behind the guest's TPM device: tpm0, or tpmN after a re-probe."""
    return str(getattr(guest, "tpm_device", "/dev/tpm0")).rsplit("/", 1)[-1]


def test_the_kernel_registered_a_tpm2_chip_with_a_resource_manager(guest: Any) -> None:
    """``tpm_version_major`` is 2 and ``/dev/tpmrm0`` exists: the kernel probed the
    vTPM as TPM 2.0, so it shares it among clients and times commands as TPM 2.0."""
    rc, major, err = guest.run(f"cat /sys/class/tpm/{chip(guest)}/tpm_version_major")
    assert rc == 0, err
    assert major.strip() == "2", f"{guest.name}'s kernel registered a TPM {major.strip()} chip"
    rm = chip(guest).replace("tpm", "tpmrm")
    assert guest.run(f"test -c /dev/{rm}")[0] == 0, f"no /dev/{rm} in {guest.name}"


def test_hwrng_draws_tpm2_random_bytes_without_tpm_errors(guest: Any) -> None:
    """The kernel's hwrng reads the vTPM (its TPM 2.0 GetRandom): 64 bytes come out of
    ``/dev/hwrng``, not all zero, and no TPM error reaches the kernel log meanwhile."""
    rc, current, err = guest.run("cat /sys/class/misc/hw_random/rng_current")
    assert rc == 0, err
    assert current.strip().startswith("tpm-rng"), f"hwrng source is {current.strip()!r}"
    _, before, _ = guest.run("dmesg | wc -l")
    rc, data, err = guest.run("head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \\n'")
    assert rc == 0, err
    assert len(data.strip()) == 128 and set(data.strip()) != {"0"}, data
    _, after, _ = guest.run(f"dmesg | tail -n +{int(before.strip()) + 1}")
    errors = [line for line in after.splitlines() if TPM_ERRORS.search(line)]
    assert not errors, f"TPM errors in {guest.name}'s kernel log:\n" + "\n".join(errors)
