"""Protocol v2 (Linux xen-tpmfront) end to end over the simulated Xen, beside the 2006 ring.

The frontend is :class:`kernel_frontend.KernelFrontend`, a model of xen-tpmfront, running
as a guest domain in this process; the backend, manager and swtpm are the real daemons
(tests/simenv.py), and a 2006 guest (our frontend daemon) is connected throughout. Every
test asserts bytes on the shared page or what the guest or dom0 can observe.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from kernel_frontend import STATUS_IDLE, STATUS_RUNNING, KernelFrontend, get_random_v2
from simenv import Guest, SimEnv, counts, wait_for
from test_driver_pair import BAD_REQUESTS, error, get_random, make_env, swtpm_pid

from xenvtpm import tpm, tpmif_v2
from xenvtpm.tools.rogue_v2 import create_primary_rsa
from xenvtpm.tpmif_v2 import VtpmState
from xenvtpm.xenbus import XenbusState

RC = tpm.TPM_RC
V2_INSTANCE = 20
CAPACITY = 4096 - 8  # xen-tpmfront: nr_extra_pages 0, data at offset 8
CLOSING = 5


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimEnv]:
    env = make_env(tmp_path_factory.mktemp("v2", numbered=True), guests=1)
    try:
        get_random(env.guests[0])
        with v2_guest(env, "warm-up") as fe:  # starts the v2 instance's swtpm
            wait_for(
                lambda: tpm.response_code(fe.transmit(tpm.get_random_command(8))) == 0,
                60,
                "the v2 instance to start",
            )
        yield env
    finally:
        env.close()


@contextlib.contextmanager
def v2_guest(
    env: SimEnv, name: str, instance: int = V2_INSTANCE, connect: bool = True, **probe: object
) -> Iterator[KernelFrontend]:
    """A new domain whose vTPM is driven by the xen-tpmfront model; removed afterwards."""
    assert env.control is not None
    domid = env.add_domain(name, instance)
    fe = KernelFrontend.in_domain(env.control, domid)
    try:
        fe.probe(**probe)  # type: ignore[arg-type]
        if connect:
            fe.wait_connected()
        yield fe
    finally:
        fe.close()
        env.remove_domain(domid)


@pytest.fixture
def fe(env: SimEnv, request: pytest.FixtureRequest) -> Iterator[KernelFrontend]:
    with v2_guest(env, request.node.name[:40]) as fe:
        yield fe


def submit_raw(
    fe: KernelFrontend,
    data: bytes,
    length: int | None = None,
    nr_extra: int | None = None,
    state: int = VtpmState.SUBMIT,
) -> None:
    """Put anything on the page, as a hostile frontend would, and notify."""
    page = fe.page
    page[8 : 8 + len(data)] = data
    struct.pack_into("=I", page, 0, len(data) if length is None else length)
    if nr_extra is not None:
        page[7] = nr_extra
    page[4] = state
    fe.notify()


def answer_at_8(fe: KernelFrontend, timeout: float = 10.0) -> bytes:
    """Wait for FINISH and read the response where the backend put it (offset 8)."""
    wait_for(lambda: fe.page[4] == VtpmState.FINISH, timeout, "FINISH")
    (length,) = struct.unpack_from("=I", fe.page, 0)
    assert length <= CAPACITY
    return bytes(fe.page[8 : 8 + length])


def stopped(env: SimEnv, instance: int = V2_INSTANCE) -> contextlib.AbstractContextManager[int]:
    """SIGSTOP the instance's swtpm for the block: its command stays in flight."""

    @contextlib.contextmanager
    def cm() -> Iterator[int]:
        pid = swtpm_pid(env, instance)
        os.kill(pid, signal.SIGSTOP)
        try:
            yield pid
        finally:
            os.kill(pid, signal.SIGCONT)

    return cm()


# -- handshake ------------------------------------------------------------------------


def test_backend_advertises_protocol_v2(env: SimEnv, fe: KernelFrontend) -> None:
    """xen-tpmfront reads feature-protocol-v2 from the backend directory (as the guest)."""
    assert fe.xs.read(f"{fe.backend}/feature-protocol-v2") == b"1"
    assert fe.backend_state() == 4 and fe.state == 4
    log = env.daemon("backend").log.read_text()
    assert "protocol v2, 0 extra pages" in log and "2006 ring, 10 data pages" in log


