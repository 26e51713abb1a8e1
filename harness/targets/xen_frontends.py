"""Which frontend binds a guest's vTPM: ours (``python3 -m xenvtpm frontend --device``,
through tpm_vtpm_proxy) or the guest kernel's own ``xen-tpmfront`` (protocol v2).

A frontend owns what differs between the two: how a guest is connected, how its TPM
device is waited for, the largest command that device takes, the health check of the
device, and which capabilities it makes possible. The rest of a Xen target does not
know which one it has.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

from harness.errors import TargetNotReady
from harness.target import Capability
from harness.targets import xen_driver
from harness.targets.health import Check
from harness.targets.xen_guest import XenGuest
from harness.targets.xen_session import Dom0Session
from harness.transport_ssh import REMOTE_PACKAGE_DIR


class Frontend(Protocol):
    name: ClassVar[str]
    kind: ClassVar[str]  # the kind of guest it makes: FRONTENDS' key, --guest-kind
    max_command_size: ClassVar[int]
    # What a guest needs for it: kernel modules, and Xen's user-space libraries.
    guest_modules: ClassVar[tuple[str, ...]]
    needs_xen_libs: ClassVar[bool]
    # What this frontend makes possible on any Xen target, and with a toolstack too.
    capabilities: ClassVar[frozenset[str]]
    with_toolstack: ClassVar[frozenset[str]]

    def connect(self, session: Dom0Session, guest: XenGuest) -> None: ...

    def bind(self, session: Dom0Session, guest: XenGuest) -> None:
        """Bind a vTPM device that another toolstack made (xl's ``vtpm=`` line)."""
        ...

    def wait_for_device(self, guest: XenGuest) -> float: ...

    def stop(self, session: Dom0Session, guest: XenGuest) -> None: ...

    def start(self, session: Dom0Session, guest: XenGuest) -> None: ...

    def health_checks(self, guests: list[XenGuest]) -> list[Check]: ...


class OurFrontend:
    """Our frontend in the guest, which makes ``/dev/tpm0`` through tpm_vtpm_proxy; it
    reconnects after a restart of either end, and the proxy gives ``/dev/tpmrm0``."""

    name: ClassVar[str] = "xenvtpm"
    kind: ClassVar[str] = "python"
    max_command_size: ClassVar[int] = 4096
    guest_modules: ClassVar[tuple[str, ...]] = xen_driver.GUEST_MODULES
    needs_xen_libs: ClassVar[bool] = True
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {
            Capability.RESTART_FRONTEND,
            Capability.RESTART_BACKEND,
            Capability.SHARED_CLIENTS,
            Capability.TPM2_CHIP,  # tpm_vtpm_proxy's chip, made with VTPM_PROXY_FLAG_TPM2
        }
    )
    with_toolstack: ClassVar[frozenset[str]] = frozenset({Capability.XL})

    def connect(self, session: Dom0Session, guest: XenGuest) -> None:
        """Toolstack entries for the guest's vTPM in dom0, then the frontend."""
        assert guest.domid is not None
        vtpm = xen_driver.GuestVtpm(guest.name, guest.domid, guest.instance)
        xen_driver.attach_guest(
            session.host(), guest.host(), vtpm, REMOTE_PACKAGE_DIR, session.start_daemon
        )

    def bind(self, session: Dom0Session, guest: XenGuest) -> None:
        self.start(session, guest)

    def wait_for_device(self, guest: XenGuest) -> float:
        """Seconds until the guest's TPM device exists (``guest.tpm_device``)."""
        return xen_driver.wait_for_device(guest.host(), guest.name, device=guest.tpm_device)

    def stop(self, session: Dom0Session, guest: XenGuest) -> None:
        session.stop_daemon(guest.host(), "frontend")

    def start(self, session: Dom0Session, guest: XenGuest) -> None:
        session.start_daemon(guest.host(), "frontend", "frontend --device")

    def health_checks(self, guests: list[XenGuest]) -> list[Check]:
        return []  # the frontend is a daemon: the session checks it runs


FRONTENDS: dict[str, type[Frontend]] = {}  # by the kind of guest: filled below
OWN_DIR = f"{REMOTE_PACKAGE_DIR}/own"  # the user's own modules, in a guest
OWN_MODULE = f"{OWN_DIR}/xen-tpmfront.ko"


