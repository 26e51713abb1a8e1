"""The backend's traffic trace: its lines, their bound, and the real backend writing them.

What a failed scenario's report shows of a guest's TPM traffic comes from here
(``xenvtpm.backend.traffic_trace`` in the backend, ``harness.traffic`` reading it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simenv import SimEnv

from harness.paths import REPO_ROOT
from harness.traffic import parse_line, read_trace, render, section, window
from xenvtpm import tpm
from xenvtpm.backend.traffic_trace import AnsweredBy, TrafficTrace

GET_RANDOM_8 = tpm.get_random_command(8)
ANSWER_8 = struct.pack(">HIIH", 0x8001, 20, 0, 8) + bytes(8)


def test_a_line_names_the_command_the_sizes_and_the_response(tmp_path: Path) -> None:
    trace = TrafficTrace(tmp_path)
    t0 = time.time()
    trace.record(1000, 7, t0, 0x17B, 12, ANSWER_8, AnsweredBy.MANAGER)
    trace.record(1000, 7, t0 + 1, -1, -1, tpm.error_response(0x95), AnsweredBy.BACKEND)
    trace.record(1000, 7, t0 + 2, 0x131, 300, None, AnsweredBy.CANCELLED)
    trace.close()
    lines = read_trace(tmp_path, 1000)
    parsed = [parse_line(line) for line in lines]
    assert [p.command_code if p else None for p in parsed] == [0x17B, -1, 0x131]
    first, refused, cancelled = (render(p) for p in parsed if p)
    assert " dom7 GetRandom 12 B -> 20 B SUCCESS " in first and first.endswith("(manager)")
    assert "(malformed) ? -> 10 B 0x95 " in refused and refused.endswith("(backend)")
    assert "CreatePrimary 300 B -> 0 B (no response)" in cancelled
    assert read_trace(tmp_path, 1001) == []  # another instance's file: none yet


def test_the_window_holds_only_the_tests_requests(tmp_path: Path) -> None:
    trace = TrafficTrace(tmp_path)
    for t in (100.0, 200.0, 300.0):
        trace.record(1, 1, t, 0x17B, 12, ANSWER_8, AnsweredBy.MANAGER)
    lines = read_trace(tmp_path, 1)
    assert [t.started for t in window(lines, 150.0, 250.0)] == [200.0]
    assert section(lines, 400.0) == "(no TPM request in this test's time)"
    cut = section(lines, 0.0, limit=1).splitlines()
    assert cut[0] == "... 2 earlier requests left out" and len(cut) == 2
    assert window(["garbage", "", "1.0 dom=x"], 0.0) == []  # unreadable lines are skipped


def test_a_guests_traffic_cannot_fill_dom0s_disk(tmp_path: Path) -> None:
    """Rotated at max_bytes, one old file kept: a chatty guest costs at most twice it,
    and the newest requests are always there."""
    trace = TrafficTrace(tmp_path, max_bytes=4096)
    for i in range(2000):
        trace.record(1, 1, float(i), 0x17B, 12, ANSWER_8, AnsweredBy.MANAGER)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["instance-1.trace", "instance-1.trace.1"]
    assert sum(f.stat().st_size for f in files) <= 2 * 4096 + 200
    lines = read_trace(tmp_path, 1)
    assert parse_line(lines[-1]) is not None and parse_line(lines[-1]).started == 1999.0  # type: ignore[union-attr]
    starts = [p.started for p in map(parse_line, lines) if p]
    assert starts == sorted(starts)  # the rotated file's lines first


def test_a_trace_that_cannot_be_written_stops_and_serves_on(tmp_path: Path) -> None:
    (tmp_path / "instance-1.trace").mkdir()  # opening it fails: as a full disk would
    trace = TrafficTrace(tmp_path)
    trace.record(1, 1, 1.0, 0x17B, 12, ANSWER_8, AnsweredBy.MANAGER)  # no exception
    assert "Is a directory" in trace.failed
    trace.record(2, 1, 1.0, 0x17B, 12, ANSWER_8, AnsweredBy.MANAGER)
    assert not (tmp_path / "instance-2.trace").exists()  # stopped for good


@pytest.fixture
def traced_env(tmp_path: Path) -> Iterator[SimEnv]:
    env = SimEnv(tmp_path)
    try:
        env.start_hypervisor()
        env.start_manager()
        env.start_backend(timeout=10.0, trace=tmp_path / "trace")
        env.add_guest("guest1", instance=1)
        env.add_guest("guest2", instance=2)
        yield env
    except BaseException:
        print(env.logs())
        raise
    finally:
        env.close()


def test_the_backend_traces_each_guests_requests_apart(traced_env: SimEnv) -> None:
    """The real backend: a forwarded command and a refused one, each in its guest's
    file only, with what the guest got back."""
    one, two = traced_env.guests
    t0 = time.time()
    assert tpm.response_code(one.transmit(GET_RANDOM_8)) == 0
    bad_tag = struct.pack(">HIIH", 0x8003, 12, 0x17B, 16)
    assert one.transmit(bad_tag) == tpm.error_response(tpm.bad_tag_rc(0x8003))
    assert tpm.response_code(two.transmit(tpm.get_random_command(4))) == 0
    directory = traced_env.workdir / "trace"
    mine = window(read_trace(directory, 1), t0)
    assert [
        (t.command_code, t.command_size, t.response_size, t.response_code, t.by) for t in mine
    ] == [
        (0x17B, 12, 20, 0, "manager"),
        (-1, -1, 10, tpm.bad_tag_rc(0x8003), "backend"),
    ]
    assert all(t.domid == one.domid for t in mine)
    theirs = window(read_trace(directory, 2), t0)
    assert [(t.command_size, t.response_size, t.domid) for t in theirs] == [(12, 16, two.domid)]


FAILING_SCENARIO = """
from harness import tpmwire

