"""xl in the harness's own dom0: the guests' domains, made from the harness's template
(``images/guest.cfg.in``), and what a host does to them: create, destroy, reboot, save
and restore.

Only a machine the harness booted has a toolstack part. On a user's host there is none:
code that destroys or recreates domains is absent there, not merely switched off.
"""

from __future__ import annotations

import shlex
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.console import ConsoleFailure
from harness.deadline import Deadline
from harness.errors import TargetNotReady
from harness.images import Images
from harness.paths import REPO_ROOT
from harness.ssh import SshHost
from harness.targets import xen_driver
from harness.targets.xen_guest import XenGuest
from harness.targets.xen_session import Dom0Session
from harness.transport_ssh import REMOTE_PACKAGE_DIR

GUEST_MEMORY_MB = 384  # 3 guests + dom0's 1024 fit in QEMU's 3072
SAVE_DIR = "/var/lib/xenvtpm-saves"  # xl save images in dom0 (the guest's memory)
SAVE_TIMEOUT = 300.0
GUEST_TIMEOUT = 420.0  # xl create -> guest SSH (~40 s idle; 284 s seen on a loaded host)
XL_CREATE_TIMEOUT = 300.0  # xl create itself: seconds idle, over 90 s with three QEMUs
# harness.console.FAILURE_PATTERNS as one grep -E pattern, for a guest's console log.
GUEST_FAILURES = (
    r"Kernel panic - not syncing.*|You are in emergency mode|"
    r"Give root password for maintenance|\(initramfs\) |Failed to start .{0,24}xenvtpm-ne"
)


def guest_mac(guest: XenGuest) -> str:
    return f"00:16:3e:78:00:{guest.index + 1:02x}"


def guest_disk(guest: XenGuest) -> str:
    return f"/dev/vd{chr(ord('b') + guest.index)}"  # QEMU drive index + 1


