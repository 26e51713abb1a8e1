"""What every target shares: run directory, capability checks, progress, lifecycle.

A target's ``start`` walks off -> ready (STYLE.md 9) and rolls back on failure; ``close``
stops everything, soft then hard, and is idempotent. ``detach`` hands the running
processes over to the CLI's state record instead of stopping them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from harness.errors import TargetNotReady, UnsupportedOperation
from harness.process import ManagedProcess, ProcessRecord, tail
from harness.target import Component, Guest
from harness.targets import Progress
from harness.tcti import TransportTCTI
from harness.transport import RawTransport

log = logging.getLogger(__name__)


class BaseGuest:
    """Shared guest behaviour: ``tcti()`` over ``transport()``; no probe by default."""

    target_name: str = "base"
    kernel_device: bool = False
    max_command_size: int = 4096  # swtpm's TPM_PT_MAX_COMMAND_SIZE

    def transport(self, shared: bool = False) -> RawTransport:
        raise NotImplementedError

    def tcti(self, shared: bool = False) -> TransportTCTI:
        return TransportTCTI(self.transport(shared))

    def probe(self, *args: str) -> dict[str, Any]:
        raise UnsupportedOperation(self.target_name, "xen-probe")


class BaseTarget:
    name: ClassVar[str] = "base"
    CAPABILITIES: ClassVar[frozenset[str]] = frozenset()
    MAX_GUESTS: ClassVar[int] = 1000
    WHY_MAX: ClassVar[str] = ""

    def __init__(
        self,
        guests: int,
        run_dir: Path | None = None,
        progress: Progress | None = None,
        detached: bool = False,
    ) -> None:
        if guests < 1:
            raise ValueError(f"a target needs at least one guest, not {guests}")
        if guests > self.MAX_GUESTS:
            why = f" {self.WHY_MAX}" if self.WHY_MAX else ""
            raise ValueError(f"at most {self.MAX_GUESTS} guests{why}, not {guests}")
        self.guest_count = guests
        self.capabilities = self.capabilities_for(guests)
        self._own_run_dir = run_dir is None
        # Short paths: unix socket paths must fit in 108 bytes.
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"xenvtpm-{self.name}-"))
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir = self.run_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self._progress = progress
        # Detached targets (``harness up``) outlive this process; others die with it.
        self.die_with_parent = not detached
        self._started = False
        self.log = log.getChild(self.name)
        self._compose()

    def _compose(self) -> None:
        """Make the target's parts, once the run directory and progress exist: a target
        that needs no arguments of its own adds its parts here, not in ``__init__``."""

    @classmethod
    def capabilities_for(cls, guests: int, **options: Any) -> frozenset[str]:
        """What the target can do with ``guests`` guests; ``options`` are its own
        settings (as ``make_target`` passes them), which some targets' abilities follow."""
        caps = set(cls.CAPABILITIES)
        if guests < 2:
            caps.discard("multi-guest")
        return frozenset(caps)

    # -- helpers -----------------------------------------------------------------------
    def say(self, message: str) -> None:
        """A progress line (stderr for the CLI, the terminal for pytest)."""
        self.log.info("%s", message)
        if self._progress is not None:
            self._progress(message)

    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise UnsupportedOperation(self.name, capability)

    def _own(self, guest: Guest) -> Any:
        if guest not in self.guests:
            raise ValueError(f"{guest!r} is not a guest of target {self.name}")
        return guest

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def guests(self) -> Sequence[Any]:
        raise NotImplementedError

    def start(self) -> None:
        if self._started:
            return
        try:
            self._start()
        except BaseException:
            self.say("start failed: stopping what was started")
            self.close()
            raise
        self._started = True

    def close(self) -> None:
        try:
            self._stop()
        finally:
            self._started = False

    def detach(self) -> list[ProcessRecord]:
        """Leave everything running; return the processes, in the order to stop them."""
        records = self._detach()
        self._started = False
        return records

    def problems(self) -> list[str]:
        """What is broken now: each managed process that should run and does not."""
        if not self._started:
            return []
        return [
            f"{p.name} (pid {p.pid}) exited with code {p.returncode}; log {p.log_path}:\n"
            f"{tail(p.log_path, 15)}"
            for p in self._processes()
            if not p.alive
        ]

    def recover(self) -> None:
        """Stop everything and start again on the same state (after a crash)."""
        self.say("environment broken: restarting it")
        self.close()
        self.start()

    def remove_run_dir(self) -> None:
        """Delete the run directory if this target made it (logs go with it)."""
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _detach(self) -> list[ProcessRecord]:
        raise NotImplementedError

    def _processes(self) -> list[ManagedProcess]:
        """The processes that must be running while the target is up."""
        raise NotImplementedError

    # -- optional operations (capabilities) --------------------------------------------
    def restart(self, component: Component) -> None:
        raise UnsupportedOperation(self.name, f"restart-{component}")

    def reboot(self, guest: Guest) -> None:
        raise UnsupportedOperation(self.name, "reboot")

    def kill_swtpm(self, guest: Guest) -> None:
        raise UnsupportedOperation(self.name, "kill-swtpm")

    def swtpm_pid(self, guest: Guest) -> int | None:
        raise UnsupportedOperation(self.name, "kill-swtpm")

    def reset_vtpm(self, guest: Guest) -> None:
        raise UnsupportedOperation(self.name, "kill-swtpm")

    def pause_swtpm(self, guest: Guest) -> None:
        """SIGSTOP the guest's swtpm: a command sent now hangs (a hung TPM)."""
        self._signal_swtpm(guest, "STOP")

    def resume_swtpm(self, guest: Guest) -> None:
        """SIGCONT the guest's swtpm: the hung command's answer comes, late."""
        self._signal_swtpm(guest, "CONT")

    def _signal_swtpm(self, guest: Guest, signal_name: str) -> None:
        pid = self.swtpm_pid(guest)
        if pid is None:
            raise TargetNotReady(f"swtpm of {guest.name}", "no such process", self.logs())
        self._send_signal(pid, signal_name)

    def _send_signal(self, pid: int, signal_name: str) -> None:
        """``kill -SIGNAL PID`` where the swtpm processes run: here, this host."""
        os.kill(pid, getattr(signal, f"SIG{signal_name}"))

    def logs(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.log_dir.glob("*.log"))}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(guests={self.guest_count}, run_dir={self.run_dir})"
