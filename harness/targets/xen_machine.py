"""The QEMU machine that runs Xen and dom0: the accelerator, the boot walked on the
serial console, the saved booted machine (warm start) and the power cut.

It gives the harness a root login to dom0 and knows nothing of guests or of the
driver: the toolstack makes the guests (:mod:`harness.targets.xen_toolstack`), the
session runs the driver (:mod:`harness.targets.xen_session`). A user's own Xen host
has no machine part at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness import accel_verdict
from harness.console import DOM0_STAGES, ConsoleFailure, SerialConsole, Stage
from harness.crash_watch import ChannelSource, FileSource
from harness.deadline import Deadline
from harness.errors import LaunchFailure, TargetNotReady
from harness.images import Images, build_images, cache_root
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
from harness.ssh import SshHost
from harness.xenlogs import REMOTE_LOG_DIR

BOOT_TIMEOUT = 360.0  # QEMU start -> dom0 SSH (23-33 s idle, 130 s on a busy host)
KVM_TRIAL: tuple[Stage, ...] = (
    Stage("xen hypervisor (kvm)", DOM0_STAGES[0].pattern, 15),
    Stage("dom0 kernel (kvm)", DOM0_STAGES[1].pattern, 20),
)


class XenMachine:
    """QEMU with Xen, dom0 and one disk per guest; ``timings`` is the target's."""

    def __init__(
        self,
        guest_count: int,
        run_dir: Path,
        artifacts: Path,
        die_with_parent: bool,
        say: Callable[[str], None],
        timings: dict[str, float],
    ) -> None:
        self.guest_count = guest_count
        self.run_dir = run_dir
        self.artifacts = artifacts
        self.die_with_parent = die_with_parent
        self.say = say
        self.timings = timings
        self.images: Images | None = None
        # The user's own hypervisor and dom0 kernel (harness.own_build), else the images'.
        self.own_xen: Path | None = None
        self.own_dom0_kernel: Path | None = None
        self.qemu: QemuMachine | None = None
        self.accel: Accel | None = None
        self.console: SerialConsole | None = None
        self._boot_t0 = 0.0

    @property
    def console_log(self) -> Path:
        return self.artifacts / "console.log"

    def build_images(self) -> Images:
        t0 = time.monotonic()
        self.images = build_images(self.say)
        self.timings["images_s"] = round(time.monotonic() - t0, 1)
        # What this run boots, exactly: Xen's and the kernel's package versions, recipe.
        shutil.copy2(self.images.dir / "manifest.json", self.artifacts / "images-manifest.json")
        return self.images

    def _images(self) -> Images:
        assert self.images is not None, "build_images first"
        return self.images

    # -- the accelerator -----------------------------------------------------------------
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

    # -- boot ------------------------------------------------------------------------------
    def _config(
        self, accel: Accel, backings: Sequence[Path] | None = None, incoming: Path | None = None
    ) -> MachineConfig:
        """Drives are qcow2 overlays in the run directory over the images (cold boot) or
        over a saved machine's disks (``backings``, with its ``incoming`` state)."""
        images = self._images()
        if backings is None:
            backings = [images.dom0, *[images.guest] * self.guest_count]
        overlays = []
        for i, backing in enumerate(backings):
            overlay = self.run_dir / f"disk{i}.qcow2"
            overlay.unlink(missing_ok=True)
            make_overlay(backing, overlay)
            overlays.append(overlay)
        return MachineConfig(
            xen=self.own_xen or images.xen,
            kernel=self.own_dom0_kernel or images.kernel,
            initrd=images.initrd,
            dom0_disk=images.dom0,
            guest_disks=[images.guest] * self.guest_count,
            run_dir=self.run_dir,
            console_log=self.console_log,
            accel=accel,
            overlays=overlays,
            incoming=incoming,
        )

    def boot(self) -> SshHost:
        """QEMU -> Xen -> dom0 -> dom0 SSH; KVM falls back to TCG at its first failure."""
        self.console_log.unlink(missing_ok=True)
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
                self.close()
                accel = "tcg"
            else:
                self.accel = "kvm"
        if self.accel is None:
            if os.environ.get(ACCEL_ENV) == "tcg":
                why = f"disabled by {ACCEL_ENV}"
            else:
                why = "unusable for Xen on this host" if kvm_usable() else "unavailable"
            self.say(f"accelerator: TCG -cpu qemu64 (KVM {why})")
            self._launch("tcg", (), Deadline(15))
            self.accel = "tcg"
        return self._wait_dom0(Deadline(BOOT_TIMEOUT))

    def _launch(
        self,
        accel: Accel,
        stages: Sequence[Stage],
        deadline: Deadline,
        backings: Sequence[Path] | None = None,
        incoming: Path | None = None,
    ) -> None:
        self._start(self._config(accel, backings, incoming), accel)
        if stages:
            assert self.console is not None
            self.console.walk(stages, deadline, self.say)

    def _start(self, config: MachineConfig, accel: str) -> None:
        self.qemu = QemuMachine(config, die_with_parent=self.die_with_parent)
        self._boot_t0 = time.monotonic()
        self.qemu.start()
        self.say(
            f"qemu pid {self.qemu.pid} ({accel}), dom0 ssh on 127.0.0.1:{config.ssh_port}, "
            f"console {config.console_socket}"
        )
        self.console = SerialConsole(config.console_socket, config.console_log, "dom0 console")
        self.console.start()

    def _wait_dom0(self, deadline: Deadline) -> SshHost:
        console = self.console
        assert console is not None
        # The KVM trial has already walked the first two stages.
        stages = DOM0_STAGES if self.accel == "tcg" else DOM0_STAGES[len(KVM_TRIAL) :]
        seen = console.walk(stages, deadline, self.say)
        self.timings.update({f"{k}_s": v for k, v in seen.items()})
        return self.connect_dom0(deadline)

    def connect_dom0(self, deadline: Deadline) -> SshHost:
        """SSH to dom0 while the console is watched for failures, then let go of it."""
        assert self.qemu is not None
        machine, console = self.qemu, self.console

        def alive() -> None:
            if not machine.alive:
                raise machine.failure("exited while dom0 was booting")
            if console is not None:
                console.poll_failures()

        dom0 = SshHost("dom0", "127.0.0.1", machine.config.ssh_port, self._images().ssh_key)
        try:
            dom0.connect(deadline, alive=alive)
        finally:
            if console is not None:
                console.close()  # an unread console socket would stall the serial port
        self.timings.setdefault("qemu_to_dom0_ssh_s", round(time.monotonic() - self._boot_t0, 1))
        self.say(f"dom0 ssh up {self.timings['qemu_to_dom0_ssh_s']:.1f} s after QEMU start")
        dom0.run(f"mkdir -p {REMOTE_LOG_DIR}", check=True)
        return dom0

    # -- saved booted machines ---------------------------------------------------------------
    def fingerprint_shape(self) -> list[Any]:
        """What a saved machine must match of this machine's shape."""
        m = MachineConfig
        return [m.memory_mb, m.cpus, m.xen_args, m.dom0_args]

    def resume_saved(self, snap: Path) -> SshHost:
        """Start QEMU on the machine saved in ``snap`` and log in to its dom0."""
        (self.console_log).unlink(missing_ok=True)
        t0 = time.monotonic()
        self.accel = "tcg"
        disks = [snap / "disks" / f"disk{i}.qcow2" for i in range(self.guest_count + 1)]
        self._launch("tcg", (), Deadline(15), backings=disks, incoming=snap / "state")
        assert self.qemu is not None
        self.qemu.wait_running(Deadline(180))
        self.timings["restore_state_s"] = round(time.monotonic() - t0, 1)
        return self.connect_dom0(Deadline(120))

    def save(self, tmp: Path, meta: dict[str, Any]) -> None:
        """Save the running machine's state and disks under ``tmp``, with ``meta``."""
        assert self.qemu is not None
        self.qemu.save_state(tmp / "state", tmp / "disks", Deadline(300))
        (tmp / "meta.json").write_text(json.dumps({"qemu": qemu_version(), **meta}))

    # -- the power cut -------------------------------------------------------------------------
    def power_cut_and_boot(self) -> SshHost:
        """SIGKILL QEMU (no shutdown, no flush), then boot the same disks cold."""
        machine = self.qemu
        if machine is None or machine.config.overlays is None:
            raise TargetNotReady("qemu", "no running machine on qcow2 overlays to power off")
        config = dataclasses.replace(machine.config, incoming=None, ssh_port=free_port())
        pid = machine.pid
        machine.power_cut()
        self.qemu = None
        self.say(f"power cut: qemu {pid} killed; booting its disks cold")
        self._start(config, self.accel or "tcg")
        first_boot = self.timings.pop("qemu_to_dom0_ssh_s", None)  # this boot's, in _wait_dom0
        dom0 = self._wait_dom0(Deadline(BOOT_TIMEOUT))
        self.timings["cold_boot_to_dom0_ssh_s"] = self.timings.pop("qemu_to_dom0_ssh_s")
        if first_boot is not None:
            self.timings["qemu_to_dom0_ssh_s"] = first_boot
        return dom0

    # -- what the crash watch and the CLI see ------------------------------------------------------
    def crash_sources(self) -> list[FileSource | ChannelSource]:
        assert self.qemu is not None
        return [FileSource("serial console (Xen, dom0)", self.qemu.config.console_log)]

    def dead(self) -> str | None:
        """Why the machine is gone, or None while it runs."""
        qemu = self.qemu
        if qemu is None or qemu.alive:
            return None
        return f"qemu (pid {qemu.pid}) is gone"

    def processes(self) -> list[ManagedProcess]:
        proc = self.qemu._proc if self.qemu is not None else None
        return [proc] if proc is not None else []

    def describe(self) -> dict[str, Any]:
        qemu, images = self.qemu, self.images
        return {
            "accel": self.accel,
            "ssh": {
                "host": "127.0.0.1",
                "port": qemu.config.ssh_port if qemu else None,
                "key": str(images.ssh_key) if images else None,
                "user": "root",
            },
            "console": str(qemu.config.console_socket) if qemu else None,
        }

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
            self.console = None
        if self.qemu is not None:
            self.qemu.close()
            self.qemu = None

    def detach(self) -> ProcessRecord | None:
        """Leave QEMU running; its record for ``harness down``."""
        if self.qemu is None:
            return None
        record = self.qemu.detach()
        self.qemu = None
        return record
