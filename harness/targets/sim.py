"""The ``sim`` target: the driver pair on the simulated Xen, every piece its own process.

    simxend (hypervisor)   manager (+ one swtpm per instance)   backend (dom0)
    frontend-guestN (one per guest domain, serving RUN/guestN.tpm, SOCK_SEQPACKET)

The harness is the toolstack (docs/simulated-xen.md): it creates each domain through
``SimControl``, writes the vTPM's xenstore directories (``toolstack.attach_vtpm``, as xl's
hotplug scripts did) and hands each frontend its domain's two pre-connected fds.

A guest is ready when its frontend has written ``device/vtpm/0/state`` since it started
and the node reads 4 (Connected). "Since it started" matters on restarts: a frontend
that was killed leaves a stale 4 behind, so readiness is judged from xenstore watch
events that arrive after the disturbance, never from the value alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from harness.deadline import Deadline
from harness.errors import HarnessError, LaunchFailure, ResetFailed, TargetNotReady
from harness.paths import REPO_ROOT
from harness.process import ManagedProcess, ProcessRecord, all_procs, proc_cmdline, tail
from harness.target import Capability, Component, Guest, HostileToolstack
from harness.targets.base import BaseGuest, BaseTarget
from harness.traffic import TRACE_DIR_NAME, read_trace
from harness.transport import RawTransport, SeqpacketTransport

START_TIMEOUT = 30.0
GUEST_TIMEOUT = 20.0
PROBE_TIMEOUT = 30.0
FIRST_INSTANCE = 1000
CONNECTED = b"4"  # XenbusStateConnected. Spec: xen/include/public/io/xenbus.h


@dataclass(eq=False)
class SimGuest(BaseGuest):
    name: str
    instance: int
    socket: Path
    target: SimTarget = field(repr=False)
    domid: int | None = None
    frontend: ManagedProcess | None = field(default=None, repr=False)
    target_name: str = field(default="sim", init=False)

    @property
    def state_path(self) -> str:
        return f"/local/domain/{self.domid}/device/vtpm/0/state"

    @property
    def backend_state_path(self) -> str:
        return f"/local/domain/0/backend/vtpm/{self.domid}/0/state"

    def transport(self, shared: bool = False) -> RawTransport:
        return SeqpacketTransport(self.socket)

    def logs(self) -> dict[str, Path]:
        """The frontend's log and whatever logs the manager keeps for this instance."""
        logs = {f"frontend-{self.name}": self.target.log_dir / f"frontend-{self.name}.log"}
        for path in sorted((self.target.state_root / str(self.instance)).glob("*.log")):
            logs[f"{path.stem}-{self.name}"] = path
        return logs

    def probe(self, *args: str) -> dict[str, Any]:
        return self.target.probe(self, *args)

    def __repr__(self) -> str:
        return f"SimGuest({self.name!r}, domid={self.domid}, instance={self.instance})"


