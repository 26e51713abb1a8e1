"""A running guest's TPM never silently resets (issue 14, point 3: PCR integrity).

A guest that finds its PCRs zeroed while it runs can replay "good" measurements, which
defeats sealing and attestation. So:

- a **planned** restart of the manager (upgrade, restart) keeps every running guest's
  volatile TPM state: PCRs, sessions and loaded objects (swtpm's CMD_STORE_VOLATILE on
  the way down, restored once on the way up);
- an **unplanned** loss of that state (swtpm killed or hung, the manager killed) fails
  closed, like a TPM in failure mode: every command gets TPM_RC_FAILURE except
  GetCapability and GetTestResult, until the domain reboots (a BIND of another domid)
  or an operator resets the instance (``python3 -m xenvtpm reset``). NV and persistent
  keys are intact afterwards.

Against real swtpm, with the manager as a subprocess (tests/test_manager.py's helpers).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from manager_env import (
    err,
    managed,
    random_bytes,
    start_manager,
    swtpm_pid,
    swtpm_pids,
)
from test_faults import (
    NV_SIZE,
    loaded_sessions_command,
    nv_define,
    nv_read,
    nv_undefine,
    nv_write,
)

from harness.paths import REPO_ROOT
from xenvtpm.backend.vtpm_identity import UuidInstances
from xenvtpm.manager.manager import ManagerClient
from xenvtpm.tpm import (
    TPM_RC,
    bind_command,
    get_random_command,
    pcr_extend_command,
    pcr_read_command,
    response_code,
)

INSTANCE = 31
SUCCESS = bytes.fromhex("80010000000a00000000")
FAILURE = err(INSTANCE, TPM_RC.FAILURE)[4:]
GET_TEST_RESULT = struct.pack(">HII", 0x8001, 10, 0x17C)
GET_CAP_MANUFACTURER = struct.pack(">HIIIII", 0x8001, 22, 0x17A, 6, 0x105, 1)  # PT_MANUFACTURER
TRANSIENT_HANDLES = struct.pack(">HIIIII", 0x8001, 22, 0x17A, 1, 0x80000000, 16)


def pcr16(c: ManagerClient) -> bytes:
    response = c.transact(INSTANCE, pcr_read_command(16))
    assert response_code(response) == TPM_RC.SUCCESS, response.hex()
    return response[-32:]


def handles(c: ManagerClient, command: bytes) -> list[int]:
    response = c.transact(INSTANCE, command)
    assert response_code(response) == TPM_RC.SUCCESS, response.hex()
    (count,) = struct.unpack_from(">I", response, 15)
    return list(struct.unpack_from(f">{count}I", response, 19))


def start_session(c: ManagerClient) -> int:
    """TPM2_StartAuthSession: an unbound, unsalted HMAC session; its handle."""
    params = (
        struct.pack(">II", 0x40000007, 0x40000007)
        + struct.pack(">H", 16)
        + os.urandom(16)
        + struct.pack(">HBHH", 0, 0x00, 0x0010, 0x000B)
    )
    response = c.transact(INSTANCE, struct.pack(">HII", 0x8001, 10 + len(params), 0x176) + params)
    assert response_code(response) == TPM_RC.SUCCESS, response.hex()
    return int(struct.unpack_from(">I", response, 10)[0])


def hash_sequence(c: ManagerClient) -> int:
    """TPM2_HashSequenceStart(SHA256): a loaded transient object; its handle."""
    response = c.transact(INSTANCE, struct.pack(">HIIHH", 0x8001, 14, 0x186, 0, 0x000B))
    assert response_code(response) == TPM_RC.SUCCESS, response.hex()
    return int(struct.unpack_from(">I", response, 10)[0])


def in_use(c: ManagerClient, domid: int) -> tuple[bytes, bytes]:
    """Bind to ``domid``, define and write an NV index and extend PCR 16."""
    assert c.transact(INSTANCE, bind_command(domid)) == SUCCESS
    value = os.urandom(NV_SIZE)
    c.transact(INSTANCE, nv_undefine())  # may not exist
    assert response_code(c.transact(INSTANCE, nv_define())) == TPM_RC.SUCCESS
    assert response_code(c.transact(INSTANCE, nv_write(value))) == TPM_RC.SUCCESS
    extend = c.transact(INSTANCE, pcr_extend_command(16, os.urandom(32)))
    assert response_code(extend) == TPM_RC.SUCCESS
    extended = pcr16(c)
    assert extended != bytes(32)
    return extended, value


def nv_value(c: ManagerClient) -> bytes:
    response = c.transact(INSTANCE, nv_read())
    assert response_code(response) == TPM_RC.SUCCESS, response.hex()
    (length,) = struct.unpack_from(">H", response, 14)
    return response[16 : 16 + length]


def assert_failure_mode(c: ManagerClient) -> None:
    """TPM_RC_FAILURE for everything but GetCapability and GetTestResult (TPM 2.0 Part 1,
    "Failure Mode"), never the reset value of a PCR."""
    assert c.transact(INSTANCE, pcr_read_command(16)) == FAILURE
    assert c.transact(INSTANCE, get_random_command(8)) == FAILURE
    assert c.transact(INSTANCE, pcr_extend_command(16, bytes(32))) == FAILURE
    assert response_code(c.transact(INSTANCE, GET_CAP_MANUFACTURER)) == TPM_RC.SUCCESS
    result = c.transact(INSTANCE, GET_TEST_RESULT)
    assert response_code(result) == TPM_RC.SUCCESS, result.hex()
    (out_size,) = struct.unpack_from(">H", result, 10)
    (test_result,) = struct.unpack_from(">I", result, 12 + out_size)
    assert test_result == TPM_RC.FAILURE


def kill_swtpm(root: Path) -> None:
    """SIGKILL the instance's swtpm and wait until it is gone (an unplanned loss)."""
    pid = swtpm_pid(root, INSTANCE)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_planned_manager_restart_keeps_pcrs_sessions_and_objects(tmp_root: Path) -> None:
    m = start_manager(tmp_root)
    try:
        with m.client() as c:
            extended, value = in_use(c, 5)
            session = start_session(c)
            sequence = hash_sequence(c)
            assert session in handles(c, loaded_sessions_command())
            assert sequence in handles(c, TRANSIENT_HANDLES)
    finally:
        assert m.stop() == 0, m.stderr()  # SIGTERM: a planned stop
    for m in managed(tmp_root):
        with m.client() as c:
            assert c.transact(INSTANCE, bind_command(5)) == SUCCESS  # the backend is back
            assert pcr16(c) == extended
            assert session in handles(c, loaded_sessions_command())
            assert sequence in handles(c, TRANSIENT_HANDLES)
            assert nv_value(c) == value
            # restored once: a later unplanned restart must never bring it back
            assert not list((tmp_root / "state" / str(INSTANCE)).glob("*.volatilestate"))


