"""``xl reboot`` of a user's guest on an existing Xen host (``--target ssh://``): the one
toolstack operation certify performs there, and only with the owner's consent
(``--destructive``). The host target composes this part only then, so without consent
no code that can reboot a domain is there at all (issue 15: absent, not disabled).

Nothing here destroys or creates a domain: the guest's own xl configuration stays the
owner's, and ``xl reboot`` keeps it.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from harness.deadline import Deadline
from harness.ssh import SshHost
from harness.targets.xen_guest import XenGuest
from harness.targets.xen_toolstack import wait_new_domain

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
        assert old is not None
        dom0.check(f"xl reboot {shlex.quote(guest.name)}", timeout=60)
        wait_new_domain(dom0, guest, old, Deadline(timeout))
        self.say(f"{guest.name}: xl reboot, domain {old} -> {guest.domid}")
        return old
