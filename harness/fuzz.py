"""``python -m harness.fuzz --seconds N``: a bounded fuzzing campaign of what guests feed us.

Targets (each a function of one byte string that raises only when a property breaks):

    intake         the backend's request intake (xenvtpm.intake): ring page + data pages
                   -> its own 10-byte error or a forward; shared memory read once
    intake-v2      the same for protocol v2 (xen-tpmfront): shared page + extra pages
                   -> error, forward or "not submitted"; header and data read once each
    tpmif          ring entry and ring page parsers, packet_length, gather
    tpm-command    tpm.validate_command (and validate_response)
    xs-wire        xenstore wire parsing: headers, packets, strings, writes, permissions
    xs-server      the simulated xenstored serving a guest's packet stream: no crash,
                   one reply per request, dom0's nodes untouched
    hypercall      simxend itself (in-process) serving a guest's hypercall channel: one
                   well-formed reply per message, no unforeseen exception, still serving
    xs-domid       simxend serving a guest's xenstore request that names a domain id
                   (GET_DOMAIN_PATH, IS_DOMAIN_INTRODUCED, SET_PERMS...): the same
                   (both in harness/fuzz_sim.py)

Engines: atheris (coverage-guided libFuzzer, one child process per target so a crash
or a hang ends only that run; it is restarted for the rest of the budget) when it can
be imported, else hypothesis (in-process, inputs mixed from random bytes and mutated
seeds, a per-input alarm for hangs). A crashing or hanging input is saved under
``artifacts/fuzz/`` (``<target>-crash-<sha1>`` / ``<target>-hang-<sha1>``); copy it
into ``tests/fuzz_corpus/<target>/`` to make it a regression input, which
tests/test_fuzz.py replays. The last line printed is exactly
``fuzz: N inputs, C crashes, H hangs``; the exit status is 1 if C or H is not 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from harness.fuzz_sim import fuzz_hypercall, fuzz_xs_domid, seeds_hypercall, seeds_xs_domid
from harness.paths import REPO_ROOT
from xenvtpm import tpm, tpmif, tpmif_v2
from xenvtpm.errors import MalformedMessage
from xenvtpm.intake import RESERVED_CODES, Forward, NotSubmitted, intake, intake_v2
from xenvtpm.sim import xenstore_wire as wire
from xenvtpm.sim.xenstore_server import XenStoreServer
from xenvtpm.xen.interface import Access, Perm

ARTIFACTS = REPO_ROOT / "artifacts" / "fuzz"
CORPUS = REPO_ROOT / "tests" / "fuzz_corpus"
HANG_S = 5.0
MAX_LEN = 2 * tpmif.PAGE_SIZE + 200
PAGE = tpmif.PAGE_SIZE

Target = Callable[[bytes], None]


# -- targets ----------------------------------------------------------------------------


class _OnceOnly:
    """A shared page that counts how often it is read: intake must read it at most once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.reads = 0

    def __getitem__(self, item: slice) -> bytes:
        self.reads += 1
        return self._data[item]

    def __len__(self) -> int:
        return len(self._data)


def fuzz_intake(data: bytes) -> None:
    """byte 0: mapped pages (0..10); 160 ring bytes; then the data pages' contents."""
    npages = data[0] % (tpmif.TPMIF_TX_RING_SIZE + 1) if data else 1
    ring = _OnceOnly(data[1 : 1 + tpmif.RING_BYTES].ljust(PAGE, b"\0"))
    body = data[1 + tpmif.RING_BYTES :]
    pages = [_OnceOnly(body[i * PAGE : (i + 1) * PAGE].ljust(PAGE, b"\0")) for i in range(npages)]
    result = intake(ring, pages, npages)  # type: ignore[arg-type]
    assert ring.reads == 1, f"ring page read {ring.reads} times"
    assert all(p.reads <= 1 for p in pages), "a data page read twice (double fetch)"
    size = struct.unpack_from("=H", ring._data, 14)[0]
    if isinstance(result, Forward):
        command = result.command
        assert len(command) == size <= tpmif.capacity(npages)
        assert command == b"".join(p._data for p in pages)[:size]
        header = tpm.validate_command(command)
        assert header.size == len(command) and header.code == result.code
        assert header.code not in RESERVED_CODES
    else:
        assert isinstance(result, bytes) and len(result) == tpm.HEADER_SIZE
        assert tpm.validate_response(result).size == tpm.HEADER_SIZE
        assert tpm.response_code(result) != 0


