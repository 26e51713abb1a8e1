"""``python -m harness up/status/logs/down`` as a user runs it, on the direct and sim targets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT
from harness.process import all_procs, proc_cmdline
from harness.transport import SeqpacketTransport, SwtpmTransport

GET_RANDOM_8 = bytes.fromhex("80010000000c0000017b0008")

needs_swtpm = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
    reason="swtpm and swtpm_setup are not installed",
)


def harness(run: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XENVTPM_RUN": str(run), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def leftovers(run: Path) -> list[str]:
    cmds = [proc_cmdline(p.pid) for p in all_procs() if p.running]
    return [" ".join(cmd) for cmd in cmds if any(str(run) in a for a in cmd)]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Path]:
    # Short: unix socket paths must fit in 108 bytes.
    path = Path(f"/tmp/xvt-cli-{os.getpid()}-{tmp_path.name[-12:]}")
    yield path
    harness(path, "down")
    shutil.rmtree(path, ignore_errors=True)


def check_up_down(run: Path, target: str, transport: type) -> None:
    up = harness(run, "up", "--target", target, "--guests", "2")
    assert up.returncode == 0, up.stderr
    env = json.loads(up.stdout)  # exactly one JSON object on stdout
    assert env["target"] == target and len(env["guests"]) == 2
    assert {g["instance"] for g in env["guests"]} == {1000, 1001}
    assert "[harness]" in up.stderr  # progress on stderr
    for g in env["guests"]:
        with transport(Path(g["tpm"])) as t:
            assert t.transmit(GET_RANDOM_8)[6:10] == b"\0\0\0\0"

    again = harness(run, "up", "--target", target)
    assert again.returncode == 1 and "already up" in again.stderr
    assert "harness down" in again.stderr

    status = harness(run, "status")
    assert status.returncode == 0 and "running" in status.stdout and "DEAD" not in status.stdout
    assert json.loads(harness(run, "status", "--json").stdout)["target"] == target
    logs = harness(run, "logs")
    assert logs.returncode == 0 and "guest0" in logs.stdout
    assert leftovers(run)

    down = harness(run, "down")
    assert down.returncode == 0, down.stderr
    assert leftovers(run) == []
    assert harness(run, "status").returncode == 1
    assert harness(run, "down").returncode == 0  # idempotent


@needs_swtpm
def test_up_down_direct(run: Path) -> None:
    check_up_down(run, "direct", SwtpmTransport)


@needs_swtpm
def test_up_down_sim(run: Path) -> None:
    pytest.importorskip("xenvtpm.manager.manager")
    check_up_down(run, "sim", SeqpacketTransport)


@needs_swtpm
def test_up_replaces_an_environment_that_died(run: Path) -> None:
    assert harness(run, "up", "--target", "direct", "--guests", "1").returncode == 0
    record = json.loads((run / "env.json").read_text())
    for p in record["processes"]:
        os.kill(p["pid"], 9)
    up = harness(run, "up", "--target", "direct", "--guests", "1")
    assert up.returncode == 0 and "no longer running" in up.stderr


def test_usage_errors(run: Path) -> None:
    assert harness(run, "up", "--target", "nowhere").returncode == 2
    assert harness(run, "status").returncode == 1
    assert "nothing is up" in harness(run, "status").stderr