def _python_env(extra: dict[str, str], drop: Sequence[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def find_swtpm(state_dir: Path) -> int | None:
    """The pid of the swtpm running on ``state_dir`` (``--tpmstate dir=STATE[,...]``)."""
    state = str(state_dir)
    for p in all_procs():
        if p.running and p.comm == "swtpm":
            for arg in proc_cmdline(p.pid):
                value = arg.split("=", 1)[1] if arg.startswith("dir=") else arg
                if value.split(",", 1)[0].rstrip("/") == state:
                    return p.pid
    return None


def probe_as_domain(control: Any, domid: int, args: Sequence[str]) -> dict[str, Any]:
    """Run ``python -m xenvtpm probe ARGS`` in domain ``domid`` (a fresh connection of
    that domain from ``SimControl.connect_domain``); return its one JSON object."""
    from xenvtpm.xen import SIM_DIR_ENV, SIM_FDS_ENV

    xs_fd, hc_fd = control.connect_domain(domid)
    argv = [sys.executable, "-m", "xenvtpm", "probe", *args]
    try:
        result = subprocess.run(
            argv,
            pass_fds=(xs_fd, hc_fd),
            capture_output=True,
            timeout=PROBE_TIMEOUT,
            env=_python_env({SIM_FDS_ENV: f"{xs_fd},{hc_fd}"}, drop=[SIM_DIR_ENV]),
            check=False,
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(xs_fd)
        os.close(hc_fd)
    try:
        answer: dict[str, Any] = json.loads(result.stdout)
    except ValueError as e:
        raise LaunchFailure(
            "probe",
            argv,
            result.returncode,
            (result.stdout + result.stderr).decode(errors="replace")[-2000:],
            reason="did not print one JSON object",
        ) from e
    return answer


class SimTarget(BaseTarget):
    name: ClassVar[str] = "sim"
    # No Linux guests and no dom0 shell: the xl, kernel-TPM and dom0 capabilities are
    # real Xen's; nor can a simulated domain be suspended (save-restore). The resumed
    # BIND behind it is tests/test_driver_pair.py's.
    CAPABILITIES: ClassVar[frozenset[str]] = frozenset(Capability) - {
        Capability.XL,
        Capability.KERNEL_TPM,
        Capability.DOM0_SHELL,
        Capability.SAVE_RESTORE,
        Capability.CRASH_WATCH,  # nothing to crash but processes: their exits are problems()
        Capability.SERVICES,  # its daemons are processes of the run, not systemd units
        Capability.CONFINED_SWTPM,  # its manager runs each swtpm as it is (tests/ confine)
    }

    def __init__(
        self,
        guests: int,
        run_dir: Path | None = None,
        progress: Any = None,
        detached: bool = False,
        *,
        trace: bool = True,
    ) -> None:
        """``trace``: the backend writes its traffic trace (off: the bench, which
        measures the driver as deployed, where the backend's default is no trace)."""
        super().__init__(guests, run_dir, progress, detached)
        from xenvtpm.xen import SIM_DIR_ENV, SIM_FDS_ENV

        self._sim_dir_env, self._sim_fds_env = SIM_DIR_ENV, SIM_FDS_ENV
        self.state_root = self.run_dir / "state"
        self.manager_socket = self.run_dir / "vtpm.sock"
        self.trace_dir = self.run_dir / TRACE_DIR_NAME  # the backend's traffic trace
        self._control: Any = None  # xenvtpm.sim.adapter.SimControl
        self._dom0: Any = None  # the dom0 Hypervisor (toolstack's xenstore)
        self._watch_seq = 0
        self._pending: dict[str, str] = {}  # guest name -> token of its readiness watch
        self._fired: dict[str, int] = {}  # token -> watch events seen since registration
        dom0_env = _python_env({SIM_DIR_ENV: str(self.run_dir)}, drop=[SIM_FDS_ENV])
        py = [sys.executable, "-m", "xenvtpm"]
        self.simxend = ManagedProcess(
            "simxend",
            [*py, "simxend", "--dir", str(self.run_dir)],
            self.log_dir / "simxend.log",
            env=dom0_env,
            die_with_parent=self.die_with_parent,
            ready=lambda: all(
                (self.run_dir / s).exists() for s in ("xenstored.sock", "privcmd.sock")
            ),
        )
        self.manager = ManagedProcess(
            "manager",
            [
                *py,
                "manager",
                "--socket",
                str(self.manager_socket),
                "--state-root",
                str(self.state_root),
            ],
            self.log_dir / "manager.log",
            env=dom0_env,
            ready=self.manager_socket.exists,
            die_with_parent=self.die_with_parent,
        )
        self.backend = ManagedProcess(
            "backend",
            [
                *py,
                "backend",
                "--manager",
                str(self.manager_socket),
                *(["--trace", str(self.trace_dir)] if trace else []),
            ],
            self.log_dir / "backend.log",
            env=dom0_env,
            die_with_parent=self.die_with_parent,
        )
        self._py = py
        self._guests = [
            SimGuest(f"guest{i}", FIRST_INSTANCE + i, self.run_dir / f"guest{i}.tpm", self)
            for i in range(guests)
        ]

    @property
    def guests(self) -> Sequence[SimGuest]:
        return list(self._guests)

    # -- bring-up ----------------------------------------------------------------------
    def _start(self) -> None:
        deadline = Deadline(START_TIMEOUT)
        self.say("starting simxend (the simulated hypervisor)")
        self.simxend.start().wait_ready(deadline)
        self._connect_toolstack()
        self.say("starting the vTPM manager and the backend")
        self.manager.start()
        self.manager.wait_ready(deadline)
        self.backend.start()
        for g in self._guests:
            self._create_guest(g, deadline)
        for g in self._guests:
            self._wait_connected(g, deadline)
            self.say(f"{g.name}: domain {g.domid}, vTPM instance {g.instance}, tpm {g.socket}")
        if not self.backend.alive:
            raise self.backend.failure("died while guests connected")

    def _connect_toolstack(self) -> None:
        from xenvtpm.sim.adapter import SimControl
        from xenvtpm.xen import open_hypervisor

        self._control = SimControl(str(self.run_dir))
        self._dom0 = open_hypervisor(str(self.run_dir))

    @property
    def xenstore(self) -> Any:
        """dom0's xenstore connection (the toolstack's): for scenarios that inspect it."""
        if self._dom0 is None:
            raise TargetNotReady("sim target", "not started")
        return self._dom0.xenstore

    def _create_guest(self, g: SimGuest, deadline: Deadline) -> None:
        from xenvtpm.tools.toolstack import attach_vtpm

        g.domid = int(self._control.create_domain(g.name))
        attach_vtpm(self.xenstore, g.domid, g.instance, g.name)
        self._start_frontend(g)

    def _start_frontend(self, g: SimGuest) -> None:
        """Start ``g``'s frontend and register the watch ``_wait_connected`` judges by."""
        g.socket.unlink(missing_ok=True)
        token = self._watch(g)
        xs_fd, hc_fd = self._control.connect_domain(g.domid)
        try:
            g.frontend = ManagedProcess(
                f"frontend-{g.name}",
                [*self._py, "frontend", "--socket", str(g.socket)],
                self.log_dir / f"frontend-{g.name}.log",
                env=_python_env({self._sim_fds_env: f"{xs_fd},{hc_fd}"}, drop=[self._sim_dir_env]),
                pass_fds=(xs_fd, hc_fd),
                die_with_parent=self.die_with_parent,
            )
            g.frontend.start()
        finally:
            os.close(xs_fd)
            os.close(hc_fd)
        self._pending[g.name] = token

    def _watch(self, g: SimGuest) -> str:
        """Watch ``g``'s frontend state; drain the event the registration itself fires."""
        self._watch_seq += 1
        token = f"harness-{g.name}-{self._watch_seq}"
        xs = self.xenstore
        xs.watch(g.state_path, token)

        def registered() -> bool:
            self._read_events()
            return self._fired.get(token, 0) > 0

        Deadline(5.0).wait_for(registered, f"xenstore watch on {g.state_path}")
        self._fired[token] = 0
        return token

    def _read_events(self) -> None:
        for ev in self.xenstore.read_watches():
            self._fired[ev.token] = self._fired.get(ev.token, 0) + 1

    def _state(self, path: str) -> bytes | None:
        from xenvtpm.errors import XenStoreError

        try:
            value: bytes = self.xenstore.read(path)
            return value
        except XenStoreError:
            return None

    def _wait_connected(self, g: SimGuest, deadline: Deadline) -> None:
        """Ready = an event on the state node since the frontend started, then it reads 4."""
        token = self._pending.pop(g.name, None)
        seen = token is None

        def ready() -> bool:
            nonlocal seen
            if g.frontend is None or not g.frontend.alive:
                raise g.frontend.failure() if g.frontend else TargetNotReady(g.name, "no frontend")
            if not self.backend.alive:
                raise self.backend.failure("died while a guest connected")
            self._read_events()
            seen = seen or self._fired.get(str(token), 0) > 0
            return seen and self._state(g.state_path) == CONNECTED and g.socket.exists()

        try:
            deadline.sub(GUEST_TIMEOUT).wait_for(ready, f"{g.name} to connect")
        except LaunchFailure:
            raise
        except HarnessError as e:
            raise TargetNotReady(
                f"guest {g.name} (domain {g.domid})",
                f"frontend state {self._state(g.state_path)!r}, backend state "
                f"{self._state(g.backend_state_path)!r}\nfrontend log tail:\n"
                f"{tail(g.logs()[f'frontend-{g.name}'], 15)}",
                self.logs(),
            ) from e
        finally:
            if token is not None:
                self._unwatch(g, token)

    def _unwatch(self, g: SimGuest, token: str) -> None:
        from xenvtpm.errors import XenStoreError

        with contextlib.suppress(XenStoreError):
            self.xenstore.unwatch(g.state_path, token)
        self._fired.pop(token, None)

    # -- teardown ----------------------------------------------------------------------
    def _stop(self) -> None:
        try:
            for g in self._guests:
                if g.frontend is not None:
                    g.frontend.stop()
            self.backend.stop()
            self.manager.stop()
        finally:
            for conn in (self._dom0, self._control):
                if conn is not None:
                    try:
                        conn.close()
                    except Exception as e:
                        self.log.warning("closing %r: %s", conn, e)
            self._dom0 = self._control = None
            self.simxend.stop()
            self.manager.stop()  # stray swtpm children, if the manager left any

    def _processes(self) -> list[ManagedProcess]:
        frontends = [g.frontend for g in self._guests if g.frontend is not None]
        return [self.simxend, self.manager, self.backend, *frontends]

    def _detach(self) -> list[ProcessRecord]:
        records = [g.frontend.detach() for g in self._guests if g.frontend is not None]
        records += [self.backend.detach(), self.manager.detach(), self.simxend.detach()]
        for conn in (self._dom0, self._control):
            if conn is not None:
                conn.close()
        self._dom0 = self._control = None
        return records

    # -- disturbances ------------------------------------------------------------------
    def restart(self, component: Component) -> None:
        self.require(f"restart-{component}")
        deadline = Deadline(START_TIMEOUT)
        if component == "frontend":
            for g in self._guests:
                if g.frontend is not None:
                    g.frontend.stop()
                self._start_frontend(g)
            for g in self._guests:
                self._wait_connected(g, deadline)
        elif component == "backend":
            self.backend.stop()
            self.backend.start()
            self._wait_all_connected(deadline)
        elif component == "manager":
            self.manager.stop()
            self.manager_socket.unlink(missing_ok=True)
            self.manager.start()
            self.manager.wait_ready(deadline)
            self._wait_all_connected(deadline)
        else:
            raise ValueError(f"unknown component {component!r}")

    def _wait_all_connected(self, deadline: Deadline) -> None:
        for g in self._guests:
            self._wait_connected(g, deadline)

    def reboot(self, guest: Guest) -> None:
        """As ``xl reboot``: the guest shuts down, its devices and domain are destroyed,
        and a new domain (new domid) gets the same vTPM instance."""
        self.require(Capability.REBOOT)
        from xenvtpm.tools.toolstack import detach_vtpm

        g: SimGuest = self._own(guest)
        deadline = Deadline(START_TIMEOUT)
        if g.frontend is not None:
            g.frontend.stop()
        old = g.domid
        assert old is not None
        detach_vtpm(self.xenstore, old)
        self._control.destroy_domain(old)
        self._create_guest(g, deadline)
        self._wait_connected(g, deadline)
        self.say(f"{g.name}: rebooted, domain {old} -> {g.domid}")

    def manager_status_line(self, timeout: float = 10.0) -> str:
        """The manager's status line (SIGUSR1): each instance's queue, in-flight, peak;
        read it with :func:`xenvtpm.manager.manager.status_counts`."""
        pid, log_path = self.manager.pid, self.manager.log_path
        if pid is None:
            raise TargetNotReady("manager", "not running", self.logs())

        def last() -> str | None:  # each line carries its time, so a new one differs
            found = [x for x in tail(log_path, 200).splitlines() if " status: " in x]
            return found[-1] if found else None

        seen = last()
        os.kill(pid, signal.SIGUSR1)
        deadline = Deadline(timeout)
        while (line := last()) == seen or line is None:
            if deadline.expired:
                raise TargetNotReady("manager", "no status line after SIGUSR1", self.logs())
            time.sleep(0.02)
        return line

    def hostile_toolstack(self) -> HostileToolstack:
        """dom0's part for a rogue frontend (scenarios/test_hostile.py)."""
        from harness.targets.sim_hostile import SimHostileToolstack

        return SimHostileToolstack(self)

    def _swtpm_of(self, g: SimGuest) -> int | None:
        return find_swtpm(self.state_root / str(g.instance))

    def swtpm_pid(self, guest: Guest) -> int | None:
        self.require(Capability.KILL_SWTPM)
        return self._swtpm_of(self._own(guest))

    def tpm_trace(self, guest: Guest) -> list[str]:
        """The backend's traffic trace of ``guest``'s vTPM, as lines."""
        return read_trace(self.trace_dir, guest.instance)

    def kill_swtpm(self, guest: Guest) -> None:
        """SIGKILL the guest's swtpm; restarting it is the manager's job."""
        self.require(Capability.KILL_SWTPM)
        pid = self._swtpm_of(self._own(guest))
        if pid is None:
            raise TargetNotReady(f"swtpm of {guest.name}", "no such process", self.logs())
        os.kill(pid, 9)
        Deadline(5.0).wait_for(
            lambda: self._swtpm_of(self._own(guest)) != pid, f"swtpm {pid} to die"
        )

    def reset_vtpm(self, guest: Guest) -> None:
        """The operator's reset of the guest's instance: ends its failure mode."""
        self.require(Capability.KILL_SWTPM)
        g = self._own(guest)
        result = subprocess.run(
            [*self._py, "reset", "--manager", str(self.manager_socket), str(g.instance)],
            capture_output=True,
            text=True,
            timeout=90,
        )
        if result.returncode != 0:
            raise ResetFailed(g.instance, result.stderr)

    # -- probing as a guest ------------------------------------------------------------
    def probe(self, guest: SimGuest, *args: str) -> dict[str, Any]:
        """``python -m xenvtpm probe ARGS`` as ``guest``'s domain; its JSON answer."""
        self.require(Capability.XEN_PROBE)
        if guest.domid is None:
            raise TargetNotReady(guest.name, "has no domain")
        return probe_as_domain(self._control, guest.domid, args)

    # -- description -------------------------------------------------------------------
    def logs(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.log_dir.glob("*.log"))}

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "guests": [
                {
                    "name": g.name,
                    "domid": g.domid,
                    "instance": g.instance,
                    "tpm": str(g.socket),
                    "transport": "seqpacket",
                }
                for g in self._guests
            ],
        }
