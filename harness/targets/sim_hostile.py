"""The sim target's toolstack for a rogue frontend (scenarios/test_hostile.py).

dom0's part, as ``xl`` would play it: each attack gets a new domain of its own with a
vTPM attached by ``toolstack.attach_vtpm`` (instance :data:`ROGUE_INSTANCE`), the rogue
(``python -m xenvtpm rogue ATTACK``) a process of that domain, then the device detached
and the domain destroyed. What would show a leak is counted where the sim keeps it:
dom0's grant mappings, mapped pages, grants and ports (simxend's ``stats(0)``), the
backend's fds and threads, and this target's swtpm processes.

The sim runs the rogue at native speed, so the answers and rates docs/threat-model.md
pins are checked here (``exact``); this was tests/test_hostile.py's own environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from harness.deadline import Deadline
from harness.errors import DeadlineExpired
from harness.process import all_procs, proc_cmdline
from harness.target import ROGUE_INSTANCE

if TYPE_CHECKING:
    from harness.targets.sim import SimTarget

ROGUE_TIMEOUT_S = 300.0
RELEASE_S = 10.0  # for the backend to let go of a rogue that left, before it is destroyed
DOM0_HOLDS = ("mappings", "mapped_pages", "ports")  # what the backend maps and binds


class SimHostileToolstack:
    """A domain per attack on the sim target; counts from simxend and ``/proc``."""

    exact = True
    settle_s = 10.0  # for the counts to come back after a rogue leaves
    poll_s = 0.05

    def __init__(self, target: SimTarget) -> None:
        from xenvtpm.sim.adapter import SimControl

        self.target = target
        self.control = SimControl(str(target.run_dir))
        self._warm = False  # the first rogue starts its instance's swtpm: not a leak

    def close(self) -> None:
        self.control.close()

    def counts(self) -> dict[str, int]:
        stats = self.control.stats(0)
        pid = self.target.backend.pid
        return {
            "mappings": int(stats["mappings"]),
            "mapped_pages": int(stats["mapped_pages"]),
            "grants": int(stats["grants"]),
            "ports": int(stats["ports"]),
            "backend_fds": len(os.listdir(f"/proc/{pid}/fd")),
            "backend_threads": len(os.listdir(f"/proc/{pid}/task")),
            "swtpms": self._swtpms(),
        }

    def _swtpms(self) -> int:
        """swtpm processes on this target's state (others may run on the machine)."""
        state = str(self.target.state_root)
        return sum(
            1
            for p in all_procs()
            if p.running and p.comm == "swtpm" and any(state in a for a in proc_cmdline(p.pid))
        )

    def backend_healthy(self) -> bool:
        """The backend runs and logged no traceback (a handler that died and was caught
        would otherwise pass unseen)."""
        backend = self.target.backend
        log = backend.log_path.read_text(errors="replace") if backend.log_path.exists() else ""
        return bool(backend.alive) and "Traceback" not in log

    def rogue_status(self) -> dict[str, int] | None:
        from xenvtpm.manager.manager import status_counts

        return status_counts(self.target.manager_status_line(), ROGUE_INSTANCE)

    def rogue(self, attack: str, args: list[str]) -> list[dict[str, Any]]:
        """The attack in a new domain. Once the rogue has left (closed its channel, or
        died) the backend lets go of its pages and port at once, before the toolstack
        destroys the domain: checked here, but for the first rogue (the warm-up)."""
        from harness.paths import REPO_ROOT
        from xenvtpm.tools.toolstack import attach_vtpm, detach_vtpm

        before = {k: v for k, v in self.counts().items() if k in DOM0_HOLDS}
        domid = self.control.create_domain(f"rogue-{attack}")
        attach_vtpm(self.target.xenstore, domid, ROGUE_INSTANCE, f"rogue-{attack}")
        try:
            proc = self.control.spawn(
                domid,
                [sys.executable, "-m", "xenvtpm", "rogue", attack, *args],
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdout=-1,
                stderr=-1,
            )
            out, err = proc.communicate(timeout=ROGUE_TIMEOUT_S)
            on_exit = self._released(before)
        finally:
            detach_vtpm(self.target.xenstore, domid)
            self.control.destroy_domain(domid)
        assert proc.returncode == 0, err.decode()[-3000:]
        warm_up, self._warm = not self._warm, True
        assert warm_up or on_exit == before, f"held after the rogue left: {on_exit}"
        return [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]

    def _released(self, before: dict[str, int]) -> dict[str, int]:
        """dom0's mappings, pages and ports once back at ``before`` (or after
        :data:`RELEASE_S`, as they are then)."""

        def now() -> dict[str, int]:
            return {k: v for k, v in self.counts().items() if k in DOM0_HOLDS}

        with contextlib.suppress(DeadlineExpired):  # reported by the caller, with the counts
            Deadline(RELEASE_S).wait_for(lambda: now() == before, "the rogue's share released")
        return now()