def test_garbage_feature_key_is_refused(env: SimEnv) -> None:
    with v2_guest(env, "feature-garbage", connect=False, feature="abc") as fe:
        with pytest.raises(ConnectionError):
            fe.wait_connected()
        assert fe.backend_state() == CLOSING
        assert (fe.backend_error() or "").startswith("connect failed")
    get_random(env.guests[0])


def test_command_submitted_before_the_backend_connects(env: SimEnv) -> None:
    """The kernel's probe sends at once; the backend answers what is on the page at connect."""
    with v2_guest(env, "early", connect=False, before_initialised=tpm.get_random_command(8)) as fe:
        fe.wait_connected()
        assert fe.wait_status(STATUS_IDLE, 10)
        response = fe.recv()
        assert response[:12] == struct.pack(">HIIH", 0x8001, 20, 0, 8), response.hex()


# -- round trips ----------------------------------------------------------------------


def test_get_random_round_trip(fe: KernelFrontend) -> None:
    first, second = get_random_v2(fe), get_random_v2(fe)
    assert first != second
    assert fe.page[4] == VtpmState.FINISH


def test_pcr_extend_and_read(fe: KernelFrontend) -> None:
    digest = hashlib.sha256(b"v2").digest()
    before = fe.transmit(tpm.pcr_read_command(16))[-32:]
    assert tpm.response_code(fe.transmit(tpm.pcr_extend_command(16, digest))) == 0
    after = fe.transmit(tpm.pcr_read_command(16))[-32:]
    assert after == hashlib.sha256(before + digest).digest()


@pytest.mark.parametrize("name", [n for n in BAD_REQUESTS if len(BAD_REQUESTS[n][0]) <= CAPACITY])
def test_malformed_request_answered_exactly(fe: KernelFrontend, name: str) -> None:
    """The same answers as on the 2006 ring (tests/test_driver_pair.py BAD_REQUESTS)."""
    request, rc = BAD_REQUESTS[name]
    assert fe.transmit(request) == error(rc)
    get_random_v2(fe)


def test_capacity_is_exactly_4088_bytes(fe: KernelFrontend) -> None:
    """4088 bytes (the page less the header) reach the TPM; 4089 are the backend's no."""
    full = struct.pack(">HIIH", 0x8001, CAPACITY, 0x17B, 16) + bytes(CAPACITY - 12)
    rc = tpm.response_code(fe.transmit(full))
    assert rc not in (0, RC.COMMAND_SIZE), hex(rc)  # swtpm judged the junk parameters
    with pytest.raises(OSError, match="do not fit"):
        fe.send(full + b"\0")  # xen-tpmfront itself refuses (EINVAL)
    over = struct.pack(">HII", 0x8001, CAPACITY + 1, 0x17B) + bytes(CAPACITY - 9)
    submit_raw(fe, over[:CAPACITY], length=CAPACITY + 1)  # a hostile length, past the page
    assert answer_at_8(fe) == error(RC.COMMAND_SIZE)
    for length in (0xFFFFFFFF, 0x10000, 4097):
        submit_raw(fe, tpm.get_random_command(8), length=length)
        assert answer_at_8(fe) == error(RC.COMMAND_SIZE), length
    get_random_v2(fe)


def test_nr_extra_pages_changed_after_connect(fe: KernelFrontend) -> None:
    """The layout is fixed at connect: a request naming 255 (or 1) extra pages is refused."""
    for n in (255, 1):
        submit_raw(fe, tpm.get_random_command(8), nr_extra=n)
        assert answer_at_8(fe) == error(RC.COMMAND_SIZE), n
    fe.page[7] = 0
    get_random_v2(fe)


def test_nr_extra_pages_huge_at_connect_is_refused(env: SimEnv) -> None:
    with v2_guest(env, "extra-huge", connect=False) as fe:
        # grant nothing more, claim 255 extra pages: refused before anything is mapped
        fe.page[7] = 255
        with pytest.raises(ConnectionError):
            fe.wait_connected()
        assert "nr_extra_pages 255 > 9" in (fe.backend_error() or "")


