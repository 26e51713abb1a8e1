"""Faults that need the simulated host's insides: each ends with a clear error for the
affected guest, nothing for the other, and NV data acknowledged before the fault is
there after recovery.

- swtpm hung (SIGSTOP) in the middle of a command, answered by the backend's own vTPM
  timeout (configured short here);
- the manager stopped with a command in flight;
- the disk full while swtpm writes state (a 1 MiB tmpfs on one instance's state
  directory, in the manager's own mount namespace: ``unshare -m``);
- a corrupted state directory.

The faults every target can cause (swtpm killed or hung, the backend or the manager
restarted, with NV and sessions checked after) are scenarios: scenarios/test_faults.py,
which the sim target runs too.

NV commands are raw bytes (password session, empty auth) so that nothing but the guest's
socket is used, as a guest would.
"""

from __future__ import annotations

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
from simenv import Daemon, Guest, SimEnv, wait_for
from test_driver_pair import error, get_random, make_env, swtpm_pid

from harness.paths import REPO_ROOT
from xenvtpm import tpm

RC = tpm.TPM_RC
NV_INDEX = 0x01500015
NV_SIZE = 64
_PW = struct.pack(">IHBH", 0x40000009, 0, 0x01, 0)  # TPM_RS_PW, no nonce, continue, no hmac
_ATTRS = 0x00000004 | 0x00040000 | 0x02000000  # AUTHWRITE | AUTHREAD | NO_DA
TPM_RH_OWNER = 0x40000001
RC_NV_UNINITIALIZED = 0x14A


def with_session(code: int, handles: bytes, params: bytes) -> bytes:
    body = handles + struct.pack(">I", len(_PW)) + _PW + params
    return struct.pack(">HII", 0x8002, 10 + len(body), code) + body


def nv_define(index: int = NV_INDEX, size: int = NV_SIZE) -> bytes:
    public = struct.pack(">IHIHH", index, 0x000B, _ATTRS, 0, size)
    params = struct.pack(">H", 0) + struct.pack(">H", len(public)) + public
    return with_session(0x12A, struct.pack(">I", TPM_RH_OWNER), params)


def nv_undefine(index: int = NV_INDEX) -> bytes:
    return with_session(0x122, struct.pack(">II", TPM_RH_OWNER, index), b"")


def nv_write(data: bytes, index: int = NV_INDEX) -> bytes:
    params = struct.pack(">H", len(data)) + data + struct.pack(">H", 0)
    return with_session(0x137, struct.pack(">II", index, index), params)


def nv_read(size: int = NV_SIZE, index: int = NV_INDEX) -> bytes:
    return with_session(0x14E, struct.pack(">II", index, index), struct.pack(">HH", size, 0))


def rc(response: bytes) -> int:
    return tpm.response_code(response)


def nv_value(guest: Guest) -> bytes:
    response = guest.transmit(nv_read())
    assert rc(response) == 0, response.hex()
    (length,) = struct.unpack_from(">H", response, 14)  # after header and parameterSize
    return response[16 : 16 + length]


def nv_prepare(guest: Guest, value: bytes) -> None:
    """A fresh NV index holding ``value`` (acknowledged: the TPM answered success)."""
    guest.transmit(nv_undefine())  # may not exist: any answer
    assert rc(guest.transmit(nv_define())) == 0
    assert rc(guest.transmit(nv_write(value))) == 0


