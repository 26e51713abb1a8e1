"""``python -m harness`` (console script ``harness``): bring an environment up, keep it up.

    up --target sim --guests N   start everything in the background; print ONE JSON object
       [--xen FILE ...]          (xen) the user's own pieces for this run: harness.own_build
    status [--json]              what runs, pids alive, crashes seen on any console
    logs [NAME] [-n LINES]       every log's path, or the tail of one
    down                         stop everything ``up`` started; nothing is left running
    ssh dom0|GUEST [CMD...]      (xen) a root shell or command in dom0 or a guest
    console [dom0|GUEST]         (xen) the serial console of dom0, or xl console of a guest
    trace GUEST [--no-follow]    the TPM requests the backend answered for GUEST, live

Progress goes to stderr, the JSON to stdout, so ``harness up | jq`` works. Exit status:
0 success, 1 a harness error (explained on stderr), 2 bad usage; ``status``: 1 when a
process is dead, 3 when a console showed a crash (a panic, an Oops, a WARNING: each
console's first is printed, all are under ``"crashes"`` in ``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness.crash_watch import GUEST_LOGS_COMMAND, Crash, crashes_in_logs, parse_guest_logs
from harness.errors import EnvironmentNotRunning, EnvironmentRunning, HarnessError
from harness.own_build import FLAGS, OwnBuild
from harness.own_build import HELP as OWN_BUILD_HELP
from harness.process import ProcessRecord, all_procs, proc_cmdline, stop_family, tail
from harness.state import RunRecord, RunState
from harness.target import XEN_TARGETS
from harness.targets import TARGETS, make_target

log = logging.getLogger("harness.cli")
MAX_UNIX_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1


def _say(message: str) -> None:
    print(f"[harness] {message}", file=sys.stderr, flush=True)


def cmd_up(
    state: RunState, target_name: str, guests: int, own_build: OwnBuild | None = None
) -> int:
    with state.locked():
        record = state.load()
        if record is not None:
            alive = record.alive()
            if alive:
                raise EnvironmentRunning(
                    f"an environment is already up (target {record.target}, "
                    f"{len(record.description.get('guests', []))} guests, "
                    f"{len(alive)} processes, run dir {record.run_dir}); "
                    "stop it first with: python -m harness down"
                )
            _say(f"previous environment in {record.run_dir} is no longer running: replacing it")
            state.clear()
        longest = state.run_dir / "guest000.tpm.ctrl"
        if len(str(longest)) > MAX_UNIX_PATH:
            raise HarnessError(
                f"{state.run_dir} is too long for unix socket paths; set XENVTPM_RUN shorter"
            )
        for pid in _sweep(str(state.run_dir)):  # e.g. a QEMU of an `up` killed mid-start
            _say(f"stopping leftover pid {pid}: {' '.join(proc_cmdline(pid))[:120]}")
            stop_family(pid, None, 5.0)
        if state.run_dir.exists():
            import shutil

            shutil.rmtree(state.run_dir)
        t0 = time.monotonic()
        options = {"own_build": own_build} if own_build else {}
        target = make_target(target_name, guests, state.run_dir, _say, detached=True, **options)
        _say(f"bringing up target {target_name} with {guests} guests in {state.run_dir}")
        target.start()  # rolls back by itself on failure
        description = target.describe()
        detach = getattr(target, "detach", None)
        if detach is None:  # pragma: no cover - every target in TARGETS has it
            target.close()
            raise HarnessError(f"target {target_name} cannot be left running")
        processes: list[ProcessRecord] = detach()
        state.save(RunRecord(target_name, str(state.run_dir), description, processes))
        _say(f"up in {time.monotonic() - t0:.1f} s; stop with: python -m harness down")
        print(json.dumps(description), flush=True)
        return 0


def _sweep(run_dir: str) -> list[int]:
    """Processes left whose command line names the run directory (belt and braces)."""
    return [
        p.pid
        for p in all_procs()
        if p.running and any(run_dir in arg for arg in proc_cmdline(p.pid))
    ]


def cmd_down(state: RunState, timeout: float) -> int:
    with state.locked():
        record = state.load()
        if record is None:
            _say("nothing is up")
            return 0
        if record.target == "xen" and record.alive():  # the machine's logs, while it runs
            from harness.deadline import Deadline
            from harness.xenlogs import collect_from_description

            try:
                where = collect_from_description(record.description, Deadline(60))
                _say(f"dom0 and guest logs collected in {where}")
            except HarnessError as e:
                _say(f"could not collect the machine's logs: {str(e).splitlines()[0]}")
        for proc in record.processes:
            if proc.alive():
                _say(f"stopping {proc.name} (pid {proc.pid})")
                proc.stop(timeout)
        for pid in _sweep(record.run_dir):
            _say(f"stopping leftover pid {pid}: {' '.join(proc_cmdline(pid))[:120]}")
            stop_family(pid, None, timeout)
        still = [p for p in record.processes if p.alive()] or _sweep(record.run_dir)
        if still:
            raise HarnessError(f"processes survived down: {still}")
        state.clear()
        _say(f"down; logs stay in {Path(record.run_dir) / 'logs'}")
        return 0


def _require(state: RunState) -> RunRecord:
    record = state.load()
    if record is None:
        raise EnvironmentNotRunning("nothing is up; start one with: python -m harness up")
    return record


def _crashes(record: RunRecord) -> list[Crash]:
    """Every crash on any console of a Xen environment since ``up``: the serial
    console's log on this host, and each guest's console log in dom0 (one command)."""
    if record.target not in XEN_TARGETS:
        return []
    serial = Path(record.description.get("artifacts", "")) / "console.log"
    why = ""
    try:
        done = subprocess.run(
            _ssh_argv(record, "dom0", [GUEST_LOGS_COMMAND]), capture_output=True, timeout=60
        )
        if done.returncode != 0:
            why = f"exit {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    if why:
        why = f"dom0 did not answer over SSH ({why})"
        return [*crashes_in_logs(serial, {}), Crash("dom0", "unreachable", why, why)]
    return crashes_in_logs(serial, parse_guest_logs(done.stdout))


def cmd_status(state: RunState, as_json: bool) -> int:
    """0: all is well; 1: a process is dead; 3: a crash was seen on a console."""
    record = _require(state)
    rows = [(p, p.alive()) for p in record.processes]
    crashes = _crashes(record)
    if as_json:
        out = record.to_json()
        out["alive"] = {p.name: alive for p, alive in rows}
        out["crashes"] = [
            {"console": c.console, "pattern": c.pattern, "line": c.line} for c in crashes
        ]
        print(json.dumps(out, indent=2))
    else:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started))
        print(f"target {record.target}, started {started}, run dir {record.run_dir}")
        for g in record.description.get("guests", []):
            print(
                f"  guest {g['name']}: domid {g.get('domid')}, "
                f"instance {g.get('instance')}, tpm {g.get('tpm')}"
            )
        for p, alive in rows:
            print(f"  {p.name:<20} pid {p.pid:<8} {'running' if alive else 'DEAD'}")
        first: dict[str, Crash] = {}
        for c in crashes:
            first.setdefault(c.console, c)
        for c in first.values():
            print(f"  CRASH on {c}")
    if crashes:
        return 3
    return 0 if all(alive for _, alive in rows) else 1


def _log_files(state: RunState) -> dict[str, Path]:
    record = state.load()
    if record is not None:
        from harness.targets.attached import AttachedTarget

        return AttachedTarget(record).logs()  # daemons' logs and each instance's swtpm log
    return {p.stem: p for p in sorted((state.run_dir / "logs").glob("*.log"))}


def cmd_logs(state: RunState, name: str | None, lines: int) -> int:
    logs = _log_files(state)
    if not logs:
        raise EnvironmentNotRunning(f"no logs under {state.run_dir}; nothing was brought up")
    if name is None:
        width = max(len(n) for n in logs)
        for n, path in logs.items():
            print(f"{n:<{width}}  {path}")
        return 0
    if name not in logs:
        raise HarnessError(f"no log named {name!r}; known: {', '.join(logs)}")
    print(tail(logs[name], lines))
    return 0


def _xen_record(state: RunState) -> RunRecord:
    record = _require(state)
    if record.target not in XEN_TARGETS:
        raise HarnessError(f"ssh and console need a xen target; {record.target} is up")
    return record


def _ssh_argv(record: RunRecord, name: str, command: list[str]) -> list[str]:
    from harness.ssh import ssh_argv

    desc = record.description
    key, port = Path(desc["ssh"]["key"]), int(desc["ssh"]["port"])
    if name == "dom0":
        return ssh_argv(key, port, command=command)
    ips = {g["name"]: g["ip"] for g in desc.get("guests", [])}
    if name not in ips:
        raise HarnessError(f"no guest {name!r}; known: dom0, {', '.join(ips)}")
    return ssh_argv(key, port, guest_ip=ips[name], command=command)


def cmd_ssh(state: RunState, name: str, command: list[str]) -> int:
    """Replace this process with OpenSSH (a real terminal; guests via dom0 as jump host)."""
    import os

    argv = _ssh_argv(_xen_record(state), name, command)
    os.execvp(argv[0], argv)


def cmd_console(state: RunState, name: str) -> int:
    """dom0: QEMU's serial socket (Xen's and dom0's console; Ctrl-] quits);
    a guest: ``xl console NAME`` in dom0 over SSH with a terminal (Ctrl-] quits)."""
    import os

    record = _xen_record(state)
    if name == "dom0":
        from harness.console import interact

        interact(Path(record.description["console"]))
        return 0
    argv = _ssh_argv(record, "dom0", ["xl", "console", name])
    argv.insert(1, "-t")  # xl console needs a terminal
    os.execvp(argv[0], argv)


def _trace_argv(record: RunRecord, name: str, follow: bool) -> list[str]:
    """The command that prints (and with ``follow`` keeps printing) the guest's trace."""
    from harness.targets.xen_driver import TRACE_DIR
    from harness.traffic import TRACE_DIR_NAME, trace_file

    instances = {g["name"]: int(g["instance"]) for g in record.description.get("guests", [])}
    if name not in instances:
        raise HarnessError(f"no guest {name!r}; known: {', '.join(instances)}")
    if record.target in XEN_TARGETS:
        path = str(trace_file(Path(TRACE_DIR), instances[name]))
        return _ssh_argv(record, "dom0", [f"tail -n +1 {'-F ' if follow else ''}{path}"])
    if record.target != "sim":
        raise HarnessError(f"{record.target} has no backend to trace")
    path = str(trace_file(Path(record.run_dir) / TRACE_DIR_NAME, instances[name]))
    return ["tail", "-n", "+1", *(["-F"] if follow else []), path]


