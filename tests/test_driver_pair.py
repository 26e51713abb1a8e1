"""The whole path with real processes: client, frontend, ring, backend, manager, swtpm.

Each test asserts what a guest observes (exact response bytes) or what dom0 can count
(mappings, processes), never internal state.
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simenv import Guest, SimEnv, wait_for

from xenvtpm import tpm
from xenvtpm.errors import GrantError, XenStoreError
from xenvtpm.sim.adapter import SimHypervisor

RC = tpm.TPM_RC


def error(rc: int) -> bytes:
    return struct.pack(">HII", 0x8001, 10, rc)


def swtpm_processes(env: SimEnv) -> dict[int, bytes]:
    """pid -> command line of every swtpm whose state lives in this environment."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"swtpm" in cmdline and str(env.workdir / "state").encode() in cmdline:
            found[int(pid)] = cmdline
    return found


def swtpm_pid(env: SimEnv, instance: int) -> int:
    """The swtpm process serving ``instance`` (found by its state directory).

    The manager starts an instance on its first command, so send one first.
    """
    needle = f"dir={env.workdir / 'state' / str(instance)},".encode()
    for pid, cmdline in swtpm_processes(env).items():
        if needle in cmdline:
            return pid
    raise LookupError(f"no swtpm for instance {instance}")


def get_random(guest_or_sock: object, n: int = 16) -> bytes:
    response: bytes = guest_or_sock.transmit(tpm.get_random_command(n))  # type: ignore[attr-defined]
    assert response[:10] == struct.pack(">HII", 0x8001, 12 + n, 0), response.hex()
    assert struct.unpack(">H", response[10:12])[0] == n
    return response[12:]


def make_env(tmp_path: Path, guests: int, backend_timeout: float = 10.0) -> SimEnv:
    env = SimEnv(tmp_path)
    try:
        env.start_hypervisor()
        env.start_manager()
        env.start_backend(timeout=backend_timeout)
        for i in range(guests):
            env.add_guest(f"guest{i + 1}", instance=i + 1)
    except BaseException:
        print(env.logs())
        env.close()
        raise
    return env


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimEnv]:
    env = make_env(tmp_path_factory.mktemp("pair", numbered=True), guests=2)
    yield env
    env.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[SimEnv]:
    """A private environment for tests that break things; short vTPM timeout."""
    env = make_env(tmp_path, guests=2, backend_timeout=2.0)
    try:
        for guest in env.guests:
            # Start both instances. Manufacturing one (swtpm_setup) may outlast the short
            # backend timeout on a loaded machine; the manager finishes it regardless.
            def answers(g: Guest = guest) -> bool:
                return tpm.response_code(g.transmit(tpm.get_random_command(8))) == 0

            wait_for(answers, 60, f"{guest.name}'s vTPM instance to start")
        yield env
    finally:
        env.close()


def test_get_random_round_trip(shared_env: SimEnv) -> None:
    guest = shared_env.guests[0]
    first, second = get_random(guest), get_random(guest)
    assert first != second