def recovered(guest: Guest, timeout: float = 30.0) -> None:
    """The guest's TPM answers again (its frontend reconnects by itself)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            get_random(guest)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimEnv]:
    """One environment for the faults the driver recovers from (each test leaves it
    working again); the disk-full case has its own."""
    env = make_env(tmp_path_factory.mktemp("faults", numbered=True), guests=2, backend_timeout=2.0)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def env(shared: SimEnv) -> SimEnv:
    for guest in shared.guests:
        recovered(guest)  # the first command manufactures the TPM (~1 s)
    return shared


def test_swtpm_hung_mid_command_then_resumed_keeps_nv(env: SimEnv) -> None:
    guest, other = env.guests
    value = os.urandom(NV_SIZE)
    nv_prepare(guest, value)
    pid = swtpm_pid(env, guest.instance)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert guest.transmit(nv_write(bytes(NV_SIZE))) == error(RC.FAILURE)  # never acked
        assert time.monotonic() - t0 < 5  # the backend's 2 s vTPM timeout, not a hang
        get_random(other)
    finally:
        os.kill(pid, signal.SIGCONT)
    recovered(guest)
    assert nv_value(guest) in (value, bytes(NV_SIZE))  # the unacked write may have landed
    nv_prepare(guest, value)
    assert nv_value(guest) == value


def test_manager_restarted_mid_command_keeps_acked_nv(env: SimEnv) -> None:
    guest, other = env.guests
    value = os.urandom(NV_SIZE)
    nv_prepare(guest, value)
    pid = swtpm_pid(env, guest.instance)
    os.kill(pid, signal.SIGSTOP)
    with guest.connect() as s:
        s.send(get_random_cmd := tpm.get_random_command(8))
        time.sleep(0.3)
        os.kill(pid, signal.SIGCONT)  # let the manager stop it cleanly
        env.daemon("manager").stop()
        answer = s.recv(4096)
    assert answer == error(RC.FAILURE) or rc(answer) == 0, answer.hex()
    assert len(get_random_cmd) == 12
    Path(env.manager_socket).unlink(missing_ok=True)
    env.start_manager()
    for g in (guest, other):
        recovered(g)
    assert nv_value(guest) == value
    assert env.daemon("backend").alive()


def loaded_sessions_command() -> bytes:
    """TPM2_GetCapability(TPM_CAP_HANDLES, HMAC sessions)."""
    return struct.pack(">HIIIII", 0x8001, 22, 0x17A, 1, 0x02000000, 16)


# -- disk full -------------------------------------------------------------------------

TMPFS_BYTES = 1 << 20


def _unshare_works() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        return "needs root, unshare and nsenter"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    return None if probe.returncode == 0 else "no mount namespaces here (unshare -m failed)"


def start_manager_on_tmpfs(env: SimEnv, instance: int) -> Daemon:
    """The manager in its own mount namespace, with ``state/<instance>`` on a tmpfs."""
    state = env.workdir / "state"
    small = state / str(instance)
    small.mkdir(parents=True, exist_ok=True)
    script = (
        f"mount -t tmpfs -o size={TMPFS_BYTES},mode=0700 xenvtpm-fault {small} && "
        f'exec "$0" -m xenvtpm manager --socket {env.manager_socket} --state-root {state}'
    )
    log = env.workdir / "manager.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, sys.executable],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
    daemon = Daemon("manager", proc, log)
    env.daemons.append(daemon)
    wait_for(lambda: os.path.exists(env.manager_socket) or not daemon.alive(), 10, "manager")
    return daemon


def in_manager_ns(manager: Daemon, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["nsenter", "-t", str(manager.proc.pid), "-m", *argv], capture_output=True, check=False
    )


def test_disk_full_while_swtpm_writes_state(tmp_path: Path) -> None:
    reason = _unshare_works()
    if reason:
        pytest.skip(reason)
    env = SimEnv(tmp_path)
    try:
        env.start_hypervisor()
        manager = start_manager_on_tmpfs(env, instance=1)
        env.start_backend(timeout=2.0)
        guest = env.add_guest("guest1", instance=1)
        other = env.add_guest("guest2", instance=2)
        for g in (guest, other):
            recovered(g)  # the first command manufactures the TPM
        value = os.urandom(NV_SIZE)
        nv_prepare(guest, value)
        filler = env.workdir / "state" / "1" / "filler"
        in_manager_ns(manager, "dd", "if=/dev/zero", f"of={filler}", "bs=4k")  # ENOSPC
        df = in_manager_ns(manager, "df", "--output=avail", str(filler.parent))
        assert df.stdout.split()[-1] == b"0", df.stdout
        writes = [os.urandom(NV_SIZE) for _ in range(3)]
        answers = [guest.transmit(nv_write(w)) for w in writes]
        print("answers with the disk full:", [a.hex() for a in answers])
        failed = [a for a in answers if rc(a) != 0]
        assert failed, "swtpm acknowledged NV writes it could not persist"
        for a in failed:  # an answer, not silence: TPM_RC_FAILURE or the TPM's own code
            assert len(a) == 10 and tpm.validate_response(a), a.hex()
        get_random(other)
        assert rc(other.transmit(nv_define())) == 0  # the other instance's disk is fine
        in_manager_ns(manager, "rm", "-f", str(filler))
        # libtpms went into failure mode when it could not write its state, and stays
        # there with space back: every command answers TPM_RC_FAILURE until swtpm is
        # power-cycled (the manager does not notice: swtpm still answers). The
        # operator's reset does it (CMD_INIT re-initialises libtpms).
        assert guest.transmit(tpm.get_random_command(8)) == error(RC.FAILURE)
        env.reset_instance(guest.instance)
        recovered(guest)
        acked = [value] + [w for w, a in zip(writes, answers, strict=True) if rc(a) == 0]
        assert nv_value(guest) == acked[-1]  # the last acknowledged write, nothing lost
    finally:
        env.close()


def test_corrupted_state_directory(env: SimEnv) -> None:
    other = env.guests[0]
    guest = env.add_guest("guest3", instance=3)  # its own instance: it will not recover
    recovered(guest)
    pid = swtpm_pid(env, guest.instance)
    permall = env.workdir / "state" / str(guest.instance) / "tpm2-00.permall"
    os.kill(pid, signal.SIGSTOP)
    permall.write_bytes(os.urandom(permall.stat().st_size))
    os.kill(pid, signal.SIGKILL)  # it restarts from the corrupted state
    for _ in range(3):
        answer = guest.transmit(tpm.get_random_command(8))
        assert len(answer) == 10 and rc(answer) != 0, answer.hex()  # a clear error
        get_random(other)
    assert env.daemon("manager").alive() and env.daemon("backend").alive()
