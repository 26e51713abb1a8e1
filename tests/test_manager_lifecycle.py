"""The vTPM manager's life: stopping (SIGTERM, SIGKILL) with no swtpm left, one manager
per socket, in-process use, its command line and log level, closed connections.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from manager_env import (
    RunningManager,
    err,
    pfx,
    random_bytes,
    start_manager,
    swtpm_pid,
    swtpm_pids,
)

from harness.paths import REPO_ROOT
from xenvtpm.daemon import LOG_LEVEL_ENV
from xenvtpm.manager.cli import build_parser
from xenvtpm.manager.manager import InstanceStatus, Manager, ManagerClient, status_counts
from xenvtpm.tpm import (
    TPM_RC,
    get_random_command,
)

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed")


# -- lifecycle ------------------------------------------------------------------------


def test_sigterm_stops_every_swtpm(tmp_root: Path) -> None:
    m = start_manager(tmp_root)
    try:
        with m.client() as c:
            for inst in (1, 2):
                random_bytes(c.transact(inst, get_random_command(4)))
        assert len(swtpm_pids(tmp_root)) == 2
        os.kill(m.proc.pid, signal.SIGUSR1)  # status line
        time.sleep(0.2)
    finally:
        rc = m.stop()
    assert rc == 0
    assert swtpm_pids(tmp_root) == []
    assert not m.socket.exists()
    log = m.stderr()
    assert "status: 2 instance(s)" in log and "stopping: 2 instance(s)" in log
    assert ":queued=0:in_flight=0:peak=1" in log


@pytest.mark.parametrize("hour", ["09", "20"])
def test_status_counts_reads_the_instance_not_the_clock(hour: str) -> None:
    """The daemon's log line starts with the time: at 20:xx o'clock instance 20's counts
    must still come from its own field, not from the timestamp (a CI failure that came
    and went with the hour)."""
    line = (
        f"2026-12-07 {hour}:41:24,123 vtpm-manager xenvtpm.manager: status: 2 instance(s) "
        "9:running:pid=11:queued=0:in_flight=0:peak=1 "
        "20:running:pid=12:queued=2:in_flight=1:peak=3"
    )
    assert status_counts(line, 20) == {"queued": 2, "in_flight": 1, "peak": 3}
    assert status_counts(line, 9) == {"queued": 0, "in_flight": 0, "peak": 1}
    assert status_counts(line, 41) is None


def test_sigterm_while_manufacturing_leaves_no_swtpm(tmp_root: Path) -> None:
    """swtpm_setup runs a swtpm of its own; stopping the manager mid-setup kills both."""
    m = start_manager(tmp_root)
    try:
        with m.client() as c:
            c.send_packet(pfx(7) + get_random_command(4))  # first use: manufacturing
            deadline = time.monotonic() + 10
            while not swtpm_pids(tmp_root) and time.monotonic() < deadline:
                time.sleep(0.01)  # until swtpm_setup's own swtpm is up
            assert swtpm_pids(tmp_root), "swtpm_setup never started its swtpm"
    finally:
        assert m.stop() == 0
    deadline = time.monotonic() + 5
    while swtpm_pids(tmp_root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert swtpm_pids(tmp_root) == []


def test_second_manager_refuses_a_served_socket(mgr: RunningManager) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenvtpm",
            "manager",
            "--socket",
            str(mgr.socket),
            "--state-root",
            str(mgr.root / "state2"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 1
    assert b"another manager already serves" in out.stderr


def test_in_process_manager_status_and_close(tmp_root: Path) -> None:
    manager = Manager(tmp_root / "s", tmp_root / "state")
    manager.start()
    thread = threading.Thread(target=manager.serve_forever)
    thread.start()
    try:
        with ManagerClient(tmp_root / "s") as c:
            random_bytes(c.transact(5, get_random_command(4)))
            assert c.transact(5, b"\x80\x01") == err(5, TPM_RC.COMMAND_SIZE)[4:]
    finally:
        manager.request_stop()
        thread.join(10)
    [st] = manager.status()
    assert st == InstanceStatus(5, "running", st.pid, 0, False, None, peak=1) and st.pid
    manager.close()
    manager.close()  # idempotent
    assert swtpm_pids(tmp_root) == []
    assert not (tmp_root / "s").exists()


def test_parser() -> None:
    args = build_parser().parse_args(
        ["--socket", "/s", "--state-root", "/r", "--log-level", "debug"]
    )
    assert (args.socket, args.state_root, args.swtpm, args.log_level) == (
        "/s",
        "/r",
        "swtpm",
        "DEBUG",
    )


def test_xenvtpm_log_level_reaches_the_manager_as_every_daemon(
    tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XENVTPM_LOG_LEVEL sets the manager's level, as the frontend's and the backend's
    (issue 15); --log-level still wins over it."""
    monkeypatch.setenv(LOG_LEVEL_ENV, "debug")
    base = ["--socket", "/s", "--state-root", "/r"]
    assert build_parser().parse_args(base).log_level == "DEBUG"
    assert build_parser().parse_args([*base, "--log-level", "info"]).log_level == "INFO"
    mgr = start_manager(tmp_root)  # its probe connection is logged at debug level only
    try:
        deadline = time.monotonic() + 10
        while "backend connected" not in mgr.stderr():
            assert time.monotonic() < deadline, f"no debug line:\n{mgr.stderr()}"
            time.sleep(0.02)
    finally:
        assert mgr.stop() == 0


def test_manager_killed_hard_leaves_no_swtpm(tmp_root: Path) -> None:
    """swtpm's channels are socketpairs and it runs with --terminate: when the manager
    dies, even by SIGKILL, every swtpm sees its data connection close and exits."""
    m = start_manager(tmp_root)
    with m.client() as c:
        random_bytes(c.transact(1, get_random_command(4)))
    assert len(swtpm_pids(tmp_root)) == 1
    m.proc.kill()
    m.proc.wait()
    deadline = time.monotonic() + 5
    while swtpm_pids(tmp_root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert swtpm_pids(tmp_root) == []


def test_requests_of_a_closed_connection_are_dropped(mgr: RunningManager) -> None:
    with mgr.client() as c:
        random_bytes(c.transact(4, get_random_command(8)))
    pid = swtpm_pid(mgr.root, 4)
    gone = mgr.client()
    os.kill(pid, signal.SIGSTOP)
    try:
        for n in (1, 2, 3):
            gone.send_packet(pfx(4) + get_random_command(n))
        time.sleep(0.1)
        gone.close()
        time.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)
    with mgr.client() as c:
        # the in-flight one completes (its reply is dropped); the queued ones never run
        assert len(random_bytes(c.transact(4, get_random_command(6)))) == 6
        r, _, _ = select.select([c], [], [], 0.2)
        assert r == []
    assert swtpm_pid(mgr.root, 4) == pid
