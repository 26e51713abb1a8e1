"""A guest of a Xen target: its name, domid, vTPM instance, SSH login through dom0 and
the TPM device a scenario reaches through a relay.

The same on every Xen target: a guest the harness created under QEMU, or one a user's
host already runs. What made the domain (xl and the harness's template) is the
toolstack's business (:mod:`harness.targets.xen_toolstack`), not the guest's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import TargetNotReady
from harness.ssh import SshHost
from harness.target import Capability
from harness.targets.base import BaseGuest
from harness.transport import RawTransport
from harness.transport_ssh import REMOTE_PACKAGE_DIR, RelayTransport, open_relay

if TYPE_CHECKING:
    from harness.targets.xen_base import XenDriverTarget

FIRST_INSTANCE = 1000


class XenGuest(BaseGuest):
    """A PV guest: its xl name, domid, vTPM instance, address and SSH login."""

    target_name = "xen"
    kernel_device = True

    def __init__(self, index: int, target: XenDriverTarget, name: str = "", ip: str = "") -> None:
        self.index = index
        self.name = name or f"guest{index}"
        self.instance = FIRST_INSTANCE + index
        self.ip = ip or f"169.254.1.{index + 1}"
        self.domid: int | None = None
        self.target = target
        self.ssh: SshHost | None = None
        # The guest's TPM device: /dev/tpm0, unless its kernel numbered the chip anew
        # (xen-tpmfront after xl restore: the resumed chip is tpm1; see save_restore).
        self.tpm_device = "/dev/tpm0"
        self.max_command_size = target.frontend.max_command_size

    # -- the coordination surface for deploying the driver pair ------------------------
    def host(self) -> SshHost:
        if self.ssh is None or not self.ssh.connected:
            raise TargetNotReady(self.name, "not booted (no SSH connection)")
        return self.ssh

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
        return self.host().run(command, timeout)

    def put(self, local: Path | str, remote: str) -> None:
        self.host().put(local, remote)

    def transport(self, shared: bool = False) -> RawTransport:
        """The guest's TPM device (``tpm_device``; ``shared``: /dev/tpmrm0) through
        ``python3 -m xenvtpm relay`` over SSH, leased from the target's pool of relays
        (``harness.relay_pool``: started once, not per transport)."""
        if shared:
            self.target.require(Capability.SHARED_CLIENTS)
        device = "/dev/tpmrm0" if shared else self.tpm_device
        return self.target.relays.lease(
            self.name, device, lambda: self._open_relay(device), shared=shared
        )

    def _open_relay(self, device: str) -> RelayTransport:
        return open_relay(
            self.host().client(), device, name=self.name, package_dir=REMOTE_PACKAGE_DIR
        )

    def logs(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.target.artifacts.glob(f"{self.name}*.log"))}

    def probe(self, *args: str) -> dict[str, Any]:
        return self.target.probe(self, *args)

    def describe(self) -> dict[str, Any]:
        """``tpm``: under ``harness up``, the host-side endpoint (sim's contract: one
        command in, one response out, ``harness.endpoint``); else the guest's device."""
        endpoint = self.target.run_dir / f"{self.name}.tpm"
        up = not self.target.die_with_parent
        return {
            "name": self.name,
            "domid": self.domid,
            "instance": self.instance,
            "ip": self.ip,
            "tpm": str(endpoint) if up else self.tpm_device,
            "device": self.tpm_device,
            "transport": "seqpacket" if up else "xen-ssh",
        }

    def __repr__(self) -> str:
        return f"XenGuest({self.name}, domid={self.domid}, ip={self.ip})"
