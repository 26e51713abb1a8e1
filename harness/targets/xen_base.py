"""What every Xen target is made of: a dom0 session (the driver's side, through SSH)
and a frontend (ours, or the guest kernel's ``xen-tpmfront``), with the guests'
relays. Parts add behaviour: the QEMU target adds its machine and xl toolstack
(:mod:`harness.targets.xen`), the user's host adds its checks and clean-up
(:mod:`harness.targets.xen_host`); neither takes anything away.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from harness import tpmwire
from harness.deadline import Deadline
from harness.errors import DeviceRefused, TargetNotReady
from harness.own_build import OwnBuild, OwnBuildError, PreparedBuild
from harness.paths import REPO_ROOT
from harness.relay_pool import RelayPool
from harness.ssh import SshHost
from harness.target import Capability, Component, Guest
from harness.targets import Progress, xen_driver
from harness.targets.base import BaseTarget
from harness.targets.health import Check
from harness.targets.xen_frontends import Frontend, KernelFrontend, OurFrontend
from harness.targets.xen_guest import XenGuest
from harness.targets.xen_session import Dom0Session

# What a dom0 session gives any Xen target, whatever its frontend.
SESSION_CAPABILITIES = frozenset(
    {
        Capability.MULTI_GUEST,
        Capability.RESTART_MANAGER,
        Capability.KILL_SWTPM,
        Capability.XEN_PROBE,
        Capability.VALIDATION,
        Capability.DOM0_SHELL,
        Capability.KERNEL_TPM,
        Capability.TRAFFIC_TRACE,
    }
)


def artifacts_dir(target: str = "xen") -> Path:
    """``$XENVTPM_ARTIFACTS``, else ``artifacts/<target>/`` (one per kind of target)."""
    explicit = os.environ.get("XENVTPM_ARTIFACTS")
    return Path(explicit) if explicit else REPO_ROOT / "artifacts" / target


class XenDriverTarget(BaseTarget):
    """A dom0 session and a frontend; subclasses say how dom0 and the guests come up."""

    FRONTEND: ClassVar[type[Frontend]] = OurFrontend
    ON_A_HOST: ClassVar[bool] = False  # a user's own host: its Xen and kernels are its own
    frontend: Frontend
    artifacts: Path
    timings: dict[str, float]
    relays: RelayPool
    _guests: list[XenGuest]
    session: Dom0Session

    def __init__(
        self,
        guests: int,
        run_dir: Path | None = None,
        progress: Progress | None = None,
        detached: bool = False,
        *,
        own_build: OwnBuild | None = None,
    ) -> None:
        """``own_build``: the user's pieces that replace bundled ones for this run
        (:mod:`harness.own_build`); checked here, before anything starts."""
        self.own_build = own_build or OwnBuild()
        super().__init__(guests, run_dir, progress, detached)
        self.own_build.check(on_a_host=self.ON_A_HOST, guest_kind=self.frontend.kind)
        self.prepared = PreparedBuild()

    def prepare_own_build(self, kernel_release: str) -> PreparedBuild:
        """The user's pieces checked against the guests' kernel and made ready; their
        origins and sha256 recorded in the artifacts."""
        self.prepared = self.own_build.prepare(
            self.run_dir / "own", kernel_release, self._build_module
        )
        self.session.package = self.prepared.driver
        if self.prepared.tpmfront is not None and isinstance(self.frontend, KernelFrontend):
            self.frontend.use_module(self.prepared.tpmfront, self.prepared.tpmfront_info)
        self.prepared.record(self.artifacts)
        for piece in self.prepared.pieces:
            self.say(f"own build: {piece.flag} {piece.origin}: {piece.what} ({piece.sha256[:16]})")
        return self.prepared

    def _build_module(self, source: Path) -> Path:
        raise OwnBuildError(f"--tpmfront-source {source}: {self.name} cannot build modules")

    def frontend_class(self) -> type[Frontend]:
        """Which frontend this target's guests have (the class's, unless chosen per run)."""
        return self.FRONTEND

    def _compose(self) -> None:
        self.frontend = self.frontend_class()()
        self.artifacts = artifacts_dir(self.name)
        self.timings = {}
        self.relays = RelayPool()  # each guest's /dev/tpm0 relay, kept between transports
        self._guests = self.make_guests(self.guest_count)
        # dom0 of our own machine runs the package and its units; a user's host, the
        # copied folder (the harness installs nothing there)
        self.session = Dom0Session(
            self._guests, self.artifacts, self.say, packaged=not self.ON_A_HOST
        )

    def make_guests(self, count: int) -> list[XenGuest]:
        return [XenGuest(i, self) for i in range(count)]

    @property
    def guests(self) -> Sequence[XenGuest]:
        return list(self._guests)

    @property
    def dom0(self) -> SshHost | None:
        return self.session.dom0

    @dom0.setter
    def dom0(self, login: SshHost | None) -> None:
        self.session.dom0 = login

    def _dom0(self) -> SshHost:
        return self.session.host()

    def hosts(self) -> dict[str, SshHost]:
        """dom0 and every booted guest, by name."""
        return self.session.hosts()

    # -- the driver pair -------------------------------------------------------------------
    def deploy(self, package: Path | None = None) -> None:
        """Copy the driver package (the run's: ``--driver`` may name another) into dom0
        and every guest (``/opt/xenvtpm``) and check that ``python3 -m xenvtpm`` runs
        there, every host at once. Starting the daemons is ``start_daemon``."""
        t0 = time.monotonic()
        package = package or self.session.package
        self.session.deploy(package)
        hosts = ", ".join(self.hosts())
        self.say(f"deployed {package} to {hosts} in {time.monotonic() - t0:.1f} s")

    def start_driver(self) -> None:
        """Deploy the current driver pair and bring up every guest's TPM device."""
        t0 = time.monotonic()
        self.deploy()
        self.session.start_dom0_daemons()
        for guest in self._guests:
            self.connect_vtpm(guest)
        for guest in self._guests:
            waited = self.wait_for_device(guest)
            self.say(f"{guest.name}: /dev/tpm0 up {waited:.1f} s after its frontend started")
        self.timings["driver_to_tpm0_s"] = round(time.monotonic() - t0, 1)

    def start_daemon(self, host: xen_driver.Host, name: str, args: str) -> int:
        return self.session.start_daemon(host, name, args)

    def stop_daemon(self, host: xen_driver.Host, name: str) -> None:
        self.session.stop_daemon(host, name)

    def connect_vtpm(self, guest: XenGuest) -> None:
        """Toolstack entries for the guest's vTPM in dom0, then its frontend."""
        self.frontend.connect(self.session, guest)

    def wait_for_device(self, guest: XenGuest) -> float:
        """Seconds until the guest's TPM device exists (``guest.tpm_device``)."""
        return self.frontend.wait_for_device(guest)

    def stop_frontend(self, guest: XenGuest) -> None:
        self.relays.release(guest.name)  # the device goes: nothing may hold it open
        self.frontend.stop(self.session, guest)

    def start_frontend(self, guest: XenGuest) -> None:
        """Start the guest's frontend; its TPM device follows (``wait_for_device``)."""
        self.frontend.start(self.session, guest)

    def restart(self, component: Component) -> None:
        """Stop and start one component, then wait until every guest is served again."""
        self.require(f"restart-{component}")
        if component == "frontend":
            for guest in self._guests:
                self.stop_frontend(guest)
                self.start_frontend(guest)
            for guest in self._guests:
                self.wait_for_device(guest)
        elif component == "backend":
            self.session.restart_backend()
        elif component == "manager":
            self.session.restart_manager()
        else:
            raise ValueError(f"unknown component {component!r}")
        deadline = Deadline(xen_driver.DEVICE_TIMEOUT)
        self.session.wait_connected(deadline)
        if component == "manager":
            self._wait_served(deadline)
        self.say(f"restarted the {component}")

    def crash_service(self, component: Literal["backend", "manager"]) -> float:
        """SIGKILL dom0's backend or manager; its unit's Restart= starts it again. Only
        where the guests get over a restart of it (stock xen-tpmfront does not)."""
        self.require(Capability.SERVICES)
        self.require(f"restart-{component}")
        t0 = time.monotonic()
        self.session.crash_unit(component)
        deadline = Deadline(xen_driver.DEVICE_TIMEOUT)
        self.session.wait_connected(deadline)
        if component == "manager":
            self._wait_served(deadline)
        waited = time.monotonic() - t0
        self.say(f"systemd started the crashed {component} again; served {waited:.1f} s on")
        return waited

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

    # -- health ------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """What ``health_checks`` finds broken: one command per host, all hosts at once."""
        if not self._started:
            return []
        return self.session.problems(self.health_checks())

    def health_checks(self) -> list[Check]:
        """Every daemon this target started runs, and what the frontend checks."""
        return self.session.health_checks() + self.frontend.health_checks(self._guests)

    def kernel_log_problems(self) -> list[str]:
        """Crash lines new since the last call in dom0's and the guests' kernel logs."""
        return self.session.kernel_log_problems()

    # -- dom0 for scenarios (capabilities) ----------------------------------------------------
    def dom0_run(self, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
        """Run ``command`` as root in dom0: (exit code, stdout, stderr). For scenarios
        that need dom0 itself, e.g. a baseline swtpm behind dom0's own vTPM proxy."""
        self.require(Capability.DOM0_SHELL)
        return self.session.run(command, timeout)

    def tpm_trace(self, guest: Guest) -> list[str]:
        """The backend's traffic trace of ``guest``'s vTPM, as lines (one SSH command)."""
        return self.session.trace(guest.instance)

    def backend_resources(self) -> dict[str, int]:
        return self.session.backend_resources()

    def manager_status_line(self) -> str:
        return self.session.manager_status_line()

    def swtpm_pid(self, guest: Guest) -> int | None:
        self.require(Capability.KILL_SWTPM)
        return self.session.swtpm_pid(self._own(guest).instance)

    def kill_swtpm(self, guest: Guest) -> None:
        """SIGKILL the guest's swtpm in dom0; restarting it is the manager's job."""
        self.require(Capability.KILL_SWTPM)
        self.session.kill_swtpm(guest.name, self._own(guest).instance, self.logs())

    def reset_vtpm(self, guest: Guest) -> None:
        """The operator's reset of the guest's instance, in dom0: ends its failure mode."""
        self.require(Capability.KILL_SWTPM)
        self.session.reset_vtpm(self._own(guest).instance)

    def _send_signal(self, pid: int, signal_name: str) -> None:
        self.session.signal(pid, signal_name)  # swtpm runs in dom0

    def probe(self, guest: XenGuest, *args: str) -> dict[str, Any]:
        """``python3 -m xenvtpm probe ARGS`` inside ``guest`` (as its domain); its JSON."""
        self.require(Capability.XEN_PROBE)
        return self.session.probe(guest, *args)

    # -- evidence and the end ----------------------------------------------------------------
    def logs(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.artifacts.glob("*.log"))} | super().logs()

    def _close_logins(self) -> None:
        self.relays.close()
        self.session.close()