def test_a_killed_swtpm_fails_closed_until_the_domain_reboots(tmp_root: Path) -> None:
    for m in managed(tmp_root):
        with m.client() as c:
            _, value = in_use(c, 5)
            kill_swtpm(tmp_root)
            assert_failure_mode(c)
            assert c.transact(INSTANCE, bind_command(5)) == SUCCESS  # the backend rebinds
            assert_failure_mode(c)  # still the same boot of domain 5
            assert c.transact(INSTANCE, bind_command(5, resumed=True)) == SUCCESS
            assert_failure_mode(c)  # xl restore continues that boot too
            assert c.transact(INSTANCE, bind_command(6)) == SUCCESS  # a reboot
            assert pcr16(c) == bytes(32)
            assert nv_value(c) == value
            assert len(random_bytes(c.transact(INSTANCE, get_random_command(8)))) == 8


def test_an_operator_reset_ends_failure_mode(tmp_root: Path) -> None:
    for m in managed(tmp_root):
        with m.client() as c:
            _, value = in_use(c, 5)
            kill_swtpm(tmp_root)
            assert_failure_mode(c)
            reset = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "xenvtpm",
                    "reset",
                    "--manager",
                    str(m.socket),
                    str(INSTANCE),
                ],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert reset.returncode == 0, reset.stderr
            assert pcr16(c) == bytes(32)  # a power cycle: the operator's explicit choice
            assert nv_value(c) == value
            assert c.transact(INSTANCE, bind_command(5)) == SUCCESS
            assert len(random_bytes(c.transact(INSTANCE, get_random_command(8)))) == 8