def xl_config(guest: XenGuest, images: Images, boot: tuple[str, str] | None = None) -> str:
    """The guest's xl configuration, from the harness's template; ``boot``: the kernel
    and initrd in dom0 (default dom0's own, as the images have them)."""
    text = (REPO_ROOT / "images" / "guest.cfg.in").read_text()
    kernel, ramdisk = boot or (images.dom0_kernel, images.dom0_initrd)
    values = {
        "NAME": guest.name,
        "KERNEL": kernel,
        "RAMDISK": ramdisk,
        "IP": guest.ip,
        "MAC": guest_mac(guest),
        "DISK": guest_disk(guest),
        "MEMORY": str(GUEST_MEMORY_MB),
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def wait_new_domain(dom0: SshHost, guest: XenGuest, old: int, deadline: Deadline) -> None:
    """After ``xl reboot``: poll ``xl domid`` until xl names a domain other than ``old``,
    and give ``guest`` its id (TargetNotReady at ``deadline``)."""
    name = shlex.quote(guest.name)
    while True:
        rc, out, _ = dom0.run(f"xl domid {name}", timeout=30)
        if rc == 0 and out.strip().isdigit() and int(out) != old:
            guest.domid = int(out)
            return
        if deadline.expired:
            raise TargetNotReady(guest.name, f"no new domain after xl reboot (was {old})")
        time.sleep(1.0)


class XlToolstack:
    """The guests' domains in the harness's dom0, through ``session``'s login."""

    def __init__(
        self,
        session: Dom0Session,
        images: Callable[[], Images],
        evidence: Callable[[], dict[str, Path]],
        say: Callable[[str], None],
    ) -> None:
        self.session = session
        self._images = images
        self._evidence = evidence  # the target's logs, for a guest that never came up
        self.say = say
        self.guest_boot: tuple[str, str] | None = None  # the guests' kernel and initrd

    def _dom0(self) -> SshHost:
        return self.session.host()

    def domid(self, guest: XenGuest) -> int:
        return int(self._dom0().check(f"xl domid {guest.name}").strip())

    def start_guests(self, guests: Sequence[XenGuest]) -> None:
        """``xl create`` every guest, then wait for each one's SSH (they boot in parallel)."""
        for guest in guests:
            self.create_guest(guest)
        for guest in guests:
            self.wait_guest(guest, Deadline(GUEST_TIMEOUT))

    def create_guest(self, guest: XenGuest, vtpm_uuid: str | None = None) -> None:
        """``xl create`` the guest; ``vtpm_uuid``: with xl's own vTPM device of that uuid
        in its configuration (docs/xl.md), otherwise with none (the harness attaches)."""
        dom0 = self._dom0()
        cfg = f"/etc/xen/{guest.name}.cfg"
        config = xl_config(guest, self._images(), self.guest_boot)
        if vtpm_uuid is not None:
            config += f'vtpm = ["backend=0,uuid={uuid.UUID(vtpm_uuid)}"]\n'
        dom0.run(f"cat > {cfg}", stdin=config.encode(), check=True)
        rc, out, err = dom0.run(f"xl create {cfg}", timeout=XL_CREATE_TIMEOUT)
        if rc != 0 and "because of timeout" in err:
            # xl's hotplug scripts (vif-bridge) have a fixed time budget that a loaded
            # TCG dom0 can exceed; xl has destroyed the half-made domain: once more.
            self.say(f"{guest.name}: xl create: a hotplug script timed out; trying once more")
            dom0.run(f"xl destroy {guest.name}", timeout=60)
            rc, out, err = dom0.run(f"xl create {cfg}", timeout=XL_CREATE_TIMEOUT)
        if rc != 0:
            self.session.collect()
            raise TargetNotReady(
                f"guest {guest.name}",
                f"xl create {cfg} exited {rc}:\n{out}{err}",
                {"xl logs": self.session.artifacts / "var-log-xen"},
            )
        guest.domid = self.domid(guest)
        self.say(f"{guest.name}: xl create -> domain {guest.domid}, link {guest.ip}")

    def wait_guest(self, guest: XenGuest, deadline: Deadline) -> None:
        """SSH to the guest through dom0; meanwhile its console log (xenconsoled's, in
        dom0) is checked for failure patterns and ``xl`` for the domain being gone."""
        dom0 = self._dom0()
        t0 = time.monotonic()
        last_check = [0.0]
        console = f"/var/log/xen/console/guest-{guest.name}.log"

        def alive() -> None:
            if time.monotonic() - last_check[0] < 10:
                return
            last_check[0] = time.monotonic()
            rc, _, _ = dom0.run(f"xl domid {guest.name}", timeout=30)
            if rc != 0:
                raise TargetNotReady(
                    f"guest {guest.name}", "its domain is gone (crashed?)", self._evidence()
                )
            _, seen, _ = dom0.run(
                f"grep -aEo {shlex.quote(GUEST_FAILURES)} {console} | head -1", timeout=30
            )
            if seen.strip():
                raise ConsoleFailure(f"{guest.name} console", "failure", seen.encode(), None)

        guest.ssh = SshHost(guest.name, guest.ip, 22, self._images().ssh_key, via=dom0)
        try:
            guest.ssh.connect(deadline, alive=alive)
        except (TargetNotReady, ConsoleFailure):
            self.session.collect()
            raise
        self.say(f"{guest.name}: ssh up (waited {time.monotonic() - t0:.1f} s)")

    def destroy(self, guest: XenGuest) -> None:
        """``xl destroy``: the domain is gone at once, no shutdown; then its vTPM
        directories go (the backend sees the frontend vanish first)."""
        assert guest.domid is not None
        self._dom0().check(f"xl destroy {guest.name}", timeout=60)
        self.session.detach_domain(guest.domid)
        guest.domid = None

    def create(self, guest: XenGuest, vtpm_uuid: str | None = None) -> None:
        """``xl create`` a destroyed guest again and log in to it."""
        self.create_guest(guest, vtpm_uuid)
        self.wait_guest(guest, Deadline(GUEST_TIMEOUT))

    def reboot(self, guest: XenGuest) -> tuple[int, float, float]:
        """``xl reboot``: a new domain (new domid) boots while the old one's vTPM
        directories go; until the guest's SSH. (old domid, seconds down, seconds up)."""
        dom0 = self._dom0()
        old = guest.domid
        assert old is not None
        t0 = time.monotonic()
        dom0.check(f"xl reboot {guest.name}", timeout=60)
        deadline = Deadline(GUEST_TIMEOUT)
        wait_new_domain(dom0, guest, old, deadline)
        t1 = time.monotonic()
        with ThreadPoolExecutor(1) as pool:  # the old domain's vTPM goes while the new boots
            detached = pool.submit(self.session.detach_domain, old)
            self.wait_guest(guest, deadline)
            detached.result()
        return old, t1 - t0, time.monotonic() - t1

    def save_and_restore(self, guest: XenGuest) -> tuple[int, float]:
        """``xl save``, then ``xl restore -p``: the toolstack writes the vTPM's
        directories for the new domain while it is still paused, as xl does for its own
        devices, so that the guest's kernel finds its device on resume. They say
        ``resume = True``: the same boot goes on, so the vTPM keeps its PCRs. Returns (old
        domid, seconds to save); the domain is unpaused and logged in to."""
        dom0 = self._dom0()
        old = guest.domid
        assert old is not None
        image = f"{SAVE_DIR}/{guest.name}.xlsave"
        t0 = time.monotonic()
        dom0.check(f"mkdir -p {SAVE_DIR} && xl save {guest.name} {image}", timeout=SAVE_TIMEOUT)
        saved = time.monotonic() - t0
        self.session.detach_domain(old)
        try:
            dom0.check(f"xl restore -p {image}", timeout=SAVE_TIMEOUT)
        finally:
            dom0.run(f"rm -f {image}")
        guest.domid = self.domid(guest)
        vtpm = xen_driver.GuestVtpm(guest.name, guest.domid, guest.instance)
        dom0.check(xen_driver.attach_command(vtpm, REMOTE_PACKAGE_DIR, resumed=True))
        dom0.check(f"xl unpause {guest.name}")
        return old, saved
