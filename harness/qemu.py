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
own throw-away overlay, so N guests need no copies. Lifecycle per STYLE.md 4: ``start``
and ``close`` are idempotent; ``close`` asks QMP to quit, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

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
        drives = [self.dom0_disk, *self.guest_disks]
        return [
            QEMU,
            *accel_args(self.accel),
            "-m", str(self.memory_mb),
            "-smp", str(self.cpus),
            "-nodefaults",  # no CD-ROM, floppy or VGA to probe at boot
            "-display", "none",
            "-vga", "none",
            "-no-reboot",
            *(["-snapshot"] if self.snapshot else []),
            "-kernel", str(self.xen),
            "-append", self.xen_args,
            "-initrd", f"{self.kernel} {self.dom0_args},{self.initrd}",
            *[a for d in drives for a in ("-drive", f"file={d},if=virtio,format=raw")],
            "-netdev",
            f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=net0",
            "-chardev",
            f"socket,id=con0,path={self.console_socket},server=on,wait=off,"
            f"logfile={self.console_log},logappend=on",
            "-serial", "chardev:con0",
            "-monitor", "none",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
        ]  # fmt: skip


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

    def qmp(self, command: str, timeout: float = 5.0) -> dict[str, object]:
        """One QMP command on a fresh connection (capabilities negotiated first)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.config.qmp_socket))
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        return {}  # quit: QEMU closed the connection
                    reply: dict[str, object] = json.loads(line)
                    if "event" not in reply:
                        break
            return reply

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
