"""``manager --confine-swtpm UID_BASE`` (xenvtpm/manager/confinement.py): each swtpm runs
as its own uid, alone in its 0700 state directory, with no network and a file-size
limit, and serves as before: state written confined survives a manager restart."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from manager_env import random_bytes, start_manager, swtpm_pid

from xenvtpm.errors import VTPMError
from xenvtpm.manager.confinement import Confinement
from xenvtpm.manager.manager import ManagerClient
from xenvtpm.tpm import get_random_command, pcr_extend_command, pcr_read_command

UID_BASE = 620000
LIMIT = 8 << 20

pytestmark = [
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="confining swtpm needs root"),
]


def status_ids(pid: int, field: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split()[1:]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def fsize_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max file size"):
            return line.split()[3]
    raise AssertionError("no file-size line")


@contextmanager
def manager(root: Path, *flags: str) -> Iterator[ManagerClient]:
    """A manager with ``flags``, stopped (SIGTERM: a planned stop) at the end."""
    root.chmod(0o711)  # the swtpm's uid must cross it to its state
    m = start_manager(root, *flags)
    try:
        with m.client() as client:
            yield client
    finally:
        assert m.stop() == 0


def test_each_swtpm_runs_as_its_own_uid_alone_and_offline(tmp_root: Path) -> None:
    flags = ("--confine-swtpm", str(UID_BASE), "--swtpm-file-size-limit", str(LIMIT))
    with manager(tmp_root, *flags) as c:
        for instance in (1, 2):
            assert len(random_bytes(c.transact(instance, get_random_command(8)))) == 8
            pid = swtpm_pid(tmp_root, instance)
            uid = str(UID_BASE + instance)
            assert status_ids(pid, "Uid") == [uid] * 4
            assert status_ids(pid, "Gid") == [uid] * 4
            assert status_ids(pid, "Groups") == []
            assert status_ids(pid, "CapEff") == ["0000000000000000"]
            assert fsize_limit(pid) == str(LIMIT)
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
            state = tmp_root / "state" / str(instance)
            info = state.stat()
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (UID_BASE + instance, 0o700)
            for name in ("tpm2-00.permall", "swtpm.log", ".lock"):
                assert (state / name).stat().st_uid == UID_BASE + instance, name
        assert stat.S_IMODE((tmp_root / "state").stat().st_mode) == 0o711


def test_state_written_confined_survives_a_manager_restart(tmp_root: Path) -> None:
    """The confined swtpm saves its volatile state at a planned stop, as its own uid, and
    the next confined swtpm reads it: the extended PCR is still there."""
    flags = ("--confine-swtpm", str(UID_BASE))
    with manager(tmp_root, *flags) as c:
        random_bytes(c.transact(3, get_random_command(8)))
        answer = c.transact(3, pcr_extend_command(16, b"\x33" * 32))
        assert answer[6:10] == b"\0\0\0\0", answer.hex()
        extended = c.transact(3, pcr_read_command(16))[-32:]
    with manager(tmp_root, *flags) as c:
        assert c.transact(3, pcr_read_command(16))[-32:] == extended


@pytest.mark.parametrize(
    ("base", "limit", "error"),
    [(0, LIMIT, "a uid in"), (UID_BASE, 1000, "at least 1 MiB"), (2**31, LIMIT, "a uid in")],
)
def test_a_bad_confinement_is_refused(base: int, limit: int, error: str) -> None:
    with pytest.raises(VTPMError, match=error):
        Confinement(base, limit)


def test_a_state_root_others_cannot_reach_is_named(tmp_path: Path) -> None:
    """The swtpm's uid must cross every parent of the state root: a closed one is a
    clear error at its start, not a TPM_RC_FAILURE with no reason."""
    closed = tmp_path / "closed"
    (closed / "state" / "1").mkdir(parents=True)
    closed.chmod(0o700)
    with pytest.raises(VTPMError, match=f"{closed} is closed to others"):
        Confinement(UID_BASE).prepare(closed / "state", closed / "state" / "1", 1)


def test_an_instance_beyond_the_uid_range_is_refused() -> None:
    with pytest.raises(VTPMError, match="no uid"):
        Confinement(2**31 - 10).uid(100)