def test_one_extra_page_carries_a_4096_byte_command(env: SimEnv) -> None:
    """Extra pages work too (xen-tpmfront never uses them): data at 12, then page 2."""
    with v2_guest(env, "extra-one", nr_extra_pages=1) as fe:
        assert fe.backend_state() == 4
        get_random_v2(fe)
        full = struct.pack(">HIIH", 0x8001, 4096, 0x17B, 16) + bytes(4084)
        assert fe.extra is not None
        fe.page[12:4096] = full[:4084]
        fe.extra.pages[0][:12] = full[4084:]
        struct.pack_into("=I", fe.page, 0, 4096)
        fe.page[4] = VtpmState.SUBMIT
        fe.notify()
        wait_for(lambda: fe.page[4] == VtpmState.FINISH, 10, "FINISH")
        rc = tpm.response_code(tpmif_v2.read_response(fe.page, 4096))
        assert rc not in (0, RC.COMMAND_SIZE), hex(rc)  # all 4096 bytes reached swtpm
        get_random_v2(fe, 8)


# -- the state machine ------------------------------------------------------------------


def test_garbage_state_is_ignored(fe: KernelFrontend) -> None:
    command = tpm.get_random_command(8)
    for state in (0x77, 0xFF, VtpmState.FINISH, VtpmState.IDLE):
        submit_raw(fe, command, state=state)
        time.sleep(0.2)
        assert fe.page[4] == state  # no answer, nothing written
        assert bytes(fe.page[8:20]) == command[:12]
    assert fe.backend_state() == 4
    get_random_v2(fe)


def test_cancel_with_nothing_in_flight_completes_at_once(fe: KernelFrontend) -> None:
    get_random_v2(fe)
    fe.cancel()
    wait_for(lambda: fe.page[4] == VtpmState.IDLE, 5, "IDLE after CANCEL")
    with pytest.raises(OSError, match="cancelled"):
        fe.recv()  # vtpm_recv: IDLE means cancelled
    get_random_v2(fe)


def test_cancel_mid_command_completes_when_the_command_leaves_the_path(
    env: SimEnv, fe: KernelFrontend
) -> None:
    """CANCEL while swtpm works: IDLE (the client's ECANCELED) comes only once the manager
    has answered the cancelled command, whose answer is dropped; until then the frontend
    reads "running", so it cannot put a second command on the path."""
    get_random_v2(fe)
    with stopped(env):
        submit_raw(fe, tpm.get_random_command(16))
        time.sleep(0.3)  # the backend has forwarded it to the stopped swtpm
        assert fe.page[4] == VtpmState.SUBMIT
        fe.cancel()
        time.sleep(0.5)
        assert fe.page[4] == VtpmState.CANCEL and fe.status() == STATUS_RUNNING
        assert env.manager_status(V2_INSTANCE)["in_flight"] == 1
    wait_for(lambda: fe.page[4] == VtpmState.IDLE, 10, "IDLE once swtpm answered")
    with pytest.raises(OSError, match="cancelled"):
        fe.recv()
    assert len(get_random_v2(fe, 8)) == 8  # not the late GetRandom(16) answer
    get_random(env.guests[0])


def test_submit_after_cancel_waits_for_the_cancelled_answer(
    env: SimEnv, fe: KernelFrontend
) -> None:
    """A frontend that submits again right after its CANCEL, without waiting for IDLE:
    the new command is not forwarded while the cancelled one is still in the manager."""
    get_random_v2(fe)
    with stopped(env):
        submit_raw(fe, tpm.get_random_command(16))
        time.sleep(0.3)
        fe.cancel()
        time.sleep(0.1)
        submit_raw(fe, tpm.get_random_command(8))
        time.sleep(0.3)
        status = env.manager_status(V2_INSTANCE)
        assert (status["in_flight"], status["queued"]) == (1, 0), status
        assert fe.page[4] == VtpmState.SUBMIT
    response = answer_at_8(fe)  # looked at once the cancelled command's answer came
    assert response[:12] == struct.pack(">HIIH", 0x8001, 20, 0, 8), response.hex()
    get_random_v2(fe)


