"""What ``pytest --attach`` needs of a Xen environment that ``harness up`` left running:
root logins to its dom0 and, through dom0, to its guests (as the xen target has them),
for relays to each guest's TPM device and for the backend's traffic trace.

The scenarios reach a guest's ``/dev/tpm0`` through the relay, as on a private Xen
target, not through ``harness up``'s endpoints: a kernel's refusal of a command
(EINVAL, E2BIG) reaches them as such, which the error scenarios check. An endpoint holds
the device only while a client of it is connected, so both can be used in turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.deadline import Deadline
from harness.ssh import SshHost
from harness.targets.xen_driver import trace_command
from harness.transport_ssh import REMOTE_PACKAGE_DIR, RelayTransport, open_relay
from xenvtpm.lifecycle import Closeable

CONNECT_TIMEOUT = 60.0


class XenLogins(Closeable):
    """dom0 and each guest of a running environment's description, logged in."""

    def __init__(self, description: Mapping[str, Any]) -> None:
        ssh = description["ssh"]
        key = Path(ssh["key"])
        self.dom0 = SshHost("dom0", str(ssh.get("host", "127.0.0.1")), int(ssh["port"]), key)
        self.guests = {
            g["name"]: SshHost(g["name"], g["ip"], 22, key, via=self.dom0)
            for g in description.get("guests", [])
        }

    def connect(self) -> None:
        deadline = Deadline(CONNECT_TIMEOUT)
        self.dom0.connect(deadline)
        for host in self.guests.values():
            host.connect(deadline)

    def relay(self, guest: str, device: str) -> RelayTransport:
        return open_relay(
            self.guests[guest].client(), device, name=guest, package_dir=REMOTE_PACKAGE_DIR
        )

    def trace(self, instance: int) -> list[str]:
        _, out, _ = self.dom0.run(trace_command(instance), timeout=30)
        return out.splitlines()

    def close(self) -> None:
        for host in self.guests.values():
            host.close()
        self.dom0.close()