BAD_REQUESTS = {
    "size-field-too-large": (struct.pack(">HII", 0x8001, 13, 0x17B) + b"\x00\x10", RC.COMMAND_SIZE),
    "size-field-too-small": (struct.pack(">HII", 0x8001, 11, 0x17B) + b"\x00\x10", RC.COMMAND_SIZE),
    "truncated-header": (bytes.fromhex("8001000000"), RC.COMMAND_SIZE),
    "empty-write": (b"", RC.COMMAND_SIZE),
    "unknown-tag": (struct.pack(">HIIH", 0x8003, 12, 0x17B, 16), tpm.BAD_TAG_RC),
    "unknown-command": (struct.pack(">HIIH", 0x8001, 12, 0x1FF, 16), RC.COMMAND_CODE),
    "manager-control-code": (tpm.bind_command(2), RC.COMMAND_CODE),
    "manager-cancel-code": (bytes.fromhex("80010000000a20000f02"), RC.COMMAND_CODE),
    # two data pages, well formed, but over swtpm's 4096-byte maximum: the manager says no
    "two-pages-over-tpm-max": (
        struct.pack(">HII", 0x8001, 5000, 0x17B) + bytes(4990),
        RC.COMMAND_SIZE,
    ),
    # more than the ten granted pages: the frontend cannot even put it on the ring
    "over-ring-capacity": (
        struct.pack(">HII", 0x8001, 40961, 0x17B) + bytes(40951),
        RC.COMMAND_SIZE,
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_malformed_request_answered_exactly(shared_env: SimEnv, name: str) -> None:
    request, rc = BAD_REQUESTS[name]
    guest = shared_env.guests[0]
    assert guest.transmit(request) == error(rc)
    get_random(guest)  # the channel still works


def test_multi_page_request_reaches_the_tpm_intact(shared_env: SimEnv) -> None:
    """A 4097-byte command spans two pages; the TPM parses all of it (no truncation)."""
    guest = shared_env.guests[0]
    # GetRandom with 4085 trailing bytes: header consistent, so swtpm itself judges it.
    # swtpm rejects >4096, so the manager answers COMMAND_SIZE; at exactly 4096 bytes
    # (one full page) the TPM answers about the junk parameters instead.
    full_page = struct.pack(">HIIH", 0x8001, 4096, 0x17B, 16) + bytes(4084)
    assert tpm.response_code(guest.transmit(full_page)) not in (0, RC.COMMAND_SIZE)
    get_random(guest)


def test_two_guests_no_cross_talk(shared_env: SimEnv) -> None:
    """Both guests extend the same PCR concurrently; each sees only its own history."""
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def work(guest_index: int) -> None:
        guest = shared_env.guests[guest_index]
        digest = hashlib.sha256(guest.name.encode()).digest()
        try:
            before = guest.transmit(tpm.pcr_read_command(16))[-32:]
            for _ in range(20):
                assert tpm.response_code(guest.transmit(tpm.pcr_extend_command(16, digest))) == 0
                get_random(guest, 8)
            expected = before
            for _ in range(20):
                expected = hashlib.sha256(expected + digest).digest()
            results[guest.name] = guest.transmit(tpm.pcr_read_command(16))[-32:]
            assert results[guest.name] == expected
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results["guest1"] != results["guest2"]


def test_backend_times_out_silent_vtpm_and_drops_late_reply(env: SimEnv) -> None:
    guest, other = env.guests
    pid = swtpm_pid(env, guest.instance)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert guest.transmit(tpm.get_random_command(16)) == error(RC.FAILURE)
        get_random(other)  # a stalled instance stalls nobody else
    finally:
        os.kill(pid, signal.SIGCONT)
    # The late GetRandom(16) answer must be dropped, not taken for this GetRandom(8).
    assert len(get_random(guest, 8)) == 8


def test_a_timed_out_command_holds_the_guests_slot_until_swtpm_answers(env: SimEnv) -> None:
    """After the timeout (TPM_RC_FAILURE) the command is still in swtpm: the guest's next
    request is not forwarded behind it, and is itself answered TPM_RC_FAILURE if the
    slot stays held for a whole timeout; once swtpm answers, the guest is served again.
    The manager never holds two of the guest's commands."""
    guest, other = env.guests
    pid = swtpm_pid(env, guest.instance)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert guest.transmit(tpm.get_random_command(16)) == error(RC.FAILURE)
        t0 = time.monotonic()
        assert guest.transmit(tpm.get_random_command(12)) == error(RC.FAILURE)
        assert time.monotonic() - t0 > 1.5  # held for the backend's 2 s timeout
        status = env.manager_status(guest.instance)
        assert (status["in_flight"], status["queued"]) == (1, 0), status
        get_random(other)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(get_random(guest, 8)) == 8
    assert env.manager_status(guest.instance)["peak"] == 1


def test_swtpm_killed_mid_command(env: SimEnv) -> None:
    guest, other = env.guests
    pid = swtpm_pid(env, guest.instance)
    os.kill(pid, signal.SIGSTOP)
    with guest.connect() as s:
        s.send(tpm.get_random_command(16))
        time.sleep(0.3)  # let the command reach the stopped swtpm's socket
        os.kill(pid, signal.SIGKILL)
        assert s.recv(4096) == error(RC.FAILURE)
    # restarted from its state directory, in failure mode: the guest's volatile state
    # (PCRs...) is gone, so it never sees a freshly reset TPM (test_vtpm_continuity.py)
    assert guest.transmit(tpm.get_random_command(16)) == error(RC.FAILURE)
    get_random(other)
    env.reset_instance(guest.instance)
    get_random(guest)
    assert swtpm_pid(env, guest.instance) != pid


def test_frontend_killed_mid_request(env: SimEnv) -> None:
    guest, other = env.guests
    assert env.control is not None
    pid = swtpm_pid(env, guest.instance)
    os.kill(pid, signal.SIGSTOP)
    try:
        with guest.connect() as s:
            s.send(tpm.get_random_command(16))
            guest.frontend.stop(signal.SIGKILL)
    finally:
        os.kill(pid, signal.SIGCONT)
    env.control.destroy_domain(guest.domid)
    backend = env.daemon("backend")
    assert backend.alive()
    get_random(other)
    wait_for(lambda: mapped_by_dom0(env) == 2, 10, "dom0 to unmap the dead guest's pages")


def mapped_by_dom0(env: SimEnv) -> int:
    """Grant mappings dom0 holds now (each connected frontend: ring + data = 2 maps)."""
    assert env.control is not None
    stats = env.control.stats(0)
    return int(stats["mappings"])


def test_other_domains_grants_and_xenstore_are_refused(shared_env: SimEnv) -> None:
    victim, attacker = shared_env.guests
    assert shared_env.control is not None and shared_env.dom0 is not None
    ring_ref = int(
        shared_env.dom0.xenstore.read(f"/local/domain/{victim.domid}/device/vtpm/0/ring-ref")
    )
    xs_fd, hc_fd = shared_env.control.connect_domain(attacker.domid)
    hv = SimHypervisor.from_fds(xs_fd, hc_fd)
    try:
        with pytest.raises(GrantError):
            hv.grants.map_grant_refs(victim.domid, [ring_ref])
        victim_dir = f"/local/domain/{victim.domid}/device/vtpm/0"
        for attempt in (
            lambda: hv.xenstore.write(f"{victim_dir}/ring-ref", "8"),
            lambda: hv.xenstore.read(f"{victim_dir}/ring-ref"),
            lambda: hv.xenstore.write(
                f"/local/domain/0/backend/vtpm/{attacker.domid}/0/instance", str(victim.instance)
            ),
        ):
            with pytest.raises(XenStoreError) as e:
                attempt()
            assert e.value.errno_name == "EACCES"
    finally:
        hv.close()
    get_random(victim)


@pytest.mark.parametrize("resumed", [False, True], ids=["reboot", "restore"])
def test_new_domain_power_cycles_the_vtpm_unless_it_resumes(env: SimEnv, resumed: bool) -> None:
    """The same instance on a new domid: a reboot power-cycles it (PCRs reset); a domain
    that resumes a saved one (``xl restore``, the toolstack's ``resume = True``) keeps the
    same boot's PCRs, through the backend's BIND marked resumed."""
    old = env.guests[0]
    extend = tpm.pcr_extend_command(16, hashlib.sha256(b"measured").digest())
    assert tpm.response_code(old.transmit(extend)) == 0
    measured = old.transmit(tpm.pcr_read_command(16))[-32:]
    assert measured != bytes(32)
    old.frontend.stop()
    env.remove_domain(old.domid)
    new = env.add_guest("guest1-again", instance=old.instance, resumed=resumed)
    after = new.transmit(tpm.pcr_read_command(16))[-32:]
    assert after == (measured if resumed else bytes(32))


def test_backend_restart_guest_reconnects(env: SimEnv) -> None:
    guest = env.guests[0]
    assert env.daemon("backend").stop() == 0  # a clean exit on SIGTERM
    env.start_backend(timeout=2.0)
    wait_for(lambda: env.frontend_state(guest) == "4", 15, "the guest to reconnect")
    get_random(guest)


def test_daemons_exit_cleanly_on_sigterm(env: SimEnv) -> None:
    """SIGTERM: each daemon says Closed / stops its swtpm and exits 0."""
    assert env.dom0 is not None
    guest = env.guests[0]
    assert guest.frontend.stop() == 0
    closed = env.dom0.xenstore.read(f"/local/domain/{guest.domid}/device/vtpm/0/state")
    assert closed == b"6"
    for name in ("backend", "manager"):
        assert env.daemon(name).stop() == 0, env.daemon(name).tail()
    assert swtpm_processes(env) == {}


@pytest.mark.parametrize("command", ["frontend", "backend", "manager", "simxend", "attach"])
def test_every_entry_point_has_help(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "xenvtpm", command, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
