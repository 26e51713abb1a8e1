"""``--target xen``: Xen 4.17 and a Debian dom0 under QEMU, PV guests started with xl.

The target is its parts (:mod:`harness.targets.xen_base`): the QEMU machine
(:mod:`~harness.targets.xen_machine`), the dom0 session
(:mod:`~harness.targets.xen_session`), the xl toolstack
(:mod:`~harness.targets.xen_toolstack`) and a frontend
(:mod:`~harness.targets.xen_frontends`: ours here, the guests' own ``xen-tpmfront`` in
``--target xen-kernel``). Bring-up walks off -> ready (STYLE.md 9), each step with its
own deadline:

    images    harness.images.build_images (cached; cold build a few minutes)
    boot      QEMU (KVM tried once per host, else TCG -cpu qemu64), the serial console
              walked stage by stage (harness.console.DOM0_STAGES), failure patterns fatal
    dom0      SSH on the hostfwd port (harness.ssh)
    guests    ``xl create`` from ``images/guest.cfg.in``, then SSH to each guest through dom0
    deploy    the xenvtpm package into dom0 and every guest, then the daemons

Per-run evidence lands in ``artifacts/<target>/`` (``$XENVTPM_ARTIFACTS``): console.log (the
whole raw serial console, written by QEMU), qemu.log, and on close dom0's dmesg and
journal, ``xl dmesg``, ``/var/log/xen`` (xl and guest console logs) and daemon logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from harness import patched_tpmfront
from harness.crash_watch import ChannelSource, Crash, CrashWatch, guest_console_command
from harness.deadline import Deadline
from harness.endpoint import start_endpoint
from harness.errors import HarnessError, TargetNotReady
from harness.images import Images
from harness.process import ManagedProcess, ProcessRecord
from harness.qemu import qemu_version
from harness.target import Capability, Guest, HostileToolstack
from harness.targets import xen_guest_kernel as guest_kernel
from harness.targets.xen_base import SESSION_CAPABILITIES, XenDriverTarget
from harness.targets.xen_frontends import (
    Frontend,
    KernelFrontend,
    OurFrontend,
    PatchedKernelFrontend,
)
from harness.targets.xen_guest import FIRST_INSTANCE, XenGuest
from harness.targets.xen_machine import XenMachine
from harness.targets.xen_toolstack import GUEST_MEMORY_MB, GUEST_TIMEOUT, XlToolstack, xl_config
from harness.transport_ssh import REMOTE_PACKAGE_DIR

__all__ = ["FIRST_INSTANCE", "REMOTE_PACKAGE_DIR", "XenGuest", "XenKernelFrontendTarget"]

SNAPSHOT_ENV = "XENVTPM_SNAPSHOT"  # "0": always boot cold, never save a booted machine
# our own machine's dom0 runs the package's units, each swtpm confined (dom0_units)
MACHINE_CAPABILITIES = frozenset(
    {
        Capability.POWER_CUT,
        Capability.CRASH_WATCH,
        Capability.SERVICES,
        Capability.CONFINED_SWTPM,
    }
)
TOOLSTACK_CAPABILITIES = frozenset({Capability.REBOOT})


def capabilities(frontend: type[Frontend]) -> frozenset[str]:
    """Machine + session + toolstack, and what the frontend makes possible with them."""
    return (
        MACHINE_CAPABILITIES
        | SESSION_CAPABILITIES
        | TOOLSTACK_CAPABILITIES
        | frontend.capabilities
        | frontend.with_toolstack
    )


class XenTarget(XenDriverTarget):
    """The machine, the dom0 session, the xl toolstack and our frontend."""

    name: ClassVar[str] = "xen"
    FRONTEND: ClassVar[type[Frontend]] = OurFrontend
    CAPABILITIES: ClassVar[frozenset[str]] = capabilities(OurFrontend)
    MAX_GUESTS: ClassVar[int] = 20
    WHY_MAX: ClassVar[str] = "(one QEMU drive each)"

    machine: XenMachine
    toolstack: XlToolstack
    _endpoints: list[ManagedProcess]  # harness up: one per guest
    crash_watch: CrashWatch | None
    _crashed_guests: set[str]  # since this machine started
    crashes: list[Crash]  # every crash seen since the target started
    on_crash: Callable[[Crash], None] | None  # the fixtures' alarm

    def _compose(self) -> None:
        super()._compose()
        self.machine = XenMachine(
            self.guest_count,
            self.run_dir,
            self.artifacts,
            self.die_with_parent,
            self.say,
            self.timings,
        )
        self.toolstack = XlToolstack(self.session, self._images, self.logs, self.say)
        self._endpoints = []
        self.crash_watch = None
        self._crashed_guests = set()
        self.crashes = []
        self.on_crash = None

    @property
    def accel(self) -> str | None:
        return self.machine.accel

    @property
    def images(self) -> Images | None:
        return self.machine.images

    def _images(self) -> Images:
        assert self.machine.images is not None
        return self.machine.images

    # -- bring-up ------------------------------------------------------------------------
    def _start(self) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.machine.build_images()
        self.use_own_build()
        if not (self._snapshots() and self.restore()):
            self.dom0 = self.machine.boot()
            guest_kernel.install_in_dom0(self._dom0(), self.prepared, self._images(), self.say)
            self.start_guests()
            self.install_guest_modules()
            self.provision()
            if self._snapshots() and self.machine.accel == "tcg":
                self.save_snapshot()
        self.check_booted_own()
        self.start_driver()
        self.watch_crashes()
        if not self.die_with_parent:  # harness up: sim's endpoints, a real guest behind
            self.start_endpoints()
        self.say(
            "xen target ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        )

    def use_own_build(self) -> None:
        """The user's pieces (``--xen``, ``--guest-kernel``...), checked against the
        images' kernel before QEMU starts, then handed to the parts that use them."""
        prepared = self.prepare_own_build(self._images().kernel_version)
        self.machine.own_xen, self.machine.own_dom0_kernel = prepared.xen, prepared.dom0_kernel
        if prepared.guest_kernel is not None:
            self.toolstack.guest_boot = guest_kernel.guest_boot_files(prepared, self._images())

    def check_booted_own(self) -> None:
        """dom0 and every guest run the user's kernels (``uname -r``): the proof that a
        piece was booted, not only recorded."""
        own = {"dom0": self.prepared.dom0_kernel_release}
        if self.prepared.guest_kernel is not None:
            own.update({g.name: self.prepared.guest_kernel.release for g in self._guests})
        for name, release in own.items():
            if release is None:
                continue
            running = self.hosts()[name].check("uname -r").strip()
            if running != release:
                raise TargetNotReady(name, f"runs kernel {running}, not the given {release}")
            self.say(f"{name} runs the given kernel {running}")

    def install_guest_modules(self) -> None:
        """The user's guest kernel's modules into every guest, all at once."""
        if self.prepared.guest_modules is None:
            return
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(self._guests)) as pool:
            installs = [
                pool.submit(guest_kernel.install_in_guest, g.host(), self.prepared)
                for g in self._guests
            ]
            for install in installs:
                install.result()
        self.timings["guest_modules_s"] = round(time.monotonic() - t0, 1)

    def _build_module(self, source: Path) -> Path:
        """``--tpmfront-source``: built against the images' kernel headers (seconds)."""
        from harness import kbuild

        images = self._images()
        manifest = json.loads((images.dir / "manifest.json").read_text())
        return kbuild.build_module(source, images.dir, manifest, self.say, name="xen-tpmfront")

    def start_guests(self) -> None:
        """``xl create`` every guest, then wait for each one's SSH (they boot in parallel)."""
        t0 = time.monotonic()
        self.toolstack.start_guests(self._guests)
        self.timings["xl_create_to_guest_ssh_s"] = round(time.monotonic() - t0, 1)

    def provision(self) -> None:
        """Make every guest's vTPM instance in dom0 now (``python3 -m xenvtpm provision``:
        swtpm_setup, 20-30 s each in TCG, all at once), so that a saved booted machine
        carries them and a warm start only starts swtpm."""
        t0 = time.monotonic()
        self.session.provision([g.instance for g in self._guests])
        self.timings["provision_s"] = round(time.monotonic() - t0, 1)
        self.say(f"made the guests' vTPM instances in dom0 in {self.timings['provision_s']} s")

    # -- crash watch: every console until teardown (harness/crash_watch.py) -----------------
    def watch_crashes(self) -> None:
        """Follow the serial console, each guest's console (through dom0) and QEMU."""
        self.stop_watching()
        self._crashed_guests.clear()
        if self.machine.qemu is None:
            return
        dom0 = self._dom0()
        sources = self.machine.crash_sources()
        sources += [
            ChannelSource(f"{g.name} console", dom0.stream(guest_console_command(g.name)))
            for g in self._guests
        ]
        self.crash_watch = CrashWatch(sources, self._crash_seen, self.machine.dead).start()
        self.kernel_log_problems()  # the baseline: a failed test's scan shows what is new

    def stop_watching(self) -> None:
        """Before the machine stops on purpose (close, power cut): that is no crash."""
        if self.crash_watch is not None:
            self.crash_watch.close()
            self.crash_watch = None

    def _crash_seen(self, crash: Crash) -> None:
        self.crashes.append(crash)
        for g in self._guests:
            if crash.console == f"{g.name} console":
                self._crashed_guests.add(g.name)  # its console in dom0 keeps what it said
        self.say(f"CRASH on {crash}")
        if self.on_crash is not None:
            self.on_crash(crash)

    # -- saved booted machines (warm start) ------------------------------------------------
    @staticmethod
    def _snapshots() -> bool:
        return os.environ.get(SNAPSHOT_ENV, "1") != "0"

    def snapshot_dir(self) -> Path:
        """Where the booted machine for this recipe and guest count is saved (TCG only);
        one booted with the user's own pieces has their key in its name."""
        own = self.prepared.machine_key()
        return self._images().dir / f"booted-tcg-{self.guest_count}{f'-own-{own}' if own else ''}"

    def restore(self) -> bool:
        """Start from the saved booted machine: dom0 and guests already up. False (and the
        saved machine deleted) if there is none or it does not come up."""
        snap = self.snapshot_dir()
        try:
            meta = json.loads((snap / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        if (
            meta.get("qemu") != qemu_version()
            or meta.get("fingerprint") != self._fingerprint()
            or self.machine.choose_accel() != "tcg"
        ):
            shutil.rmtree(snap, ignore_errors=True)
            return False
        self.say(f"restoring the booted machine saved in {snap} (no cold boot)")
        t0 = time.monotonic()
        try:
            self.dom0 = self.machine.resume_saved(snap)
            for guest in self._guests:
                guest.domid = self.toolstack.domid(guest)
                self.toolstack.wait_guest(guest, Deadline(120))
        except HarnessError as e:
            self.say(f"saved machine unusable ({str(e).splitlines()[0]}): booting cold")
            self._stop()
            self.machine.accel = None
            shutil.rmtree(snap, ignore_errors=True)
            return False
        # The saved machine's clocks stopped when it was saved: set them to now.
        for host in self.hosts().values():
            host.run(f"date -s @{time.time():.3f} >/dev/null", timeout=30)
        self.timings["restore_to_guests_ssh_s"] = round(time.monotonic() - t0, 1)
        return True

    def save_snapshot(self) -> None:
        """Save the freshly booted machine (dom0 + guests, before any deploy) for the next
        run; the logins are closed first and made again afterwards."""
        snap = self.snapshot_dir()
        tmp = snap.with_name(snap.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        self.say(f"saving the booted machine to {snap} for the next run")
        for host in self.hosts().values():
            host.close()
        try:
            meta = {"fingerprint": self._fingerprint(), "guests": self.describe()["guests"]}
            self.machine.save(tmp, meta)
            shutil.rmtree(snap, ignore_errors=True)
            tmp.rename(snap)
        except (HarnessError, OSError, ValueError) as e:
            self.say(f"could not save the booted machine: {e}")
            shutil.rmtree(tmp, ignore_errors=True)
        self.timings["save_snapshot_s"] = round(time.monotonic() - t0, 1)
        self.dom0 = self.machine.connect_dom0(Deadline(120))
        for guest in self._guests:
            self.toolstack.wait_guest(guest, Deadline(120))

    def _fingerprint(self) -> str:
        """What a saved machine must match beyond the recipe: the machine's shape and the
        guests' xl configurations (the toolstack's constants and the template)."""
        shape = [*self.machine.fingerprint_shape(), GUEST_MEMORY_MB, "provisioned"]
        if own := self.prepared.machine_key():  # the bundled machine's stays as it was
            shape.append(own)
        boot = self.toolstack.guest_boot
        configs = [xl_config(g, self._images(), boot) for g in self._guests]
        blob = json.dumps([shape, configs], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # -- xl: real domains, the vTPM's life beside the guest's --------------------------------
    def detach_vtpm(self, guest: XenGuest) -> None:
        """The toolstack removes the guest's vTPM (both xenstore directories), as
        ``xl vtpm-detach`` does; the frontend stops first, as the guest's kernel would."""
        self.stop_frontend(guest)
        assert guest.domid is not None
        self.session.detach_domain(guest.domid)

    def attach_vtpm(self, guest: XenGuest) -> float:
        """Attach the guest's vTPM instance to the running guest, as ``xl vtpm-attach``
        does; seconds until its TPM device is up."""
        self.connect_vtpm(guest)
        return self.wait_for_device(guest)

    def destroy(self, guest: XenGuest) -> None:
        """``xl destroy``: the domain is gone at once, no shutdown; the toolstack then
        removes its vTPM directories (the backend sees the frontend vanish first)."""
        self._forget_session(guest)
        self.toolstack.destroy(guest)

    def create(self, guest: XenGuest) -> None:
        """``xl create`` a destroyed guest again, then attach its vTPM (same instance)."""
        self.toolstack.create(guest)
        self.attach_vtpm(guest)

    def create_with_xl_vtpm(self, guest: Guest, vtpm_uuid: str) -> float:
        """``xl create`` a destroyed guest with ``vtpm = ["backend=0,uuid=..."]`` in its
        configuration: xl makes the vTPM itself, with no attach of ours, and the guest's
        driver binds it. Seconds from the guest's SSH to its TPM device."""
        self.require(Capability.XL_DEVICES)
        g: XenGuest = self._own(guest)
        self.toolstack.create(g, vtpm_uuid=vtpm_uuid)
        t0 = time.monotonic()
        self.frontend.bind(self.session, g)
        self.frontend.wait_for_device(g)
        return time.monotonic() - t0

    def _forget_session(self, guest: XenGuest) -> None:
        self.relays.release(guest.name)
        self.session.forget(guest)

    def reboot(self, guest: Guest) -> None:
        """``xl reboot``: the guest's kernel reboots, xl makes a new domain (new domid);
        the toolstack detaches the old domain's vTPM and attaches the same instance to
        the new one, whose frontend then brings the TPM device back."""
        self.require(Capability.REBOOT)
        g: XenGuest = self._own(guest)
        t0 = time.monotonic()
        self.stop_frontend(g)
        self._forget_session(g)
        old, down, up = self.toolstack.reboot(g)
        t2 = time.monotonic()
        self.attach_vtpm(g)
        t3 = time.monotonic()
        self.say(
            f"{g.name}: rebooted, domain {old} -> {g.domid} in {t3 - t0:.0f} s (down "
            f"{down:.0f} s, up to SSH {up:.0f} s, vTPM {t3 - t2:.0f} s)"
        )

    def save_restore(self, guest: XenGuest) -> float:
        """``xl save`` then ``xl restore``, as a host does to suspend or migrate a guest;
        seconds from the restored domain's unpause to its TPM device (the toolstack's
        ``save_and_restore`` says how the vTPM keeps its PCRs)."""
        self.require(Capability.SAVE_RESTORE)
        g: XenGuest = self._own(guest)
        self.stop_frontend(g)
        self._forget_session(g)
        old, saved = self.toolstack.save_and_restore(g)
        t1 = time.monotonic()
        self.toolstack.wait_guest(g, Deadline(GUEST_TIMEOUT))
        self.wait_for_device(g)
        waited = time.monotonic() - t1
        self.say(
            f"{g.name}: saved in {saved:.0f} s, restored as domain {g.domid} (was {old}); "
            f"{g.tpm_device} {waited:.1f} s after unpause"
        )
        return waited

    def power_cut_and_cold_boot(self) -> float:
        """Pull the plug, then power on: QEMU is SIGKILLed at once (no shutdown, no flush:
        whatever dom0 and the guests had not flushed to their disks is gone), the same
        disks (this run's qcow2 overlays, not the saved machine's RAM) boot cold, the
        guests are created again and the driver is started; each guest keeps its vTPM
        instance. Seconds from the cut to every guest's TPM device."""
        self.require(Capability.POWER_CUT)
        if self.machine.qemu is None or self.machine.qemu.config.overlays is None:
            raise TargetNotReady("qemu", "no running machine on qcow2 overlays to power off")
        t0 = time.monotonic()
        self.stop_watching()  # a planned death
        self._close_logins()  # they die with the machine
        self.dom0 = self.machine.power_cut_and_boot()
        self.start_guests()
        self.start_driver()
        self.watch_crashes()
        seconds = time.monotonic() - t0
        self.timings["power_cut_to_tpm_devices_s"] = round(seconds, 1)
        self.say(f"power cut: every guest's TPM device is back {seconds:.0f} s after the cut")
        return seconds

    # -- evidence and lifecycle ----------------------------------------------------------------
    def _collect_dom0(self) -> None:
        """dom0's dmesg and journal, xl dmesg, /var/log/xen and daemon logs -> artifacts."""
        self.session.collect(skip=self._crashed_guests)  # a crashed guest's login would hang

    def _stop(self) -> None:
        for endpoint in self._endpoints:
            endpoint.stop()
        self._endpoints.clear()
        self.relays.close()
        try:
            with contextlib.suppress(Exception):
                self._collect_dom0()
        finally:
            self._close_logins()
            self.stop_watching()
            self.machine.close()

    def start_endpoints(self) -> None:
        """A host-side socket per guest in front of its TPM device (``harness.endpoint``)."""
        qemu = self.machine.qemu
        assert qemu is not None
        for g in self._guests:
            self._endpoints.append(
                start_endpoint(
                    self.run_dir / f"{g.name}.tpm",
                    key=self._images().ssh_key,
                    port=qemu.config.ssh_port,
                    guest_ip=g.ip,
                    device=g.tpm_device,
                    name=g.name,
                    log_path=self.log_dir / f"endpoint-{g.name}.log",
                    die_with_parent=self.die_with_parent,
                )
            )

    def _detach(self) -> list[ProcessRecord]:
        endpoints = [p.detach() for p in self._endpoints]  # stopped first, then the machine
        self._endpoints.clear()
        self.relays.close()
        self.stop_watching()  # the environment is handed on; ``harness status`` scans it
        if self.machine.qemu is None:
            return []
        for host in self.hosts().values():
            host.close()
        record = self.machine.detach()
        return [*endpoints, *([record] if record is not None else [])]

    def _processes(self) -> list[ManagedProcess]:
        return self.machine.processes() + self._endpoints

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.name,
            **self.machine.describe(),
            "artifacts": str(self.artifacts),
            "timings": self.timings,
            "guests": [g.describe() for g in self._guests],
            "own_build": self.prepared.to_json(),
            "dom0_package": self.session.installed,  # version, sha256, file (artifacts)
        }

    def hostile_toolstack(self) -> HostileToolstack:
        """dom0's part for a rogue frontend (scenarios/test_hostile.py)."""
        from harness.targets.xen_hostile import XenHostileToolstack

        return XenHostileToolstack(self)


class XenKernelFrontendTarget(XenTarget):
    """``--target xen-kernel``: the same machine, but each guest's vTPM is bound by the
    guest kernel's own ``xen-tpmfront`` (protocol v2), with no software of ours in the
    guest: the backend serves an unmodified Linux guest. Its frontend part
    (:class:`~harness.targets.xen_frontends.KernelFrontend`) says what that allows."""

    name: ClassVar[str] = "xen-kernel"
    FRONTEND: ClassVar[type[Frontend]] = KernelFrontend
    CAPABILITIES: ClassVar[frozenset[str]] = capabilities(KernelFrontend)


class PatchedKernelFrontendTarget(XenKernelFrontendTarget):
    """``--target xen-kernel-tpm2``: stock guests whose ``xen-tpmfront`` carries the
    patch series of ``linux/xen-tpmfront/`` (:mod:`harness.patched_tpmfront`), built out of
    tree for the guests' kernel and loaded in place of theirs: the vTPM is a TPM 2.0
    chip to the guest kernel, and stays ``/dev/tpm0`` across ``xl save``/``restore``.
    A ``--tpmfront`` or ``--tpmfront-source`` of the user's replaces the patched one."""

    name: ClassVar[str] = "xen-kernel-tpm2"
    FRONTEND: ClassVar[type[Frontend]] = PatchedKernelFrontend
    CAPABILITIES: ClassVar[frozenset[str]] = capabilities(PatchedKernelFrontend)

    def use_own_build(self) -> None:
        if not (self.own_build.tpmfront or self.own_build.tpmfront_source):
            source = patched_tpmfront.source_dir(self._images().dir, self.say)
            self.own_build = dataclasses.replace(self.own_build, tpmfront_source=source)
        super().use_own_build()