def fuzz_intake_v2(data: bytes) -> None:
    """byte 0: extra pages mapped at connect (0..2); the shared page; the extra pages."""
    nr_extra = data[0] % 3 if data else 0
    shared = _OnceOnly(data[1 : 1 + PAGE].ljust(PAGE, b"\0"))
    body = data[1 + PAGE :]
    extra = [_OnceOnly(body[i * PAGE : (i + 1) * PAGE].ljust(PAGE, b"\0")) for i in range(nr_extra)]
    result = intake_v2(shared, extra, nr_extra)  # type: ignore[arg-type]
    assert shared.reads <= 2, f"shared page read {shared.reads} times (header + data at most)"
    assert all(p.reads <= 1 for p in extra), "an extra page read twice (double fetch)"
    header = tpmif_v2.SharedHeader.from_bytes(shared._data[: tpmif_v2.HEADER_SIZE])
    if isinstance(result, NotSubmitted):
        assert header.state != tpmif_v2.VtpmState.SUBMIT and result.state == header.state
    elif isinstance(result, Forward):
        assert header.state == tpmif_v2.VtpmState.SUBMIT
        assert header.nr_extra_pages == nr_extra
        assert len(result.command) == header.length <= tpmif_v2.capacity(nr_extra)
        whole = shared._data[tpmif_v2.data_offset(nr_extra) :] + b"".join(p._data for p in extra)
        assert result.command == whole[: header.length]
        assert tpm.validate_command(result.command).code == result.code
        assert result.code not in RESERVED_CODES and result.locality == header.locality
    else:
        assert isinstance(result, bytes) and len(result) == tpm.HEADER_SIZE
        assert tpm.response_code(result) != 0


def fuzz_tpmif(data: bytes) -> None:
    try:
        entry = tpmif.TxRequest.from_bytes(data[:16])
    except MalformedMessage:
        assert len(data) < 16
    else:
        assert entry.to_bytes() == data[:16]
    entries = tpmif.read_ring(data.ljust(tpmif.RING_BYTES, b"\0"))
    assert len(entries) == tpmif.TPMIF_TX_RING_SIZE
    npages = len(data) % (tpmif.TPMIF_TX_RING_SIZE + 1)
    pages = [memoryview(data[i * 97 : i * 97 + PAGE]) for i in range(npages)]
    try:
        length = tpmif.packet_length(entries, npages)
    except MalformedMessage:
        length = -1
    try:
        fast = tpmif.read_length(data.ljust(tpmif.RING_BYTES, b"\0"), npages)
    except MalformedMessage:
        fast = -1
    assert fast == length, "read_length and packet_length(read_ring) disagree"
    if length < 0:
        return
    try:
        packet = tpmif.gather(pages, length)
    except MalformedMessage:
        return  # short pages: refused, not crashed
    assert len(packet) == length


def fuzz_tpm_command(data: bytes) -> None:
    try:
        header = tpm.validate_command(data, tpm.MAX_COMMAND_SIZE)
    except tpm.MalformedCommand as e:
        assert e.rc != 0
    else:
        assert header.size == len(data) <= tpm.MAX_COMMAND_SIZE
        assert header.to_bytes() == data[:10]
    try:
        response = tpm.validate_response(data)
    except MalformedMessage:
        pass
    else:
        assert response.size == len(data)


def fuzz_xs_wire(data: bytes) -> None:
    try:
        packet = wire.XsPacket.from_bytes(data)
    except MalformedMessage:
        pass
    else:
        assert packet.to_bytes() == data
    for parse in (wire.split_strings, wire.one_string, wire.decode_write, wire.decode_error):
        with contextlib.suppress(MalformedMessage):
            parse(data)
    with contextlib.suppress(MalformedMessage, ValueError):
        Perm.from_wire(data.decode("utf-8", "replace"))


