"""``--target xen``: Xen 4.17 and a Debian dom0 under QEMU, PV guests started with xl.

Bring-up walks off -> ready (STYLE.md 9), each step with its own deadline:

    images    harness.images.build_images (cached; cold build a few minutes)
    boot      QEMU (KVM tried once per host, else TCG -cpu qemu64), the serial console
              walked stage by stage (harness.console.DOM0_STAGES), failure patterns fatal
    dom0      SSH on the hostfwd port (harness.ssh)
    guests    ``xl create`` from ``images/guest.cfg.in``, then SSH to each guest through dom0
    deploy    (separate step, ``deploy()``) the xenvtpm package into dom0 and every guest

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
import platform
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from harness import accel_verdict, tpmwire
from harness.console import DOM0_STAGES, ConsoleFailure, SerialConsole, Stage
from harness.crash_watch import (
    DOM0_KERNEL_LOGS,
    GUEST_KERNEL_LOGS,
    ChannelSource,
    Crash,
    CrashWatch,
    FileSource,
    guest_console_command,
    new_crash_lines_check,
)
from harness.deadline import Deadline
from harness.endpoint import start_endpoint
from harness.errors import (
    DeviceRefused,
    HarnessError,
    LaunchFailure,
    ResetFailed,
    TargetNotReady,
)
from harness.images import ROOT, Images, build_images, cache_root
from harness.process import ManagedProcess, ProcessRecord
from harness.qemu import (
    ACCEL_ENV,
    Accel,
    MachineConfig,
    QemuMachine,
    free_port,
    kvm_usable,
    make_overlay,
    qemu_version,
)
from harness.relay_pool import RelayPool
from harness.ssh import SshHost
from harness.target import Capability, Component, Guest, HostileToolstack
from harness.targets import Progress, xen_driver
from harness.targets.base import BaseGuest, BaseTarget
from harness.targets.health import Check, failures
from harness.transport import RawTransport
from harness.transport_ssh import RelayTransport, open_relay
from harness.xenlogs import REMOTE_LOG_DIR, collect_logs

FIRST_INSTANCE = 1000
GUEST_MEMORY_MB = 384  # 3 guests + dom0's 1024 fit in QEMU's 3072
REMOTE_PACKAGE_DIR = "/opt/xenvtpm"  # PYTHONPATH for python3 -m xenvtpm in every domain
SNAPSHOT_ENV = "XENVTPM_SNAPSHOT"  # "0": always boot cold, never save a booted machine
BOOT_TIMEOUT = 360.0  # QEMU start -> dom0 SSH (23-33 s idle, 130 s on a busy host)
SAVE_DIR = "/var/lib/xenvtpm-saves"  # xl save images in dom0 (the guest's memory)
SAVE_TIMEOUT = 300.0
GUEST_TIMEOUT = 420.0  # xl create -> guest SSH (~40 s idle; 284 s seen on a loaded host)
XL_CREATE_TIMEOUT = 300.0  # xl create itself: seconds idle, over 90 s with three QEMUs
# harness.console.FAILURE_PATTERNS as one grep -E pattern, for a guest's console log.
GUEST_FAILURES = (
    r"Kernel panic - not syncing.*|You are in emergency mode|"
    r"Give root password for maintenance|\(initramfs\) |Failed to start .{0,24}xenvtpm-ne"
)
KVM_TRIAL: tuple[Stage, ...] = (
    Stage("xen hypervisor (kvm)", DOM0_STAGES[0].pattern, 15),
    Stage("dom0 kernel (kvm)", DOM0_STAGES[1].pattern, 20),
)


def artifacts_dir(target: str = "xen") -> Path:
    """``$XENVTPM_ARTIFACTS``, else ``artifacts/<target>/`` (one per kind of guest)."""
    explicit = os.environ.get("XENVTPM_ARTIFACTS")
    return Path(explicit) if explicit else ROOT / "artifacts" / target


def deploy_package(host: SshHost, package: Path = ROOT / "xenvtpm") -> None:
    """Replace ``/opt/xenvtpm/xenvtpm`` on ``host`` and check ``python3 -m xenvtpm`` runs."""
    host.run(f"rm -rf {REMOTE_PACKAGE_DIR}/xenvtpm", check=True)
    host.put(package, f"{REMOTE_PACKAGE_DIR}/xenvtpm")
    host.check(f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm --help >/dev/null")


class XenGuest(BaseGuest):
    """A PV guest: its xl name, domid, vTPM instance, link-local address and SSH."""

    target_name = "xen"
    kernel_device = True

    def __init__(self, index: int, target: XenTarget) -> None:
        self.index = index
        self.name = f"guest{index}"
        self.instance = FIRST_INSTANCE + index
        self.ip = f"169.254.1.{index + 1}"
        self.mac = f"00:16:3e:78:00:{index + 1:02x}"
        self.disk = f"/dev/vd{chr(ord('b') + index)}"  # QEMU drive index + 1
        self.domid: int | None = None
        self.target = target
        self.ssh: SshHost | None = None
        # The guest's TPM device: /dev/tpm0, unless its kernel numbered the chip anew
        # (xen-tpmfront after xl restore: the resumed chip is tpm1; see save_restore).
        self.tpm_device = "/dev/tpm0"
        self.max_command_size = target.MAX_COMMAND_SIZE

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

    def xl_config(self, images: Images) -> str:
        text = (ROOT / "images" / "guest.cfg.in").read_text()
        values = {
            "NAME": self.name,
            "KERNEL": images.dom0_kernel,
            "RAMDISK": images.dom0_initrd,
            "IP": self.ip,
            "MAC": self.mac,
            "DISK": self.disk,
            "MEMORY": str(GUEST_MEMORY_MB),
        }
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        return text

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


class XenTarget(BaseTarget):
    name: ClassVar[str] = "xen"
    MAX_COMMAND_SIZE: ClassVar[int] = 4096
    CAPABILITIES: ClassVar[frozenset[str]] = frozenset(
        {
            Capability.MULTI_GUEST,
            Capability.RESTART_FRONTEND,
            Capability.RESTART_BACKEND,
            Capability.RESTART_MANAGER,
            Capability.REBOOT,
            Capability.KILL_SWTPM,
            Capability.XEN_PROBE,
            Capability.VALIDATION,
            Capability.XL,
            Capability.SHARED_CLIENTS,
            Capability.KERNEL_TPM,
            Capability.DOM0_SHELL,
            Capability.POWER_CUT,
            Capability.CRASH_WATCH,
            Capability.TRAFFIC_TRACE,
        }
    )

    def __init__(
        self,
        guests: int,
        run_dir: Path | None = None,
        progress: Progress | None = None,
        detached: bool = False,
    ) -> None:
        if guests > 20:
            raise ValueError(f"at most 20 guests (one QEMU drive each), not {guests}")
        super().__init__(guests, run_dir, progress, detached)
        self.artifacts = artifacts_dir(self.name)
        self.images: Images | None = None
        self.machine: QemuMachine | None = None
        self.dom0: SshHost | None = None
        self._guests = [XenGuest(i, self) for i in range(guests)]
        self.accel: Accel | None = None
        self.console: SerialConsole | None = None
        self._boot_t0 = 0.0
        self._endpoints: list[ManagedProcess] = []  # harness up: one per guest
        self.timings: dict[str, float] = {}
        self._daemons: dict[str, dict[str, int]] = {}  # host name -> daemon name -> pid
        self.relays = RelayPool()  # each guest's /dev/tpm0 relay, kept between transports
        self.crash_watch: CrashWatch | None = None
        self._crashed_guests: set[str] = set()  # since this machine started
        self.crashes: list[Crash] = []  # every crash seen since the target started
        self.on_crash: Callable[[Crash], None] | None = None  # the fixtures' alarm

    @property
    def guests(self) -> Sequence[XenGuest]:
        return list(self._guests)

    # -- bring-up ------------------------------------------------------------------------
    def _start(self) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self.images = build_images(self.say)
        self.timings["images_s"] = round(time.monotonic() - t0, 1)
        # What this run boots, exactly: Xen's and the kernel's package versions, recipe.
        shutil.copy2(self.images.dir / "manifest.json", self.artifacts / "images-manifest.json")
        if not (self._snapshots() and self.restore()):
            self.boot()
            self.start_guests()
            self.provision()
            if self._snapshots() and self.accel == "tcg":
                self.save_snapshot()
        self.start_driver()
        self.watch_crashes()
        if not self.die_with_parent:  # harness up: sim's endpoints, a real guest behind
            self.start_endpoints()
        self.say(
            "xen target ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        )

    # -- crash watch: every console until teardown (harness/crash_watch.py) -----------------
    def watch_crashes(self) -> None:
        """Follow the serial console, each guest's console (through dom0) and QEMU."""
        self.stop_watching()
        self._crashed_guests.clear()
        machine, dom0 = self.machine, self._dom0()
        if machine is None:
            return
        sources: list[FileSource | ChannelSource] = [
            FileSource("serial console (Xen, dom0)", machine.config.console_log)
        ]
        sources += [
            ChannelSource(f"{g.name} console", dom0.stream(guest_console_command(g.name)))
            for g in self._guests
        ]

        def alive() -> str | None:
            return None if machine.alive else f"qemu (pid {machine.pid}) is gone"

        self.crash_watch = CrashWatch(sources, self._crash_seen, alive).start()
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
        """Where the booted machine for this recipe and guest count is saved (TCG only)."""
        assert self.images is not None
        return self.images.dir / f"booted-tcg-{self.guest_count}"

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
            or self.choose_accel() != "tcg"
        ):
            shutil.rmtree(snap, ignore_errors=True)
            return False
        (self.artifacts / "console.log").unlink(missing_ok=True)
        self.say(f"restoring the booted machine saved in {snap} (no cold boot)")
        t0 = time.monotonic()
        try:
            self.accel = "tcg"
            disks = [snap / "disks" / f"disk{i}.qcow2" for i in range(self.guest_count + 1)]
            self._launch("tcg", (), Deadline(15), backings=disks, incoming=snap / "state")
            assert self.machine is not None
            self.machine.wait_running(Deadline(180))
            self.timings["restore_state_s"] = round(time.monotonic() - t0, 1)
            self._connect_dom0(Deadline(120))
            for guest in self._guests:
                guest.domid = int(self._dom0().check(f"xl domid {guest.name}").strip())
                self.wait_guest(guest, Deadline(120))
        except HarnessError as e:
            self.say(f"saved machine unusable ({str(e).splitlines()[0]}): booting cold")
            self._stop()
            self.accel = None
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
        assert self.machine is not None
        snap = self.snapshot_dir()
        tmp = snap.with_name(snap.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        self.say(f"saving the booted machine to {snap} for the next run")
        for host in self.hosts().values():
            host.close()
        try:
            self.machine.save_state(tmp / "state", tmp / "disks", Deadline(300))
            (tmp / "meta.json").write_text(
                json.dumps(
                    {
                        "qemu": qemu_version(),
                        "fingerprint": self._fingerprint(),
                        "guests": self.describe()["guests"],
                    }
                )
            )
            shutil.rmtree(snap, ignore_errors=True)
            tmp.rename(snap)
        except (HarnessError, OSError, ValueError) as e:
            self.say(f"could not save the booted machine: {e}")
            shutil.rmtree(tmp, ignore_errors=True)
        self.timings["save_snapshot_s"] = round(time.monotonic() - t0, 1)
        self._connect_dom0(Deadline(120))
        for guest in self._guests:
            self.wait_guest(guest, Deadline(120))

    def _fingerprint(self) -> str:
        """What a saved machine must match beyond the recipe: the machine's shape and the
        guests' xl configurations (this module's constants and the template)."""
        assert self.images is not None
        m = MachineConfig
        shape = [m.memory_mb, m.cpus, m.xen_args, m.dom0_args, GUEST_MEMORY_MB, "provisioned"]
        configs = [g.xl_config(self.images) for g in self._guests]
        blob = json.dumps([shape, configs], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def dom0_run(self, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
        """Run ``command`` as root in dom0: (exit code, stdout, stderr). For scenarios
        that need dom0 itself, e.g. a baseline swtpm behind dom0's own vTPM proxy."""
        self.require(Capability.DOM0_SHELL)
        return self._dom0().run(command, timeout)

    def tpm_trace(self, guest: Guest) -> list[str]:
        """The backend's traffic trace of ``guest``'s vTPM, as lines (one SSH command)."""
        _, out, _ = self._dom0().run(xen_driver.trace_command(guest.instance), timeout=30)
        return out.splitlines()

    def _dom0(self) -> SshHost:
        if self.dom0 is None:
            raise TargetNotReady("dom0", "not booted")
        return self.dom0

    def _accel_record(self) -> Path:
        return cache_root() / "accel.json"

    def choose_accel(self) -> Accel:
        """KVM unless a recent trial on this host showed it cannot run Xen
        (:mod:`harness.accel_verdict`); ``$XENVTPM_ACCEL`` overrides."""
        return accel_verdict.choose(
            accel_verdict.read_verdict(self._accel_record()),
            self._host_key(),
            forced=os.environ.get(ACCEL_ENV, "auto"),
            kvm_usable=kvm_usable(),
        )

    def _host_key(self) -> str:
        return f"{platform.release()} | {qemu_version()}"

    def _remember_accel(self, kvm_runs_xen: bool, why: str) -> None:
        verdict = accel_verdict.AccelVerdict.now(self._host_key(), kvm_runs_xen, why)
        accel_verdict.write_verdict(self._accel_record(), verdict)

    def _machine_config(
        self, accel: Accel, backings: Sequence[Path] | None = None, incoming: Path | None = None
    ) -> MachineConfig:
        """Drives are qcow2 overlays in the run directory over the images (cold boot) or
        over a saved machine's disks (``backings``, with its ``incoming`` state)."""
        assert self.images is not None
        if backings is None:
            backings = [self.images.dom0, *[self.images.guest] * self.guest_count]
        overlays = []
        for i, backing in enumerate(backings):
            overlay = self.run_dir / f"disk{i}.qcow2"
            overlay.unlink(missing_ok=True)
            make_overlay(backing, overlay)
            overlays.append(overlay)
        return MachineConfig(
            xen=self.images.xen,
            kernel=self.images.kernel,
            initrd=self.images.initrd,
            dom0_disk=self.images.dom0,
            guest_disks=[self.images.guest] * self.guest_count,
            run_dir=self.run_dir,
            console_log=self.artifacts / "console.log",
            accel=accel,
            overlays=overlays,
            incoming=incoming,
        )

    def boot(self) -> None:
        """QEMU -> Xen -> dom0 -> dom0 SSH; KVM falls back to TCG at its first failure."""
        console_log = self.artifacts / "console.log"
        console_log.unlink(missing_ok=True)
        accel = self.choose_accel()
        if accel == "kvm":
            self.say("trying KVM (once per host; falls back to TCG -cpu qemu64)")
            try:
                self._launch("kvm", KVM_TRIAL, Deadline(45))
                self._remember_accel(True, "Xen and dom0 booted")
            except (ConsoleFailure, TargetNotReady, LaunchFailure) as e:
                why = str(e).splitlines()[0]
                self.say(f"KVM cannot boot Xen here ({why}): falling back to TCG -cpu qemu64")
                self._remember_accel(False, why)
                self._close_machine()
                accel = "tcg"
            else:
                self.accel = "kvm"
        if self.accel is None:
            self.say("accelerator: TCG -cpu qemu64 (KVM " + (
                "disabled by " + ACCEL_ENV if os.environ.get(ACCEL_ENV) == "tcg"
                else "unusable for Xen on this host" if kvm_usable() else "unavailable"
            ) + ")")  # fmt: skip
            self._launch("tcg", (), Deadline(15))
            self.accel = "tcg"
        self._wait_dom0(Deadline(BOOT_TIMEOUT))

    def _launch(
        self,
        accel: Accel,
        stages: Sequence[Stage],
        deadline: Deadline,
        backings: Sequence[Path] | None = None,
        incoming: Path | None = None,
    ) -> None:
        config = self._machine_config(accel, backings, incoming)
        self.machine = QemuMachine(config, die_with_parent=self.die_with_parent)
        self._boot_t0 = time.monotonic()
        self.machine.start()
        self.say(
            f"qemu pid {self.machine.pid} ({accel}), dom0 ssh on 127.0.0.1:{config.ssh_port}, "
            f"console {config.console_socket}"
        )
        self.console = SerialConsole(config.console_socket, config.console_log, "dom0 console")
        self.console.start()
        if stages:
            self.console.walk(stages, deadline, self.say)

    def _wait_dom0(self, deadline: Deadline) -> None:
        console = self.console
        assert console is not None
        # The KVM trial has already walked the first two stages.
        stages = DOM0_STAGES if self.accel == "tcg" else DOM0_STAGES[len(KVM_TRIAL) :]
        seen = console.walk(stages, deadline, self.say)
        self.timings.update({f"{k}_s": v for k, v in seen.items()})
        self._connect_dom0(deadline)

    def _connect_dom0(self, deadline: Deadline) -> None:
        """SSH to dom0 while the console is watched for failures, then let go of it."""
        assert self.machine is not None and self.images is not None
        machine, console = self.machine, self.console

        def alive() -> None:
            if not machine.alive:
                raise machine.failure("exited while dom0 was booting")
            if console is not None:
                console.poll_failures()

        self.dom0 = SshHost("dom0", "127.0.0.1", machine.config.ssh_port, self.images.ssh_key)
        try:
            self.dom0.connect(deadline, alive=alive)
        finally:
            if console is not None:
                console.close()  # an unread console socket would stall the serial port
        self.timings.setdefault("qemu_to_dom0_ssh_s", round(time.monotonic() - self._boot_t0, 1))
        self.say(f"dom0 ssh up {self.timings['qemu_to_dom0_ssh_s']:.1f} s after QEMU start")
        self.dom0.run(f"mkdir -p {REMOTE_LOG_DIR}", check=True)

    def start_guests(self) -> None:
        """``xl create`` every guest, then wait for each one's SSH (they boot in parallel)."""
        assert self.dom0 is not None and self.images is not None
        t0 = time.monotonic()
        for guest in self._guests:
            self.create_guest(guest)
        for guest in self._guests:
            self.wait_guest(guest, Deadline(GUEST_TIMEOUT))
        self.timings["xl_create_to_guest_ssh_s"] = round(time.monotonic() - t0, 1)

    def create_guest(self, guest: XenGuest) -> None:
        assert self.dom0 is not None and self.images is not None
        cfg = f"/etc/xen/{guest.name}.cfg"
        self.dom0.run(f"cat > {cfg}", stdin=guest.xl_config(self.images).encode(), check=True)
        rc, out, err = self.dom0.run(f"xl create {cfg}", timeout=XL_CREATE_TIMEOUT)
        if rc != 0 and "because of timeout" in err:
            # xl's hotplug scripts (vif-bridge) have a fixed time budget that a loaded
            # TCG dom0 can exceed; xl has destroyed the half-made domain: once more.
            self.say(f"{guest.name}: xl create: a hotplug script timed out; trying once more")
            self.dom0.run(f"xl destroy {guest.name}", timeout=60)
            rc, out, err = self.dom0.run(f"xl create {cfg}", timeout=XL_CREATE_TIMEOUT)
        if rc != 0:
            self._collect_dom0()
            raise TargetNotReady(
                f"guest {guest.name}",
                f"xl create {cfg} exited {rc}:\n{out}{err}",
                {"xl logs": self.artifacts / "var-log-xen"},
            )
        guest.domid = int(self.dom0.check(f"xl domid {guest.name}").strip())
        self.say(f"{guest.name}: xl create -> domain {guest.domid}, link {guest.ip}")

    def wait_guest(self, guest: XenGuest, deadline: Deadline) -> None:
        """SSH to the guest through dom0; meanwhile its console log (xenconsoled's, in
        dom0) is checked for failure patterns and ``xl`` for the domain being gone."""
        assert self.dom0 is not None and self.images is not None
        dom0 = self.dom0
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
                    f"guest {guest.name}", "its domain is gone (crashed?)", self.logs()
                )
            _, seen, _ = dom0.run(
                f"grep -aEo {shlex.quote(GUEST_FAILURES)} {console} | head -1", timeout=30
            )
            if seen.strip():
                raise ConsoleFailure(f"{guest.name} console", "failure", seen.encode(), None)

        guest.ssh = SshHost(guest.name, guest.ip, 22, self.images.ssh_key, via=dom0)
        try:
            guest.ssh.connect(deadline, alive=alive)
        except (TargetNotReady, ConsoleFailure):
            self._collect_dom0()
            raise
        self.say(f"{guest.name}: ssh up (waited {time.monotonic() - t0:.1f} s)")

    # -- deploy (coordinated with the driver work) -----------------------------------------
    def hosts(self) -> dict[str, SshHost]:
        """dom0 and every booted guest, by name."""
        out: dict[str, SshHost] = {}
        if self.dom0 is not None and self.dom0.connected:
            out["dom0"] = self.dom0
        for g in self._guests:
            if g.ssh is not None and g.ssh.connected:
                out[g.name] = g.ssh
        return out

    def deploy(self, package: Path = ROOT / "xenvtpm") -> None:
        """Copy the driver package into dom0 and every guest (``/opt/xenvtpm``) and check
        that ``python3 -m xenvtpm`` runs there, every host at once. Starting the daemons
        is ``start_daemon``."""
        t0 = time.monotonic()
        hosts = self.hosts()
        with ThreadPoolExecutor(len(hosts) or 1) as pool:
            list(pool.map(lambda host: deploy_package(host, package), hosts.values()))
        self.say(f"deployed {package.name}/ to {', '.join(hosts)} in {time.monotonic() - t0:.1f} s")

    def provision(self) -> None:
        """Make every guest's vTPM instance in dom0 now (``python3 -m xenvtpm provision``:
        swtpm_setup, 20-30 s each in TCG, all at once), so that a saved booted machine
        carries them and a warm start only starts swtpm."""
        dom0 = self._dom0()
        t0 = time.monotonic()
        deploy_package(dom0)
        instances = " ".join(str(g.instance) for g in self._guests)
        dom0.check(
            f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm provision "
            f"--state-root {xen_driver.STATE_ROOT} {instances}",
            timeout=600,
        )
        self.timings["provision_s"] = round(time.monotonic() - t0, 1)
        self.say(f"made the guests' vTPM instances in dom0 in {self.timings['provision_s']} s")

    def start_driver(self) -> None:
        """Deploy the current driver pair and bring up every guest's /dev/tpm0."""
        assert self.dom0 is not None
        t0 = time.monotonic()
        self.deploy()
        xen_driver.start_dom0(self.dom0, self.start_daemon)
        for guest in self._guests:
            self.connect_vtpm(guest)
        for guest in self._guests:
            waited = self.wait_for_device(guest)
            self.say(f"{guest.name}: /dev/tpm0 up {waited:.1f} s after its frontend started")
        self.timings["driver_to_tpm0_s"] = round(time.monotonic() - t0, 1)

    def start_daemon(self, host: xen_driver.Host, name: str, args: str) -> int:
        """Start ``python3 -m xenvtpm ARGS`` in the background on ``host``; its pid.

        It logs to ``/var/log/xenvtpm/NAME.log`` there (fetched into artifacts on close).
        """
        log = f"{REMOTE_LOG_DIR}/{name}.log"
        command = (
            f"mkdir -p {REMOTE_LOG_DIR}; cd {REMOTE_PACKAGE_DIR} || exit 1; "
            f"setsid nohup python3 -m xenvtpm {args} >>{log} 2>&1 </dev/null & echo $!"
        )
        pid = int(host.check(command).strip())
        self._daemons.setdefault(host.name, {})[name] = pid
        return pid

    def stop_daemon(self, host: xen_driver.Host, name: str) -> None:
        """Stop a daemon ``start_daemon`` started on ``host`` (SIGTERM, then SIGKILL)."""
        pid = self._daemons.get(host.name, {}).pop(name, None)
        if pid is not None:
            xen_driver.stop_daemon(host, f"{name} on {host.name}", pid)

    # -- disturbing the driver (capabilities) ------------------------------------------------
    def problems(self) -> list[str]:
        """What ``health_checks`` finds broken: one command per host, all hosts at once."""
        if not self._started:
            return []
        return [
            f"{check.problem}\n{evidence}" if evidence else check.problem
            for check, evidence in failures(self.hosts(), self.health_checks())
        ]

    def health_checks(self) -> list[Check]:
        """Every daemon this target started runs."""
        return [
            Check(
                name,
                f"kill -0 {pid}",
                f"{daemon} in {name} exited; log {REMOTE_LOG_DIR}/{daemon}.log there "
                f"(fetched into {self.artifacts} on close)",
            )
            for name, daemons in self._daemons.items()
            for daemon, pid in daemons.items()
        ]

    def kernel_log_problems(self) -> list[str]:
        """Crash lines new since the last call in dom0's dmesg, ``xl dmesg`` and the
        guests' console logs, and in each guest's dmesg (at every log level, also those
        below the consoles' level that the watch cannot see); one command per host, all
        at once. Not in the per-test health check: under TCG it cost 2.4 s per test
        (test_errors' mean went from 1.0 to 3.4 s), so the fixtures run it after a
        failed test, for its evidence."""
        if self.dom0 is None:  # not up (called from _start too, before it has finished)
            return []
        checks = [
            Check(
                "dom0",
                new_crash_lines_check(DOM0_KERNEL_LOGS),
                "new crash lines in dom0's kernel logs (dmesg, xl dmesg, the guests' consoles):",
            )
        ]
        checks += [
            Check(
                g.name,
                new_crash_lines_check(GUEST_KERNEL_LOGS),
                f"new crash lines in {g.name}'s dmesg:",
            )
            for g in self._guests
        ]
        return [f"{c.problem}\n{evidence}" for c, evidence in failures(self.hosts(), checks)]

    def restart(self, component: Component) -> None:
        """Stop and start one component, then wait until every guest is served again."""
        self.require(f"restart-{component}")
        dom0 = self._dom0()
        if component == "frontend":
            for guest in self._guests:
                self.stop_frontend(guest)
                self.start_frontend(guest)
            for guest in self._guests:
                self.wait_for_device(guest)
        elif component == "backend":
            self.stop_daemon(dom0, "backend")
            self.start_daemon(dom0, "backend", xen_driver.backend_args())
        elif component == "manager":
            self.stop_daemon(dom0, "manager")
            dom0.check(f"rm -f {xen_driver.MANAGER_SOCKET}")
            self.start_daemon(dom0, "manager", xen_driver.manager_args())
            xen_driver.wait_for_manager(dom0)  # a command sent before would outlast the
            # guest kernel's budget (ETIME) instead of getting TPM_RC_FAILURE
        else:
            raise ValueError(f"unknown component {component!r}")
        deadline = Deadline(xen_driver.DEVICE_TIMEOUT)
        for guest in self._guests:
            assert guest.domid is not None
            xen_driver.wait_connected(dom0, guest.domid, deadline)
        if component == "manager":
            self._wait_served(deadline)
        self.say(f"restarted the {component}")

    def _wait_served(self, deadline: Deadline) -> None:
        """Until each guest's vTPM answers a GetRandom. A restarted manager starts each
        swtpm again (its volatile state restored) at the first command, which under TCG
        can outlast the guest kernel's 750 ms for a scenario's Startup: ETIME, seen in
        CI (test_pcrs_kept_on_driver_restart[manager]). GetRandom changes no PCR, no
        resetCount, nothing a scenario reads. A guest whose device a scenario holds
        open across the restart (EBUSY) is left to that scenario."""
        for guest in self._guests:
            while True:
                try:
                    with guest.transport() as t:
                        t.transmit(tpmwire.get_random(8), timeout=60)
                    break
                except DeviceRefused as e:
                    if e.errno_name == "EBUSY":  # a scenario holds the device across the
                        break  # restart: its own first command waits for the instance
                    if deadline.expired:  # ETIME: the instance is still starting
                        raise TargetNotReady(guest.name, f"vTPM not served: {e}") from e
                    time.sleep(0.5)

    def reboot(self, guest: Guest) -> None:
        """``xl reboot``: the guest's kernel reboots, xl makes a new domain (new domid);
        the toolstack detaches the old domain's vTPM and attaches the same instance to
        the new one, whose frontend then brings /dev/tpm0 back."""
        self.require(Capability.REBOOT)
        g: XenGuest = self._own(guest)
        dom0 = self._dom0()
        old = g.domid
        t0 = time.monotonic()
        self.stop_frontend(g)
        self._forget_session(g)
        dom0.check(f"xl reboot {g.name}", timeout=60)
        deadline = Deadline(GUEST_TIMEOUT)
        while True:
            rc, out, _ = dom0.run(f"xl domid {g.name}", timeout=30)
            if rc == 0 and out.strip().isdigit() and int(out) != old:
                g.domid = int(out)
                break
            if deadline.expired:
                raise TargetNotReady(g.name, f"no new domain {GUEST_TIMEOUT:.0f} s after xl reboot")
            time.sleep(1.0)
        assert old is not None
        t1 = time.monotonic()
        with ThreadPoolExecutor(1) as pool:  # the old domain's vTPM goes while the new boots
            detached = pool.submit(self._detach_domain, old)
            self.wait_guest(g, deadline)
            detached.result()
        t2 = time.monotonic()
        self.connect_vtpm(g)
        self.wait_for_device(g)
        t3 = time.monotonic()
        self.say(
            f"{g.name}: rebooted, domain {old} -> {g.domid} in {t3 - t0:.0f} s (down "
            f"{t1 - t0:.0f} s, up to SSH {t2 - t1:.0f} s, vTPM {t3 - t2:.0f} s)"
        )

    def save_restore(self, guest: XenGuest) -> float:
        """``xl save`` then ``xl restore``, as a host does to suspend or migrate a guest;
        seconds from the restored domain's unpause to its TPM device.

        The toolstack writes the vTPM's directories for the new domain while it is still
        paused (``xl restore -p``), as xl does for its own devices, so that the guest's
        kernel finds its device on resume (xen-tpmfront re-probes it: tpmfront_resume).
        They say ``resume = 1``: the same boot goes on, so the vTPM keeps its PCRs."""
        self.require(Capability.SAVE_RESTORE)
        g: XenGuest = self._own(guest)
        dom0 = self._dom0()
        old = g.domid
        assert old is not None
        image = f"{SAVE_DIR}/{g.name}.xlsave"
        t0 = time.monotonic()
        self.stop_frontend(g)
        self._forget_session(g)
        dom0.check(f"mkdir -p {SAVE_DIR} && xl save {g.name} {image}", timeout=SAVE_TIMEOUT)
        saved = time.monotonic() - t0
        self._detach_domain(old)
        try:
            dom0.check(f"xl restore -p {image}", timeout=SAVE_TIMEOUT)
        finally:
            dom0.run(f"rm -f {image}")
        g.domid = int(dom0.check(f"xl domid {g.name}").strip())
        vtpm = xen_driver.GuestVtpm(g.name, g.domid, g.instance)
        dom0.check(xen_driver.attach_command(vtpm, REMOTE_PACKAGE_DIR, resumed=True))
        dom0.check(f"xl unpause {g.name}")
        t1 = time.monotonic()
        self.wait_guest(g, Deadline(GUEST_TIMEOUT))
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
        machine = self.machine
        if machine is None or machine.config.overlays is None:
            raise TargetNotReady("qemu", "no running machine on qcow2 overlays to power off")
        config = dataclasses.replace(machine.config, incoming=None, ssh_port=free_port())
        t0, pid = time.monotonic(), machine.pid
        self.stop_watching()  # a planned death
        machine.power_cut()
        self.machine = None
        self.say(f"power cut: qemu {pid} killed; booting its disks cold")
        self.relays.close()  # their logins died with the machine
        self._daemons.clear()
        for host in [self.dom0, *(g.ssh for g in self._guests)]:
            if host is not None:
                host.close()
        self.dom0 = None
        for g in self._guests:
            g.ssh, g.domid = None, None
        self.machine = QemuMachine(config, die_with_parent=self.die_with_parent)
        self._boot_t0 = time.monotonic()
        self.machine.start()
        self.console = SerialConsole(config.console_socket, config.console_log, "dom0 console")
        self.console.start()
        first_boot = self.timings.pop("qemu_to_dom0_ssh_s", None)  # this boot's, in _wait_dom0
        self._wait_dom0(Deadline(BOOT_TIMEOUT))
        self.timings["cold_boot_to_dom0_ssh_s"] = self.timings.pop("qemu_to_dom0_ssh_s")
        if first_boot is not None:
            self.timings["qemu_to_dom0_ssh_s"] = first_boot
        self.start_guests()
        self.start_driver()
        self.watch_crashes()
        seconds = time.monotonic() - t0
        self.timings["power_cut_to_tpm_devices_s"] = round(seconds, 1)
        self.say(f"power cut: every guest's TPM device is back {seconds:.0f} s after the cut")
        return seconds

    def connect_vtpm(self, guest: XenGuest) -> None:
        """Toolstack entries for the guest's vTPM in dom0, then its frontend: ours
        (``frontend --device``, through tpm_vtpm_proxy); ``/dev/tpm0`` follows."""
        assert guest.domid is not None
        vtpm = xen_driver.GuestVtpm(guest.name, guest.domid, guest.instance)
        xen_driver.attach_guest(
            self._dom0(), guest.host(), vtpm, REMOTE_PACKAGE_DIR, self.start_daemon
        )

    # -- xl: real domains, the vTPM's life beside the guest's --------------------------------
    def stop_frontend(self, guest: XenGuest) -> None:
        self.relays.release(guest.name)  # the device goes: nothing may hold it open
        self.stop_daemon(guest.host(), "frontend")

    def start_frontend(self, guest: XenGuest) -> None:
        """Start the guest's frontend; ``/dev/tpm0`` follows (``wait_for_device``)."""
        self.start_daemon(guest.host(), "frontend", "frontend --device")

    def wait_for_device(self, guest: XenGuest) -> float:
        """Seconds until the guest's TPM device exists (``guest.tpm_device``)."""
        return xen_driver.wait_for_device(guest.host(), guest.name, device=guest.tpm_device)

    def detach_vtpm(self, guest: XenGuest) -> None:
        """The toolstack removes the guest's vTPM (both xenstore directories), as
        ``xl vtpm-detach`` does; the frontend stops first, as the guest's kernel would."""
        self.stop_frontend(guest)
        assert guest.domid is not None
        self._detach_domain(guest.domid)

    def attach_vtpm(self, guest: XenGuest) -> float:
        """Attach the guest's vTPM instance to the running guest, as ``xl vtpm-attach``
        does; seconds until its /dev/tpm0 is up."""
        self.connect_vtpm(guest)
        return self.wait_for_device(guest)

    def destroy(self, guest: XenGuest) -> None:
        """``xl destroy``: the domain is gone at once, no shutdown; the toolstack then
        removes its vTPM directories (the backend sees the frontend vanish first)."""
        assert guest.domid is not None
        self._forget_session(guest)
        self._dom0().check(f"xl destroy {guest.name}", timeout=60)
        self._detach_domain(guest.domid)
        guest.domid = None

    def _forget_session(self, guest: XenGuest) -> None:
        """The guest's daemons and login end with its domain: drop our handles."""
        self.relays.release(guest.name)
        self._daemons.pop(guest.name, None)
        if guest.ssh is not None:
            guest.ssh.close()
            guest.ssh = None

    def _detach_domain(self, domid: int) -> None:
        """The toolstack's ``detach`` in dom0: both vTPM directories of ``domid`` go."""
        self._dom0().check(f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm detach --domid {domid}")

    def create(self, guest: XenGuest) -> None:
        """``xl create`` a destroyed guest again, then attach its vTPM (same instance)."""
        self.create_guest(guest)
        self.wait_guest(guest, Deadline(GUEST_TIMEOUT))
        self.attach_vtpm(guest)

    def backend_resources(self) -> dict[str, int]:
        """What dom0's backend holds now: grant mappings (gntdev areas in its address
        space), event channels bound by dom0's userspace, its fds and threads."""
        pid = self._daemons.get("dom0", {}).get("backend")
        if pid is None:
            raise TargetNotReady("backend", "not started by this target")
        out = self._dom0().check(
            f"grep -c /dev/xen/gntdev /proc/{pid}/maps; "
            "grep -c evtchn:python3 /proc/interrupts; "
            f"ls /proc/{pid}/fd | wc -l; ls /proc/{pid}/task | wc -l"
        )
        mappings, ports, fds, threads = (int(x) for x in out.split())
        return {"mappings": mappings, "ports": ports, "fds": fds, "threads": threads}

    def manager_status_line(self) -> str:
        """dom0's manager's status line (SIGUSR1): each instance's queue, in-flight and
        peak; read it with :func:`xenvtpm.manager.manager.status_counts`."""
        pid = self._daemons.get("dom0", {}).get("manager")
        if pid is None:
            raise TargetNotReady("manager", "not started by this target")
        log = f"{REMOTE_LOG_DIR}/manager.log"
        line: str = self._dom0().check(
            f"n=$(grep -c ' status: ' {log}); kill -USR1 {pid}; "
            f"for i in $(seq 50); do [ $(grep -c ' status: ' {log}) -gt $n ] && break; "
            f"sleep 0.2; done; grep ' status: ' {log} | tail -n 1"
        )
        return line.strip()

    def swtpm_pid(self, guest: Guest) -> int | None:
        self.require(Capability.KILL_SWTPM)
        return xen_driver.swtpm_pid(self._dom0(), self._own(guest).instance)

    def kill_swtpm(self, guest: Guest) -> None:
        """SIGKILL the guest's swtpm in dom0; restarting it is the manager's job."""
        self.require(Capability.KILL_SWTPM)
        pid = self.swtpm_pid(guest)
        if pid is None:
            raise TargetNotReady(f"swtpm of {guest.name}", "no such process", self.logs())
        self._dom0().check(f"kill -KILL {pid}")
        Deadline(10.0).wait_for(lambda: self.swtpm_pid(guest) != pid, f"swtpm {pid} to die")

    def reset_vtpm(self, guest: Guest) -> None:
        """The operator's reset of the guest's instance, in dom0: ends its failure mode."""
        self.require(Capability.KILL_SWTPM)
        instance = self._own(guest).instance
        rc, out, err = self._dom0().run(
            f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm reset "
            f"--manager {xen_driver.MANAGER_SOCKET} {instance}",
            timeout=120,
        )
        if rc != 0:
            raise ResetFailed(instance, err or out)

    def _send_signal(self, pid: int, signal_name: str) -> None:
        self._dom0().check(f"kill -{signal_name} {pid}")  # swtpm runs in dom0

    def probe(self, guest: XenGuest, *args: str) -> dict[str, Any]:
        """``python3 -m xenvtpm probe ARGS`` inside ``guest`` (as its domain); its JSON."""
        self.require(Capability.XEN_PROBE)
        command = f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm probe " + shlex.join(args)
        rc, out, err = guest.run(command)
        if rc != 0:
            raise TargetNotReady(guest.name, f"probe {shlex.join(args)} exited {rc}: {err}")
        answer: dict[str, Any] = json.loads(out)
        return answer

    # -- evidence ------------------------------------------------------------------------
    def _collect_dom0(self) -> None:
        """dom0's dmesg and journal, xl dmesg, /var/log/xen and daemon logs -> artifacts."""
        if self.dom0 is not None and self.dom0.connected:
            guests = {
                g.name: g.ssh
                for g in self._guests
                if g.ssh is not None and g.name not in self._crashed_guests  # would time out
            }
            collect_logs(self.dom0, guests, self.artifacts)

    # -- lifecycle -------------------------------------------------------------------------
    def _close_machine(self) -> None:
        self.stop_watching()
        if self.console is not None:
            self.console.close()
            self.console = None
        if self.machine is not None:
            self.machine.close()
            self.machine = None

    def _stop(self) -> None:
        for endpoint in self._endpoints:
            endpoint.stop()
        self._endpoints.clear()
        self.relays.close()
        try:
            with contextlib.suppress(Exception):
                self._collect_dom0()
        finally:
            self._daemons.clear()
            for g in self._guests:
                if g.ssh is not None:
                    g.ssh.close()
                    g.ssh = None
                g.domid = None
            if self.dom0 is not None:
                self.dom0.close()
                self.dom0 = None
            self._close_machine()

    def start_endpoints(self) -> None:
        """A host-side socket per guest in front of its TPM device (``harness.endpoint``)."""
        assert self.machine is not None and self.images is not None
        for g in self._guests:
            self._endpoints.append(
                start_endpoint(
                    self.run_dir / f"{g.name}.tpm", key=self.images.ssh_key,
                    port=self.machine.config.ssh_port, guest_ip=g.ip, device=g.tpm_device,
                    name=g.name, log_path=self.log_dir / f"endpoint-{g.name}.log",
                    die_with_parent=self.die_with_parent,
                )
            )  # fmt: skip

    def _detach(self) -> list[ProcessRecord]:
        endpoints = [p.detach() for p in self._endpoints]  # stopped first, then the machine
        self._endpoints.clear()
        self.relays.close()
        self.stop_watching()  # the environment is handed on; ``harness status`` scans it
        if self.machine is None:
            return []
        for g in self._guests:
            if g.ssh is not None:
                g.ssh.close()
        if self.dom0 is not None:
            self.dom0.close()
        record = self.machine.detach()
        self.machine = None
        return [*endpoints, record]

    def _processes(self) -> list[ManagedProcess]:
        proc = self.machine._proc if self.machine is not None else None
        return ([proc] if proc is not None else []) + self._endpoints

    def logs(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.artifacts.glob("*.log"))} | super().logs()

    def describe(self) -> dict[str, Any]:
        machine = self.machine
        images = self.images
        return {
            "target": self.name,
            "accel": self.accel,
            "ssh": {
                "host": "127.0.0.1",
                "port": machine.config.ssh_port if machine else None,
                "key": str(images.ssh_key) if images else None,
                "user": "root",
            },
            "console": str(machine.config.console_socket) if machine else None,
            "artifacts": str(self.artifacts),
            "timings": self.timings,
            "guests": [g.describe() for g in self._guests],
        }

    def hostile_toolstack(self) -> HostileToolstack:
        """dom0's part for a rogue frontend (scenarios/test_hostile.py)."""
        from harness.targets.xen_hostile import XenHostileToolstack

        return XenHostileToolstack(self)


class XenKernelFrontendTarget(XenTarget):
    """``--target xen-kernel``: the same machine, but each guest's vTPM is bound by the
    guest kernel's own ``xen-tpmfront`` (protocol v2, issue 7), with no software of ours
    in the guest: the backend serves an unmodified Linux guest.

    What the stock driver allows decides the capabilities (docs/xen-under-qemu.md):

    - xen-tpmfront never probes for TPM 2.0, so its kernel registers the chip as TPM
      1.2: ``/dev/tpm0`` passes TPM 2.0 commands through, but there is no
      ``/dev/tpmrm0``, hence no shared clients;
    - it unregisters its device for good when the backend closes, and cannot reconnect
      after an unbind, so restarts of the backend or the frontend are left out (and with
      them the xl scenarios, which stop and start the frontend);
    - reboots work (a new domain probes afresh), and so do ``xl save`` / ``xl restore``,
      which only this kind of guest can survive: the kernel re-probes on resume.
    """

    name: ClassVar[str] = "xen-kernel"
    # xen-tpmfront grants no extra pages, and its one page starts with the 8-byte
    # vtpm_shared_page header: vtpm_send refuses a longer command (EINVAL).
    MAX_COMMAND_SIZE: ClassVar[int] = 4096 - 8
    CAPABILITIES: ClassVar[frozenset[str]] = (
        XenTarget.CAPABILITIES
        - {
            Capability.RESTART_FRONTEND,
            Capability.RESTART_BACKEND,
            Capability.XL,
            Capability.SHARED_CLIENTS,
        }
    ) | {Capability.SAVE_RESTORE}

    def connect_vtpm(self, guest: XenGuest) -> None:
        """Toolstack entries in dom0, then ``modprobe xen-tpmfront`` in the guest (the
        image blacklists its automatic loading, so that our frontend can own the device
        in ``--target xen``)."""
        assert guest.domid is not None
        vtpm = xen_driver.GuestVtpm(guest.name, guest.domid, guest.instance)
        self._dom0().check(xen_driver.attach_command(vtpm, REMOTE_PACKAGE_DIR))
        guest.host().check("modprobe xen-tpmfront")

    def wait_for_device(self, guest: XenGuest) -> float:
        """Seconds until xen-tpmfront's chip exists; ``guest.tpm_device`` is its device.

        Not always /dev/tpm0: on resume xen-tpmfront removes and re-probes its chip by
        hand, outside the driver core, so the old chip's devm reference (and with it
        the number tpm0) is never released and the new chip is tpm1 (measured, 6.1)."""
        waited = xen_driver.wait_for_kernel_chip(guest.host(), guest.name)
        guest.tpm_device = waited.device
        return waited.seconds

    def health_checks(self) -> list[Check]:
        """Also: each guest's TPM device is there (xen-tpmfront never rebinds by itself)."""
        return super().health_checks() + [
            Check(
                guest.name,
                f"test -c {guest.tpm_device}",
                f"{guest.name}: {guest.tpm_device} is gone (xen-tpmfront unbound)",
            )
            for guest in self._guests
        ]
