"""Open loop: N guests, each sending GetRandom(16) at a fixed rate, as hosts load a vTPM.

The closed loop of ``scale.py`` measures saturation, which no host runs at. Here each
guest's k-th command is *due* at ``start + (g / N + k) / rate``: guests are spread
evenly over the period, and the schedule never waits for the driver. A guest's
endpoint is a TPM device (one command at a time), so a command due while the previous
one is unanswered is sent when that answer arrives, and its latency still counts from
when it was due: a slow driver shows as latency, never as a lower offered load
(no coordinated omission).

One target with the largest number of guests serves every level; a level of N guests
drives the first N (the others stay idle, and an idle device costs the daemons
nothing). Per level: p50/p99 from due time to answer, errors (an answer that is not
TPM_RC_SUCCESS, a closed endpoint, or no answer within :data:`ANSWER_TIMEOUT_S`),
commands left unsent when the window ended (an overloaded level's backlog: the goal
needs none), and the CPU each role spent (per command, and as a share of one core,
which is what tells the saturated role: the backend and the manager are one thread
each, the frontends share the host's cores).
"""

from __future__ import annotations

import heapq
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bench import procs, scale
from harness.bench.latency import GET_RANDOM_16
from harness.bench.stats import Summary, ratio, table

_RC_AT_6 = struct.Struct(">I")
#: Longer than the Linux TPM core waits for a short command (~2 s, DESIGN.md 4): an
#: answer later than this is an error, and the level stops waiting for it.
ANSWER_TIMEOUT_S = 2.0
GOAL = {"guests": 128, "rate_per_guest": 20.0, "p99_us": 20_000.0, "errors": 0}
Levels = tuple[tuple[int, float], ...]  # (guests, commands per second per guest)
QUICK_LEVELS: Levels = ((32, 20.0), (128, 20.0), (128, 40.0))
FULL_LEVELS: Levels = ((8, 20.0), (32, 20.0), (64, 20.0), (128, 20.0), (128, 40.0), (128, 80.0))


@dataclass
class Guest:
    sock: socket.socket
    next_due: int = 0  # ns: when its next command is due
    inflight_due: int | None = None  # ns: the unanswered command's due time
    sent: int = 0  # ns: when that command was sent


@dataclass
class OpenResult:
    latencies_ns: list[int] = field(default_factory=list)
    due: int = 0  # commands due in the measured window
    sent: int = 0  # commands sent in the whole run, warm-up included
    answered: int = 0
    late_sends: int = 0  # sent a period or more after their due time (previous unanswered)
    unsent: int = 0  # due in the window but still waiting for their turn when it ended
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