class KernelFrontend:
    """The guest kernel's own ``xen-tpmfront``, with no software of ours in the guest.

    What the stock driver allows decides the capabilities (docs/xen-under-qemu.md):

    - xen-tpmfront never probes for TPM 2.0, so its kernel registers the chip as TPM
      1.2: ``/dev/tpm0`` passes TPM 2.0 commands through, but there is no
      ``/dev/tpmrm0``, hence no shared clients;
    - it unregisters its device for good when the backend closes, and cannot reconnect
      after an unbind, so restarts of the backend or the frontend are left out (and with
      them the xl scenarios, which stop and start the frontend);
    - reboots work (a new domain probes afresh), and so do ``xl save`` / ``xl restore``,
      which only this kind of guest can survive: the kernel re-probes on resume;
    - xl's own ``vtpm-attach`` gives the running guest another chip, which the kernel
      probes as a new device (docs/xl.md).
    """

    name: ClassVar[str] = "xen-tpmfront"
    kind: ClassVar[str] = "kernel"
    # xen-tpmfront grants no extra pages, and its one page starts with the 8-byte
    # vtpm_shared_page header: vtpm_send refuses a longer command (EINVAL).
    max_command_size: ClassVar[int] = 4096 - 8
    guest_modules: ClassVar[tuple[str, ...]] = ("xen-tpmfront",)
    needs_xen_libs: ClassVar[bool] = False  # only the relay of ours runs in the guest
    capabilities: ClassVar[frozenset[str]] = frozenset()
    with_toolstack: ClassVar[frozenset[str]] = frozenset(
        {Capability.SAVE_RESTORE, Capability.XL_DEVICES}
    )

    def connect(self, session: Dom0Session, guest: XenGuest) -> None:
        """Toolstack entries in dom0, then ``modprobe xen-tpmfront`` in the guest (the
        image blacklists its automatic loading, so that our frontend can own the device
        in ``--target xen``)."""
        assert guest.domid is not None
        vtpm = xen_driver.GuestVtpm(guest.name, guest.domid, guest.instance)
        session.host().check(xen_driver.attach_command(vtpm, REMOTE_PACKAGE_DIR))
        self.bind(session, guest)

    def bind(self, session: Dom0Session, guest: XenGuest) -> None:
        """Load xen-tpmfront (the guest's own, or the user's), which binds the device."""
        if self.own_module is None:
            guest.host().check("modprobe xen-tpmfront")
        else:
            self._load_own(guest)

    # -- the user's own xen-tpmfront (--tpmfront, --tpmfront-source) ---------------------
    def __init__(self) -> None:
        self.own_module: Path | None = None
        self.own_info: dict[str, str] = {}

    def use_module(self, module: Path, info: dict[str, str]) -> None:
        """Load ``module`` (checked by harness.own_build) instead of the guests' own."""
        self.own_module, self.own_info = module, info

    def _load_own(self, guest: XenGuest) -> None:
        """Copy the module in, load what it depends on, unload a xen-tpmfront already
        there (none on a fresh boot: the image blacklists it), ``insmod`` this one, and
        check what the kernel says of the loaded one: an out-of-tree build taints it
        ``O``, and a module with a srcversion must show the file's."""
        assert self.own_module is not None
        host = guest.host()
        host.check(f"mkdir -p {OWN_DIR}")
        host.put(self.own_module, OWN_MODULE)
        depends = " ".join(d for d in self.own_info.get("depends", "").split(",") if d)
        load = f"modprobe -a {depends}; " if depends else ""
        host.check(
            f"{load}if grep -q '^xen_tpmfront ' /proc/modules; then rmmod xen_tpmfront; fi; "
            f"insmod {OWN_MODULE}"
        )
        if self.own_info.get("intree") != "Y":
            taint = host.run("cat /sys/module/xen_tpmfront/taint")[1]
            if "O" not in taint:
                raise TargetNotReady(
                    f"guest {guest.name}",
                    f"the loaded xen_tpmfront is not out of tree (taint {taint.strip()!r}): "
                    f"not {self.own_module}",
                )
        expected = self.own_info.get("srcversion")
        if expected:
            loaded = host.run("cat /sys/module/xen_tpmfront/srcversion")[1].strip()
            if loaded != expected:
                raise TargetNotReady(
                    f"guest {guest.name}",
                    f"xen_tpmfront loaded there has srcversion {loaded or '(none)'}, not "
                    f"{expected} of {self.own_module}: the guest's own module was loaded",
                )

    def wait_for_device(self, guest: XenGuest) -> float:
        """Seconds until xen-tpmfront's chip exists; ``guest.tpm_device`` is its device.

        Not always /dev/tpm0: on resume xen-tpmfront removes and re-probes its chip by
        hand, outside the driver core, so the old chip's devm reference (and with it
        the number tpm0) is never released and the new chip is tpm1 (measured, 6.1)."""
        waited = xen_driver.wait_for_kernel_chip(guest.host(), guest.name)
        guest.tpm_device = waited.device
        return waited.seconds

    def stop(self, session: Dom0Session, guest: XenGuest) -> None:
        """Nothing of ours runs in the guest: its kernel's driver goes with its domain."""

    def start(self, session: Dom0Session, guest: XenGuest) -> None:
        raise NotImplementedError("xen-tpmfront cannot be started again after an unbind")

    def health_checks(self, guests: list[XenGuest]) -> list[Check]:
        """Each guest's TPM device is there (xen-tpmfront never rebinds by itself)."""
        return [
            Check(
                guest.name,
                f"test -c {guest.tpm_device}",
                f"{guest.name}: {guest.tpm_device} is gone (xen-tpmfront unbound)",
            )
            for guest in guests
        ]


class PatchedKernelFrontend(KernelFrontend):
    """Stock guests whose ``xen-tpmfront`` carries the patch series of
    ``linux/xen-tpmfront/`` (issue 17), built out of tree for the guest's kernel and loaded
    in place of its own. It registers a TPM 2.0 backend as a TPM 2.0 chip, so the
    kernel makes ``/dev/tpmrm0`` (shared clients) and its own users speak TPM 2.0, and
    its resume reconnects the ring for the same chip, which stays ``/dev/tpm0``.
    Restarts of the backend stay out, as with the stock driver."""

    name: ClassVar[str] = "xen-tpmfront + linux/xen-tpmfront patches"
    kind: ClassVar[str] = "kernel-tpm2"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {Capability.SHARED_CLIENTS, Capability.TPM2_CHIP}
    )


FRONTENDS.update({f.kind: f for f in (OurFrontend, KernelFrontend, PatchedKernelFrontend)})
