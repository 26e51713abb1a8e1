"""``python -m harness.bench`` (``nox -s bench``): what the driver pair costs per
command against swtpm reached directly, and how far one backend scales.

One run, in this order (each phase bounded by the run's time budget):

1. bring up a ``direct`` target (plain swtpm) and a 1-guest ``sim`` target (the whole
   driver pair), both freshly manufactured: their bring-up times include swtpm_setup;
2. latency of four workloads on both paths, every process pinned to CPU 0, then
   unpinned (``latency.py``);
3. the cost of one driver command: CPU, wake-ups, py-spy profile, system calls
   (``profiling.py``);
4. what durable NV costs: NV_Write through a manager with and without its fsync
   (``nvwrite.py``);
5. scale: 1, 8, 32 and 128 guests on one backend and manager (``scale.py``);
6. open loop: N guests each sending GetRandom at a fixed rate, up to 128 x 20/s and
   beyond (``open_loop.py``);
7. ``bench.json``, ``latency_vs_instances.png`` and the tables, with every goal of
   issue 6 judged met or not met (``stats.py``).

``--target xen`` runs ``xen.py`` instead: a Xen guest's /dev/tpm0 against swtpm in dom0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from harness.bench import floor, micro, nvwrite, open_loop, procs, profiling, scale, stats
from harness.bench.latency import GET_RANDOM_16, Link, PathClient, Plan, measure_workload
from harness.bench.plot import latency_vs_instances
from harness.deadline import Deadline
from harness.process import tail
from harness.targets.direct import DirectTarget

QUICK_LEVELS = (1, 8, 32)
FULL_LEVELS = (1, 8, 32, 128)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.bench",
        description="Benchmark the vTPM driver pair against swtpm reached directly.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer samples, scale levels 1, 8, 32 only; under 3 minutes",
    )
    p.add_argument(
        "--target",
        choices=("sim", "xen"),
        default="sim",
        help="sim (default): the simulated Xen; xen: Xen 4.17 under QEMU, a guest's "
        "/dev/tpm0 against swtpm in dom0 (harness/bench/xen.py)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("artifacts/bench"),
        help="output directory (default: artifacts/bench)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time budget of the whole run (default 170 quick, 1200 full); "
        "scale levels that would not fit are skipped and reported",
    )
    p.add_argument(
        "--levels",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=None,
        help="scale levels, e.g. 1,8,32,128",
    )
    p.add_argument("--no-profile", action="store_true", help="skip py-spy and strace")
    return p


def _say(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.out: Path = args.out
        budget = args.max_seconds or (170.0 if self.quick else 1200.0)
        self.budget = Deadline(budget)
        self.levels: tuple[int, ...] = args.levels or (QUICK_LEVELS if self.quick else FULL_LEVELS)
        self.report: dict[str, Any] = {
            "schema": stats.SCHEMA,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "quick": self.quick,
            "target": args.target,
            "machine": procs.machine_info(),
            "budget_s": budget,
            "notes": [],
            "errors": [],
        }
        self.template_dir = Path(tempfile.mkdtemp(prefix="xvbench-template-"))
        self.direct: DirectTarget | None = None
        self.level1: scale.Level | None = None
        self.template: Path | None = None  # manufactured state that later levels clone

    def note(self, text: str) -> None:
        _say(text)
        self.report["notes"].append(text)

    # -- phases ----------------------------------------------------------------------

    def check_machine(self, when: str) -> None:
        """Name other busy processes: on a shared machine they skew every number."""
        hogs = procs.cpu_hogs()
        self.report["machine"][f"other_busy_processes_{when}"] = hogs
        if hogs:
            names = ", ".join(f"{h['comm']} (pid {h['pid']}, {h['cpu_pct']}% CPU)" for h in hogs)
            self.note(
                f"{when}: other processes were busy on this machine: {names}; "
                "latencies and throughput are lower bounds of what it can do"
            )

    def bring_up(self) -> None:
        _say("bringing up the direct target (plain swtpm) and a 1-guest sim target")
        t0 = time.monotonic()
        self.direct = DirectTarget(1)
        self.direct.start()
        direct_s = time.monotonic() - t0
        self.level1 = scale.start_level(1, None)
        setup = re.search(
            r"manufactured in ([\d.]+) s", tail(self.level1.target.log_dir / "manager.log", 200)
        )
        self.report["bringup"] = {
            "swtpm_setup_s": float(setup.group(1)) if setup else None,
            "direct_swtpm_incl_setup_s": round(direct_s, 3),
            "sim_instance_incl_setup_s": round(self.level1.bringup_s, 3),
            "what": "target start to first GetRandom answered, including swtpm_setup "
            "(manufacture), frontend start, xenbus handshake, manager and swtpm start",
        }

    def pids(self) -> dict[str, int]:
        """Every process on both paths (the client is pinned separately)."""
        assert self.direct is not None and self.level1 is not None
        t = self.level1.target
        out = {"direct-swtpm": self.direct.guests[0].process.pid}
        out |= {"simxend": t.simxend.pid, "manager": t.manager.pid, "backend": t.backend.pid}
        for g in t.guests:
            out[f"frontend-{g.name}"] = g.frontend.pid if g.frontend else None
        result = {k: v for k, v in out.items() if v is not None}
        assert t.manager.pid is not None
        for i, pid in enumerate(procs.children_named(t.manager.pid, "swtpm")):
            result[f"swtpm-{i}"] = pid
        return result

    def pin(self, pinned: bool) -> None:
        cpus = {procs.PIN_CPU} if pinned else procs.all_cpus()
        procs.set_affinity([*self.pids().values(), os.getpid()], cpus)

    def latency(self) -> dict[str, PathClient]:
        assert self.direct is not None and self.level1 is not None
        clients = {
            "direct": PathClient("direct", Link(self.direct.guests[0].socket, socket.SOCK_STREAM)),
            "driver": PathClient(
                "driver", Link(self.level1.target.guests[0].socket, socket.SOCK_SEQPACKET)
            ),
        }
        for c in clients.values():
            c.setup()
        plan = Plan.for_mode(self.quick)
        self.report["latency_plan"] = {
            "ops_per_round": plan.ops,
            "rounds": plan.rounds,
            "warmup": plan.warmup,
        }
        latency: dict[str, dict[str, Any]] = {w: {} for w in stats.WORKLOADS}
        self.report["latency"] = latency
        for mode in stats.MODES:
            self.pin(mode == "pinned")
            for workload in stats.WORKLOADS:
                _say(f"latency: {workload}, {mode}")
                pooled = measure_workload(clients, workload, plan)
                latency[workload][mode] = stats.compare(
                    stats.Summary.from_ns(*pooled["direct"]),
                    stats.Summary.from_ns(*pooled["driver"]),
                )
        self.report["ratios"] = stats.ratios_of(latency)
        return clients

    def profile(self, clients: dict[str, PathClient]) -> None:
        assert self.level1 is not None
        t = self.level1.target
        self.pin(True)
        pids = self.pids()
        daemons = {
            k: v for k, v in pids.items() if k in ("manager", "backend") or k.startswith("frontend")
        }
        for c in clients.values():
            c.link.set_timeout(None)
        driver, direct = clients["driver"].link, clients["direct"].link

        def op(link: Link) -> Callable[[], object]:
            return lambda: link.roundtrip(GET_RANDOM_16)

        seconds = 2.0 if self.quick else 4.0
        _say("profile: CPU and context switches per command (pinned)")
        path = {k: v for k, v in pids.items() if k != "direct-swtpm"} | {"client": os.getpid()}
        prof: dict[str, Any] = {
            "workload": "GetRandom(16) raw, one client, everything pinned to CPU 0",
            "driver": profiling.cost_per_command(path, op(driver), seconds),
            "direct": profiling.cost_per_command(
                {"swtpm": pids["direct-swtpm"], "client": os.getpid()}, op(direct), seconds
            ),
        }
        self.report["profile"] = prof
        _say("profile: Python cost of each per-command step, in-process")
        try:
            prof["steps"] = micro.hot_path_steps()
        except Exception as e:  # evidence, not the benchmark: report and go on
            prof["steps"] = {"error": f"{type(e).__name__}: {e}"}
        if self.args.no_profile:
            prof["py_spy"] = prof["strace"] = {"skipped": "--no-profile"}
            return
        _say("profile: py-spy on frontend, backend and manager")
        prof["py_spy"] = profiling.py_spy(daemons, op(driver), seconds + 1, self.out / "profile")
        _say("profile: strace -c (system calls per command)")
        prof["strace"] = profiling.strace_counts(
            daemons, op(driver), 300 if self.quick else 1000, self.out / "profile"
        )
        if not all(p.alive for p in (t.manager, t.backend)):
            raise RuntimeError("a daemon died during profiling")

    def relay_floor(self) -> None:
        """Three do-nothing relays to the direct swtpm: the architecture's floor."""
        assert self.direct is not None
        _say("floor: GetRandom(16) through 3 do-nothing Python relays to swtpm")
        g = self.direct.guests[0]
        assert g.process.pid is not None
        plan = Plan.for_mode(self.quick)
        res = floor.measure(
            g.socket, g.process.pid, plan.ops["getrandom_raw"], plan.warmup, plan.rounds
        )
        self.report["floor"] = res
        raw = self.report.get("latency", {}).get("getrandom_raw", {})
        for mode in stats.MODES:
            direct = raw.get(mode, {}).get("direct", {}).get("p50_us")
            self.report["ratios"][f"floor3_getrandom_p50_{mode}"] = stats.ratio(
                res[mode]["p50_us"], direct
            )

    def nv_write(self) -> None:
        """NV_Write p50/p99 with and without the manager's fsync (issue 14, point 6)."""
        if self.budget.remaining < 60:
            self.note(f"nv_write skipped: {self.budget.remaining:.0f} s of the budget left")
            return
        try:
            self.report["nv_write"] = nvwrite.measure(self.quick, _say)
        except Exception as e:  # the other phases still count: report and go on
            self.report["errors"].append(f"nv_write: {type(e).__name__}: {e}")
            _say(f"nv_write failed: {type(e).__name__}: {e}")

    def scale(self) -> None:
        assert self.level1 is not None
        duration, warmup = (3.0, 0.5) if self.quick else (8.0, 1.0)
        entries: list[dict[str, Any]] = []
        self.report["scale"] = entries
        self.report["scale_levels_planned"] = list(self.levels)
        if self.quick and 128 not in self.levels:
            self.note("quick mode: scale levels 1, 8, 32 only (128 needs the full run)")
        template: Path | None = None
        per_instance = 0.3  # s, first guess at a cloned instance's bring-up
        for n in self.levels:
            if n == 1 and self.level1 is not None:
                level, self.level1 = self.level1, None
            else:
                need = n * per_instance + duration + warmup + 10
                if need > self.budget.remaining:
                    self.note(
                        f"scale: {n} instances skipped: needs ~{need:.0f} s, "
                        f"{self.budget.remaining:.0f} s of the budget left"
                    )
                    continue
                _say(f"scale: starting {n} guests")
                try:
                    level = scale.start_level(n, template)
                except Exception as exc:
                    self.report["errors"].append(f"scale {n}: bring-up failed: {exc}")
                    _say(f"scale: {n} guests failed to start: {exc}")
                    continue
                per_instance = max(level.bringup_s / n, 0.05)
            failed = True
            if template is None:  # the first (fresh) level's state seeds the others
                template = self.template = scale.save_template(level, self.template_dir)
            try:
                _say(f"scale: {n} guests, closed loop for {duration:.0f} s")
                entries.append(scale.measure_level(level, duration, warmup))
                last = entries[-1]
                _say(
                    f"scale: {n} guests: {last['ops_per_s']} ops/s, p99 {last['p99_us']} us, "
                    f"{last['errors']} errors"
                )
                failed = False
            finally:
                level.close(keep_logs=self.out / "logs" / f"scale-{n}" if failed else None)
        scale.backend_shares(entries)
        xs = [e["instances"] for e in entries]
        fit = stats.slope(xs, [e["backend_rss_mb"] for e in entries])
        swtpm = [e["swtpm_rss_mb"] for e in entries if e.get("swtpm_rss_mb")]
        largest = max(entries, key=lambda e: e["instances"], default=None)
        self.report["memory"] = {
            "backend_mb_per_instance": None if fit is None else round(max(fit, 0.0), 3),
            "method": "least-squares slope of backend RSS over instances (scale levels)",
            "backend_rss_mb_at_largest": largest["backend_rss_mb"] if largest else None,
            "swtpm_mb_per_instance": round(sum(swtpm) / len(swtpm), 2) if swtpm else None,
            "frontend_rss_mb": largest.get("frontend_rss_mb") if largest else None,
        }
        for entry in entries:  # the 1-instance level has no growth of its own: use the fit
            if entry["backend_mb_per_instance"] is None and fit is not None:
                share = round(max(fit, 0.0), 3)
                entry["backend_mb_per_instance"] = share
                entry["rss_mb_per_instance"] = round(share + (entry.get("swtpm_rss_mb") or 0.0), 2)

    def open_loop(self) -> None:
        """Fixed-rate guests (issue 20, part 3), quick mode included: the goal level
        (128 x 20/s) needs one 128-guest bring-up of cloned state, ~20-40 s here."""
        levels: open_loop.Levels = open_loop.QUICK_LEVELS if self.quick else open_loop.FULL_LEVELS
        duration, warmup = (3.0, 0.5) if self.quick else (8.0, 1.0)
        self.report["open_loop"] = []
        per_instance = 0.3 if self.template is not None else 2.5  # cloned, or manufactured
        while levels:
            most = max(n for n, _ in levels)
            need = most * per_instance + len(levels) * (duration + warmup + 1.0) + 10
            if need <= self.budget.remaining:
                break
            self.note(
                f"open loop: {most} guests skipped: needs ~{need:.0f} s, "
                f"{self.budget.remaining:.0f} s of the budget left"
            )
            levels = tuple(lv for lv in levels if lv[0] < most)
        if not levels:
            return
        try:
            entries, meta = open_loop.run(levels, duration, warmup, self.template, _say)
        except Exception as exc:
            self.report["errors"].append(f"open loop: {type(exc).__name__}: {exc}")
            return
        self.report["open_loop"] = entries
        self.report["open_loop_meta"] = meta

    # -- the run ---------------------------------------------------------------------

    def run(self) -> int:
        t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        status = 0
        try:
            self.check_machine("start")
            self.bring_up()
            clients = self.latency()
            try:
                self.profile(clients)
            finally:
                self.pin(False)
                for c in clients.values():
                    c.close()
            self.relay_floor()
            assert self.direct is not None
            self.direct.close()
            self.nv_write()
            self.scale()
            self.open_loop()
            self.check_machine("end")
        except KeyboardInterrupt:
            self.report["errors"].append("interrupted")
            status = 130
        except Exception as e:
            self.report["errors"].append(f"{type(e).__name__}: {e}")
            _say(f"failed: {type(e).__name__}: {e}")
            status = 1
        finally:
            self.close()
        self.report["duration_s"] = round(time.monotonic() - t0, 1)
        self.report["machine"]["loadavg_at_end"] = procs.loadavg()
        self.finish()
        return status

    def close(self) -> None:
        shutil.rmtree(self.template_dir, ignore_errors=True)
        if self.level1 is not None:
            self.level1.close(keep_logs=self.out / "logs" / "level1")
            self.level1 = None
        if self.direct is not None:
            self.direct.close()
            self.direct.remove_run_dir()

    def finish(self) -> None:
        goals = stats.evaluate_goals(self.report)
        self.report["goals"] = [
            {
                "name": g.name,
                "measure": g.measure,
                "goal": g.goal,
                "value": g.value,
                "met": g.met,
                "note": g.note,
            }
            for g in goals
        ]
        m = self.report["machine"]
        title = (
            f"xenvtpm sim: {m['cpu_model']}, {m['nproc']} CPUs, "
            f"Linux {m['kernel']}, Python {m['python']}"
        )
        png = latency_vs_instances(
            self.report.get("scale", []), self.out / "latency_vs_instances.png", title
        )
        self.report["plot"] = str(png) if png else None
        (self.out / "bench.json").write_text(json.dumps(self.report, indent=2) + "\n")
        text = self.tables(goals)
        (self.out / "summary.txt").write_text(text + "\n")
        print(text)
        _say(f"wrote {self.out / 'bench.json'}" + (f" and {png}" if png else ""))

    def tables(self, goals: list[stats.GoalResult]) -> str:
        m = self.report["machine"]
        parts = [
            f"machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['os']}, Linux {m['kernel']}, "
            f"Python {m['python']}, {m['swtpm']}"
        ]
        if self.report.get("latency"):
            parts += [
                "",
                "Latency (us), driver = guest endpoint -> frontend -> ring -> "
                "backend -> manager -> swtpm; direct = swtpm's socket",
                "",
            ]
            parts.append(stats.latency_table(self.report["latency"]))
        cost = self.report.get("profile", {}).get("driver")
        if cost:
            each = ", ".join(f"{k} {v['cpu_us']}" for k, v in cost["per_process"].items())
            total = cost["cpu_us_total"]
            parts += ["", f"CPU per driver command (us), pinned, total {total}: {each}"]
        prof = self.report.get("profile", {})
        steps = prof.get("steps")
        if steps and "us_per_call" in steps:
            each = ", ".join(f"{k} {v}" for k, v in steps["us_per_call"].items())
            parts.append(f"Python per-command steps (us per call): {each}")
        for name, spy in sorted(prof.get("py_spy", {}).items()):
            if isinstance(spy, dict) and spy.get("self"):
                top = "; ".join(f"{f} {p}%" for f, p in spy["self"][:4])
                parts.append(f"py-spy {name} (self time): {top}")
        for name, st in sorted(prof.get("strace", {}).items()):
            if isinstance(st, dict) and "per_op" in st:
                calls = ", ".join(f"{k} {v}" for k, v in st["per_op"].items())
                parts.append(f"syscalls/command {name}: {st['total_per_op']} ({calls})")
        fl = self.report.get("floor")
        if fl:
            r = self.report["ratios"]
            parts += [
                "",
                "Floor: GetRandom(16) through 3 do-nothing Python relays to swtpm: "
                f"pinned p50 {fl['pinned']['p50_us']} us (x{r['floor3_getrandom_p50_pinned']}"
                f" direct), unpinned p50 {fl['unpinned']['p50_us']} us "
                f"(x{r['floor3_getrandom_p50_unpinned']})",
            ]
        nv = self.report.get("nv_write")
        if nv:
            parts += [
                "",
                "Durable NV (issue 14): NV_Write and GetRandom straight to a manager, "
                f"with its fsync and with --no-fsync (state on {nv['state_filesystem']})",
                "",
                nvwrite.nv_table(nv),
            ]
        if self.report.get("scale"):
            parts += ["", "Scale: one backend + manager, N guests in closed loops of GetRandom", ""]
            parts.append(stats.scale_table(self.report["scale"]))
        parts += open_loop.summary_lines(self.report)
        parts += ["", "Goals (issue 6)", "", stats.goals_table(goals)]
        for n in self.report["notes"]:
            parts.append(f"note: {n}")
        for e in self.report["errors"]:
            parts.append(f"ERROR: {e}")
        return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.target == "xen":
        from harness.bench import xen

        return xen.run(args, _say)
    return Bench(args).run()
