"""``python -m harness.bench --target xen``: the driver on real Xen against swtpm in dom0.

Xen 4.17 under QEMU (``harness.targets.xen``), in one run:

* **driver**: GetRandom(16) on a guest's ``/dev/tpm0``, timed inside the guest (kernel
  tpm_vtpm_proxy, frontend, ring, backend and manager in dom0, the manager's swtpm);
* **direct**: the same command on a swtpm started in dom0 just for this, reached over
  its unix socket, timed inside dom0.

Both are timed by ``tpm_timing.py`` fed to ``python3 -`` over SSH, so SSH is not in the
timed path; rounds alternate the two paths so drift hits both. Under TCG every
instruction is emulated, so absolute times say little about a real host: only the
driver/direct ratio means anything, and the output says so.

The result goes into ``bench.json`` under ``xen``, beside whatever a sim run left there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from harness.bench import procs, stats

TIMING_SCRIPT = Path(__file__).with_name("tpm_timing.py")
SWTPM_DIR = "/tmp/xvbench-swtpm"  # in dom0
GUESTS = 2  # the saved booted machine is for 2 guests: a warm start (~70 s)
TCG_NOTE = (
    "Xen 4.17 and its domains run under QEMU TCG (every instruction emulated): absolute "
    "times are not a real host's; only the driver/direct ratio means anything"
)


def plan_for(quick: bool) -> dict[str, int]:
    """Round trips per round, rounds (alternating the paths) and untimed warm-up."""
    if quick:
        return {"ops_per_round": 100, "rounds": 3, "warmup": 10}
    return {"ops_per_round": 300, "rounds": 5, "warmup": 20}


def pool(rounds: list[dict[str, Any]]) -> tuple[list[int], float]:
    """The samples and the wall time of several ``tpm_timing.py`` outputs together."""
    samples: list[int] = []
    busy = 0.0
    for r in rounds:
        samples += [int(s) for s in r["samples_ns"]]
        busy += float(r["busy_s"])
    return samples, busy


def summarize(direct: list[dict[str, Any]], driver: list[dict[str, Any]]) -> dict[str, Any]:
    """Both paths' summaries and the driver/direct ratios (``stats.compare``)."""
    return stats.compare(stats.Summary.from_ns(*pool(direct)), stats.Summary.from_ns(*pool(driver)))


def merge(existing: Mapping[str, Any] | None, xen: Mapping[str, Any]) -> dict[str, Any]:
    """``bench.json`` with ``xen`` set: a sim run's keys kept, a xen-only file made."""
    report: dict[str, Any] = dict(existing) if existing else {"schema": stats.SCHEMA}
    report["xen"] = dict(xen)
    return report


def xen_table(xen: Mapping[str, Any]) -> str:
    """The terminal table of a xen run: both paths, the ratio, and the TCG caveat."""
    accel = str(xen.get("accel") or "?").upper()
    lines = [f"Xen target ({accel}), GetRandom(16) raw write/read, timed inside the domains"]
    cmp = xen.get("latency")
    if cmp:
        rows = []
        for path, where in (
            ("direct", "swtpm's unix socket, client in dom0"),
            ("driver", f"{xen.get('guest', {}).get('name', 'guest')} /dev/tpm0"),
        ):
            s = cmp[path]
            rows.append([f"{path}: {where}", s["n"], s["p50_us"], s["p99_us"], s["ops_per_s"]])
        lines += ["", stats.table(["path", "n", "p50 us", "p99 us", "ops/s"], rows), ""]
        lines.append(
            f"driver/direct: p50 x{cmp['ratio_p50']}, p99 x{cmp['ratio_p99']} "
            f"(+{cmp['overhead_p50_us']:,.0f} us per command at p50)"
        )
    if accel == "TCG":
        lines.append(f"note: {TCG_NOTE}")
    hogs = xen.get("host_busy_processes", {}).get("start")
    if hogs:
        names = ", ".join(f"{h['comm']} (pid {h['pid']}, {h['cpu_pct']}% CPU)" for h in hogs)
        lines.append(f"note: busy on the host before this run's QEMU started: {names}")
    for error in xen.get("errors", []):
        lines.append(f"ERROR: {error}")
    return "\n".join(lines)


# -- the run (needs QEMU, Xen images and paramiko) -------------------------------------


