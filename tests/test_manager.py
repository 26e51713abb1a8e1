"""The vTPM manager against real swtpm: routing and isolation, malformed packets, BIND
and PCRs (lifecycle and failures: test_manager_lifecycle.py, test_manager_failures.py).

Managers run as subprocesses (``python -m xenvtpm manager``), as in production; each
fixture's teardown checks the manager exits 0 on SIGTERM and leaves no swtpm running.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest
from manager_env import (
    PREFIX,
    QUEUE_PER_INSTANCE,
    RunningManager,
    err,
    managed,
    pcr10,
    pfx,
    random_bytes,
    swtpm_pid,
    swtpm_pids,
)

from xenvtpm.tpm import (
    TPM_RC,
    bind_command,
    get_random_command,
    pcr_extend_command,
    startup_command,
)

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed")


# -- routing --------------------------------------------------------------------------


def test_socket_is_private(mgr: RunningManager) -> None:
    assert stat.S_IMODE(mgr.socket.stat().st_mode) == 0o600


def test_two_instances_separate_tpms(mgr: RunningManager) -> None:
    with mgr.client() as c:
        a = random_bytes(c.transact(1, get_random_command(16)))
        b = random_bytes(c.transact(2, get_random_command(16)))
        assert len(a) == len(b) == 16 and a != b
    state = mgr.root / "state"
    assert (state / "1" / "tpm2-00.permall").is_file()
    assert (state / "2" / "tpm2-00.permall").is_file()
    pids = {swtpm_pid(mgr.root, 1), swtpm_pid(mgr.root, 2)}
    assert len(pids) == 2 and set(swtpm_pids(mgr.root)) >= pids


def test_replies_never_cross_instances_or_connections(mgr: RunningManager) -> None:
    """Pipeline packets for two instances over two connections, as many as a backend's
    link may have outstanding: every reply must carry the prefix it was sent with, reach
    the connection that sent it, and answer that very command (each (connection,
    instance) pair asks a distinct length)."""
    with mgr.client() as c:  # make sure both instances run
        c.transact(1, get_random_command(1))
        c.transact(2, get_random_command(1))
    lengths = {(0, 1): 8, (0, 2): 24, (1, 1): 16, (1, 2): 32}
    conns = [mgr.client(), mgr.client()]
    window = QUEUE_PER_INSTANCE  # the link's bound: 4 outstanding per instance
    try:
        for _ in range(12):
            for _ in range(window):
                for ci, conn in enumerate(conns):
                    for inst in (1, 2):
                        conn.send_packet(pfx(inst) + get_random_command(lengths[ci, inst]))
            for ci, conn in enumerate(conns):
                got: dict[int, int] = {1: 0, 2: 0}
                for _ in range(2 * window):
                    reply = conn.recv_packet(timeout=30)
                    (inst,) = PREFIX.unpack_from(reply)
                    assert inst in (1, 2), reply.hex()
                    response = reply[4:]
                    assert len(random_bytes(response)) == lengths[ci, inst], (ci, inst)
                    got[inst] += 1
                assert got == {1: window, 2: window}
        for conn in conns:
            r, _, _ = select.select([conn], [], [], 0.2)
            assert r == [], "unexpected extra reply"
    finally:
        for conn in conns:
            conn.close()


def test_new_instance_start_does_not_stall_others(mgr: RunningManager) -> None:
    with mgr.client() as slow, mgr.client() as fast:
        fast.transact(1, get_random_command(1))
        slow.send_packet(pfx(50) + get_random_command(4))  # manufactures a TPM (~1 s)
        t0 = time.monotonic()
        for _ in range(20):
            random_bytes(fast.transact(1, get_random_command(4)))
        elapsed = time.monotonic() - t0
        reply = slow.recv_packet(timeout=30)
        assert reply[:4] == pfx(50) and len(random_bytes(reply[4:])) == 4
    assert elapsed < 0.5, f"instance 1 stalled {elapsed:.2f} s behind instance 50's start"


# -- malformed packets ----------------------------------------------------------------

MALFORMED = [
    # (name, command after the prefix, expected TPM_RC)
    ("size field too big", bytes.fromhex("80010000000d0000017b0010"), TPM_RC.COMMAND_SIZE),
    ("size field too small", bytes.fromhex("80010000000b0000017b0010"), TPM_RC.COMMAND_SIZE),
    ("bad tag", bytes.fromhex("80030000000c0000017b0010"), TPM_RC.VALUE),
    ("TPM 1.2 tag", bytes.fromhex("00c10000000c0000017b0010"), TPM_RC.VALUE),
    ("truncated header", bytes.fromhex("8001000000"), TPM_RC.COMMAND_SIZE),
    ("prefix only", b"", TPM_RC.COMMAND_SIZE),
    (
        "over 4096 bytes, consistent",
        bytes.fromhex("8001") + (4097).to_bytes(4, "big") + bytes.fromhex("0000017b") + bytes(4087),
        TPM_RC.COMMAND_SIZE,
    ),
    (
        "8000 bytes, consistent",
        bytes.fromhex("8001") + (8000).to_bytes(4, "big") + bytes.fromhex("0000017b") + bytes(7990),
        TPM_RC.COMMAND_SIZE,
    ),
    (
        "over 40 KiB",
        bytes.fromhex("8001") + (50000).to_bytes(4, "big") + bytes(49994),
        TPM_RC.COMMAND_SIZE,
    ),
    ("bind too long", bind_command(1) + b"\0", TPM_RC.COMMAND_SIZE),
    ("bind too short", bytes.fromhex("80010000000d20000f00000000"), TPM_RC.COMMAND_SIZE),
]


@pytest.mark.parametrize(("name", "command", "rc"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_answered_exactly(
    mgr: RunningManager, name: str, command: bytes, rc: int
) -> None:
    with mgr.client() as c:
        random_bytes(c.transact(1, get_random_command(8)))
        pid = swtpm_pid(mgr.root, 1)
        c.send_packet(pfx(1) + command)
        assert c.recv_packet() == err(1, rc)
        # the instance still works afterwards, and swtpm never saw the packet (had it,
        # a long write would have desynchronised and restarted it)
        assert len(random_bytes(c.transact(1, get_random_command(8)))) == 8
        assert swtpm_pid(mgr.root, 1) == pid


def test_unknown_command_code_is_swtpms_answer(mgr: RunningManager) -> None:
    with mgr.client() as c:
        c.send_packet(pfx(1) + bytes.fromhex("80010000000a20000e00"))
        assert c.recv_packet() == err(1, TPM_RC.COMMAND_CODE)


def test_malformed_for_unknown_instance_starts_nothing(mgr: RunningManager) -> None:
    with mgr.client() as c:
        c.send_packet(pfx(77) + bytes.fromhex("80010000000d0000017b0010"))
        assert c.recv_packet() == err(77, TPM_RC.COMMAND_SIZE)
    assert not (mgr.root / "state" / "77").exists()


def test_packet_without_instance_id_is_dropped(mgr: RunningManager) -> None:
    with mgr.client() as c:
        c.send_packet(b"\x00\x00\x01")
        c.send_packet(pfx(1) + get_random_command(5))
        reply = c.recv_packet()  # the next reply is the GetRandom one
        assert reply[:4] == pfx(1) and len(random_bytes(reply[4:])) == 5
    assert "dropped a 3-byte packet" in mgr.stderr()


def test_malformed_keeps_fifo_order(mgr: RunningManager) -> None:
    with mgr.client() as c:
        c.send_packet(pfx(1) + get_random_command(7))
        c.send_packet(pfx(1) + bytes.fromhex("80030000000c0000017b0010"))
        c.send_packet(pfx(1) + get_random_command(9))
        assert len(random_bytes(c.recv_packet()[4:])) == 7
        assert c.recv_packet() == err(1, TPM_RC.VALUE)
        assert len(random_bytes(c.recv_packet()[4:])) == 9


# -- BIND and PCRs --------------------------------------------------------------------


def test_bind_resets_pcrs_only_for_another_domain(mgr: RunningManager) -> None:
    success = bytes.fromhex("80010000000a00000000")
    with mgr.client() as c:
        assert c.transact(3, bind_command(7)) == success  # fresh instance: no reset
        assert c.transact(3, pcr_extend_command(10, b"\x01" * 32))[6:10] == bytes(4)
        extended = pcr10(c, 3)
        assert extended != bytes(32)
        assert c.transact(3, bind_command(7)) == success  # same domain: kept
        assert pcr10(c, 3) == extended
        assert c.transact(3, bind_command(8)) == success  # another domain: reset
        assert pcr10(c, 3) == bytes(32)
        # the TPM is started (not TPM_RC_INITIALIZE) and usable after the reset
        assert c.transact(3, startup_command()) == bytes.fromhex("80010000000a00000100")
        c.transact(3, pcr_extend_command(10, b"\x01" * 32))
        assert pcr10(c, 3) == extended
        assert c.transact(3, bind_command(8)) == success
        assert pcr10(c, 3) == extended
        # a reset is a power cycle, not a new TPM: the same process and EK persist
        assert swtpm_pid(mgr.root, 3) in swtpm_pids(mgr.root)


def test_bind_of_a_resumed_domain_keeps_pcrs(mgr: RunningManager) -> None:
    """xl restore makes a new domid for the same boot: a BIND marked resumed keeps the
    TPM (PCRs too); the next plain BIND of another domain (a reboot) resets again."""
    success = bytes.fromhex("80010000000a00000000")
    with mgr.client() as c:
        assert c.transact(4, bind_command(7)) == success
        c.transact(4, pcr_extend_command(10, b"\x01" * 32))
        extended = pcr10(c, 4)
        assert extended != bytes(32)
        assert c.transact(4, bind_command(9, resumed=True)) == success
        assert pcr10(c, 4) == extended
        assert c.transact(4, bind_command(9)) == success  # now bound to 9: kept
        assert pcr10(c, 4) == extended
        assert c.transact(4, bind_command(10)) == success  # a reboot of domain 9
        assert pcr10(c, 4) == bytes(32)


def test_a_hung_swtpm_being_rebound_does_not_stall_other_instances(tmp_root: Path) -> None:
    """BIND of another domain power-cycles the instance through swtpm's control channel;
    when that swtpm is hung, only its own instance waits (issue 14, point 4)."""
    success = bytes.fromhex("80010000000a00000000")
    for m in managed(tmp_root):
        with m.client() as a, m.client() as b:
            assert a.transact(21, bind_command(1)) == success
            random_bytes(a.transact(21, get_random_command(8)))  # used: a rebind cycles it
            random_bytes(b.transact(22, get_random_command(8)))
            pid = swtpm_pid(tmp_root, 21)
            os.kill(pid, signal.SIGSTOP)
            try:
                a.send_packet(pfx(21) + bind_command(2))  # domain 1 rebooted as domain 2
                time.sleep(0.1)
                worst = 0.0
                for _ in range(20):
                    t0 = time.monotonic()
                    random_bytes(b.transact(22, get_random_command(8)))
                    worst = max(worst, time.monotonic() - t0)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert worst < 0.5, f"instance 22 waited {worst:.2f} s behind instance 21's swtpm"
            assert a.recv_packet(timeout=30) == pfx(21) + success  # the cycle completed
