"""What the benchmark reads from and does to processes: CPU pinning, run time, context
switches and resident memory, from ``/proc``. Spec: proc(5), sched_setaffinity(2).

Pinning sets the affinity of every thread of a process (``/proc/PID/task``): the
manager starts swtpm from worker threads, and an affinity set on the main thread only
would leave them free.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.process import all_procs

PIN_CPU = 0


def all_cpus() -> set[int]:
    return set(range(os.cpu_count() or 1))


def threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return []


def set_affinity(pids: Iterable[int], cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of every pid (vanished ones are skipped)."""
    for pid in pids:
        for tid in threads(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                os.sched_setaffinity(tid, cpus)


def children_named(parent: int, comm: str) -> list[int]:
    """Live children of ``parent`` whose comm is ``comm`` (the manager's swtpm)."""
    return [p.pid for p in all_procs() if p.running and p.ppid == parent and p.comm == comm]


def run_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run on a CPU, all threads (``/proc/PID/task/*/schedstat``)."""
    total = 0
    for tid in threads(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_kb(pid: int) -> int:
    """Resident set size in kB (VmRSS); 0 if the process is gone."""
    value = _status(pid).get("VmRSS", "0 kB").split()[0]
    return int(value) if value.isdigit() else 0


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of all threads."""
    vol = invol = 0
    for tid in threads(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
    return vol, invol


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together (``/proc/stat`` line ``cpu``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """How busy the machine's CPUs were between two ``cpu_busy`` readings (0..100)."""
    total = after[1] - before[1]
    return round(100.0 * (after[0] - before[0]) / total, 1) if total > 0 else None


@dataclass(frozen=True)
class Usage:
    """CPU time and context switches of one process at one moment."""

    run_ns: int
    voluntary: int
    involuntary: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        return cls(run_ns(pid), *context_switches(pid))


def snapshot(pids: Mapping[str, int]) -> dict[str, Usage]:
    return {name: Usage.of(pid) for name, pid in pids.items()}


def per_op(
    before: Mapping[str, Usage], after: Mapping[str, Usage], ops: int
) -> dict[str, dict[str, float]]:
    """CPU us, voluntary (wake-ups) and involuntary switches per operation, per process."""
    out = {}
    for name, a in after.items():
        b = before[name]
        out[name] = {
            "cpu_us": round((a.run_ns - b.run_ns) / ops / 1000.0, 2),
            "wakeups": round((a.voluntary - b.voluntary) / ops, 2),
            "preempted": round((a.involuntary - b.involuntary) / ops, 2),
        }
    return out


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    out: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{entry}/stat").read_text()
            rpar = raw.rindex(")")
            rest = raw[rpar + 2 :].split()
            out[int(entry)] = (raw[raw.index("(") + 1 : rpar], int(rest[11]) + int(rest[12]))
    return out


def cpu_hogs(seconds: float = 0.5, threshold_pct: float = 20.0) -> list[dict[str, Any]]:
    """Other processes using more than ``threshold_pct`` of a CPU right now: on a shared
    machine they take CPU time from the benchmark and their presence must be reported."""
    hz = os.sysconf("SC_CLK_TCK")
    before = _cpu_ticks()
    time.sleep(seconds)
    after = _cpu_ticks()
    mine = {os.getpid()}
    hogs = []
    for pid, (comm, ticks) in after.items():
        if pid in mine or pid not in before:
            continue
        pct = 100.0 * (ticks - before[pid][1]) / hz / seconds
        if pct >= threshold_pct:
            hogs.append({"pid": pid, "comm": comm, "cpu_pct": round(pct)})
    return sorted(hogs, key=lambda h: -h["cpu_pct"])


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    hypervisor = None
    with contextlib.suppress(OSError):
        hypervisor = "hypervisor" in Path("/proc/cpuinfo").read_text()
    mem_kb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "virtualized": hypervisor,
        "mem_gb": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "swtpm": _first_line(["swtpm", "--version"]),
        "loadavg_at_start": loadavg(),
    }


def _os_name() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return None


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, ValueError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None