_GUEST = 5
_SECRET = "/local/domain/0/backend/vtpm/5/0/instance"


def fuzz_xs_server(data: bytes) -> None:
    """A guest's connection sends ``data`` as a stream of packets, as simxend frames it."""
    server = XenStoreServer()
    server.connect(1, 0)
    server.introduce_domain(_GUEST, "guest")
    server.connect(2, _GUEST)
    for payload in (wire.encode_write(_SECRET, b"7"),):
        server.handle(1, wire.XsPacket(wire.XsType.XS_WRITE, 1, 0, payload))
    owner, reader = Perm(0, Access.NONE), Perm(_GUEST, Access.READ)
    perms = wire.join_strings(_SECRET, owner.to_wire(), reader.to_wire())
    server.handle(1, wire.XsPacket(wire.XsType.XS_SET_PERMS, 2, 0, perms))
    before = server.read_node(_SECRET)
    offset = 0
    while offset + wire.HEADER_SIZE <= len(data):
        try:
            header = wire.XsHeader.from_bytes(data[offset : offset + wire.HEADER_SIZE])
        except MalformedMessage:
            break  # simxend drops such a connection
        end = offset + wire.HEADER_SIZE + header.length
        if end > len(data):
            break
        packet = wire.XsPacket.from_bytes(data[offset:end])
        offset = end
        deliveries = server.handle(2, packet)
        assert deliveries and deliveries[0][0] == 2, "no reply to the sender first"
        reply = deliveries[0][1]
        assert reply.req_id == packet.req_id
        wire.XsPacket.from_bytes(reply.to_bytes())
        for _conn, event in deliveries:
            assert len(event.payload) <= wire.XENSTORE_PAYLOAD_MAX
    assert server.read_node(_SECRET) == before, "a guest changed dom0's node"


TARGETS: dict[str, Target] = {
    "intake": fuzz_intake,
    "intake-v2": fuzz_intake_v2,
    "tpmif": fuzz_tpmif,
    "tpm-command": fuzz_tpm_command,
    "xs-wire": fuzz_xs_wire,
    "xs-server": fuzz_xs_server,
    "hypercall": fuzz_hypercall,
    "xs-domid": fuzz_xs_domid,
}


def _ring(size: int, refs: int = 10) -> bytes:
    entries = [tpmif.TxRequest(0, 8 + i, 0, max(size - i * PAGE, 0)) for i in range(refs)]
    return b"".join(e.to_bytes() for e in entries)


def _xs(type_: wire.XsType, payload: bytes, req: int = 1, tx: int = 0) -> bytes:
    return wire.XsPacket(type_, req, tx, payload).to_bytes()


