"""The driver pair on a booted Xen target: what runs where, and in which order.

dom0 runs the vTPM manager and the backend; the toolstack step (``python3 -m xenvtpm
attach``, as xl's hotplug scripts did) writes each guest's vTPM directories; each guest
runs the frontend with ``--device``, which creates ``/dev/tpm0`` through tpm_vtpm_proxy
once its ring is Connected. Scenarios then reach ``/dev/tpm0`` through the guest relay
(``python3 -m xenvtpm relay`` over SSH).

Kept apart from ``xen.py`` (the machine: images, QEMU, console, SSH) so the two change
independently: this module only needs a host to run commands on.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from harness.deadline import Deadline
from harness.errors import TargetNotReady

MANAGER_SOCKET = "/run/xenvtpm/vtpm.sock"
TRACE_DIR = "/run/xenvtpm/trace"  # the backend's traffic trace, one file per instance
STATE_ROOT = "/var/lib/xenvtpm"
# More flags for dom0's manager (e.g. --no-fsync, to see the power-cut scenario fail).
MANAGER_FLAGS_ENV = "XENVTPM_MANAGER_FLAGS"
DOM0_MODULES = ("xen-evtchn", "xen-gntdev", "xen-gntalloc")
GUEST_MODULES = ("xen-evtchn", "xen-gntdev", "xen-gntalloc", "tpm_vtpm_proxy")
# swtpm_setup alone takes 20-30 s in a TCG dom0 (measured); the warm-up retries meanwhile.
DEVICE_TIMEOUT = 240.0


class Host(Protocol):
    """What this module needs of dom0 or a guest (``harness.ssh.SshHost`` has it)."""

    name: str

    def run(
        self, command: str, timeout: float = 60.0, *, check: bool = False, stdin: bytes = b""
    ) -> tuple[int, str, str]: ...

    def check(self, command: str, timeout: float = 60.0) -> str: ...


@dataclass(frozen=True)
class GuestVtpm:
    """One guest's vTPM as the toolstack sees it."""

    name: str
    domid: int
    instance: int


StartDaemon = Callable[[Host, str, str], int]


def manager_options() -> list[str]:
    """What the harness adds to the manager's command line: ``$XENVTPM_MANAGER_FLAGS``."""
    return shlex.split(os.environ.get(MANAGER_FLAGS_ENV, ""))


def backend_options() -> list[str]:
    """What the harness adds to the backend's: the traffic trace, for failed tests."""
    return ["--trace", TRACE_DIR]


def manager_args() -> str:
    """The manager's arguments in dom0: its unit's (deploy/systemd), then the harness's."""
    return f"manager --socket {MANAGER_SOCKET} --state-root {STATE_ROOT}" + "".join(
        f" {shlex.quote(flag)}" for flag in manager_options()
    )


def backend_args() -> str:
    """xl's vtpm uuids are given instances in a map kept with the manager's state."""
    return f"backend --manager {MANAGER_SOCKET} --uuid-map {STATE_ROOT}/vtpm-uuids.json " + (
        shlex.join(backend_options())
    )


def trace_command(instance: int) -> str:
    """Print the instance's trace, the rotated file first (either may not exist yet)."""
    base = f"{TRACE_DIR}/instance-{int(instance)}.trace"
    return f"cat {base}.1 {base} 2>/dev/null; true"


def attach_command(guest: GuestVtpm, package_dir: str, resumed: bool = False) -> str:
    """The toolstack step; ``resumed``: the domain resumes a saved one (keep the TPM)."""
    return (
        f"cd {shlex.quote(package_dir)} && python3 -m xenvtpm attach --domid {guest.domid} "
        f"--instance {guest.instance} --name {shlex.quote(guest.name)}"
        + (" --resume" if resumed else "")
    )


def modprobe_command(modules: Sequence[str]) -> str:
    return " && ".join(f"modprobe {m}" for m in modules)


def start_dom0(dom0: Host, start_daemon: StartDaemon) -> None:
    """Manager first (the backend connects to it), then the backend."""
    dom0.check(f"{modprobe_command(DOM0_MODULES)} && mkdir -p /run/xenvtpm {STATE_ROOT}")
    start_daemon(dom0, "manager", manager_args())
    wait_for_manager(dom0)
    start_daemon(dom0, "backend", backend_args())


def wait_for_manager(dom0: Host, timeout: float = 30.0) -> None:
    """Until the (re)started vTPM manager listens on its socket."""
    deadline = Deadline(timeout)
    while dom0.run(f"test -S {MANAGER_SOCKET}")[0] != 0:
        if deadline.expired:
            raise TargetNotReady("dom0", f"the vTPM manager never opened {MANAGER_SOCKET}")
        time.sleep(0.5)


