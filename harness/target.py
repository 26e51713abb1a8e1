"""What a target is, as the fixtures and scenarios see it: small protocols and names.

A *target* brings up guests that each have a vTPM, and can disturb them (restart a
component, reboot a guest, kill a swtpm). What a target can do is announced as a set of
capability names; scenarios ask for them with ``@pytest.mark.needs(...)`` and are skipped
on targets that lack them. Each capability's operations are a small protocol below
(:class:`Faults`, :class:`Xl`, ...), which a scenario gets from the fixture of that name
in ``conftest.py`` (STYLE.md 9): it never reads a target's internals. Targets live in
``harness/targets/`` and register their name in ``harness.targets.TARGETS``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, runtime_checkable

from harness.transport import RawTransport

if TYPE_CHECKING:
    from harness.crash_watch import Crash


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
    XL_DEVICES = "xl-devices"  # xl vtpm-attach / vtpm-list / vtpm-detach in dom0 on a
    # running guest whose kernel binds the new device (xen-tpmfront): docs/xl.md
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
    TPM2_CHIP = "tpm2-chip"  # the guest kernel registered its vTPM as a TPM 2.0 chip:
    # its own users (hwrng, IMA) speak TPM 2.0; with save-restore, it stays /dev/tpm0
    SERVICES = "services"  # dom0's manager and backend run as the package's systemd units:
    # target.crash_service(name) SIGKILLs one, and its unit must start it again
    CONFINED_SWTPM = "confined-swtpm"  # dom0's manager runs each swtpm confined
    # (--confine-swtpm): a uid of its own per instance, no network; with dom0-shell
    VALIDATION = "validation"  # the driver checks packet lengths itself (short header,
    # empty write, oversize): plain swtpm cannot even receive those as one command


Component = Literal["frontend", "backend", "manager"]
# Xen under QEMU: what harness up can leave running
XEN_TARGETS = ("xen", "xen-kernel", "xen-kernel-tpm2")
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


# -- capabilities: what a scenario may do beyond the guests, one protocol each ----------
class Restarts(Protocol):
    """``restart-frontend``, ``restart-backend``, ``restart-manager``."""

    def restart(self, component: Component) -> None: ...


class Services(Protocol):
    """``services``: dom0's daemons under the package's units (deploy/systemd)."""

    def crash_service(self, component: Literal["backend", "manager"]) -> float:
        """SIGKILL the component's main process; the seconds until systemd has started
        it again and every guest's vTPM is Connected."""
        ...


class Reboots(Protocol):
    """``reboot``."""

    def reboot(self, guest: Guest) -> None: ...


class Faults(Protocol):
    """``kill-swtpm``: a guest's swtpm killed, hung (SIGSTOP) or resumed, and the
    operator's reset that ends the instance's failure mode."""

    def swtpm_pid(self, guest: Guest) -> int | None: ...
    def kill_swtpm(self, guest: Guest) -> None: ...
    def reset_vtpm(self, guest: Guest) -> None: ...
    def pause_swtpm(self, guest: Guest) -> None: ...
    def resume_swtpm(self, guest: Guest) -> None: ...


class Dom0Shell(Protocol):
    """``dom0-shell``: a command as root in dom0: (exit code, stdout, stderr)."""

    def dom0_run(self, command: str, timeout: float = 60.0) -> tuple[int, str, str]: ...


class Xl(Protocol):
    """``xl``: real Xen domains, and what dom0's backend holds for them."""

    def destroy(self, guest: Guest) -> None: ...
    def create(self, guest: Guest) -> None: ...
    def detach_vtpm(self, guest: Guest) -> None: ...
    def attach_vtpm(self, guest: Guest) -> float: ...
    def stop_frontend(self, guest: Guest) -> None: ...
    def start_frontend(self, guest: Guest) -> None: ...
    def wait_for_device(self, guest: Guest) -> float: ...

    def backend_resources(self) -> dict[str, int]:
        """Grant mappings, ports, fds and threads of dom0's backend now."""
        ...


class XlDevices(Protocol):
    """``xl-devices``: xl's own vTPM devices (docs/xl.md). A destroyed guest is created
    again with ``vtpm = ["backend=0,uuid=..."]`` in its configuration (no attach of
    ours), or as the harness makes it (``create``)."""

    def destroy(self, guest: Guest) -> None: ...
    def create(self, guest: Guest) -> None: ...
    def create_with_xl_vtpm(self, guest: Guest, vtpm_uuid: str) -> float: ...


class SaveRestore(Protocol):
    """``save-restore``: ``xl save`` then ``xl restore``; the seconds it took."""

    def save_restore(self, guest: Guest) -> float: ...


class PowerCut(Protocol):
    """``power-cut``: the machine killed without a shutdown, then booted cold."""

    def power_cut_and_cold_boot(self) -> float: ...


class CrashWatch(Protocol):
    """``crash-watch``: crashes seen on the consoles, and the kernel logs' problems."""

    @property
    def crashes(self) -> list[Crash]: ...

    def kernel_log_problems(self) -> list[str]: ...


class TrafficTrace(Protocol):
    """``traffic-trace``: the backend's trace lines of a guest's vTPM."""

    def tpm_trace(self, guest: Guest) -> list[str]: ...


ROGUE_INSTANCE = 1900  # the rogue frontend's vTPM instance, beside the guests' own


class HostileToolstack(Protocol):
    """dom0's part in scenarios/test_hostile.py: a vTPM device for a rogue frontend
    (``python -m xenvtpm rogue ATTACK``, instance :data:`ROGUE_INSTANCE`), attached
    for one attack and detached after, and what would show a leak.

    A target offers one through ``hostile_toolstack()`` (``xen-probe`` targets whose
    domains the harness can add to): ``harness/targets/sim_hostile.py``,
    ``xen_hostile.py``. ``exact``: the target runs the rogue at native speed, so the
    answers, rates and counts pinned by docs/threat-model.md are checked; under TCG the
    attacks are scaled down (the xen column of the scenario's table) and only what
    holds for every target is.
    """

    exact: bool
    settle_s: float  # for the counts to come back after a rogue leaves
    poll_s: float

    def counts(self) -> dict[str, int]:
        """What a leak would show up in (dom0's mappings and ports, the backend's fds
        and threads, ...), by name."""
        ...

    def backend_healthy(self) -> bool:
        """The backend still runs (and, where its log is at hand, logged no traceback)."""
        ...

    def rogue(self, attack: str, args: list[str]) -> list[dict[str, Any]]:
        """Attach the rogue's device, run the attack, detach it: its JSON observations."""
        ...

    def rogue_status(self) -> dict[str, int] | None:
        """The manager's ``queued``/``in_flight``/``peak`` for the rogue's instance."""
        ...

    def close(self) -> None: ...
