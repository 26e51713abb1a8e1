"""The xen targets' toolstack for a rogue frontend (scenarios/test_hostile.py).

A second vTPM device (devid :data:`ROGUE_DEVID`, instance :data:`ROGUE_INSTANCE`) on the
last PV guest, attached with ``python3 -m xenvtpm attach`` in dom0; the rogue runs
inside that guest over SSH, against the real backend in dom0, through Xen's grant tables
and event channels; the device is detached in dom0 afterwards. The guest's own frontend
(devid 0) keeps running. Counts come from dom0's ``/proc``
(``XenTarget.backend_resources``). TCG is slow: attacks are scaled down (``exact`` is
False) and the rogue waits longer for answers.

Only the Xen machines under QEMU (``xen``, ``xen-kernel``) offer it: on an existing host
(``ssh://``) the rogue's device is not ours to add.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING, Any

from harness.errors import UnsupportedOperation
from harness.ssh import CommandFailed
from harness.target import ROGUE_INSTANCE, XEN_TARGETS

if TYPE_CHECKING:
    from harness.targets.xen import XenTarget

ROGUE_DEVID = 1  # the rogue's device beside the guest's own vTPM (devid 0)
XEN_AUTOPROBE = "/sys/bus/xen/drivers_autoprobe"  # the driver core's per-bus switch


class XenHostileToolstack:
    """dom0 of a xen target: the rogue's vTPM as devid 1 of the last guest, the rogue
    inside that guest, counts from dom0's ``/proc``."""

    exact = False
    settle_s = 60.0
    poll_s = 1.0  # each count is an SSH command in dom0
    rogue_timeout = 20.0  # the rogue's --timeout: seconds for an answer under TCG
    first_timeout = 240.0  # the first command waits for swtpm_setup (20-30 s under TCG)

    def __init__(self, target: XenTarget) -> None:
        if target.name not in XEN_TARGETS:
            raise UnsupportedOperation(target.name, "hostile-toolstack")
        from harness.targets.xen import REMOTE_PACKAGE_DIR

        self.target = target
        self.home = REMOTE_PACKAGE_DIR
        self.host = target.guests[-1]  # the rogue's domain
        self.victim = target.guests[0]
        # A stock guest's xen-tpmfront binds every new vtpm device at once; the rogue's
        # must stay free, so the guest's xen bus stops binding new devices meanwhile.
        self.hold_probe = target.frontend.kind != "python"  # a kernel's xen-tpmfront

    def close(self) -> None:
        self.detach()

    def counts(self) -> dict[str, int]:
        return dict(self.target.backend_resources())

    def backend_healthy(self) -> bool:
        return not any(p.startswith("backend in dom0") for p in self.target.problems())

    def rogue_status(self) -> dict[str, int] | None:
        from xenvtpm.manager.manager import status_counts

        return status_counts(self.target.manager_status_line(), ROGUE_INSTANCE)

    def dom0(self, command: str, timeout: float = 60.0) -> str:
        """``command`` in dom0 (its ``dom0_run``); CommandFailed unless it exits 0."""
        command = f"cd {self.home} && {command}"
        rc, out, err = self.target.dom0_run(command, timeout)
        if rc != 0:
            raise CommandFailed("dom0", command, rc, out, err)
        return out

    def attach(self) -> None:
        """The rogue's device, then until the backend is in InitWait: one shell loop on
        ``xenstore-read`` (polling with python3 would load dom0 beside the backend)."""
        domid = self.host.domid
        if self.hold_probe:
            self.host.host().check(f"echo 0 > {XEN_AUTOPROBE}")
        self.dom0(
            f"python3 -m xenvtpm attach --domid {domid} --instance {ROGUE_INSTANCE} "
            f"--name rogue --devid {ROGUE_DEVID}"
        )
        state = f"/local/domain/0/backend/vtpm/{domid}/{ROGUE_DEVID}/state"
        self.dom0(
            f'for i in $(seq 120); do [ "$(xenstore-read {state} 2>/dev/null)" = 2 ] && exit 0; '
            f"sleep 0.5; done; echo backend not in InitWait on {state} >&2; exit 1",
            timeout=90,
        )

    def detach(self) -> None:
        if self.host.domid is not None:
            self.dom0(f"python3 -m xenvtpm detach --domid {self.host.domid} --devid {ROGUE_DEVID}")
        if self.hold_probe:
            self.host.host().check(f"echo 1 > {XEN_AUTOPROBE}")

    def rogue(self, attack: str, args: list[str]) -> list[dict[str, Any]]:
        timeout = self.first_timeout if attack == "hello" else self.rogue_timeout
        argv = [
            "--devid",
            str(ROGUE_DEVID),
            "--timeout",
            str(timeout),
            "--foreign-domid",
            str(self.victim.domid),
            *args,
        ]
        command = f"cd {self.home} && python3 -m xenvtpm rogue {attack} " + shlex.join(argv)
        self.attach()
        try:
            rc, out, err = self.host.run(command, timeout=600)
        finally:
            self.detach()
        why = f"rogue {attack} in {self.host.name} exited {rc}: {err[-2000:]}{out[-1500:]}"
        assert rc == 0, why
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