@pytest.mark.parametrize("cycles", [20])
def test_submit_cancel_cycles_hold_at_most_one_command(env: SimEnv, cycles: int) -> None:
    """SUBMIT, CANCEL, SUBMIT, ... against a busy vTPM: the manager never holds more than
    one of this guest's commands (the answer to a cancelled one frees the slot)."""
    instance = V2_INSTANCE + 1  # its own instance: the manager's peak is per instance
    with v2_guest(env, "cancel-cycles", instance=instance) as fe:
        wait_for(
            lambda: tpm.response_code(fe.transmit(tpm.get_random_command(8))) == 0,
            60,
            "the instance to start",
        )
        with stopped(env, instance):
            for _ in range(cycles):
                submit_raw(fe, tpm.get_random_command(16))
                time.sleep(0.05)
                fe.cancel()
                time.sleep(0.05)
            status = env.manager_status(instance)
        assert status["peak"] == 1 and status["queued"] == 0, status
        wait_for(lambda: fe.page[4] == VtpmState.IDLE, 10, "IDLE after the last CANCEL")
        get_random_v2(fe)
    assert env.manager_status(instance)["peak"] == 1


def test_reconnecting_in_a_loop_queues_one_bind(env: SimEnv) -> None:
    """Each connect tells the manager which domain drives the instance (a BIND); a
    frontend that reconnects in a loop in front of a busy vTPM adds no more of them
    while its last one is still queued, and nothing of its is refused."""
    instance = V2_INSTANCE + 2
    assert env.control is not None
    domid = env.add_domain("rebind-loop", instance)
    try:
        fe = KernelFrontend.in_domain(env.control, domid)
        fe.probe()
        fe.wait_connected()
        wait_for(
            lambda: tpm.response_code(fe.transmit(tpm.get_random_command(8))) == 0,
            60,
            "the instance to start",
        )
        with stopped(env, instance):
            submit_raw(fe, tpm.get_random_command(16))
            time.sleep(0.3)  # in swtpm, which is stopped
            for _ in range(8):
                fe.close()  # Closed: the backend disconnects, the command stays in swtpm
                fe = KernelFrontend.in_domain(env.control, domid)
                fe._switch(XenbusState.INITIALISING)

                def init_wait(f: KernelFrontend = fe) -> bool:
                    return f.backend_state() == XenbusState.INIT_WAIT

                wait_for(init_wait, 10, "InitWait")
                fe.probe()
                fe.wait_connected()
            time.sleep(0.3)
            status = env.manager_status(instance)
        assert (status["in_flight"], status["queued"]) == (1, 1), status  # one BIND queued
        get_random_v2(fe)
        fe.close()
    finally:
        env.remove_domain(domid)
    assert "refused to bind" not in env.daemon("backend").log.read_text(errors="replace")


def transient_handles(fe: KernelFrontend) -> list[int]:
    """TPM2_GetCapability(TPM_CAP_HANDLES, TRANSIENT_FIRST): the loaded objects.
    Spec: TPM2 Part 3, 30.2; Part 2, 6.12 (TPM_CAP_HANDLES = 1), 7.4 (0x80000000)."""
    command = struct.pack(">HIIIII", 0x8001, 22, tpm.TPM_CC.GetCapability, 1, 0x80000000, 16)
    response = fe.transmit(command)
    assert tpm.response_code(response) == 0, response[:10].hex()
    (count,) = struct.unpack_from(">I", response, 15)  # after moreData and capability
    return list(struct.unpack_from(f">{count}I", response, 19))


