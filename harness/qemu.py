"""One QEMU machine booting Xen 4.17 with a Debian dom0 (DESIGN.md section 4 flags).

    qemu-system-x86_64 -accel tcg -cpu qemu64 -m 3072 -smp 2 -no-reboot -snapshot
      -kernel xen.bin -append "dom0_mem=1024M,max:1024M console=com1 com1=115200,8n1
                               loglvl=all guest_loglvl=all noreboot"
      -initrd "vmlinuz root=/dev/vda console=hvc0 earlyprintk=xen,initrd.img"
      -drive file=dom0.img,if=virtio,format=raw  (+ one guest.img drive per guest)
      -netdev user,restrict=on,hostfwd=tcp:127.0.0.1:PORT-:22 -device virtio-net-pci

One deliberate difference from DESIGN's ``-nographic -serial mon:stdio``: the serial
port is a unix socket chardev with ``logfile=`` (and QMP another socket). The machine
must outlive ``harness up``, which a pty owned by the CLI would not allow; the chardev
logs the whole raw console to ``artifacts/xen/console.log`` whoever is attached, and
``harness console`` or the boot watcher (``harness.console``) connect to the socket.

Every guest drive is the same cached ``guest.img``: ``-snapshot`` gives each drive its
own throw-away overlay, so N guests need no copies. With ``overlays`` the drives are
instead qcow2 files in the run directory (``make_overlay``) whose backing file is the
image or a saved machine's disk: ``save_state`` pauses the machine, writes its RAM and
device state to a file (QMP ``migrate`` to ``exec:cat``) and copies the overlays, and
``incoming`` starts a later QEMU from that state, already booted (see
``harness.snapshot``). Lifecycle per STYLE.md 4: ``start`` and ``close`` are
idempotent; ``close`` asks QMP to quit, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from harness.deadline import Deadline
from harness.errors import DeadlineExpired, LaunchFailure
from harness.process import ManagedProcess, ProcessRecord

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
Accel = Literal["kvm", "tcg"]
ACCEL_ENV = "XENVTPM_ACCEL"  # kvm, tcg or auto (the default)

XEN_ARGS = (
    "dom0_mem=1024M,max:1024M console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all noreboot"
)
DOM0_ARGS = "root=/dev/vda ro console=hvc0 earlyprintk=xen"


def accel_args(accel: Accel) -> list[str]:
    """KVM with the host CPU, or TCG with ``qemu64`` (``-cpu max`` crashes dom0: SMAP)."""
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", "-cpu", "qemu64"]


def kvm_usable() -> bool:
    """/dev/kvm can be opened. Whether it can run Xen is only known by trying."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (QEMU binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class MachineConfig:
    xen: Path
    kernel: Path
    initrd: Path
    dom0_disk: Path
    guest_disks: list[Path]
    run_dir: Path
    console_log: Path
    ssh_port: int = field(default_factory=free_port)
    accel: Accel = "tcg"
    memory_mb: int = 3072
    cpus: int = 2
    snapshot: bool = True
    xen_args: str = XEN_ARGS
    dom0_args: str = DOM0_ARGS
    # qcow2 overlays, one per drive (dom0 first), used instead of -snapshot.
    overlays: list[Path] | None = None
    # Start from a saved machine state (a file written by QemuMachine.save_state).
    incoming: Path | None = None

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    def argv(self) -> list[str]:
        for path in (self.kernel, self.initrd):
            if "," in str(path):  # QEMU's multiboot module list is comma separated
                raise ValueError(f"{path}: a multiboot module path cannot contain a comma")
        if self.overlays is not None:
            drives = [f"file={o},if=virtio,format=qcow2" for o in self.overlays]
        else:
            disks = [self.dom0_disk, *self.guest_disks]
            drives = [f"file={d},if=virtio,format=raw" for d in disks]
        snapshot = self.snapshot and self.overlays is None
        return [  # one option and its value per line, as QEMU documents them
            QEMU,
            *accel_args(self.accel),
            "-m", str(self.memory_mb),
            "-smp", str(self.cpus),
            "-nodefaults",  # no CD-ROM, floppy or VGA to probe at boot
            "-display", "none",
            "-vga", "none",
            "-no-reboot",
            *(["-snapshot"] if snapshot else []),
            "-kernel", str(self.xen),
            "-append", self.xen_args,
            "-initrd", f"{self.kernel} {self.dom0_args},{self.initrd}",
            *[a for d in drives for a in ("-drive", d)],
            "-netdev",
            f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=net0",
            "-chardev",
            f"socket,id=con0,path={self.console_socket},server=on,wait=off,"
            f"logfile={self.console_log},logappend=on",
            "-serial", "chardev:con0",
            "-monitor", "none",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            *(["-incoming", f"exec:cat {self.incoming}"] if self.incoming else []),
        ]  # fmt: skip


