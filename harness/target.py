"""What a target is, as the fixtures and scenarios see it: small protocols and names.

A *target* brings up guests that each have a vTPM, and can disturb them (restart a
component, reboot a guest, kill a swtpm). What a target can do is announced as a set of
capability names; scenarios ask for them with ``@pytest.mark.needs(...)`` and are skipped
on targets that lack them. Targets live in ``harness/targets/`` and register their name
in ``harness.targets.TARGETS`` (sim, direct; later xen under QEMU and ssh://host).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, Self, runtime_checkable

from harness.transport import RawTransport


class Capability(enum.StrEnum):
    """Names a scenario can require. A StrEnum so plain strings compare equal."""

    MULTI_GUEST = "multi-guest"  # at least two guests with separate vTPMs
    RESTART_FRONTEND = "restart-frontend"  # target.restart("frontend")
    RESTART_BACKEND = "restart-backend"  # target.restart("backend")
    RESTART_MANAGER = "restart-manager"  # target.restart("manager")
    REBOOT = "reboot"  # target.reboot(guest): new domain, same vTPM instance
    KILL_SWTPM = "kill-swtpm"  # target.kill_swtpm(guest), target.swtpm_pid(guest),
    # target.pause_swtpm(guest) / resume_swtpm(guest) (SIGSTOP / SIGCONT: a hung TPM)
    XEN_PROBE = "xen-probe"  # guest.probe(...): xenstore/grant/evtchn as that domain
    XL = "xl"  # real Xen domains: target.destroy/create(guest), detach/attach of a vTPM
    # on a running guest, start/stop_frontend, backend_resources(), guest.run(cmd)
    SAVE_RESTORE = "save-restore"  # target.save_restore(guest): xl save, xl restore;
    # the guest's kernel re-probes its vTPM, which keeps its state (PCRs too)
    SHARED_CLIENTS = "shared-clients"  # guest.transport(shared=True) beside other clients:
    # a resource manager in the guest's kernel (/dev/tpmrm0), or the sim's own sharing
    KERNEL_TPM = "kernel-tpm"  # guest.run(cmd) in a Linux guest whose kernel serves
    # /dev/tpm0 (and /dev/tpmrm0 if it registered a TPM 2.0), tpm2-tools, /opt/tpm2-selftests
    DOM0_SHELL = "dom0-shell"  # target.dom0_run(cmd) as root in a dom0 with swtpm,
    # tpm_vtpm_proxy and /opt/tpm2-selftests: a baseline TPM beside the guests' vTPMs
    POWER_CUT = "power-cut"  # target.power_cut_and_cold_boot(): the machine killed without
    # a shutdown (its page caches lost), the same disks booted cold, every guest back with
    # its vTPM instance
    CRASH_WATCH = "crash-watch"  # target.crashes, target.kernel_log_problems(): the
    # machine's consoles watched until teardown (a crash fails the running test at once),
    # every host's kernel logs scanned after a failed test (harness/crash_watch.py)
    TRAFFIC_TRACE = "traffic-trace"  # target.tpm_trace(guest): the backend's trace lines
    # of that guest's vTPM (xenvtpm/backend/traffic_trace.py), for a failed test's report
    VALIDATION = "validation"  # the driver checks packet lengths itself (short header,
    # empty write, oversize): plain swtpm cannot even receive those as one command


Component = Literal["frontend", "backend", "manager"]
XEN_TARGETS = ("xen", "xen-kernel")  # Xen under QEMU: what harness up can leave running
COMPONENT_CAPABILITY: dict[str, Capability] = {
    "frontend": Capability.RESTART_FRONTEND,
    "backend": Capability.RESTART_BACKEND,
    "manager": Capability.RESTART_MANAGER,
}


@runtime_checkable
class Guest(Protocol):
    """One guest with one vTPM, as seen from the host running the scenarios."""

    @property
    def name(self) -> str: ...

    @property
    def domid(self) -> int | None:
        """The Xen domain id now (changes on reboot); None on targets without domains."""
        ...

    @property
    def instance(self) -> int:
        """The vTPM instance id the toolstack bound to this guest."""
        ...

    @property
    def kernel_device(self) -> bool:
        """True when commands pass through the guest kernel's TPM character device
        (``/dev/tpm0``), which checks a command's size before any driver sees it."""
        ...

    @property
    def max_command_size(self) -> int:
        """The largest command the guest's path carries: swtpm's 4096, or less where a
        frontend's one shared page also holds its own header (stock xen-tpmfront)."""
        ...

    def transport(self, shared: bool = False) -> RawTransport:
        """A new connection to this guest's TPM.

        ``shared``: one that may be open beside others. A Linux guest's ``/dev/tpm0``
        admits one opener (EBUSY for the next), so a shared connection there is the
        kernel's resource-managed ``/dev/tpmrm0``, as concurrent TPM clients on Linux
        use; elsewhere every connection may be shared.
        """
        ...

    def tcti(self, shared: bool = False) -> Any:
        """A ``tpm2_pytss.PyTCTI`` over a new transport (``harness.tcti.TransportTCTI``)."""
        ...

    def logs(self) -> dict[str, Path]:
        """This guest's own logs (frontend, its swtpm), by name."""
        ...

    def probe(self, *args: str) -> dict[str, Any]:
        """Run ``python -m xenvtpm probe ARGS`` as this guest's domain; its JSON answer."""
        ...


@runtime_checkable
class Target(Protocol):
    """An environment of guests with vTPMs. ``start``/``close`` are idempotent."""

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> frozenset[str]: ...

    @property
    def guests(self) -> Sequence[Guest]: ...

    def start(self) -> None: ...
    def close(self) -> None: ...

    def restart(self, component: Component) -> None:
        """Restart one component; for "frontend", every guest's frontend."""
        ...

    def reboot(self, guest: Guest) -> None:
        """Reboot a guest, as ``xl reboot``: new domid, same vTPM instance."""
        ...

    def kill_swtpm(self, guest: Guest) -> None:
        """SIGKILL the swtpm serving ``guest``'s vTPM (its supervisor may restart it)."""
        ...

    def swtpm_pid(self, guest: Guest) -> int | None: ...

    def reset_vtpm(self, guest: Guest) -> None:
        """The operator's reset (``python3 -m xenvtpm reset``): power-cycle ``guest``'s
        instance and end its failure mode (after its swtpm was killed)."""
        ...

    def logs(self) -> dict[str, Path]:
        """Every log of the environment (daemons and guests), by name."""
        ...

    def describe(self) -> dict[str, Any]:
        """The JSON ``harness up`` prints: ``{"target": ..., "guests": [...]}``."""
        ...

    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