def seeds(name: str) -> list[bytes]:
    """Valid (or nearly valid) inputs that show the fuzzer the shape of each format."""
    rand = tpm.get_random_command(16)
    if name == "intake":
        big = struct.pack(">HII", 0x8001, 4097, 0x17B) + bytes(4087)
        return [
            b"\x0a" + _ring(len(rand)) + rand,
            b"\x01" + _ring(4097, 1) + big,
            b"\x02" + _ring(len(big), 2) + big,
            b"\x0a" + _ring(len(rand)) + rand[:9],
            b"\x0a" + _ring(10) + tpm.bind_command(3),
        ]
    if name == "intake-v2":
        full = struct.pack(">HII", 0x8001, 4096, 0x17B) + bytes(4086)

        def v2(length: int, state: int, nr_extra: int, body: bytes) -> bytes:
            head = struct.pack("=IBBBB", length, state, 0, 0, nr_extra) + bytes(4 * nr_extra)
            return (head + body).ljust(PAGE, b"\0") + body[PAGE - len(head) :]

        return [
            b"\x00" + v2(len(rand), 1, 0, rand),
            b"\x01" + v2(4096, 1, 1, full),
            b"\x00" + v2(len(rand), 3, 0, rand),
            b"\x00" + v2(4089, 1, 0, rand),
            b"\x00" + v2(14, 1, 0, tpm.bind_command(3)),
            b"\x02" + v2(12, 1, 255, rand),
        ]
    if name == "tpmif":
        return [_ring(12), _ring(40960), _ring(0) + rand]
    if name == "tpm-command":
        return [rand, tpm.pcr_read_command(3), tpm.error_response(0x142), tpm.bind_command(1)]
    if name == "hypercall":
        return seeds_hypercall()
    if name == "xs-domid":
        return seeds_xs_domid()
    path = "device/vtpm/0/state"
    packets = [
        _xs(wire.XsType.XS_READ, wire.join_strings(_SECRET)),
        _xs(wire.XsType.XS_WRITE, wire.encode_write(path, b"3")),
        _xs(wire.XsType.XS_WRITE, wire.encode_write(_SECRET, b"1")),
        _xs(wire.XsType.XS_WATCH, wire.join_strings("device", "tok")),
        _xs(wire.XsType.XS_TRANSACTION_START, b"\0"),
        _xs(wire.XsType.XS_WRITE, wire.encode_write("data/x", b"y"), tx=1),
        _xs(wire.XsType.XS_TRANSACTION_END, b"T\0", tx=1),
        _xs(wire.XsType.XS_SET_PERMS, wire.join_strings(path, "n5", "w0")),
        _xs(wire.XsType.XS_DIRECTORY, wire.join_strings("/local/domain/0")),
        _xs(wire.XsType.XS_RM, wire.join_strings("/local/domain/0/backend")),
        _xs(wire.XsType.XS_MKDIR, wire.join_strings("/local/domain/0/x")),
    ]
    if name == "xs-server":
        return [b"".join(packets), *packets]
    return [*packets, b"r5\0n0\0"]


# -- engines ----------------------------------------------------------------------------


@dataclass
class Tally:
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0

    def add(self, other: Tally) -> None:
        self.inputs += other.inputs
        self.crashes += other.crashes
        self.hangs += other.hangs


class _Hang(Exception):
    pass


def _save(out: Path, name: str, kind: str, data: bytes) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{kind}-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _Hang


def run_one(target: Target, data: bytes, hang_s: float = HANG_S) -> str | None:
    """Run one input; ``None`` if fine, else ``"crash"`` or ``"hang"``."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, hang_s)
    try:
        target(data)
    except _Hang:
        return "hang"
    except Exception:
        return "crash"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return None


def hypothesis_campaign(name: str, seconds: float, out: Path) -> Tally:
    """In-process: hypothesis draws random bytes and mutations of the seeds."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    target = TARGETS[name]
    tally = Tally()
    base = seeds(name)
    mutated = st.builds(
        _mutate,
        st.sampled_from(base),
        st.lists(st.tuples(st.integers(0, MAX_LEN), st.integers(0, 255)), max_size=8),
        st.integers(0, MAX_LEN),
    )
    inputs = st.one_of(mutated, st.binary(max_size=512), st.sampled_from(base))
    deadline = time.monotonic() + seconds

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def one(data: bytes) -> None:
        if time.monotonic() > deadline:
            return
        tally.inputs += 1
        verdict = run_one(target, data)
        if verdict is not None:
            if verdict == "crash":
                tally.crashes += 1
            else:
                tally.hangs += 1
            path = _save(out, name, verdict, data)
            print(f"fuzz: {name}: {verdict} saved to {path}", flush=True)

    while time.monotonic() < deadline:
        one()
    return tally


