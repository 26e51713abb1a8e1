"""``xl reboot`` of a user's guest on an existing Xen host (``--target ssh://``): the one
toolstack operation certify performs there, and only with the owner's consent
(``--destructive``). The host target composes this part only then, so without consent
no code that can reboot a domain is there at all (issue 15: absent, not disabled).

Nothing here destroys or creates a domain: the guest's own xl configuration stays the
owner's, and ``xl reboot`` keeps it.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable

from harness.deadline import Deadline
from harness.errors import TargetNotReady
from harness.ssh import SshHost
from harness.targets.xen_guest import XenGuest

#: A real host's guest may take long to shut down and boot; past this, the run says so.
REBOOT_TIMEOUT = 600.0


class HostReboots:
    """Reboots the user's guests through dom0's xl."""

    def __init__(self, dom0: Callable[[], SshHost], say: Callable[[str], None]) -> None:
        self._dom0 = dom0
        self.say = say

    def reboot(self, guest: XenGuest, timeout: float = REBOOT_TIMEOUT) -> int:
        """``xl reboot NAME``, then xl's id of the new domain (set on ``guest``); the old
        domid is returned. The guest's login and vTPM are the caller's."""
        dom0 = self._dom0()
        old = guest.domid
        name = shlex.quote(guest.name)
        dom0.check(f"xl reboot {name}", timeout=60)
        deadline = Deadline(timeout)
        while True:
            rc, out, _ = dom0.run(f"xl domid {name}", timeout=30)
            if rc == 0 and out.strip().isdigit() and int(out) != old:
                guest.domid = int(out)
                break
            if deadline.expired:
                raise TargetNotReady(
                    guest.name, f"no new domain {timeout:.0f} s after xl reboot (was {old})"
                )
            time.sleep(1.0)
        assert old is not None
        self.say(f"{guest.name}: xl reboot, domain {old} -> {guest.domid}")
        return old