def make_overlay(backing: Path, overlay: Path) -> None:
    """A new qcow2 file whose unwritten blocks read from ``backing`` (raw or qcow2)."""
    fmt = "qcow2" if backing.suffix == ".qcow2" else "raw"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(backing.resolve())]
    try:
        subprocess.run([*argv, str(overlay)], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise LaunchFailure(
            "qemu-img",
            [*argv, str(overlay)],
            getattr(e, "returncode", None),
            err.decode(errors="replace"),
            None,
            "could not create an overlay",
        ) from e


class QemuMachine:
    """The QEMU process: launch, wait for its sockets, quit politely, never leak it."""

    def __init__(self, config: MachineConfig, *, die_with_parent: bool = True) -> None:
        self.config = config
        self.log_path = config.run_dir / "logs" / "qemu.log"
        self._proc: ManagedProcess | None = None
        self.die_with_parent = die_with_parent

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def failure(self, reason: str) -> LaunchFailure:
        if self._proc is not None:
            return self._proc.failure(reason)
        return LaunchFailure("qemu", self.config.argv(), None, "", self.log_path, reason)

    def start(self, deadline: Deadline | None = None) -> Self:
        """Launch QEMU and wait until its console and QMP sockets accept connections."""
        if self.alive:
            return self
        cfg = self.config
        for sock in (cfg.console_socket, cfg.qmp_socket):
            sock.unlink(missing_ok=True)
        cfg.console_log.parent.mkdir(parents=True, exist_ok=True)
        self._proc = ManagedProcess(
            "qemu",
            cfg.argv(),
            self.log_path,
            ready=lambda: cfg.console_socket.exists() and cfg.qmp_socket.exists(),
            stop_timeout=10.0,
            die_with_parent=self.die_with_parent,
        )
        try:
            self._proc.start()
            self._proc.wait_ready(deadline or Deadline(15))
        except BaseException:
            self.close()
            raise
        log.info("qemu pid %s (%s), ssh on 127.0.0.1:%d", self.pid, cfg.accel, cfg.ssh_port)
        return self

    def qmp(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """One QMP command on a fresh connection (capabilities negotiated first)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.config.qmp_socket))
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            for cmd, args in (("qmp_capabilities", None), (command, arguments)):
                msg: dict[str, Any] = {"execute": cmd}
                if args is not None:
                    msg["arguments"] = args
                f.write(json.dumps(msg).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        return {}  # quit: QEMU closed the connection
                    reply: dict[str, Any] = json.loads(line)
                    if "event" not in reply:
                        break
            return reply

    def status(self) -> str:
        """QMP run state: "running", "inmigrate", "paused", "postmigrate", ..."""
        reply = self.qmp("query-status")
        return str(reply.get("return", {}).get("status", "unknown"))

    def wait_running(self, deadline: Deadline) -> None:
        """After ``incoming``: wait until the saved state is loaded and the VM runs."""

        def running() -> bool:
            if not self.alive:
                raise self.failure("exited while loading the saved machine state")
            state = self.status()
            if state == "paused":  # it was saved paused (save_state stops it first)
                self.qmp("cont")
                return False
            if state not in ("running", "inmigrate", "prelaunch", "restore-vm"):
                raise self.failure(f"is {state!r} instead of running after loading its state")
            return state == "running"

        try:
            deadline.wait_for(running, "qemu to load the saved state", max_interval=0.5)
        except DeadlineExpired as e:
            raise self.failure("did not finish loading its saved state in time") from e

    def save_state(self, state: Path, disks: Path, deadline: Deadline) -> None:
        """Pause, write RAM and device state to ``state``, copy every overlay into
        ``disks`` (the saved machine's disks), then resume. Needs ``overlays``."""
        overlays = self.config.overlays
        if overlays is None:
            raise ValueError("save_state needs qcow2 overlays (MachineConfig.overlays)")
        tmp = state.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self.qmp("stop")
        try:
            self.qmp("migrate", {"uri": f"exec:cat > {tmp}"})

            def done() -> bool:
                info = self.qmp("query-migrate").get("return", {})
                if info.get("status") in ("failed", "cancelled"):
                    raise self.failure(f"migrate to a file failed: {info}")
                return bool(info.get("status") == "completed")

            deadline.wait_for(done, "qemu to write its state", max_interval=0.5)
            disks.mkdir(parents=True, exist_ok=True)
            for overlay in overlays:  # consistent: the VM is paused and flushed
                shutil.copyfile(overlay, disks / overlay.name)
            tmp.replace(state)
        finally:
            tmp.unlink(missing_ok=True)
            self.qmp("cont")

    def power_cut(self) -> None:
        """SIGKILL QEMU at once: no QMP quit, so neither the guest OS nor QEMU flushes
        anything, as in a power cut. The drives stay for a cold boot; idempotent."""
        if self._proc is not None:
            self._proc.kill()
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL; idempotent; no QEMU is left behind."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.alive:
                with contextlib.suppress(OSError, ValueError):
                    self.qmp("quit")
                with contextlib.suppress(DeadlineExpired):
                    Deadline(timeout).wait_for(lambda: not proc.alive, "qemu to quit")
        finally:
            proc.stop()  # reaps, and signals whatever is left
            self._proc = None
            for sock in (self.config.console_socket, self.config.qmp_socket):
                sock.unlink(missing_ok=True)

    def detach(self) -> ProcessRecord:
        if self._proc is None:
            raise self.failure("was not started")
        record = self._proc.detach()
        self._proc = None
        return record

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