def test_cancel_of_a_long_rsa_create_primary(env: SimEnv, fe: KernelFrontend) -> None:
    """A client cancels an RSA 3072 CreatePrimary (kept long by stopping swtpm in it):
    it sees IDLE (ECANCELED) once swtpm is done with it, and its next commands work.
    swtpm 0.7.1 does not stop a running command on CMD_CANCEL_TPM_CMD (measured), so
    the IDLE waits for the command's end."""
    get_random_v2(fe)
    pid = swtpm_pid(env, V2_INSTANCE)
    submit_raw(fe, create_primary_rsa(3072, b"cancel"))
    time.sleep(0.02)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert env.manager_status(V2_INSTANCE)["in_flight"] == 1
        fe.cancel()
        time.sleep(0.5)
        assert fe.page[4] == VtpmState.CANCEL, fe.page[4]
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: fe.page[4] == VtpmState.IDLE, 60, "IDLE after the CreatePrimary")
    with pytest.raises(OSError, match="cancelled"):
        fe.recv()
    status = env.manager_status(V2_INSTANCE)
    assert (status["in_flight"], status["queued"]) == (0, 0), status
    get_random_v2(fe)
    response = fe.transmit(create_primary_rsa(3072, b"again"))
    assert tpm.response_code(response) == 0, response[:10].hex()
    (handle,) = struct.unpack_from(">I", response, 10)
    # The cancelled CreatePrimary ran all the same: its object is loaded under a handle
    # the guest never saw (a cancel cannot undo a TPM command); FlushContext frees it.
    handles = transient_handles(fe)
    assert len(handles) == 2 and handle in handles, [hex(h) for h in handles]
    for h in handles:
        flush = struct.pack(">HIII", 0x8001, 14, tpm.TPM_CC.FlushContext, h)
        assert tpm.response_code(fe.transmit(flush)) == 0
    assert swtpm_pid(env, V2_INSTANCE) == pid  # the same swtpm: nothing was restarted


def test_submit_while_busy_is_ignored(env: SimEnv, fe: KernelFrontend) -> None:
    get_random_v2(fe)
    with stopped(env):
        submit_raw(fe, tpm.get_random_command(16))
        time.sleep(1.0)  # long enough for the backend to copy it, even loaded
        submit_raw(fe, tpm.get_random_command(8))  # a second SUBMIT, same page
        time.sleep(0.2)
    response = answer_at_8(fe)
    assert response[:12] == struct.pack(">HIIH", 0x8001, 28, 0, 16), response.hex()
    time.sleep(0.3)
    assert fe.page[4] == VtpmState.FINISH  # exactly one answer, never for the second
    get_random_v2(fe)


def test_rewriting_the_page_during_processing(env: SimEnv, fe: KernelFrontend) -> None:
    """Double fetch: after the backend copied the command, the frontend rewrites length,
    header and body with a request that would be refused; the backend answers its copy."""
    get_random_v2(fe)
    with stopped(env):
        submit_raw(fe, tpm.get_random_command(16))
        time.sleep(1.0)  # long enough for the backend to copy it, even loaded
        evil = tpm.bind_command(fe.backend_id)  # the manager's own code
        fe.page[8 : 8 + 4096 - 8] = bytes(4088)
        fe.page[8 : 8 + len(evil)] = evil
        struct.pack_into("=I", fe.page, 0, 0xFFFFFFFF)
    response = answer_at_8(fe)
    assert response[:12] == struct.pack(">HIIH", 0x8001, 28, 0, 16), response.hex()
    get_random_v2(fe)


def test_racing_rewrites_get_one_answer_each(env: SimEnv, fe: KernelFrontend) -> None:
    """A thread flips length and header while commands run: each gets one well-formed
    answer (the TPM's, or the backend's 0x142), and the backend lives."""
    stop = threading.Event()
    good = tpm.get_random_command(16)
    flips = 0

    def flip() -> None:
        nonlocal flips
        while not stop.is_set():
            struct.pack_into("=I", fe.page, 0, 0xFFFF)
            fe.page[10:14] = b"\xff\xff\xff\xff"
            struct.pack_into("=I", fe.page, 0, len(good))
            fe.page[10:14] = struct.pack(">I", len(good))
            flips += 1

    thread = threading.Thread(target=flip, daemon=True)
    thread.start()
    answered = 0
    try:
        for _ in range(100):
            fe.page[8 : 8 + len(good)] = good
            fe.page[4] = VtpmState.SUBMIT
            fe.notify()
            assert fe.wait_status(STATUS_IDLE, 10)
            (length,) = struct.unpack_from("=I", fe.page, 0)
            response = bytes(fe.page[8 : 8 + min(length, CAPACITY)])
            rc = tpm.response_code(response)
            assert rc in (0, RC.COMMAND_SIZE), hex(rc)
            answered += 1
    finally:
        stop.set()
        thread.join(5)
    assert answered == 100 and flips > 100
    assert env.daemon("backend").alive()
    get_random_v2(fe)