def test_before(guest):
    with guest.transport() as t:
        t.transmit(tpmwire.get_random(4))

def test_fails_after_a_command(guest):
    with guest.transport() as t:
        assert t.transmit(tpmwire.get_random(8))[6:10] == bytes(4)
    assert False, "deliberate"
"""


def test_a_failed_scenarios_report_carries_its_tpm_traffic(tmp_path: Path) -> None:
    """On sim, as on Xen: the requests of the failed test's time, per guest, by name; not
    those of the test before it."""
    pytest.importorskip("tpm2_pytss")
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "conftest.py").read_text())
    (tmp_path / "test_traced.py").write_text(FAILING_SCENARIO)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "test_traced.py",
            "--target",
            "sim",
            "-p",
            "no:cacheprovider",
        ],
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "XENVTPM_ARTIFACTS": str(tmp_path / "artifacts"),
        },
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = result.stdout + result.stderr
    assert "1 passed" in out and "1 failed" in out, out
    report = out[out.index("TPM traffic of guest0, backend side") :]
    first = report.splitlines()[1]
    assert " GetRandom 12 B -> 20 B SUCCESS " in first and first.endswith("(manager)"), report
    assert "-> 16 B" not in report  # test_before's GetRandom(4)
    guest1 = report[report.index("TPM traffic of guest1, backend side") :]
    assert guest1.splitlines()[1] == "(no TPM request in this test's time)", guest1
    for line in out.splitlines():  # nothing left running
        if "kept run directory" in line:
            shutil.rmtree(line.split()[-1], ignore_errors=True)


def test_harness_trace_prints_a_guests_requests(tmp_path: Path) -> None:
    """``harness up``, a command on guest0's endpoint, the README's example client
    (``examples/endpoint_client.py``) on it, then ``harness trace guest0``."""
    run = Path(f"/tmp/xvt-trace-{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XENVTPM_RUN": str(run)}
    harness = [sys.executable, "-m", "harness"]
    try:
        up = subprocess.run(
            [*harness, "up", "--target", "sim", "--guests", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert up.returncode == 0, up.stderr
        endpoint = json.loads(up.stdout)["guests"][0]["tpm"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(60)
            s.connect(endpoint)
            s.send(GET_RANDOM_8)
            assert tpm.response_code(s.recv(4096)) == 0
        client = subprocess.run(  # the README's example program, on the same endpoint
            [sys.executable, str(REPO_ROOT / "examples" / "endpoint_client.py"), endpoint],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert client.returncode == 0, client.stdout + client.stderr
        assert "ECC P-256 primary key created and flushed" in client.stdout, client.stdout
        shown = subprocess.run(
            [*harness, "trace", "guest0", "--no-follow"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert " GetRandom 12 B -> 20 B SUCCESS " in shown.stdout, shown.stdout
        assert " CreatePrimary " in shown.stdout and " FlushContext " in shown.stdout
        unknown = subprocess.run(
            [*harness, "trace", "guest9", "--no-follow"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert unknown.returncode == 1 and "no guest 'guest9'" in unknown.stderr
    finally:
        subprocess.run([*harness, "down"], env=env, capture_output=True, timeout=60, check=False)
        shutil.rmtree(run, ignore_errors=True)