def _mutate(seed: bytes, flips: Sequence[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(seed)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    return bytes(data[: max(cut, len(data) // 2)])


_EXECUTED = re.compile(rb"stat::number_of_executed_units:\s*(\d+)")
_PULSE = re.compile(rb"^#(\d+)\s", re.MULTILINE)


def atheris_campaign(name: str, seconds: float, out: Path) -> Tally:
    """libFuzzer in child processes; a crash or hang ends one child, the next goes on."""
    corpus = out / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds(name):
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)
    tally = Tally()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 1:
        before = {p.name for p in out.glob(f"{name}-*")}
        argv = [
            sys.executable,
            "-c",
            CHILD,
            name,
            f"-max_total_time={int(left)}",
            f"-timeout={int(HANG_S)}",
            f"-max_len={MAX_LEN}",
            f"-artifact_prefix={out}/{name}-",
            "-print_final_stats=1",
            str(corpus),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(
            argv, capture_output=True, env=env, cwd=REPO_ROOT, timeout=left + 60, check=False
        )
        log = result.stdout + result.stderr
        counts = _EXECUTED.findall(log) or _PULSE.findall(log)
        tally.inputs += int(counts[-1]) if counts else 0
        new = sorted({p.name for p in out.glob(f"{name}-*")} - before)
        for artifact in new:
            kind = "hangs" if "-timeout-" in artifact or "-slow-unit-" in artifact else "crashes"
            setattr(tally, kind, getattr(tally, kind) + 1)
            print(
                f"fuzz: {name}: {kind[:-2] if kind == 'crashes' else 'hang'} saved to "
                f"{out / artifact}",
                flush=True,
            )
        if result.returncode != 0 and not new:
            tally.crashes += 1
            sys.stderr.write(log[-3000:].decode(errors="replace"))
        if result.returncode == 0:
            break
    return tally


#: The atheris child: the code under test is imported under instrumentation first.
CHILD = """
import sys, atheris
with atheris.instrument_imports(include=["xenvtpm"]):
    import xenvtpm.intake, xenvtpm.tpm, xenvtpm.tpmif, xenvtpm.tpmif_v2
    import xenvtpm.sim.xenstore_server, xenvtpm.sim.xenstore_wire
    import xenvtpm.sim.simxend, xenvtpm.sim.hypercall, xenvtpm.xen.interface
from harness.fuzz import child
child(sys.argv[1], sys.argv[2:])
"""


def child(name: str, libfuzzer_args: list[str]) -> None:
    """Inside one atheris process (see :data:`CHILD`): fuzz ``name`` with libFuzzer."""
    atheris: Any = importlib.import_module("atheris")
    atheris.Setup([sys.argv[0], *libfuzzer_args], TARGETS[name])
    atheris.Fuzz()


def have_atheris() -> bool:
    try:
        importlib.import_module("atheris")
    except ImportError:
        return False
    return True


def campaign(
    seconds: float,
    targets: Sequence[str] | None = None,
    engine: str = "auto",
    out: Path = ARTIFACTS,
) -> Tally:
    names = list(targets or TARGETS)
    if engine == "auto":
        engine = "atheris" if have_atheris() else "hypothesis"
    run = atheris_campaign if engine == "atheris" else hypothesis_campaign
    total = Tally()
    for name in names:
        t0 = time.monotonic()
        tally = run(name, seconds / len(names), out)
        total.add(tally)
        print(
            f"fuzz: {name} ({engine}): {tally.inputs} inputs, {tally.crashes} crashes, "
            f"{tally.hangs} hangs in {time.monotonic() - t0:.0f} s",
            flush=True,
        )
    return total


def replay(corpus: Path = CORPUS) -> dict[str, list[str]]:
    """Run every saved regression input (``corpus/<target>/*``); the failing ones."""
    failures: dict[str, list[str]] = {}
    for name, target in TARGETS.items():
        for path in sorted((corpus / name).glob("*")) if (corpus / name).is_dir() else []:
            if run_one(target, path.read_bytes()) is not None:
                failures.setdefault(name, []).append(path.name)
    return failures


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m harness.fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=60.0, help="whole campaign (default 60)")
    p.add_argument(
        "--target",
        action="append",
        choices=sorted(TARGETS),
        help="fuzz only this target (repeatable; default all)",
    )
    p.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    p.add_argument("--out", type=Path, default=ARTIFACTS, help="crashes, hangs, corpus")
    a = p.parse_args(args)
    failures = replay()
    total = campaign(a.seconds, a.target, a.engine, a.out)
    for name, files in failures.items():
        print(f"fuzz: regression inputs failing for {name}: {files}")
        total.crashes += len(files)
    print(f"fuzz: {total.inputs} inputs, {total.crashes} crashes, {total.hangs} hangs")
    return 1 if total.crashes or total.hangs else 0


if __name__ == "__main__":
    sys.exit(main())