# -- beside the 2006 ring ---------------------------------------------------------------


def test_2006_and_v2_guests_side_by_side_stay_isolated(env: SimEnv, fe: KernelFrontend) -> None:
    guest = env.guests[0]
    digests = {"2006": hashlib.sha256(b"ring").digest(), "v2": hashlib.sha256(b"page").digest()}
    befores = {
        "2006": guest.transmit(tpm.pcr_read_command(23))[-32:],
        "v2": fe.transmit(tpm.pcr_read_command(23))[-32:],
    }
    errors: list[BaseException] = []

    def ring_guest() -> None:
        try:
            for _ in range(20):
                assert (
                    tpm.response_code(guest.transmit(tpm.pcr_extend_command(23, digests["2006"])))
                    == 0
                )
                get_random(guest, 8)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=ring_guest)
    thread.start()
    for _ in range(20):
        assert tpm.response_code(fe.transmit(tpm.pcr_extend_command(23, digests["v2"]))) == 0
        get_random_v2(fe, 8)
    thread.join()
    assert not errors, errors
    for name, read in (("2006", guest.transmit), ("v2", fe.transmit)):
        expected = befores[name]
        for _ in range(20):
            expected = hashlib.sha256(expected + digests[name]).digest()
        assert read(tpm.pcr_read_command(23))[-32:] == expected, name


def test_no_leak_after_v2_guests_come_and_go(env: SimEnv) -> None:
    """dom0's mappings, pages and ports, the backend's fds and threads, the swtpms."""
    before = counts(env)
    pid = swtpm_pid(env, V2_INSTANCE)
    for i in range(5):
        try:
            with v2_guest(env, f"leak-{i}", nr_extra_pages=i % 2) as fe:
                get_random_v2(fe)
                fe.cancel()

                def idle(f: KernelFrontend = fe) -> bool:
                    return f.page[4] == VtpmState.IDLE

                wait_for(idle, 5, "IDLE")
                os.kill(pid, signal.SIGSTOP)
                submit_raw(fe, tpm.get_random_command(16))
                time.sleep(0.1)  # the guest leaves with this command in flight
        finally:
            os.kill(pid, signal.SIGCONT)
    with contextlib.suppress(TimeoutError):  # reported just below, with both counts
        wait_for(lambda: counts(env) == before, 10, "dom0's resources to return to the baseline")
    assert counts(env) == before, f"before {before}, after {counts(env)}"
    log = env.daemon("backend").log.read_text(errors="replace")
    assert "Traceback" not in log
    get_random(env.guests[0])


def test_our_frontend_says_2006_explicitly(env: SimEnv) -> None:
    """Our frontend writes feature-protocol-v2 = 0 with its ring-ref, and is served."""
    assert env.dom0 is not None
    guest = env.guests[0]
    node = f"/local/domain/{guest.domid}/device/vtpm/0/feature-protocol-v2"
    assert env.dom0.xenstore.read(node) == b"0"
    get_random(guest)


def test_our_frontend_after_xen_tpmfront_left_its_key(env: SimEnv) -> None:
    """Real Xen: udev binds xen-tpmfront first; our frontend unbinds it and takes over.
    The kernel's feature-protocol-v2 = 1 stays in the directory; our frontend's 0
    replaces it, so the backend reads its ring as a 2006 ring, not as a v2 page."""
    assert env.control is not None and env.dom0 is not None
    domid = env.add_domain("takeover", V2_INSTANCE)
    try:
        fe = KernelFrontend.in_domain(env.control, domid)
        with fe:
            fe.probe()
            fe.wait_connected()
            get_random_v2(fe)
        node = f"/local/domain/{domid}/device/vtpm/0"
        assert env.dom0.xenstore.read(f"{node}/feature-protocol-v2") == b"1"
        path = str(env.workdir / "takeover.tpm")
        daemon = env.start_frontend("takeover", domid, path)
        guest = Guest("takeover", domid, V2_INSTANCE, path, daemon)
        env.wait_connected(guest)
        assert env.dom0.xenstore.read(f"{node}/feature-protocol-v2") == b"0"
        assert len(get_random(guest)) == 16
        daemon.stop()
    finally:
        env.remove_domain(domid)
