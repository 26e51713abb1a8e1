"""What durable NV costs: NV_Write through the manager, with and without its fsync.

Issue 14, point 6: when a command changed swtpm's state file, the manager fsyncs the
file and its directory before the answer goes back (``xenvtpm/manager/durability.py``), so that
an acknowledged NV write survives a power cut. This measures that price where it is
paid, in the same run: two managers side by side, one as deployed and one with
``--no-fsync``, their state in the system's temporary directory (where the rest of the
bench keeps its state), each driven over its own socket by a ``ManagerClient`` (no
frontend or backend: the fsync is the only difference between the two paths).

Per manager: one instance, one NV index of 64 bytes (owner, password session), then
NV_Writes of 64 bytes, each a new value (swtpm rewrites ``tpm2-00.permall`` every
time), and GetRandom(16), which changes nothing on disk and so costs one ``stat``.
Rounds alternate which manager goes first, so that drift hits both.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import tpmwire
from harness.bench.latency import GET_RANDOM_16, check_success, sample, watchdog
from harness.bench.stats import Summary, ratio, table
from harness.deadline import Deadline
from harness.paths import REPO_ROOT
from harness.process import ManagedProcess
from xenvtpm.manager.client import ManagerClient

INSTANCE = 1000
NV_INDEX = 0x01000A91
NV_SIZE = 64
MANUFACTURE_TIMEOUT = 180.0  # swtpm_setup of a fresh instance: ~1.5 s, far more when busy
KINDS = {"fsync": [], "no_fsync": ["--no-fsync"]}  # report key -> extra manager flags
WORKLOADS = {"nv_write": "NV_Write(64 bytes)", "getrandom": "GetRandom(16)"}


@dataclass(frozen=True)
class NvPlan:
    """Commands per round and manager, per workload."""

    ops: dict[str, int]
    rounds: int
    warmup: int

    @classmethod
    def for_mode(cls, quick: bool) -> NvPlan:
        if quick:
            return cls({"nv_write": 150, "getrandom": 500}, rounds=2, warmup=5)
        return cls({"nv_write": 500, "getrandom": 2000}, rounds=4, warmup=20)


class BenchManager:
    """One ``python -m xenvtpm manager`` with its own state root, and a client of it."""

    def __init__(self, name: str, root: Path, flags: list[str]) -> None:
        self.name = name
        self.socket = root / "vtpm.sock"
        self.state_root = root / "state"
        argv = [
            sys.executable,
            "-m",
            "xenvtpm",
            "manager",
            "--socket",
            str(self.socket),
            "--state-root",
            str(self.state_root),
            *flags,
        ]
        self.process = ManagedProcess(
            f"manager-{name}",
            argv,
            root / "manager.log",
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            ready=self.socket.exists,
        )
        self.client: ManagerClient | None = None

    def start(self, deadline: Deadline) -> ManagerClient:
        self.process.start()
        self.process.wait_ready(deadline)
        self.client = ManagerClient(self.socket, timeout=MANUFACTURE_TIMEOUT)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.process.stop()


def _succeeds(client: ManagerClient, command: bytes) -> Callable[[], None]:
    return lambda: check_success(client.transact(INSTANCE, command))


def _nv_writes(client: ManagerClient) -> Callable[[], None]:
    """An op writing a new 64-byte value each time (16 values in turn)."""
    commands: Iterator[bytes] = itertools.cycle(
        [tpmwire.nv_write(NV_INDEX, os.urandom(NV_SIZE)) for _ in range(16)]
    )
    return lambda: check_success(client.transact(INSTANCE, next(commands)))


def filesystem_of(path: Path) -> str:
    """``TYPE on SOURCE`` of the mount holding ``path`` (/proc/self/mounts)."""
    best, found = "", "unknown"
    target = str(path.resolve())
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        source, mount, fstype, *_ = line.split()
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, found = mount, f"{fstype} on {source}"
    return found


def measure(quick: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Both managers, both workloads; the ``nv_write`` entry of bench.json."""
    plan = NvPlan.for_mode(quick)
    root = Path(tempfile.mkdtemp(prefix="xvbench-nv-"))
    managers = {kind: BenchManager(kind, root / kind, flags) for kind, flags in KINDS.items()}
    try:
        deadline = Deadline(MANUFACTURE_TIMEOUT)
        clients = {kind: m.start(deadline) for kind, m in managers.items()}
        say("nv_write: manufacturing one instance per manager")
        t0 = time.monotonic()
        for client in clients.values():  # both manufacture at once
            client.send_packet(INSTANCE.to_bytes(4, "big") + GET_RANDOM_16)
        for client in clients.values():
            check_success(client.recv_packet(MANUFACTURE_TIMEOUT)[4:])
        manufactured_s = time.monotonic() - t0
        for client in clients.values():
            _succeeds(client, tpmwire.nv_define_space(NV_INDEX, NV_SIZE))()
        ops = {
            kind: {"nv_write": _nv_writes(c), "getrandom": _succeeds(c, GET_RANDOM_16)}
            for kind, c in clients.items()
        }
        samples: dict[str, dict[str, list[int]]] = {k: {w: [] for w in WORKLOADS} for k in KINDS}
        for workload in WORKLOADS:
            say(f"nv_write: {WORKLOADS[workload]}, fsync and --no-fsync, {plan.rounds} rounds")
            for r in range(plan.rounds):
                for kind in KINDS if r % 2 == 0 else reversed(KINDS):
                    with watchdog(60.0, f"{workload} on the {kind} manager"):
                        lat, _ = sample(ops[kind][workload], plan.ops[workload], plan.warmup)
                    samples[kind][workload].extend(lat)
    finally:
        for manager in managers.values():
            manager.close()
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {
        "what": "NV_Write of 64 bytes (a new value each time) and GetRandom(16), straight "
        "to a manager over its socket; one manager fsyncs swtpm's state file and "
        "directory before answering, the other runs with --no-fsync",
        "state_filesystem": filesystem_of(root.parent),
        "plan": {"ops_per_round": plan.ops, "rounds": plan.rounds, "warmup": plan.warmup},
        "manufacture_both_s": round(manufactured_s, 2),
    }
    for kind in KINDS:
        out[kind] = {w: Summary.from_ns(samples[kind][w]).to_json() for w in WORKLOADS}
    out["ratio"] = {
        f"{w}_{q}": ratio(out["fsync"][w][f"{q}_us"], out["no_fsync"][w][f"{q}_us"])
        for w in WORKLOADS
        for q in ("p50", "p99")
    }
    out["fsync_cost_p50_us"] = round(
        out["fsync"]["nv_write"]["p50_us"] - out["no_fsync"]["nv_write"]["p50_us"], 1
    )
    return out


def nv_table(entry: dict[str, Any]) -> str:
    """The printed table: p50 and p99 of both workloads on both managers."""
    rows = []
    for workload, label in WORKLOADS.items():
        for q in ("p50", "p99"):
            each = [entry[kind][workload][f"{q}_us"] for kind in KINDS]
            rows.append([f"{label} {q}", *each, entry["ratio"][f"{workload}_{q}"]])
    return table(["through the manager (us)", "fsync", "--no-fsync", "ratio"], rows)