def cmd_trace(state: RunState, name: str, follow: bool) -> int:
    """Each request as one line with its names (``harness.traffic.render``)."""
    from harness.traffic import parse_line, render

    argv = _trace_argv(_require(state), name, follow)
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as tail_proc:
        assert tail_proc.stdout is not None
        try:
            for line in tail_proc.stdout:
                parsed = parse_line(line) if line.strip() else None
                if parsed is not None:
                    print(render(parsed), flush=True)
        except KeyboardInterrupt:
            tail_proc.terminate()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start an environment in the background")
    up.add_argument("--target", default="sim", choices=TARGETS)
    up.add_argument("--guests", type=int, default=2)
    for flag, (metavar, text) in OWN_BUILD_HELP.items():
        up.add_argument(flag, metavar=metavar, help=f"(xen) {text}")
    down = sub.add_parser("down", help="stop everything up started")
    down.add_argument("--timeout", type=float, default=5.0, help="seconds before SIGKILL")
    status = sub.add_parser("status", help="what runs")
    status.add_argument("--json", action="store_true")
    logs = sub.add_parser("logs", help="log paths, or the tail of one")
    logs.add_argument("name", nargs="?")
    logs.add_argument("-n", "--lines", type=int, default=50)
    ssh = sub.add_parser("ssh", help="(xen) root shell or command in dom0 or a guest")
    ssh.add_argument("name", help="dom0 or a guest name (guest0, guest1, ...)")
    ssh.add_argument("remote", nargs=argparse.REMAINDER, help="command to run instead")
    console = sub.add_parser("console", help="(xen) serial console of dom0 or a guest")
    console.add_argument("name", nargs="?", default="dom0")
    trace = sub.add_parser("trace", help="a guest's TPM requests, as the backend saw them")
    trace.add_argument("name", help="a guest name (guest0, guest1, ...)")
    trace.add_argument(
        "--no-follow", dest="follow", action="store_false", help="print what is there and exit"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(name)s: %(message)s",
    )
    state = RunState()
    try:
        if args.command == "up":
            own = OwnBuild.from_flags({f: getattr(args, FLAGS[f]) for f in FLAGS})
            if own and args.target not in XEN_TARGETS:
                raise HarnessError(f"{', '.join(own.given())}: for xen targets, not {args.target}")
            return cmd_up(state, args.target, args.guests, own)
        if args.command == "down":
            return cmd_down(state, args.timeout)
        if args.command == "status":
            return cmd_status(state, args.json)
        if args.command == "logs":
            return cmd_logs(state, args.name, args.lines)
        if args.command == "ssh":
            return cmd_ssh(state, args.name, args.remote)
        if args.command == "console":
            return cmd_console(state, args.name)
        if args.command == "trace":
            return cmd_trace(state, args.name, args.follow)
    except HarnessError as e:
        print(f"harness {args.command}: {e}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - argparse rejects unknown commands
