"""How far one backend and one manager scale: N guests, each a closed loop of GetRandom.

Each level is a fresh ``sim`` target with N guests (so the backend and manager serve
exactly N instances). One client process drives every guest's endpoint from one epoll
loop: each connection always has exactly one GetRandom(16) outstanding, and sends the
next as soon as the answer arrives (a closed loop, no think time). By Little's law the
mean latency is then N / throughput, whatever the driver does: p99 at 128 instances
is bounded below by 128 / (aggregate ops/s).

Bring-up: manufacturing a TPM (swtpm_setup) takes about a second and the manager
serialises it (one CA), so 128 fresh instances would take minutes on 2 cores. The
first level (1 instance) is manufactured fresh and timed; larger levels start from a
copy of that manufactured state (``tpm2-00.permall``) and time everything else:
frontend, xenbus handshake, manager, swtpm start and the first command.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bench import procs
from harness.bench.latency import GET_RANDOM_16
from harness.bench.stats import Summary
from harness.errors import TransportError
from harness.targets.sim import FIRST_INSTANCE, SimTarget
from harness.transport import SeqpacketTransport

PERMALL = "tpm2-00.permall"
_RC_AT_6 = struct.Struct(">I")
STALL_S = 10.0  # no answer from any guest for this long: the rest count as errors


@dataclass
class LoadResult:
    latencies_ns: list[int] = field(default_factory=list)
    completed: int = 0  # answers in the measurement window
    answered: int = 0  # answers in the whole run, warm-up included
    errors: int = 0
    window_s: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


def closed_loop(paths: Sequence[Path], duration: float, warmup: float) -> LoadResult:
    """Drive every endpoint in ``paths`` with one outstanding GetRandom(16) each, for
    ``warmup`` + ``duration`` seconds; measure only after the warm-up."""
    result = LoadResult()
    socks: dict[int, socket.socket] = {}
    sent_at: dict[int, int] = {}
    ep = select.epoll()
    clock = time.perf_counter_ns
    try:
        for path in paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10.0)
            s.connect(str(path))
            s.setblocking(False)
            socks[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLIN)
        start = clock()
        measure_from = start + int(warmup * 1e9)
        stop_at = measure_from + int(duration * 1e9)
        for fd, s in socks.items():
            sent_at[fd] = clock()
            s.send(GET_RANDOM_16)
        last_answer = clock()
        while sent_at:
            events = ep.poll(1.0)
            now = clock()
            if not events and now - last_answer > STALL_S * 1e9:
                for fd in list(sent_at):
                    result.error(f"no answer on {paths[list(socks).index(fd)]} in {STALL_S} s")
                    del sent_at[fd]
                break
            for fd, _ in events:
                s = socks[fd]
                try:
                    reply = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError as e:
                    reply = b""
                    result.error(f"recv: {e}")
                now = clock()
                last_answer = now
                result.answered += 1
                t0 = sent_at.pop(fd, None)
                if t0 is None:
                    continue
                if not reply:
                    result.error("endpoint closed the connection")
                    ep.unregister(fd)
                    continue
                if len(reply) < 10 or _RC_AT_6.unpack_from(reply, 6)[0] != 0:
                    result.error(f"bad answer {reply[:10].hex()}")
                elif measure_from <= t0 and now <= stop_at:
                    result.latencies_ns.append(now - t0)
                    result.completed += 1
                if now < stop_at:
                    sent_at[fd] = clock()
                    try:
                        s.send(GET_RANDOM_16)
                    except OSError as e:
                        del sent_at[fd]
                        result.error(f"send: {e}")
        result.window_s = duration
    finally:
        ep.close()
        for s in socks.values():
            s.close()
    return result


def load_entry(n: int, load: LoadResult) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "instances": n,
        "ops_per_s": round(load.completed / load.window_s, 1) if load.window_s else 0.0,
        "errors": load.errors,
        "duration_s": load.window_s,
        "samples": len(load.latencies_ns),
    }
    if load.latencies_ns:
        summary = Summary.from_ns(load.latencies_ns)
        entry.update(p50_us=summary.p50_us, p99_us=summary.p99_us, max_us=summary.max_us)
        ops = entry["ops_per_s"]
        entry["little_mean_us"] = round(n / ops * 1e6, 1) if ops else None
    else:
        entry.update(p50_us=None, p99_us=None, max_us=None, little_mean_us=None)
    if load.error_samples:
        entry["error_samples"] = load.error_samples
    return entry


def memory(target: SimTarget) -> dict[str, Any]:
    """Resident memory (MB) of the dom0 daemons, the swtpm and the frontends."""
    mb = 1024.0
    assert target.manager.pid is not None and target.backend.pid is not None
    swtpm = [procs.rss_kb(p) for p in procs.children_named(target.manager.pid, "swtpm")]
    fronts = [
        procs.rss_kb(g.frontend.pid)
        for g in target.guests
        if g.frontend is not None and g.frontend.pid is not None
    ]
    return {
        "backend_rss_mb": round(procs.rss_kb(target.backend.pid) / mb, 2),
        "manager_rss_mb": round(procs.rss_kb(target.manager.pid) / mb, 2),
        "swtpm_count": len(swtpm),
        "swtpm_rss_mb": round(sum(swtpm) / len(swtpm) / mb, 2) if swtpm else None,
        "frontend_rss_mb": round(sum(fronts) / len(fronts) / mb, 2) if fronts else None,
    }


def first_answers(target: SimTarget, timeout: float = 120.0) -> None:
    """One GetRandom per guest, in order: the instance is up once it answers."""
    for g in target.guests:
        with SeqpacketTransport(g.socket) as t:
            reply = t.transmit(GET_RANDOM_16, timeout)
        if len(reply) < 10 or _RC_AT_6.unpack_from(reply, 6)[0] != 0:
            raise TransportError(f"{g.name}: first GetRandom answered {reply[:10].hex()}")


@dataclass
class Level:
    """A started sim target for one scale level, and how long it took to come up."""

    target: SimTarget
    run_dir: Path
    state: str  # "fresh" (manufactured here) or "cloned" (state copied from a template)
    bringup_s: float

    def close(self, keep_logs: Path | None = None) -> None:
        try:
            self.target.close()
        finally:
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for log in self.run_dir.glob("logs/*.log"):
                    with contextlib.suppress(OSError):
                        shutil.copy(log, keep_logs / log.name)
            shutil.rmtree(self.run_dir, ignore_errors=True)


def new_run_dir() -> Path:
    # short: unix socket paths must fit in 108 bytes
    return Path(tempfile.mkdtemp(prefix="xvbench-", dir="/tmp"))


def start_level(
    n: int, template: Path | None, progress: Callable[[str], None] | None = None
) -> Level:
    """Start a sim target with ``n`` guests (from ``template`` state if given) and wait
    until every guest has answered one command."""
    run_dir = new_run_dir()
    if template is not None:
        for i in range(n):
            state = run_dir / "state" / str(FIRST_INSTANCE + i)
            state.mkdir(mode=0o700, parents=True)
            shutil.copy(template, state / PERMALL)
    target = SimTarget(n, run_dir, progress, trace=False)  # as deployed: no traffic trace
    t0 = time.monotonic()
    try:
        target.start()
        first_answers(target)
    except BaseException:
        target.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return Level(target, run_dir, "cloned" if template else "fresh", time.monotonic() - t0)


def save_template(level: Level, dest_dir: Path) -> Path | None:
    """Copy guest0's manufactured state out of a (closed) level, for later levels."""
    src = level.target.state_root / str(FIRST_INSTANCE) / PERMALL
    if not src.exists():
        return None
    dest_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, dest_dir / PERMALL))


