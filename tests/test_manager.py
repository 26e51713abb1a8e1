"""The vTPM manager against real swtpm: routing, isolation, errors, recovery, shutdown.

Managers run as subprocesses (``python -m xenvtpm manager``), as in production; each
fixture's teardown checks the manager exits 0 on SIGTERM and leaves no swtpm running.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xenvtpm.daemon import LOG_LEVEL_ENV
from xenvtpm.errors import ChannelClosed
from xenvtpm.manager.cli import build_parser
from xenvtpm.manager.manager import InstanceStatus, Manager, ManagerClient
from xenvtpm.tpm import (
    TPM_RC,
    bind_command,
    cancel_command,
    get_random_command,
    pcr_extend_command,
    pcr_read_command,
    response_code,
    startup_command,
)

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed")

REPO = Path(__file__).resolve().parent.parent
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
            cwd=REPO,
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


@pytest.fixture
def tmp_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="xvm-", dir="/tmp"))
    try:
        yield root
    finally:
        for pid in swtpm_pids(root):  # never leave anything running, even on failure
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


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


@pytest.fixture(scope="module")
def mgr() -> Iterator[RunningManager]:
    """One manager shared by the module; instances are reused where sensible."""
    root = Path(tempfile.mkdtemp(prefix="xvm-", dir="/tmp"))
    try:
        yield from managed(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def random_bytes(response: bytes) -> bytes:
    assert response_code(response) == TPM_RC.SUCCESS, response.hex()
    (n,) = struct.unpack_from(">H", response, 10)
    assert len(response) == 12 + n
    return response[12:]


def pcr10(client: ManagerClient, instance: int) -> bytes:
    rsp = client.transact(instance, pcr_read_command(10))
    assert response_code(rsp) == TPM_RC.SUCCESS, rsp.hex()
    return rsp[-32:]


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
        cwd=REPO,
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
