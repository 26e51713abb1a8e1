"""A small simulated-Xen environment for the driver pair's integration tests.

Every piece is its own OS process, as in production: simxend (the hypervisor), the
manager with real swtpm instances, the backend, and one frontend per guest domain.
Tests reach into it only through the same interfaces a user has: the guests' TPM
sockets, xenstore as dom0, and the hypervisor's toolstack operations.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.paths import REPO_ROOT
from harness.process import parent_death_signal
from xenvtpm.manager.manager import status_counts
from xenvtpm.sim.adapter import SimControl, SimHypervisor
from xenvtpm.tools.toolstack import attach_vtpm, detach_vtpm
from xenvtpm.xen import SIM_DIR_ENV, SIM_FDS_ENV
from xenvtpm.xen.interface import Hypervisor


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class Guest:
    name: str
    domid: int
    instance: int
    socket_path: str
    frontend: Daemon

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(30)
        s.connect(self.socket_path)
        return s

    def transmit(self, command: bytes, timeout: float = 30.0) -> bytes:
        with self.connect() as s:
            s.settimeout(timeout)
            s.send(command)
            return s.recv(65536)


@dataclass
class SimEnv:
    workdir: Path
    daemons: list[Daemon] = field(default_factory=list)
    guests: list[Guest] = field(default_factory=list)
    dom0: Hypervisor | None = None
    control: SimControl | None = None

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def manager_socket(self) -> str:
        return str(self.run_dir / "vtpm.sock")

    def spawn(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> Daemon:
        log = self.workdir / f"{name}.log"
        full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "xenvtpm", *args],
                stdout=out,
                stderr=out,
                env=full_env,
                pass_fds=pass_fds,
                preexec_fn=parent_death_signal,  # a killed test run leaves no daemon
            )
        daemon = Daemon(name, proc, log)
        self.daemons.append(daemon)
        return daemon

    def start_hypervisor(self) -> None:
        self.spawn("simxend", ["simxend", "--dir", str(self.run_dir)])
        wait_for(
            lambda: (
                (self.run_dir / "privcmd.sock").exists()
                and (self.run_dir / "xenstored.sock").exists()
            ),
            10,
            "simxend",
        )
        self.control = SimControl(str(self.run_dir))
        self.dom0 = SimHypervisor.connect_dom0(str(self.run_dir))

    def start_manager(self, args: list[str] | None = None) -> Daemon:
        d = self.spawn(
            "manager",
            args
            or [
                "manager",
                "--socket",
                self.manager_socket,
                "--state-root",
                str(self.workdir / "state"),
            ],
        )
        wait_for(lambda: os.path.exists(self.manager_socket) or not d.alive(), 10, "manager")
        return d

    def reset_instance(self, instance: int) -> None:
        """The operator's reset (``python3 -m xenvtpm reset``): ends failure mode."""
        subprocess.run(
            [
                sys.executable,
                "-m",
                "xenvtpm",
                "reset",
                "--manager",
                self.manager_socket,
                str(instance),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            timeout=60,
        )

    def start_backend(
        self, timeout: float = 10.0, trace: Path | None = None, uuid_map: Path | None = None
    ) -> Daemon:
        return self.spawn(
            "backend",
            ["backend", "--manager", self.manager_socket, "--timeout", str(timeout)]
            + (["--trace", str(trace)] if trace is not None else [])
            + (["--uuid-map", str(uuid_map)] if uuid_map is not None else []),
            env={SIM_DIR_ENV: str(self.run_dir)},
        )

    def start_frontend(self, name: str, domid: int, socket_path: str) -> Daemon:
        assert self.control is not None
        xs_fd, hc_fd = self.control.connect_domain(domid)
        try:
            return self.spawn(
                f"frontend-{name}",
                ["frontend", "--socket", socket_path],
                env={SIM_FDS_ENV: f"{xs_fd},{hc_fd}"},
                pass_fds=(xs_fd, hc_fd),
            )
        finally:
            os.close(xs_fd)
            os.close(hc_fd)

    def add_guest(
        self, name: str, instance: int, wait: bool = True, resumed: bool = False
    ) -> Guest:
        """A new domain with a vTPM and a frontend; ``resumed``: as ``xl restore``."""
        assert self.control is not None and self.dom0 is not None
        domid = self.control.create_domain(name)
        attach_vtpm(self.dom0.xenstore, domid, instance, name, resumed=resumed)
        path = str(self.workdir / f"{name}.tpm")
        frontend = self.start_frontend(name, domid, path)
        guest = Guest(name, domid, instance, path, frontend)
        self.guests.append(guest)
        if wait:
            self.wait_connected(guest)
        return guest

    def add_domain(self, name: str, instance: int) -> int:
        """A new guest domain with a vTPM attached but no frontend (e.g. for a rogue one)."""
        assert self.control is not None and self.dom0 is not None
        domid = self.control.create_domain(name)
        attach_vtpm(self.dom0.xenstore, domid, instance, name)
        return domid

    def run_in_domain(
        self, domid: int, args: list[str], timeout: float = 120.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``python -m xenvtpm ARGS`` as a process of ``domid`` and wait for it."""
        assert self.control is not None
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        env.pop(SIM_DIR_ENV, None)
        proc = self.control.spawn(
            domid,
            [sys.executable, "-m", "xenvtpm", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def remove_domain(self, domid: int) -> None:
        """As ``xl destroy``: remove the vTPM directories, then the domain."""
        assert self.control is not None and self.dom0 is not None
        detach_vtpm(self.dom0.xenstore, domid)
        self.control.destroy_domain(domid)

    def frontend_state(self, guest: Guest) -> str:
        assert self.dom0 is not None
        try:
            return self.dom0.xenstore.read(
                f"/local/domain/{guest.domid}/device/vtpm/0/state"
            ).decode()
        except Exception:
            return "?"

    def wait_connected(self, guest: Guest, timeout: float = 15) -> None:
        def ready() -> bool:
            if not guest.frontend.alive():
                raise RuntimeError(f"frontend died:\n{guest.frontend.tail()}")
            return self.frontend_state(guest) == "4" and os.path.exists(guest.socket_path)

        wait_for(ready, timeout, f"{guest.name} to connect")

    def daemon(self, name: str) -> Daemon:
        return next(d for d in reversed(self.daemons) if d.name == name)

    def manager_status(self, instance: int) -> dict[str, int]:
        """The manager's own account of ``instance`` (its SIGUSR1 status line):
        ``queued``, ``in_flight`` and ``peak`` (most guest commands held at once)."""
        manager = self.daemon("manager")

        def lines() -> list[str]:
            return [
                x for x in manager.log.read_text(errors="replace").splitlines() if " status: " in x
            ]

        seen = len(lines())
        os.kill(manager.proc.pid, signal.SIGUSR1)
        wait_for(lambda: len(lines()) > seen, 10, "the manager's status line")
        counts = status_counts(lines()[-1], instance)
        if counts is None:
            raise LookupError(f"instance {instance} not in the manager's status")
        return counts

    def logs(self) -> str:
        return "\n".join(f"--- {d.name} ({d.log})\n{d.tail()}" for d in self.daemons)

    def close(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        if self.dom0 is not None:
            self.dom0.close()
        if self.control is not None:
            self.control.close()


@dataclass(frozen=True)
class Counts:
    """What a leak would show up in: dom0's grant mappings, mapped pages and event
    channel ports (simxend's ``stats(0)``), the backend's fds and threads, the swtpms."""

    mappings: int
    mapped_pages: int
    ports: int
    grants: int
    fds: int
    threads: int
    swtpms: int


def swtpm_count(env: SimEnv) -> int:
    """swtpm processes of this environment (others may run on the machine)."""
    needle = str(env.workdir / "state").encode()
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"swtpm" in cmdline.split(b"\0", 1)[0] and needle in cmdline:
            n += 1
    return n


def counts(env: SimEnv) -> Counts:
    assert env.control is not None
    stats = env.control.stats(0)
    pid = env.daemon("backend").proc.pid
    return Counts(
        mappings=int(stats["mappings"]),
        mapped_pages=int(stats["mapped_pages"]),
        ports=int(stats["ports"]),
        grants=int(stats["grants"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        swtpms=swtpm_count(env),
    )