def _role_pids(target: SimTarget) -> dict[str, list[int]]:
    assert target.manager.pid is not None and target.backend.pid is not None
    fronts = [
        g.frontend.pid
        for g in target.guests
        if g.frontend is not None and g.frontend.pid is not None
    ]
    return {
        "frontends": fronts,
        "backend": [target.backend.pid],
        "manager": [target.manager.pid],
        "swtpm": procs.children_named(target.manager.pid, "swtpm"),
        "client": [os.getpid()],
    }


def measure_level(level: Level, duration: float, warmup: float) -> dict[str, Any]:
    """The closed loop on every guest, with the CPU each role spent per command and how
    busy the machine's CPUs were (``/proc/stat``) while it ran."""
    target = level.target
    roles = _role_pids(target)
    before = {r: sum(procs.run_ns(p) for p in pids) for r, pids in roles.items()}
    busy_before = procs.cpu_busy()
    load = closed_loop([g.socket for g in target.guests], duration, warmup)
    busy = procs.cpu_busy_pct(busy_before, procs.cpu_busy())
    after = {r: sum(procs.run_ns(p) for p in pids) for r, pids in roles.items()}
    entry = load_entry(len(target.guests), load)
    if load.answered:
        cpu = {r: round((after[r] - before[r]) / load.answered / 1000.0, 1) for r in roles}
        entry["cpu_us_per_op"] = cpu | {"total": round(sum(cpu.values()), 1)}
    entry["machine_cpu_busy_pct"] = busy
    entry.update(memory(target))
    entry["state"] = level.state
    entry["bringup_total_s"] = round(level.bringup_s, 2)
    entry["bringup_s_per_instance"] = round(level.bringup_s / len(target.guests), 3)
    return entry


def backend_shares(scale: list[dict[str, Any]]) -> None:
    """Fill each entry's backend MB per instance (RSS growth over the 1-instance level)
    and ``rss_mb_per_instance`` = that share + one swtpm's RSS (issue 6's definition)."""
    base = next((e for e in scale if e["instances"] == 1), None)
    for e in scale:
        share = None
        if base is not None and e["instances"] > 1:
            share = (e["backend_rss_mb"] - base["backend_rss_mb"]) / (e["instances"] - 1)
            share = round(max(share, 0.0), 3)
        e["backend_mb_per_instance"] = share
        e["rss_mb_per_instance"] = round((share or 0.0) + (e.get("swtpm_rss_mb") or 0.0), 2)
