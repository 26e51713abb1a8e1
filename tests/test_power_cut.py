"""A power cut under the manager, on this host: acknowledged TPM state is on disk.

The manager's state root is a small ext4 filesystem of its own (a loop device, mounted
in the manager's private mount namespace with ``commit=60``, so that within a test only
an fsync commits its journal). The power cut is ext4's shutdown ioctl without a log
flush, as xfstests' ``godown`` does: from then on nothing reaches the disk, and what
the journal had not committed is lost. The manager and its swtpm are then killed, the
filesystem is mounted again (its journal replayed) under a new manager, and the TPM is
asked what it has. The Xen scenario ``scenarios/test_power_cut.py`` cuts a whole
machine's power; this one runs in ``nox -s tests``.

Spec: Linux fs/ext4/ioctl.c, ``ext4_shutdown`` (EXT4_IOC_SHUTDOWN,
EXT4_GOING_FLAGS_NOLOGFLUSH).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import tpmwire
from harness.paths import REPO_ROOT
from harness.process import stop_family
from xenvtpm.manager.client import ManagerClient

EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 0x2  # no flush of the journal, nor of the data
INSTANCE = 1
NV_INDEX = 0x01500016
NV_SIZE = 64
EK_HANDLE = 0x81010001  # the RSA EK that manufacturing makes persistent


def _cannot_cut_power() -> str | None:
    tools = ("unshare", "mkfs.ext4", "losetup", "sync")
    if os.geteuid() != 0 or not all(shutil.which(t) for t in tools):
        return f"needs root and {', '.join(tools)}"
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        return "no mount namespaces here (unshare -m failed)"
    if not Path("/dev/loop-control").exists():
        return "no loop devices here"
    return None


_WHY_NOT = _cannot_cut_power()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))


class PoweredManager:
    """``python -m xenvtpm manager`` with its state root on its own ext4 (``disk``)."""

    def __init__(self, workdir: Path, disk: Path, *flags: str) -> None:
        self.disk, self.flags = disk, flags
        self.mount = workdir / "mnt"
        self.mount.mkdir(exist_ok=True)
        self.socket = workdir / "vtpm.sock"
        self.log = workdir / "manager.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagerClient:
        self.socket.unlink(missing_ok=True)
        script = (
            f"mount -o loop,commit=60 {self.disk} {self.mount} && "
            f'exec "$0" -m xenvtpm manager --socket {self.socket} '
            f"--state-root {self.mount}/state " + " ".join(self.flags)
        )
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script, sys.executable],
                stdout=out,
                stderr=out,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"manager did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        return ManagerClient(self.socket, timeout=120)

    def _state(self) -> str:
        """The state root as this manager sees it (inside its mount namespace)."""
        assert self.proc is not None
        return f"/proc/{self.proc.pid}/root{self.mount}/state"

    def sync(self) -> None:
        """Everything written so far is on the disk (syncfs)."""
        subprocess.run(["sync", "-f", self._state()], check=True)

    def cut(self) -> None:
        """Power off: the filesystem stops at once, then every process dies (SIGKILL)."""
        assert self.proc is not None
        fd = os.open(self._state(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)
        self.kill()

    def kill(self) -> None:
        if self.proc is None:
            return
        stop_family(self.proc.pid, None, 10.0, reap=self.proc.poll, soft=signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        deadline = time.monotonic() + 30  # the namespace goes, and with it the loop mount
        while subprocess.run(
            ["losetup", "-j", str(self.disk)], capture_output=True, text=True
        ).stdout.strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.disk} is still attached to a loop device")
            time.sleep(0.1)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    image = tmp_path / "state.ext4"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    return image


def _ok(client: ManagerClient, command: bytes) -> tpmwire.Response:
    resp = tpmwire.Response.from_bytes(client.transact(INSTANCE, command))
    assert resp.code == tpmwire.RC.SUCCESS, f"the TPM answered {resp.code:#x}"
    return resp


def _nv_after_a_cut_behind(manager: PoweredManager) -> tuple[bytes, bytes]:
    """Write NV, sync, write again and cut the power at the answer; then read it back
    under a new manager: (value before the last write, value read back)."""
    before, after = os.urandom(NV_SIZE), os.urandom(NV_SIZE)
    client = manager.start()
    try:
        _ok(client, tpmwire.get_random(8))  # manufactures the instance
        _ok(client, tpmwire.nv_define_space(NV_INDEX, NV_SIZE))
        _ok(client, tpmwire.nv_write(NV_INDEX, before))
        manager.sync()  # only the next write is at stake
        _ok(client, tpmwire.nv_write(NV_INDEX, after))  # acknowledged
        manager.cut()
    finally:
        client.close()
        manager.kill()
    client = manager.start()
    try:
        return before, tpmwire.parse_nv_read(_ok(client, tpmwire.nv_read(NV_INDEX, NV_SIZE)))
    finally:
        client.close()
        manager.kill()


def test_an_acknowledged_nv_write_survives_a_power_cut(tmp_path: Path, disk: Path) -> None:
    before, value = _nv_after_a_cut_behind(PoweredManager(tmp_path, disk))
    assert value != before, "the acknowledged NV_Write was lost in the power cut"


def test_without_fsync_the_same_power_cut_loses_it(tmp_path: Path, disk: Path) -> None:
    """The control: with ``--no-fsync`` the manager answers before the state is on
    disk, and this power cut really loses it (so the test above can fail)."""
    before, value = _nv_after_a_cut_behind(PoweredManager(tmp_path, disk, "--no-fsync"))
    assert value == before, "the unsynced write survived: this cut loses nothing"


def test_a_new_instance_is_on_disk_before_its_first_answer(tmp_path: Path, disk: Path) -> None:
    """The guest's first answer may already depend on the new TPM's seeds (its EK, a
    key sealed under its SRK): manufacturing must not be lost in a power cut after it."""
    manager = PoweredManager(tmp_path, disk)
    client = manager.start()
    try:
        ek = _ok(client, tpmwire.read_public(EK_HANDLE)).body  # manufactures the instance
        manager.cut()
    finally:
        client.close()
        manager.kill()
    client = manager.start()
    try:
        resp = tpmwire.Response.from_bytes(
            client.transact(INSTANCE, tpmwire.read_public(EK_HANDLE))
        )
        assert resp.code == tpmwire.RC.SUCCESS and resp.body == ek, (
            "after the power cut the instance has another EK: it was manufactured anew"
        )
    finally:
        client.close()
        manager.kill()


@pytest.fixture(autouse=True)
def _manager_log(tmp_path: Path) -> Iterator[None]:
    """The managers' log, in the report of a failing test."""
    yield
    log = tmp_path / "manager.log"
    if log.exists():
        print(log.read_text()[-4000:])
