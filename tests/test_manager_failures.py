"""The vTPM manager when swtpm fails (killed, hung, failing to start), cancels of
queued and running commands, and the bounds on what one backend may hold.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import time
from pathlib import Path

import pytest
from manager_env import (
    QUEUE_PER_INSTANCE,
    RunningManager,
    err,
    managed,
    pfx,
    random_bytes,
    swtpm_pid,
    swtpm_pids,
)

from xenvtpm.errors import ChannelClosed
from xenvtpm.manager.manager import ManagerClient
from xenvtpm.tpm import (
    TPM_RC,
    bind_command,
    cancel_command,
    get_random_command,
)

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed")


# -- swtpm failures -------------------------------------------------------------------


def recover_by_reboot(c: ManagerClient, instance: int, domid: int) -> None:
    """A BIND of another domain (a reboot) ends failure mode (test_vtpm_continuity.py)."""
    assert c.transact(instance, bind_command(domid)) == bytes.fromhex("80010000000a00000000")
    assert len(random_bytes(c.transact(instance, get_random_command(8)))) == 8


def test_swtpm_killed_during_command(mgr: RunningManager) -> None:
    with mgr.client() as c:
        random_bytes(c.transact(41, get_random_command(8)))
        pid = swtpm_pid(mgr.root, 41)
        os.kill(pid, signal.SIGSTOP)  # the next command stays in flight
        try:
            c.send_packet(pfx(41) + get_random_command(8))
            r, _, _ = select.select([c], [], [], 0.3)
            assert r == [], "answered while swtpm was stopped"
        finally:
            os.kill(pid, signal.SIGKILL)
        assert c.recv_packet() == err(41, TPM_RC.FAILURE)
        # restarted from its state dir, in failure mode: its volatile state is gone
        assert c.transact(41, get_random_command(8)) == err(41, TPM_RC.FAILURE)[4:]
        new_pid = swtpm_pid(mgr.root, 41)
        assert new_pid != pid and new_pid in swtpm_pids(mgr.root)
        recover_by_reboot(c, 41, 2)


def test_queued_commands_after_swtpm_death_fail_closed(mgr: RunningManager) -> None:
    with mgr.client() as c:
        random_bytes(c.transact(42, get_random_command(8)))
        pid = swtpm_pid(mgr.root, 42)
        os.kill(pid, signal.SIGSTOP)
        try:
            for n in (3, 4, 5):
                c.send_packet(pfx(42) + get_random_command(n))
            time.sleep(0.2)
        finally:
            os.kill(pid, signal.SIGKILL)
        assert c.recv_packet() == err(42, TPM_RC.FAILURE)  # the one in flight
        assert c.recv_packet() == err(42, TPM_RC.FAILURE)  # the queued ones: failure mode
        assert c.recv_packet() == err(42, TPM_RC.FAILURE)
        recover_by_reboot(c, 42, 2)


def test_idle_swtpm_death_fails_closed(mgr: RunningManager) -> None:
    with mgr.client() as c:
        random_bytes(c.transact(43, get_random_command(8)))
        os.kill(swtpm_pid(mgr.root, 43), signal.SIGKILL)
        time.sleep(0.1)
        assert c.transact(43, get_random_command(8)) == err(43, TPM_RC.FAILURE)[4:]
        recover_by_reboot(c, 43, 2)


def test_hung_swtpm_times_out_and_restarts(tmp_root: Path) -> None:
    for m in managed(tmp_root, "--command-timeout", "1"):
        with m.client() as c:
            random_bytes(c.transact(1, get_random_command(8)))
            pid = swtpm_pid(tmp_root, 1)
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            assert c.transact(1, get_random_command(8)) == err(1, TPM_RC.FAILURE)[4:]
            assert 0.9 < time.monotonic() - t0 < 5
            recover_by_reboot(c, 1, 2)
            assert pid not in swtpm_pids(tmp_root)


def test_start_failure_answers_failure_and_retries(tmp_root: Path) -> None:
    for m in managed(tmp_root, "--swtpm-setup", "/bin/false"):
        with m.client() as c:
            assert c.transact(9, get_random_command(8)) == err(9, TPM_RC.FAILURE)[4:]
            assert c.transact(9, get_random_command(8)) == err(9, TPM_RC.FAILURE)[4:]
            # a malformed packet is answered without another start attempt
            c.send_packet(pfx(9) + bytes.fromhex("80030000000c0000017b0010"))
            assert c.recv_packet() == err(9, TPM_RC.VALUE)
        log = m.stderr()
        assert log.count("vTPM instance 9: /bin/false --tpm2") == 2, log
        assert "failed (exit 1)" in log


# -- cancel -----------------------------------------------------------------------------


def test_cancel_answers_queued_commands_canceled_in_their_place(mgr: RunningManager) -> None:
    """XENVTPM_CC_CANCEL gets no answer of its own; the connection's queued commands for
    the instance are answered TPM_RC_CANCELED in their FIFO place, after the one in
    flight (swtpm 0.7.1 finishes a running command even when asked to cancel it);
    another connection's commands are untouched."""
    with mgr.client() as c, mgr.client() as other:
        random_bytes(c.transact(4, get_random_command(8)))
        pid = swtpm_pid(mgr.root, 4)
        os.kill(pid, signal.SIGSTOP)
        try:
            for n in (1, 2, 3):
                c.send_packet(pfx(4) + get_random_command(n))
            other.send_packet(pfx(4) + get_random_command(7))
            time.sleep(0.1)
            c.send_packet(pfx(4) + cancel_command())
            c.send_packet(pfx(5) + cancel_command())  # an instance with nothing: ignored
            r, _, _ = select.select([c], [], [], 0.3)
            assert r == [], "answered while swtpm was stopped"
        finally:
            os.kill(pid, signal.SIGCONT)
        assert len(random_bytes(c.recv_packet()[4:])) == 1  # in flight: it ran
        assert c.recv_packet() == err(4, TPM_RC.CANCELED)
        assert c.recv_packet() == err(4, TPM_RC.CANCELED)
        assert len(random_bytes(other.recv_packet()[4:])) == 7
        r, _, _ = select.select([c], [], [], 0.2)
        assert r == [], "the cancel was answered"
        assert len(random_bytes(c.transact(4, get_random_command(5)))) == 5
    assert swtpm_pid(mgr.root, 4) == pid


