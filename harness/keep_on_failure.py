"""``pytest scenarios --keep-on-failure``: stop at the first failure and leave the
environment running, exactly as ``python -m harness up`` would have left it.

The target is built detached from the start (its daemons, or QEMU and the guests'
endpoints, do not die with pytest) in ``harness up``'s run directory. A run that
passes closes it as usual; at the first failure the run stops, the target is handed
over to ``harness`` (its run record), and the way in is printed: ``harness ssh``,
``console``, ``trace``, the endpoints, ``pytest --attach`` and ``harness down``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.state import RunRecord, RunState
from harness.target import XEN_TARGETS

KEEPABLE = ("sim", "direct", *XEN_TARGETS)


def prepare(target_name: str) -> Path:
    """The run directory to build the target in; refuses what ``harness up`` would."""
    if target_name not in KEEPABLE:
        raise HarnessError(
            f"--keep-on-failure: target {target_name} cannot be left running "
            f"(it can for {', '.join(KEEPABLE)})"
        )
    state = RunState()
    with state.locked():
        record = state.load()
        if record is not None and record.alive():
            raise HarnessError(
                f"--keep-on-failure: an environment is already up ({record.target}, run dir "
                f"{record.run_dir}); stop it first with: python -m harness down"
            )
        state.clear()
        if state.run_dir.exists():
            shutil.rmtree(state.run_dir)
    return state.run_dir


def hand_over(target: Any, say: Callable[[str], None]) -> None:
    """Leave ``target`` running under ``harness``'s record, and say how to reach it."""
    description = target.describe()
    processes = target.detach()
    state = RunState()
    with state.locked():
        state.save(RunRecord(target.name, str(target.run_dir), description, processes))
    for line in directions(target.name, description):
        say(line)


def directions(target_name: str, description: dict[str, Any]) -> list[str]:
    lines = [f"kept {target_name} running after the first failure:"]
    for g in description.get("guests", []):
        lines.append(f"  {g['name']}: TPM endpoint {g['tpm']} (one command in, one response out)")
    if target_name in XEN_TARGETS:
        names = " ".join(g["name"] for g in description.get("guests", []))
        lines += [
            f"  python -m harness ssh dom0|{names.replace(' ', '|')}   a root shell",
            "  python -m harness console [GUEST]   the serial console, or a guest's",
        ]
    lines += [
        "  python -m harness trace GUEST        the guest's TPM requests, live",
        "  python -m harness status             what runs",
        "  pytest scenarios --attach -k NAME    the scenario again, on this environment",
        "  python -m harness down               stop it all",
    ]
    return lines