def test_a_hung_swtpm_restarted_by_its_timeout_fails_closed(tmp_root: Path) -> None:
    for m in managed(tmp_root, "--command-timeout", "1"):
        with m.client() as c:
            in_use(c, 5)
            os.kill(swtpm_pid(tmp_root, INSTANCE), signal.SIGSTOP)
            assert c.transact(INSTANCE, get_random_command(8)) == FAILURE
            assert_failure_mode(c)


def test_a_killed_manager_fails_closed_after_its_restart(tmp_root: Path) -> None:
    m = start_manager(tmp_root)
    with m.client() as c:
        in_use(c, 5)
    m.proc.kill()  # no planned stop: the volatile state dies with swtpm
    m.proc.wait()
    deadline = time.monotonic() + 5
    while swtpm_pids(tmp_root) and time.monotonic() < deadline:
        time.sleep(0.05)
    m.socket.unlink(missing_ok=True)
    for m in managed(tmp_root):
        with m.client() as c:
            assert c.transact(INSTANCE, bind_command(5)) == SUCCESS
            assert_failure_mode(c)
            assert c.transact(INSTANCE, bind_command(6)) == SUCCESS
            assert pcr16(c) == bytes(32)


def test_saved_state_of_another_host_boot_is_never_restored(tmp_root: Path) -> None:
    """dom0 rebooted between the planned stop and the start: domain ids start again, so
    domain 5 may be another guest; the saved state is discarded, not restored."""
    boot_id = tmp_root / "boot_id"
    boot_id.write_text("11111111-1111-1111-1111-111111111111\n")
    m = start_manager(tmp_root, "--boot-id-file", str(boot_id))
    try:
        with m.client() as c:
            in_use(c, 5)
    finally:
        assert m.stop() == 0, m.stderr()
    boot_id.write_text("22222222-2222-2222-2222-222222222222\n")
    for m in managed(tmp_root, "--boot-id-file", str(boot_id)):
        with m.client() as c:
            assert c.transact(INSTANCE, bind_command(5)) == SUCCESS
            assert pcr16(c) == bytes(32)
            assert len(random_bytes(c.transact(INSTANCE, get_random_command(8)))) == 8
            assert not list((tmp_root / "state" / str(INSTANCE)).glob("*.volatilestate"))


@pytest.mark.parametrize("domid", [5])
def test_a_planned_restart_then_a_reboot_resets(tmp_root: Path, domid: int) -> None:
    m = start_manager(tmp_root)
    try:
        with m.client() as c:
            in_use(c, domid)
    finally:
        assert m.stop() == 0
    for m in managed(tmp_root):
        with m.client() as c:
            assert c.transact(INSTANCE, bind_command(domid + 1)) == SUCCESS  # rebooted
            assert pcr16(c) == bytes(32)


def test_a_copy_of_the_stopped_state_root_is_a_whole_backup(tmp_root: Path) -> None:
    """README, "Deploying on a Xen host": the state root copied with ``cp -a`` while the
    manager is stopped holds every instance's NV and xl's uuid map; put back after the
    disk is lost, the next manager serves the same NV and the uuid the same instance."""
    state = tmp_root / "state"
    m = start_manager(tmp_root)
    try:
        with m.client() as c:
            _, value = in_use(c, 5)
    finally:
        assert m.stop() == 0, m.stderr()
    uuid = "5c0a3b9e-1d2f-4e6a-8b7c-0d1e2f3a4b5c"
    instance = UuidInstances(state / "vtpm-uuids.json").instance_for(uuid)
    backup = tmp_root / "backup"
    subprocess.run(["cp", "-a", str(state), str(backup)], check=True)
    shutil.rmtree(state)  # the disk is lost
    subprocess.run(["cp", "-a", str(backup), str(state)], check=True)
    for m in managed(tmp_root):
        with m.client() as c:
            assert c.transact(INSTANCE, bind_command(6)) == SUCCESS  # the guest booted again
            assert nv_value(c) == value
    assert UuidInstances(state / "vtpm-uuids.json").instance_for(uuid) == instance
