"""The vTPM manager as a test runs it: a real ``python -m xenvtpm manager`` subprocess
on a private socket and state root, and the packets it speaks (instance prefix, error
replies). Shared by the test_manager*.py files; their fixtures are in conftest.py.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.paths import REPO_ROOT
from xenvtpm.manager.manager import ManagerClient
from xenvtpm.tpm import (
    TPM_RC,
    pcr_read_command,
    response_code,
)

PREFIX = struct.Struct(">I")
QUEUE_PER_INSTANCE = 4  # commands of one connection an instance queues (docs/threat-model.md)


def pfx(instance: int) -> bytes:
    return PREFIX.pack(instance)


def err(instance: int, rc: int) -> bytes:
    """The exact reply packet for a 10-byte error response."""
    return pfx(instance) + bytes.fromhex("80010000000a") + rc.to_bytes(4, "big")


def swtpm_pids(root: Path) -> list[int]:
    """Live (non-zombie) swtpm processes whose command line names ``root``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"swtpm" in cmdline and str(root).encode() in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def swtpm_pid(root: Path, instance: int) -> int:
    return int((root / "state" / str(instance) / "swtpm.pid").read_text())


@dataclass
class RunningManager:
    root: Path
    socket: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def client(self) -> ManagerClient:
        return ManagerClient(self.socket, timeout=30)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_manager(root: Path, *extra: str) -> RunningManager:
    sock = root / "vtpm.sock"
    stderr_path = root / "manager.log"
    with stderr_path.open("wb") as err_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xenvtpm",
                "manager",
                "--socket",
                str(sock),
                "--state-root",
                str(root / "state"),
                *extra,
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=err_file,
            stderr=err_file,
        )
    deadline = time.monotonic() + 10
    while True:
        try:
            ManagerClient(sock, timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"manager did not start:\n{stderr_path.read_text()}") from None
            time.sleep(0.02)
    return RunningManager(root, sock, proc, stderr_path)


def managed(root: Path, *extra: str) -> Iterator[RunningManager]:
    m = start_manager(root, *extra)
    try:
        yield m
    finally:
        rc = m.stop()
        leftover = swtpm_pids(root)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        assert rc == 0, m.stderr()
        assert leftover == [], f"swtpm left running: {leftover}"
        assert not m.socket.exists()


def random_bytes(response: bytes) -> bytes:
    assert response_code(response) == TPM_RC.SUCCESS, response.hex()
    (n,) = struct.unpack_from(">H", response, 10)
    assert len(response) == 12 + n
    return response[12:]


def pcr10(client: ManagerClient, instance: int) -> bytes:
    rsp = client.transact(instance, pcr_read_command(10))
    assert response_code(rsp) == TPM_RC.SUCCESS, rsp.hex()
    return rsp[-32:]
