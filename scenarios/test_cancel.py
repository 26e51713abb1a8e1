"""A client cancels a long command through its guest kernel (protocol v2 CANCEL).

Stock Linux guests only: xen-tpmfront registers a TPM 1.2 chip, whose sysfs ``cancel``
makes the kernel call the driver's cancel op, which writes CANCEL into the shared page
and notifies the backend. The backend then keeps the device's one slot until the
manager answers the cancelled command (it forwards ``CMD_CANCEL_TPM_CMD`` to swtpm,
which, measured on 0.7.1 in socket mode, runs the command to its end anyway), writes
IDLE, and the client's write gets ECANCELED (xen-tpmfront's ``vtpm_status``: IDLE
without a result). At most one command of the device is anywhere on the path
throughout, and the next command works.

Spec: Linux drivers/char/tpm/xen-tpmfront.c (vtpm_cancel, vtpm_status), tpm-sysfs.c
(cancel_store); include/xen/interface/io/tpmif.h (VTPM_STATE_CANCEL).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from tpm_helpers import assert_channel_works, slow_create_primary_cmd

from harness.errors import DeviceRefused
from harness.tpmwire import flush_all

CANCEL_AFTER_S = 0.5  # into the command: RSA key generation takes seconds in a TCG dom0
ATTEMPTS = 3


def sysfs_cancel(guest: Any) -> None:
    """What ``echo 1 > cancel`` does: the kernel's cancel op for the chip in use."""
    chip = guest.tpm_device.rsplit("/", 1)[-1]
    rc, _, err = guest.run(
        f"for f in /sys/class/tpm/{chip}/cancel /sys/class/tpm/{chip}/device/cancel; do "
        '[ -e "$f" ] && echo 1 > "$f" && exit 0; done; exit 3'
    )
    assert rc == 0, f"no sysfs cancel for {chip}: {err}"


def cancel_later(guest: Any, done: threading.Event) -> None:
    if not done.wait(CANCEL_AFTER_S):
        sysfs_cancel(guest)


@pytest.mark.slow
@pytest.mark.needs("kernel-cancel")
def test_client_cancels_a_long_create_primary(target: Any, guest: Any) -> None:
    """The cancelled client gets ECANCELED (or, if swtpm finished first, its answer);
    the next GetRandom on the same device works, and no answer is ever lost or given
    to the wrong command."""
    outcomes: list[bytes | BaseException] = []
    for _ in range(ATTEMPTS):
        with guest.transport() as t:
            done = threading.Event()
            canceller = threading.Thread(target=cancel_later, args=(guest, done), daemon=True)
            canceller.start()
            try:
                outcomes.append(t.transmit(slow_create_primary_cmd(), timeout=180))
            except DeviceRefused as e:
                outcomes.append(e)
            finally:
                done.set()
                canceller.join(30)
            assert len(assert_channel_works(t, 16)) == 16  # the device is free again
            flush_all(t)  # a cancelled CreatePrimary still ran: its object is loaded
        if isinstance(outcomes[-1], DeviceRefused):
            break
        time.sleep(0.5)
    last = outcomes[-1]
    assert isinstance(last, DeviceRefused) and last.errno_name == "ECANCELED", outcomes
