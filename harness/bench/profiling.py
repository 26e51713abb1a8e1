"""Where the driver's time per command goes, with evidence from three sources.

1. CPU time and context switches per command of every process on the path
   (``/proc/PID/task/*/schedstat`` and ``status``), from a load without any tracer.
2. ``py-spy record`` on the Python daemons (frontend, backend, manager) under the same
   load: self and inclusive time per function. The raw collapsed stacks are kept under
   ``--out`` (``flamegraph.pl`` and speedscope read them).
3. ``strace -c`` on the same daemons for a fixed number of commands: system calls per
   command, by name (only if strace is installed; it slows the daemons down, so it
   runs last and its latencies are not used).
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from harness.bench import procs

_LINE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_STRACE_ROW = re.compile(
    r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(?P<calls>\d+)\s+(?:(?P<errors>\d+)\s+)?(?P<name>\w+)\s*$"
)
IDLE_FRAME = "Selector.select (selectors.py)"  # waiting in epoll_wait, or for the CPU


def run_for(op: Callable[[], object], seconds: float) -> int:
    """Call ``op`` in a loop for ``seconds``; return how many times."""
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            op()
        n += 50
    return n


def cost_per_command(
    pids: Mapping[str, int], op: Callable[[], object], seconds: float
) -> dict[str, Any]:
    """CPU us, wake-ups and preemptions per command of each process, and the sum."""
    before = procs.snapshot(pids)
    t0 = time.perf_counter()
    n = run_for(op, seconds)
    elapsed = time.perf_counter() - t0
    costs = procs.per_op(before, procs.snapshot(pids), n)
    return {
        "ops": n,
        "us_per_op_wall": round(elapsed / n * 1e6, 2),
        "per_process": costs,
        "cpu_us_total": round(sum(c["cpu_us"] for c in costs.values()), 2),
    }


def py_spy_path() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    m = _LINE.match(frame)
    if m is None:
        return frame
    file = m.group("file").rsplit("/", 2)
    return f"{m.group('func')} ({'/'.join(file[-2:]) if len(file) > 1 else file[0]})"


def summarize_collapsed(text: str, top: int = 12) -> dict[str, Any]:
    """Self and inclusive shares (%) by function from py-spy's raw (collapsed) output;
    ``idle_pct`` is the share in the event loop's select: py-spy drops sleeping
    samples, so this is the time from a wake-up until the process gets the CPU back
    (the epoll_wait call itself included)."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")]
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if total == 0:
        return {"samples": 0, "idle_pct": None, "self": [], "inclusive": []}
    idle = sum(n for f, n in self_t.items() if IDLE_FRAME in f)
    outer = {f for f, n in incl.items() if n == total}  # runpy, main, ...: no information

    def pct(n: int) -> float:
        return round(100.0 * n / total, 1)

    return {
        "samples": total,
        "idle_pct": pct(idle),
        "self": [[f, pct(n)] for f, n in self_t.most_common(top)],
        "inclusive": [[f, pct(n)] for f, n in incl.most_common(top + len(outer)) if f not in outer][
            :top
        ],
    }


def py_spy(
    pids: Mapping[str, int], op: Callable[[], object], seconds: float, out_dir: Path
) -> dict[str, Any]:
    """Sample every pid with py-spy while ``op`` runs in a loop; summary per process."""
    exe = py_spy_path()
    if exe is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for name, pid in pids.items():
        raw = out_dir / f"pyspy-{name}.txt"
        argv = [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            f"{seconds:.0f}",
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(raw),
        ]
        spies[name] = (
            subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
            raw,
        )
    time.sleep(0.5)  # py-spy attaches
    n = run_for(op, seconds)
    out: dict[str, Any] = {"ops": n, "rate_hz": 250, "raw_dir": str(out_dir)}
    for name, (proc, raw) in spies.items():
        try:
            _, err = proc.communicate(timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if raw.exists():
            out[name] = summarize_collapsed(raw.read_text(errors="replace"))
        else:
            out[name] = {"error": err.decode(errors="replace")[-500:]}
    return out


def parse_strace_summary(text: str) -> dict[str, int]:
    """``strace -c`` table -> {syscall: calls}."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = _STRACE_ROW.match(line)
        if m and m.group("name") != "total":
            calls[m.group("name")] = int(m.group("calls"))
    return calls


def strace_counts(
    pids: Mapping[str, int], op: Callable[[], object], n: int, out_dir: Path
) -> dict[str, Any]:
    """System calls per command of each pid, counted by ``strace -c`` over ``n`` ops."""
    exe = shutil.which("strace")
    if exe is None:
        return {"skipped": "strace not installed"}
    out_dir.mkdir(parents=True, exist_ok=True)
    tracers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for name, pid in pids.items():
        path = out_dir / f"strace-{name}.txt"
        proc = subprocess.Popen(
            [exe, "-c", "-f", "-o", str(path), "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        tracers[name] = (proc, path)
    time.sleep(0.5)  # strace attaches
    try:
        for _ in range(n):
            op()
    finally:
        for proc, _ in tracers.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc, _ in tracers.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out: dict[str, Any] = {"ops": n}
    for name, (_, path) in tracers.items():
        calls = parse_strace_summary(path.read_text(errors="replace")) if path.exists() else {}
        out[name] = {
            "total_per_op": round(sum(calls.values()) / n, 2),
            "per_op": {
                k: round(v / n, 2)
                for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
                if v >= n // 2
            },
        }
    return out