def test_swtpm_runs_a_cancelled_command_to_its_end(tmp_root: Path) -> None:
    """The manager asks swtpm to cancel the command in flight (CMD_CANCEL_TPM_CMD, on
    the control channel). swtpm 0.7.1 accepts it (result 0) but serves its control
    channel between commands only: the command runs to its end and is answered."""
    for m in managed(tmp_root, "--log-level", "DEBUG"):
        with m.client() as c:
            random_bytes(c.transact(6, get_random_command(8)))
            pid = swtpm_pid(tmp_root, 6)
            os.kill(pid, signal.SIGSTOP)
            try:
                c.send_packet(pfx(6) + get_random_command(16))
                time.sleep(0.1)
                c.send_packet(pfx(6) + cancel_command())
                time.sleep(0.1)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert len(random_bytes(c.recv_packet()[4:])) == 16
            deadline = time.monotonic() + 10
            while "CMD_CANCEL_TPM_CMD answered" not in m.stderr():
                assert time.monotonic() < deadline, "no answer to the cancel"
                time.sleep(0.02)
            assert "CMD_CANCEL_TPM_CMD answered b'\\x00\\x00\\x00\\x00'" in m.stderr()
            assert len(random_bytes(c.transact(6, get_random_command(8)))) == 8
            assert swtpm_pid(tmp_root, 6) == pid


# -- bounds -----------------------------------------------------------------------------


def status_of(m: RunningManager, instance: int) -> str:
    """The instance's part of a fresh SIGUSR1 status line."""
    seen = m.stderr().count(" status: ")
    os.kill(m.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while m.stderr().count(" status: ") == seen:
        assert time.monotonic() < deadline, "no status line"
        time.sleep(0.01)
    line = [x for x in m.stderr().splitlines() if " status: " in x][-1]
    return next(p for p in line.split() if p.startswith(f"{instance}:"))


def test_a_backend_over_the_queue_bound_is_disconnected(mgr: RunningManager) -> None:
    """A backend's link keeps at most 4 requests of an instance outstanding; one that
    queues more breaks the protocol. Answering it out of turn would break the FIFO
    matching, so the manager closes that connection (the link answers TPM_RC_FAILURE
    and reconnects); its queued commands are dropped, other connections are served."""
    with mgr.client() as c:
        random_bytes(c.transact(4, get_random_command(8)))
    pid = swtpm_pid(mgr.root, 4)
    rogue = mgr.client()
    os.kill(pid, signal.SIGSTOP)
    try:
        for n in range(1 + QUEUE_PER_INSTANCE):  # one in flight, the bound queued
            rogue.send_packet(pfx(4) + get_random_command(n + 1))
        r, _, _ = select.select([rogue], [], [], 0.3)
        assert r == [], "the connection was closed within the bound"
        rogue.send_packet(pfx(4) + get_random_command(9))
        with pytest.raises(ChannelClosed):
            rogue.recv_packet(timeout=5)
        assert ":queued=0:in_flight=1" in status_of(mgr, 4)
    finally:
        os.kill(pid, signal.SIGCONT)
        rogue.close()
    with mgr.client() as c:
        assert len(random_bytes(c.transact(4, get_random_command(6)))) == 6
    assert swtpm_pid(mgr.root, 4) == pid


def test_a_backend_that_never_reads_is_disconnected(mgr: RunningManager) -> None:
    """Replies a backend does not read wait in the manager up to a bound (4096), then
    the connection is closed: a stuck backend cannot grow the manager without limit."""
    c = mgr.client()
    try:
        malformed = pfx(99) + bytes.fromhex("8001")  # answered at once, starts nothing
        replies = 0
        with pytest.raises((ChannelClosed, ConnectionError)):  # EOF, or reset if unread
            for _ in range(6000):
                c.send_packet(malformed)
            while True:
                assert c.recv_packet(timeout=5) == err(99, TPM_RC.COMMAND_SIZE)
                replies += 1
        assert replies < 6000
    finally:
        c.close()
    with mgr.client() as other:
        random_bytes(other.transact(4, get_random_command(8)))