def run_timing(host: Any, kind: str, path: str, n: int, warmup: int) -> dict[str, Any]:
    """``tpm_timing.py`` inside the domain ``host`` logs in to; its JSON."""
    command = f"python3 - {kind} {shlex.quote(path)} {n} {warmup}"
    timeout = 60.0 + n * 0.5  # 0.5 s a round trip would already be broken
    rc, out, err = host.run(command, timeout, stdin=TIMING_SCRIPT.read_bytes())
    if rc != 0:
        raise RuntimeError(f"{host.name}: tpm_timing {kind} {path} exited {rc}: {err.strip()}")
    result: dict[str, Any] = json.loads(out)
    return result


def start_direct_swtpm(dom0: Any) -> str:
    """A swtpm in dom0 on a unix socket (state in a tmp dir, started and ready): its path."""
    sock = f"{SWTPM_DIR}/swtpm.sock"
    dom0.check(
        f"rm -rf {SWTPM_DIR} && mkdir -p {SWTPM_DIR}/state && "
        f"swtpm socket --tpm2 --server type=unixio,path={sock} "
        "--flags not-need-init,startup-clear "
        f"--tpmstate dir={SWTPM_DIR}/state --pid file={SWTPM_DIR}/pid "
        f"--log file={SWTPM_DIR}/log --daemon"
    )
    dom0.check(f"for i in $(seq 100); do test -S {sock} && exit 0; sleep 0.1; done; exit 1")
    return sock


def stop_direct_swtpm(dom0: Any) -> None:
    dom0.run(
        f"p=$(cat {SWTPM_DIR}/pid 2>/dev/null) && kill $p; "
        f"for i in $(seq 50); do kill -0 $p 2>/dev/null || break; sleep 0.1; done; "
        f"kill -KILL $p 2>/dev/null; rm -rf {SWTPM_DIR}",
        timeout=30,
    )


def measure(target: Any, quick: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Both paths on a started ``XenTarget``, rounds alternating; the ``xen`` report."""
    from harness.qemu import qemu_version

    dom0 = target.dom0
    guest = target.guests[0]
    plan = plan_for(quick)
    n, warmup = plan["ops_per_round"], plan["warmup"]
    xen: dict[str, Any] = {
        "accel": target.accel,
        "note": TCG_NOTE if target.accel == "tcg" else None,
        "qemu": qemu_version(),
        "workload": "GetRandom(16) raw: one write and one read per command",
        "plan": plan,
        "guest": guest.describe(),
        "target_timings": dict(target.timings),
        "errors": [],
    }
    direct: list[dict[str, Any]] = []
    driver: list[dict[str, Any]] = []
    sock = start_direct_swtpm(dom0)
    try:
        for r in range(plan["rounds"]):
            order = ("direct", "driver") if r % 2 == 0 else ("driver", "direct")
            for path in order:
                say(f"xen: round {r + 1}/{plan['rounds']}, {path}: {n} GetRandom(16)")
                if path == "direct":
                    direct.append(run_timing(dom0, "socket", sock, n, warmup))
                else:
                    driver.append(run_timing(guest.host(), "device", "/dev/tpm0", n, warmup))
    finally:
        stop_direct_swtpm(dom0)
    xen["latency"] = summarize(direct, driver)
    return xen


def run(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """Bring up the xen target, measure, always close it; write bench.json and a table."""
    from harness.targets.xen import XenTarget

    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    xen: dict[str, Any] = {"started": started, "quick": args.quick, "errors": []}
    busy_before = procs.cpu_hogs()
    status = 0
    target = XenTarget(GUESTS, progress=say)
    try:
        say(f"bringing up the xen target ({GUESTS} guests; warm start ~70 s, cold minutes)")
        target.start()
        xen |= measure(target, args.quick, say)
    except KeyboardInterrupt:
        xen["errors"].append("interrupted")
        status = 130
    except Exception as e:
        xen["errors"].append(f"{type(e).__name__}: {e}")
        say(f"failed: {type(e).__name__}: {e}")
        status = 1
    finally:
        target.close()
        target.remove_run_dir()
    xen["host_busy_processes"] = {"start": busy_before, "end": procs.cpu_hogs()}
    xen["machine"] = procs.machine_info()
    xen["duration_s"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench.json"
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError):
        existing = None
    path.write_text(json.dumps(merge(existing, xen), indent=2) + "\n")
    text = xen_table(xen)
    (args.out / "summary-xen.txt").write_text(text + "\n")
    print(text)
    say(f"wrote {path} (key xen)")
    return status if status or "latency" in xen else 1
