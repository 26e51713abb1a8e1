"""The ``direct`` target: one plain swtpm per guest, no driver at all.

It is the baseline: the scenarios that do not need Xen run here against swtpm itself,
and benchmarks compare the driver's latency to it. Its "manager" is the set of swtpm
processes, so ``restart("manager")`` restarts them all on their state, and it plays the
manager's supervisor role after ``kill_swtpm`` by starting that swtpm again at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from harness.deadline import Deadline
from harness.process import ManagedProcess, ProcessRecord
from harness.swtpm import manufacture, swtpm_process
from harness.target import Capability, Component, Guest
from harness.targets.base import BaseGuest, BaseTarget
from harness.transport import RawTransport, SwtpmTransport
from xenvtpm.manager.swtpm import write_ca_config

START_TIMEOUT = 30.0
FIRST_INSTANCE = 1000


@dataclass(eq=False)
class DirectGuest(BaseGuest):
    name: str
    instance: int
    socket: Path
    state_dir: Path
    process: ManagedProcess
    target_name: str = field(default="direct", init=False)

    @property
    def domid(self) -> int | None:
        return None

    def transport(self, shared: bool = False) -> RawTransport:
        return SwtpmTransport(self.socket)

    def logs(self) -> dict[str, Path]:
        return {f"swtpm-{self.name}": self.process.log_path}

    def __repr__(self) -> str:
        return f"DirectGuest({self.name!r}, instance={self.instance}, tpm={str(self.socket)!r})"


class DirectTarget(BaseTarget):
    name: ClassVar[str] = "direct"
    CAPABILITIES: ClassVar[frozenset[str]] = frozenset(
        {
            Capability.MULTI_GUEST,
            Capability.KILL_SWTPM,
            Capability.RESTART_MANAGER,
            Capability.SHARED_CLIENTS,
        }
    )

    _guests: list[DirectGuest]

    def _compose(self) -> None:
        self._guests = []
        for i in range(self.guest_count):
            name, instance = f"guest{i}", FIRST_INSTANCE + i
            socket = self.run_dir / f"{name}.tpm"
            state = self.run_dir / "state" / str(instance)
            log = self.log_dir / f"swtpm-{name}.log"
            proc = swtpm_process(f"swtpm-{name}", state, socket, log, self.die_with_parent)
            self._guests.append(DirectGuest(name, instance, socket, state, proc))

    @property
    def guests(self) -> Sequence[DirectGuest]:
        return list(self._guests)

    def _start(self) -> None:
        deadline = Deadline(START_TIMEOUT)
        setup = write_ca_config(self.run_dir)  # the manager's own CA layout
        for g in self._guests:
            self.say(f"{g.name}: manufacturing vTPM instance {g.instance}")
            manufacture(g.state_dir, setup, self.log_dir / "swtpm_setup.log", deadline)
        for g in self._guests:
            g.process.start()
        for g in self._guests:
            g.process.wait_ready(deadline)
            self.say(f"{g.name}: swtpm pid {g.process.pid} on {g.socket}")

    def _stop(self) -> None:
        for g in self._guests:
            g.process.stop()

    def _processes(self) -> list[ManagedProcess]:
        return [g.process for g in self._guests]

    def _detach(self) -> list[ProcessRecord]:
        return [g.process.detach() for g in self._guests]

    def restart(self, component: Component) -> None:
        self.require(f"restart-{component}")
        deadline = Deadline(START_TIMEOUT)
        self._stop()
        for g in self._guests:
            g.process.start()
        for g in self._guests:
            g.process.wait_ready(deadline)

    def kill_swtpm(self, guest: Guest) -> None:
        self.require(Capability.KILL_SWTPM)
        g: DirectGuest = self._own(guest)
        g.process.kill()
        g.process.start()
        g.process.wait_ready(Deadline(START_TIMEOUT))

    def reset_vtpm(self, guest: Guest) -> None:
        """Nothing to do: without the driver, kill_swtpm already started a fresh swtpm."""
        self.require(Capability.KILL_SWTPM)

    def swtpm_pid(self, guest: Guest) -> int | None:
        g: DirectGuest = self._own(guest)
        return g.process.pid if g.process.alive else None

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "guests": [
                {
                    "name": g.name,
                    "domid": None,
                    "instance": g.instance,
                    "tpm": str(g.socket),
                    "transport": "swtpm-stream",
                }
                for g in self._guests
            ],
        }
