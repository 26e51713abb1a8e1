"""systemd readiness (xenvtpm/notify.py): READY=1 only once the daemon serves, STOPPING=1
when it stops, and the manager's swtpm children never inherit the socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from manager_env import swtpm_pid

from harness.paths import REPO_ROOT
from xenvtpm.manager.manager import ManagerClient
from xenvtpm.notify import NOTIFY_SOCKET_ENV, Notifier
from xenvtpm.tpm import get_random_command


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """systemd's side: a datagram socket, as $NOTIFY_SOCKET names it."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(15)
        yield path, s


def fields(s: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in s.recv(4096).decode().splitlines())


def test_ready_and_stopping_reach_the_socket(listener: tuple[str, socket.socket]) -> None:
    path, s = listener
    notifier = Notifier(path)
    assert notifier.ready("backend serving")
    got = fields(s)
    assert got["READY"] == "1" and got["STATUS"] == "backend serving"
    assert got["MAINPID"] == str(os.getpid())
    assert notifier.stopping()
    assert fields(s) == {"STOPPING": "1"}


def test_an_abstract_socket_name() -> None:
    name = f"@xenvtpm-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name[1:])
        s.settimeout(5)
        assert Notifier(name).ready("x")
        assert fields(s)["READY"] == "1"


def test_no_socket_is_no_notice_and_a_dead_one_no_crash(tmp_path: Path) -> None:
    assert not Notifier(None).ready("x")
    assert not Notifier(str(tmp_path / "nobody-listens")).ready("x")


def test_the_variable_is_taken_out_of_the_environment(
    monkeypatch: pytest.MonkeyPatch, listener: tuple[str, socket.socket]
) -> None:
    monkeypatch.setenv(NOTIFY_SOCKET_ENV, listener[0])
    assert Notifier.from_environment().address == listener[0]
    assert NOTIFY_SOCKET_ENV not in os.environ


@pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed")
def test_the_manager_is_ready_only_when_it_listens(
    tmp_path: Path, listener: tuple[str, socket.socket]
) -> None:
    """READY=1 comes after the socket accepts clients (a unit ordered after the manager
    may connect at once), STOPPING=1 on SIGTERM, and swtpm has no $NOTIFY_SOCKET."""
    path, s = listener
    sock = tmp_path / "vtpm.sock"
    args = ["manager", "--socket", str(sock), "--state-root", str(tmp_path / "state")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenvtpm", *args],
        cwd=REPO_ROOT,
        env={**os.environ, NOTIFY_SOCKET_ENV: path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        got = fields(s)
        assert got["READY"] == "1" and got["MAINPID"] == str(proc.pid)
        with ManagerClient(sock, timeout=30) as client:
            client.transact(1, get_random_command(8))
        pid = swtpm_pid(tmp_path, 1)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(NOTIFY_SOCKET_ENV.encode() + b"=") for e in environ)
        proc.send_signal(signal.SIGTERM)
        assert fields(s) == {"STOPPING": "1"}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
