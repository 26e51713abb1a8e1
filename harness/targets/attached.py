"""A target made from what ``harness up`` left running (``pytest --attach``).

It reproduces a bug by hand: ``harness up``, then ``pytest scenarios --attach -k NAME``
as often as needed against the same live environment, then ``harness down``. It did
not start the daemons, so it cannot restart them: capabilities that disturb the
environment (restarts, reboot; kill-swtpm where nothing respawns swtpm) are absent and
those scenarios are skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ResetFailed, TargetNotReady, UnsupportedOperation
from harness.process import tail
from harness.relay_pool import RelayPool
from harness.state import RunRecord
from harness.target import XEN_TARGETS, Capability, Component, Guest
from harness.targets.attached_xen import XenLogins
from harness.targets.base import BaseGuest
from harness.traffic import TRACE_DIR_NAME, read_trace
from harness.transport import RawTransport, SeqpacketTransport, SwtpmTransport

# What an attached environment of each kind can still do without owning its daemons.
ATTACHED_CAPABILITIES: dict[str, frozenset[str]] = {
    "sim": frozenset(
        {
            Capability.MULTI_GUEST,
            Capability.XEN_PROBE,
            Capability.VALIDATION,
            Capability.KILL_SWTPM,
            Capability.SHARED_CLIENTS,
            Capability.TRAFFIC_TRACE,
        }
    ),
    "direct": frozenset({Capability.MULTI_GUEST, Capability.SHARED_CLIENTS}),
    # Through the guests' relays, as a private xen target (harness/targets/attached_xen.py)
    "xen": frozenset(
        {
            Capability.MULTI_GUEST,
            Capability.SHARED_CLIENTS,
            Capability.TRAFFIC_TRACE,
            Capability.VALIDATION,
        }
    ),
    "xen-kernel": frozenset(
        {Capability.MULTI_GUEST, Capability.TRAFFIC_TRACE, Capability.VALIDATION}
    ),
    "xen-kernel-tpm2": frozenset(
        {
            Capability.MULTI_GUEST,
            Capability.SHARED_CLIENTS,
            Capability.TRAFFIC_TRACE,
            Capability.VALIDATION,
        }
    ),
}


@dataclass(eq=False)
class AttachedGuest(BaseGuest):
    name: str
    domid: int | None
    instance: int
    tpm: Path
    kind: str
    target: AttachedTarget = field(repr=False)
    device: str = "/dev/tpm0"  # a Xen guest's own TPM device

    @property
    def target_name(self) -> str:  # type: ignore[override]
        return self.target.name

    @property
    def kernel_device(self) -> bool:  # type: ignore[override]
        return self.target.name in XEN_TARGETS  # /dev/tpm0 of a Linux guest

    def transport(self, shared: bool = False) -> RawTransport:
        logins = self.target.xen_logins
        if logins is not None:  # leased from a pool of relays, as on a private xen target
            device = "/dev/tpmrm0" if shared else self.device
            return self.target.relays.lease(
                self.name, device, lambda: logins.relay(self.name, device), shared=shared
            )
        if self.kind == "seqpacket":
            return SeqpacketTransport(self.tpm)
        return SwtpmTransport(self.tpm)

    def logs(self) -> dict[str, Path]:
        return {n: p for n, p in self.target.logs().items() if n.endswith(f"-{self.name}")}

    def probe(self, *args: str) -> dict[str, Any]:
        return self.target.probe(self, *args)


class AttachedTarget:
    def __init__(self, record: RunRecord, progress: Any = None) -> None:
        self.record = record
        self.name = record.target
        self.run_dir = Path(record.run_dir)
        guests = record.description.get("guests", [])
        caps = set(ATTACHED_CAPABILITIES.get(self.name, frozenset()))
        if len(guests) < 2:
            caps.discard(Capability.MULTI_GUEST)
        self.capabilities = frozenset(caps)
        self._guests = [
            AttachedGuest(
                g["name"],
                g.get("domid"),
                int(g["instance"]),
                Path(g["tpm"]),
                g.get("transport", "seqpacket"),
                self,
                g.get("device", "/dev/tpm0"),
            )
            for g in guests
        ]
        self._progress = progress
        self._control: Any = None
        self.xen_logins: XenLogins | None = None
        self.relays = RelayPool()  # a Xen guest's relays (harness.relay_pool)

    @classmethod
    def capabilities_for(cls, record: RunRecord) -> frozenset[str]:
        return cls(record).capabilities

    @property
    def guests(self) -> Sequence[AttachedGuest]:
        return list(self._guests)

    def start(self) -> None:
        dead = [p.name for p in self.record.processes if not p.alive()]
        if dead:
            raise TargetNotReady(
                f"the {self.name} environment in {self.run_dir}",
                f"{', '.join(dead)} not running; see python -m harness status",
                self.logs(),
            )
        if self.name == "sim":
            from xenvtpm.sim.adapter import SimControl

            self._control = SimControl(str(self.run_dir))
        if self.name in XEN_TARGETS:
            logins = XenLogins(self.record.description)
            try:
                logins.connect()
            except BaseException:
                logins.close()
                raise
            self.xen_logins = logins

    def close(self) -> None:
        self.relays.close()
        if self.xen_logins is not None:
            self.xen_logins.close()
            self.xen_logins = None
        if self._control is not None:
            self._control.close()
            self._control = None

    def tpm_trace(self, guest: Guest) -> list[str]:
        """The backend's traffic trace of ``guest``'s vTPM (sim: in the run directory)."""
        if self.xen_logins is not None:
            return self.xen_logins.trace(guest.instance)
        return read_trace(self.run_dir / TRACE_DIR_NAME, guest.instance)

    def problems(self) -> list[str]:
        return [
            f"{p.name} (pid {p.pid}) is not running; log {p.log}:\n{tail(Path(p.log), 15)}"
            for p in self.record.processes
            if not p.alive()
        ]

    def recover(self) -> None:
        raise TargetNotReady(
            f"the attached {self.name} environment",
            "it broke and only harness can restart it: python -m harness down && "
            "python -m harness up",
            self.logs(),
        )

    def _require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise UnsupportedOperation(f"{self.name} (attached)", capability)

    def restart(self, component: Component) -> None:
        self._require(f"restart-{component}")

    def reboot(self, guest: Guest) -> None:
        self._require(Capability.REBOOT)

    def swtpm_pid(self, guest: Guest) -> int | None:
        self._require(Capability.KILL_SWTPM)
        from harness.targets.sim import find_swtpm

        return find_swtpm(self.run_dir / "state" / str(guest.instance))

    def kill_swtpm(self, guest: Guest) -> None:
        import os
        import signal

        pid = self.swtpm_pid(guest)
        if pid is None:
            raise TargetNotReady(f"swtpm of {guest.name}", "no such process", self.logs())
        os.kill(pid, signal.SIGKILL)

    def reset_vtpm(self, guest: Guest) -> None:
        import subprocess
        import sys

        self._require(Capability.KILL_SWTPM)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "xenvtpm",
                "reset",
                "--manager",
                str(self.run_dir / "vtpm.sock"),
                str(guest.instance),
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        if result.returncode != 0:
            raise ResetFailed(guest.instance, result.stderr)

    def probe(self, guest: AttachedGuest, *args: str) -> dict[str, Any]:
        self._require(Capability.XEN_PROBE)
        from harness.targets.sim import probe_as_domain

        if self._control is None or guest.domid is None:
            raise TargetNotReady(guest.name, "not attached to a simulated hypervisor")
        return probe_as_domain(self._control, guest.domid, args)

    def logs(self) -> dict[str, Path]:
        logs = {p.stem: p for p in sorted((self.run_dir / "logs").glob("*.log"))}
        for g in self._guests:
            for path in sorted((self.run_dir / "state" / str(g.instance)).glob("*.log")):
                logs[f"{path.stem}-{g.name}"] = path
        return logs

    def describe(self) -> dict[str, Any]:
        return dict(self.record.description)

    def __enter__(self) -> AttachedTarget:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