def attach_guest(
    dom0: Host, guest_host: Host, guest: GuestVtpm, package_dir: str, start_daemon: StartDaemon
) -> None:
    """Toolstack entries in dom0, then the frontend in the guest."""
    dom0.check(attach_command(guest, package_dir))
    guest_host.check(modprobe_command(GUEST_MODULES))
    start_daemon(guest_host, "frontend", "frontend --device")


def wait_for_device(
    guest_host: Host, name: str, timeout: float = DEVICE_TIMEOUT, device: str = "/dev/tpm0"
) -> float:
    """Seconds until ``device`` exists in the guest (the kernel probed it)."""
    t0 = time.monotonic()
    deadline = Deadline(timeout)
    while guest_host.run(f"test -c {shlex.quote(device)}")[0] != 0:
        if deadline.expired:
            _, log, _ = guest_host.run("tail -n 30 /var/log/xenvtpm/frontend.log")
            raise TargetNotReady(name, f"no {device} after {timeout:.0f} s; frontend log:\n{log}")
        time.sleep(1.0)
    return time.monotonic() - t0


@dataclass(frozen=True)
class KernelChip:
    device: str  # /dev/tpmN of the chip xen-tpmfront registered
    seconds: float  # until it existed


def wait_for_kernel_chip(
    guest_host: Host, name: str, devid: int = 0, timeout: float = DEVICE_TIMEOUT
) -> KernelChip:
    """The TPM chip xen-tpmfront registered for ``device/vtpm/DEVID`` (its child in
    sysfs), once its character device exists."""
    t0 = time.monotonic()
    deadline = Deadline(timeout)
    script = (
        f"for c in /sys/bus/xen/devices/vtpm-{devid}/tpm/tpm*; do "
        '[ -c "/dev/${c##*/}" ] && echo "/dev/${c##*/}"; done; exit 0'
    )
    while True:
        found = guest_host.run(script)[1].split()
        if found:
            return KernelChip(found[-1], time.monotonic() - t0)
        if deadline.expired:
            _, log, _ = guest_host.run("dmesg | grep -i -e tpm -e vtpm | tail -n 20")
            raise TargetNotReady(
                name, f"xen-tpmfront made no TPM chip in {timeout:.0f} s; dmesg:\n{log}"
            )
        time.sleep(1.0)


def stop_daemon(host: Host, name: str, pid: int, timeout: float = 30.0) -> None:
    """SIGTERM (the daemons exit 0 on it, after cleaning up), then SIGKILL at ``timeout``."""
    script = (
        f"kill -TERM {pid} 2>/dev/null || exit 0; "
        f"for i in $(seq {int(timeout * 10)}); do kill -0 {pid} 2>/dev/null || exit 0; "
        f"sleep 0.1; done; kill -KILL {pid}; exit 3"
    )
    rc, _, _ = host.run(script, timeout=timeout + 30)
    if rc == 3:
        raise TargetNotReady(name, f"pid {pid} ignored SIGTERM for {timeout:.0f} s (killed)")


def swtpm_pid(dom0: Host, instance: int) -> int | None:
    """The running swtpm of ``instance`` (its pid file, checked against /proc), or None."""
    pid_file = f"{STATE_ROOT}/{instance}/swtpm.pid"
    rc, out, _ = dom0.run(
        f'p=$(cat {pid_file} 2>/dev/null) && [ "$(cat /proc/$p/comm 2>/dev/null)" = swtpm ] '
        "&& echo $p"
    )
    return int(out) if rc == 0 and out.strip().isdigit() else None


def wait_connected(dom0: Host, domid: int, deadline: Deadline) -> None:
    """Until both ends of ``domid``'s vTPM are XenbusState Connected (4): one
    ``xenstore-read`` of both nodes in dom0 per poll (no python3 start per poll)."""
    paths = (
        f"/local/domain/{domid}/device/vtpm/0/state",
        f"/local/domain/0/backend/vtpm/{domid}/0/state",
    )
    command = "xenstore-read " + " ".join(paths)
    states: list[str] = []
    while not deadline.expired:
        rc, out, _ = dom0.run(command)
        states = out.split() if rc == 0 else []
        if states == ["4", "4"]:
            return
        time.sleep(0.5)
    raise TargetNotReady(f"domain {domid}", f"vTPM not Connected (frontend, backend: {states})")