def drive(paths: Sequence[Path], rate: float, duration: float, warmup: float) -> OpenResult:
    """Every endpoint in ``paths`` gets GetRandom(16) at ``rate`` per second for
    ``warmup`` + ``duration`` seconds; only commands due after the warm-up are measured.

    One epoll loop; a heap holds the guests that may send, by due time (a guest with a
    command in flight leaves it until the answer), so each step costs O(log N)."""
    clock = time.perf_counter_ns
    period = int(1e9 / rate)
    timeout_ns = int(ANSWER_TIMEOUT_S * 1e9)
    result = OpenResult()
    ep = select.epoll()
    guests: dict[int, Guest] = {}
    try:
        for p in paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10.0)
            s.connect(str(p))
            s.setblocking(False)
            guests[s.fileno()] = Guest(s)
            ep.register(s.fileno(), select.EPOLLIN)
        n = len(guests)
        start = clock() + 10_000_000
        measure_from = start + int(warmup * 1e9)
        stop_at = measure_from + int(duration * 1e9)
        ready: list[tuple[int, int]] = []  # (due ns, fd) of guests free to send
        for i, (fd, g) in enumerate(guests.items()):
            g.next_due = start + period * i // n
            ready.append((g.next_due, fd))
        heapq.heapify(ready)
        inflight: dict[int, Guest] = {}
        next_sweep = start + timeout_ns // 4
        while ready or inflight:
            now = clock()
            while ready and ready[0][0] <= now:  # fell due: send (late if it waited)
                due, fd = heapq.heappop(ready)
                g = guests[fd]
                if now >= stop_at:  # overloaded: the window is over; its backlog (this
                    # command and the guest's later ones due in it) is counted, not sent
                    backlog = range(due, stop_at, period)
                    left = sum(1 for d in backlog if d >= measure_from)
                    result.due += left
                    result.unsent += left
                    continue
                measured = due >= measure_from
                if measured:
                    result.due += 1
                    if now - due >= period:
                        result.late_sends += 1
                g.inflight_due, g.sent = due, now
                result.sent += 1
                try:
                    g.sock.send(GET_RANDOM_16)
                except OSError as e:
                    g.inflight_due = None
                    if measured:
                        result.error(f"send: {e}")
                    continue
                inflight[fd] = g
            if now >= next_sweep:  # no answer in time: an error, and that guest stops
                next_sweep = now + timeout_ns // 4
                for fd, g in list(inflight.items()):
                    if now - g.sent > timeout_ns:
                        if g.inflight_due is not None and g.inflight_due >= measure_from:
                            result.error(f"no answer in {ANSWER_TIMEOUT_S} s")
                        ep.unregister(fd)
                        del inflight[fd]
            wait_ns = ready[0][0] - now if ready else timeout_ns // 4
            events = ep.poll(min(max(wait_ns, 0), timeout_ns // 4) / 1e9)
            got = clock()
            for fd, _ in events:
                g = guests[fd]
                try:
                    reply = g.sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError as e:
                    reply = b""
                    result.error(f"recv: {e}")
                asked = g.inflight_due
                g.inflight_due = None
                inflight.pop(fd, None)
                if asked is None:
                    continue
                measured = asked >= measure_from
                if not reply:
                    ep.unregister(fd)
                    if measured:
                        result.error("endpoint closed the connection")
                    continue
                if len(reply) < 10 or _RC_AT_6.unpack_from(reply, 6)[0] != 0:
                    if measured:
                        result.error(f"answered {reply[:10].hex()}")
                elif measured:
                    result.latencies_ns.append(got - asked)
                    result.answered += 1
                g.next_due = asked + period
                if g.next_due < stop_at:
                    heapq.heappush(ready, (g.next_due, fd))
    finally:
        ep.close()
        for g in guests.values():
            g.sock.close()
    return result


def measure(
    target: Any, guests: int, rate: float, duration: float, warmup: float
) -> dict[str, Any]:
    """One level on the first ``guests`` guests of a started sim target."""
    roles = scale._role_pids(target)
    before = {r: sum(procs.run_ns(p) for p in pids) for r, pids in roles.items()}
    busy_before = procs.cpu_busy()
    t0 = time.monotonic()
    res = drive([g.socket for g in target.guests[:guests]], rate, duration, warmup)
    wall = time.monotonic() - t0
    busy = procs.cpu_busy_pct(busy_before, procs.cpu_busy())
    after = {r: sum(procs.run_ns(p) for p in pids) for r, pids in roles.items()}
    entry: dict[str, Any] = {
        "guests": guests,
        "rate_per_guest": rate,
        "offered_per_s": round(guests * rate, 1),
        "p50_us": None,
        "p99_us": None,
        "max_us": None,
        "errors": res.errors,
        "due": res.due,
        "answered": res.answered,
        "late_sends": res.late_sends,
        "unsent": res.unsent,
        "duration_s": duration,
        "machine_cpu_busy_pct": busy,
    }
    if res.latencies_ns:
        s = Summary.from_ns(res.latencies_ns)
        entry.update(p50_us=s.p50_us, p99_us=s.p99_us, max_us=s.max_us)
    sent = res.sent or 1
    entry["cpu_us_per_op"] = {r: round((after[r] - before[r]) / sent / 1000.0, 1) for r in roles}
    entry["cpu_pct_of_one_core"] = {r: round((after[r] - before[r]) / wall / 1e7, 1) for r in roles}
    if res.error_samples:
        entry["error_samples"] = res.error_samples
    return entry


def saturation(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Which role is nearest its limit at the highest level: the backend and the
    manager are single-threaded (100% of one core), the frontends, swtpms and the client
    share the machine's cores with each other (and with whatever else runs here)."""
    if not entries:
        return {}
    top = max(entries, key=lambda e: e["offered_per_s"])
    pct = top["cpu_pct_of_one_core"]
    ncpu = len(procs.all_cpus())
    headroom = {
        "backend": pct.get("backend", 0.0) / 100.0,
        "manager": pct.get("manager", 0.0) / 100.0,
        "frontends": pct.get("frontends", 0.0) / (100.0 * ncpu),
        "swtpm": pct.get("swtpm", 0.0) / (100.0 * ncpu),
        # everything, other processes included: a busy machine is a limit of its own
        "machine": (top.get("machine_cpu_busy_pct") or 0.0) / 100.0,
    }
    first = max(headroom, key=lambda k: headroom[k])
    cpu = top["cpu_us_per_op"]

    def rate(us: float, cores: int) -> float | None:
        return round(cores * 1e6 / us) if us > 0 else None

    return {
        "level": {"guests": top["guests"], "rate_per_guest": top["rate_per_guest"]},
        "share_of_limit": {k: round(v, 3) for k, v in headroom.items()},
        "nearest_limit": first,
        # commands/s each role could serve alone at this level's CPU per command; the
        # last one is every role of the path sharing the machine's cores, nothing else
        "capacity_per_s": {
            "backend": rate(cpu.get("backend", 0.0), 1),
            "manager": rate(cpu.get("manager", 0.0), 1),
            "frontends": rate(cpu.get("frontends", 0.0), ncpu),
            "swtpm": rate(cpu.get("swtpm", 0.0), ncpu),
            "whole_path": rate(sum(cpu.values()), ncpu),
        },
        "machine_cpu_busy_pct": top.get("machine_cpu_busy_pct"),
        "how": "CPU of each role over the level's wall time, against its limit: one "
        "core for the single-threaded backend and manager, all cores for the frontends "
        "and swtpms (shared with each other, the client and any other load)",
    }


def run(
    levels: Sequence[tuple[int, float]],
    duration: float,
    warmup: float,
    template: Path | None,
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Bring up one target with the most guests any level needs; run every level."""
    most = max(n for n, _ in levels)
    say(f"open loop: starting {most} guests")
    level = scale.start_level(most, template)
    entries: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "bringup_s": round(level.bringup_s, 1),
        "state": level.state,
        "answer_timeout_s": ANSWER_TIMEOUT_S,
        "latency_from": "the command's due time (open loop, no coordinated omission)",
    }
    try:
        for n, rate in levels:
            say(f"open loop: {n} guests x {rate:g}/s for {duration:g} s")
            entries.append(measure(level.target, n, rate, duration, warmup))
            e = entries[-1]
            say(
                f"open loop: {n} x {rate:g}/s: p50 {e['p50_us']} us, p99 {e['p99_us']} us, "
                f"{e['errors']} errors"
            )
    finally:
        level.close()
    meta["saturation"] = saturation(entries)
    return entries, meta


def goal_met(entries: Sequence[dict[str, Any]]) -> tuple[bool | None, dict[str, Any] | None]:
    """The goal level's entry and whether it met p99 <= 20 ms with no error."""
    for e in entries:
        if e["guests"] == GOAL["guests"] and e["rate_per_guest"] == GOAL["rate_per_guest"]:
            ok = (
                e["p99_us"] is not None
                and e["p99_us"] <= GOAL["p99_us"]
                and not e["errors"]
                and not e.get("unsent")
            )
            return ok, e
    return None, None


def rows(entries: Sequence[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for e in entries:
        pct = e.get("cpu_pct_of_one_core", {})
        rows.append(
            [
                e["guests"],
                e["rate_per_guest"],
                e["offered_per_s"],
                e["p50_us"],
                e["p99_us"],
                e["errors"],
                e["late_sends"],
                e.get("unsent"),
                pct.get("backend"),
                pct.get("manager"),
                pct.get("frontends"),
                pct.get("swtpm"),
                e.get("machine_cpu_busy_pct"),
            ]
        )
    return rows


TABLE_HEADER = [
    "guests",
    "rate/guest",
    "offered/s",
    "p50 us",
    "p99 us",
    "errors",
    "late",
    "unsent",
    "backend %",
    "manager %",
    "frontends %",
    "swtpm %",
    "CPUs busy %",
]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The open-loop table and issue 20's two verdicts, for summary.txt."""
    out: list[str] = []
    entries = report.get("open_loop")
    if entries:
        out += [
            "",
            "Open loop: N guests, each GetRandom(16) at a fixed rate; latency from "
            "due time; CPU as % of one core",
            "",
        ]
        out.append(table(TABLE_HEADER, rows(entries)))
        met, _ = goal_met(entries)
        verdict = "not measured" if met is None else ("MET" if met else "NOT MET")
        out.append(f"goal (issue 20): 128 guests x 20/s, p99 <= 20 ms, 0 errors: {verdict}")
        sat = report.get("open_loop_meta", {}).get("saturation")
        if sat:
            out.append(
                f"nearest its limit at {sat['level']}: {sat['nearest_limit']} "
                f"(share of limit: {sat['share_of_limit']}); commands/s each role "
                f"could serve alone: {sat['capacity_per_s']}"
            )
    r = report.get("ratios", {})
    over = ratio(r.get("getrandom_p50_pinned"), r.get("floor3_getrandom_p50_pinned"))
    if over is not None:
        out.append(
            f"GetRandom pinned driver/direct over the 3-relay floor's: {over} "
            "(goal of issue 20: <= 1.25)"
        )
    return out
