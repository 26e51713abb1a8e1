"""``manager --confine-swtpm UID_BASE`` (xenvtpm/manager/confinement.py): each swtpm runs
as its own uid, alone in its 0700 state directory, with no network and a file-size
limit, and serves as before: state written confined survives a manager restart."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
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


def as_uid(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` run as ``uid`` (and gid), no groups: what a confined swtpm could do."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        stdout=subprocess.DEVNULL,  # a state file is binary
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        check=False,
    )


def test_one_instances_uid_can_neither_read_nor_write_anothers_state(tmp_root: Path) -> None:
    """Code running as instance 1's uid (a guest that took over its swtpm) reaches its own
    state, and not a byte of instance 2's: no read, no write, no new file, no listing."""
    with manager(tmp_root, "--confine-swtpm", str(UID_BASE)) as c:
        for instance in (1, 2):
            random_bytes(c.transact(instance, get_random_command(8)))
        mine, theirs = tmp_root / "state" / "1", tmp_root / "state" / "2"
        uid = UID_BASE + 1
        assert as_uid(uid, "cat", str(mine / "tpm2-00.permall")).returncode == 0
        for argv in (
            ["cat", str(theirs / "tpm2-00.permall")],
            ["sh", "-c", f"echo x >> {theirs / 'tpm2-00.permall'}"],
            ["touch", str(theirs / "planted")],
            ["ls", str(theirs)],
            ["ls", str(tmp_root / "state")],
        ):
            done = as_uid(uid, *argv)
            assert done.returncode != 0 and "Permission denied" in done.stderr, (argv, done)
        assert not (theirs / "planted").exists()


def start_refused(tmp_root: Path, instance: int) -> str:
    """Instance ``instance``'s first command under a confined manager: TPM_RC_FAILURE;
    the manager's log."""
    m = start_manager(tmp_root, "--confine-swtpm", str(UID_BASE))
    try:
        with m.client() as c:
            answer = c.transact(instance, get_random_command(8))
            assert answer[6:10] == (0x101).to_bytes(4, "big"), answer.hex()  # TPM_RC_FAILURE
    finally:
        assert m.stop() == 0
    return m.stderr()


def test_a_state_directory_of_another_uid_is_reported_not_repaired(tmp_root: Path) -> None:
    """Instance 3's state found owned by instance 4's uid (moved, or written by another
    swtpm): the manager does not start swtpm on it, says whose it is, and leaves it as it
    found it; the operator decides."""
    with manager(tmp_root, "--confine-swtpm", str(UID_BASE)) as c:
        random_bytes(c.transact(3, get_random_command(8)))
    state = tmp_root / "state" / "3"
    stranger = UID_BASE + 4
    for path in [state, *state.iterdir()]:
        os.chown(path, stranger, stranger, follow_symlinks=False)
    log = start_refused(tmp_root, 3)
    assert f"owned by uid {stranger}" in log and str(state) in log, log
    assert state.stat().st_uid == stranger
    assert (state / "tpm2-00.permall").stat().st_uid == stranger


def test_a_state_directory_open_to_others_is_reported_not_repaired(tmp_root: Path) -> None:
    with manager(tmp_root, "--confine-swtpm", str(UID_BASE)) as c:
        random_bytes(c.transact(5, get_random_command(8)))
    state = tmp_root / "state" / "5"
    state.chmod(0o777)
    log = start_refused(tmp_root, 5)
    assert "mode 777" in log and str(state) in log, log
    assert stat.S_IMODE(state.stat().st_mode) == 0o777
