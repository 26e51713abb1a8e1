"""The real-Xen pieces that can be checked on a host without Xen.

* the Linux adapter fails cleanly (HypervisorUnavailable) where there is no Xen, and its
  ctypes signatures declare every pointer result as c_void_p (DESIGN.md 4);
* when libxenstore.so.4 is installed, the adapter's xenstore half runs against the
  simulated xenstored, which speaks the same wire protocol (XENSTORED_PATH);
* the vTPM proxy endpoint, over a SEQPACKET socketpair standing in for the proxy fd;
* the guest relay and its harness transport, over socketpairs and a fake TPM device.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import TransportClosed, TransportTimeout
from harness.paths import REPO_ROOT
from harness.transport_ssh import DeviceRefused, RelayTransport, relay_command
from xenvtpm import tpm
from xenvtpm.errors import HypervisorUnavailable, VTPMError, XenStoreError
from xenvtpm.frontend.vtpm_proxy import (
    WARM_UP_COMMAND,
    ProxyClient,
    ProxyDevice,
    VtpmProxyEndpoint,
    VtpmProxyIoctl,
    create_proxy_device,
    unbind_kernel_frontend,
)
from xenvtpm.loop import Loop
from xenvtpm.tools import relay
from xenvtpm.xen import SIM_DIR_ENV, SIM_FDS_ENV, open_hypervisor
from xenvtpm.xen.interface import Access, Perm, WatchEvent
from xenvtpm.xen.linux import LinuxEventChannel, LinuxHypervisor
from xenvtpm.xen.linux_libs import PACKAGES, SIGNATURES, XenLibs

SET_LOCALITY = bytes.fromhex("80020000000b2000100000")  # measured: the kernel's first command
GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")
RESPONSE = bytes.fromhex("80010000000e00000000000200aa")

# -- the adapter where there is no Xen ----------------------------------------------------


def test_open_without_dev_xen_says_why(tmp_path: Path) -> None:
    with pytest.raises(HypervisorUnavailable, match=r"not a Xen domain: .*missing.*modprobe"):
        LinuxHypervisor.open(dev_xen=str(tmp_path / "xen"))


@pytest.mark.skipif(os.path.isdir("/dev/xen"), reason="this host is a Xen domain")
def test_open_hypervisor_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIM_FDS_ENV, raising=False)
    monkeypatch.delenv(SIM_DIR_ENV, raising=False)
    with pytest.raises(HypervisorUnavailable, match="/dev/xen"):
        open_hypervisor()


def test_missing_library_names_the_package() -> None:
    with pytest.raises(HypervisorUnavailable, match=r"libxenstore\.so\.4.*apt-get install"):
        XenLibs({"libxenstore.so.4": "libxenstore-that-does-not-exist.so.4"})


POINTER_RESULTS = {
    "xs_open",
    "xs_read",
    "xs_directory",
    "xs_get_permissions",
    "xs_check_watch",
    "xs_get_domain_path",
    "xengntshr_open",
    "xengntshr_share_pages",
    "xengnttab_open",
    "xengnttab_map_domain_grant_refs",
    "xenevtchn_open",
}


def test_pointer_results_are_c_void_p() -> None:
    """ctypes' default int restype would truncate 64-bit pointers (DESIGN.md 4)."""
    declared = {name: sig for sigs in SIGNATURES.values() for name, sig in sigs.items()}
    assert declared.keys() >= POINTER_RESULTS
    for name in POINTER_RESULTS:
        assert declared[name].restype is ctypes.c_void_p, name
    for name, sig in declared.items():
        assert sig.argtypes[0] is ctypes.c_void_p or name == "xs_open", name  # the handle
        assert sig.restype is not ctypes.c_char_p, f"{name}: c_char_p would leak the result"
    assert set(PACKAGES) == set(SIGNATURES)


def test_signatures_match_the_headers_when_installed() -> None:
    """With libxen-dev installed, each declared function returns a pointer exactly when
    its prototype in Xen's header says so."""
    headers = [Path("/usr/include", h) for h in ("xenstore.h", "xengnttab.h", "xenevtchn.h")]
    if not all(h.exists() for h in headers):
        pytest.skip("libxen-dev headers not installed")
    text = "\n".join(h.read_text() for h in headers)
    for sigs in SIGNATURES.values():
        for name, sig in sigs.items():
            # a prototype: after a ';', '}', '*/' or a preprocessor line; type, name, '('
            proto = re.compile(
                r"(?:;|\}|\*/|^#[^\n]*)\s*((?:const\s+)?(?:struct\s+)?\w+[\s*]*?)\b"
                + name
                + r"\s*\(",
                re.M,
            )
            match = proto.search(text)
            assert match is not None, name
            returns_pointer = match.group(1).rstrip().endswith("*")
            assert returns_pointer == (sig.restype is ctypes.c_void_p), (name, match.group(1))


class StormingEvtchn:
    """libxenevtchn (``XenLibs.evtchn``) for one port whose peer notifies again after
    every unmask, as a guest in a tight notify loop does: its fd never stops polling
    readable. ``storming = False`` ends the storm at the next unmask. Spec: xenevtchn.h.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._r, self._w = os.pipe()
        os.write(self._w, b"\x01")  # pending now, and again after every unmask
        self.storming = True
        self.pendings = 0
        self.unmasks = 0

    def xenevtchn_fd(self, handle: int) -> int:
        return self._r

    def xenevtchn_pending(self, handle: int) -> int:
        self.pendings += 1
        return self.port

    def xenevtchn_unmask(self, handle: int, port: int) -> int:
        assert port == self.port
        self.unmasks += 1
        if not self.storming:
            os.read(self._r, 1)  # the peer stopped: nothing pending after this unmask
        return 0

    def xenevtchn_notify(self, handle: int, port: int) -> int:
        return 0

    def xenevtchn_unbind(self, handle: int, port: int) -> int:
        return 0

    def xenevtchn_close(self, handle: int) -> int:
        os.close(self._r)
        os.close(self._w)
        return 0


class EvtchnOnly:
    """``XenLibs`` with only its libxenevtchn, which is all ``LinuxEventChannel`` uses."""

    def __init__(self, evtchn: StormingEvtchn) -> None:
        self.evtchn = evtchn


def test_consume_returns_during_an_event_channel_storm() -> None:
    """XSA-391 class: a guest that notifies again after every unmask keeps its port
    pending for as long as it likes. ``consume()`` runs on the backend's only thread, so
    it must return after a bounded number of pending/unmask rounds (the event loop calls
    it again once every other ready fd is served), not loop while the port is pending."""
    storm = StormingEvtchn(port=7)
    channel = LinuxEventChannel(EvtchnOnly(storm), 1, 7)  # type: ignore[arg-type]
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(channel.consume()), daemon=True)
    thread.start()
    thread.join(2.0)
    stuck = thread.is_alive()
    storm.storming = False  # lets a looping consume() go, so the test ends
    thread.join(5)
    try:
        assert not stuck, f"consume() still looping after 2 s: {storm.pendings} rounds"
        assert result == [True]
        assert 1 <= storm.pendings <= 64, storm.pendings  # bounded
        assert storm.unmasks == storm.pendings  # every event taken is unmasked
        assert select.select([channel.fileno()], [], [], 0)[0]  # still pending: next turn
    finally:
        channel.close()


# -- the xenstore half against the simulated xenstored ------------------------------------


def _libs_or_skip() -> XenLibs:
    try:
        return XenLibs()
    except HypervisorUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def simxend(tmp_path: Path) -> Iterator[Path]:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenvtpm", "simxend", "--dir", str(run)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not (run / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "simxend did not start"
            time.sleep(0.02)
        yield run
    finally:
        proc.terminate()
        proc.wait(10)


def test_libxenstore_against_the_simulated_xenstored(
    simxend: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    libs = _libs_or_skip()
    from xenvtpm.xen.linux_xenstore import LinuxXenStore

    monkeypatch.setenv("XENSTORED_PATH", str(simxend / "xenstored.sock"))  # read by xs_open
    with LinuxXenStore.open(libs) as xs:
        assert xs.get_domain_path(3) == "/local/domain/3"
        xs.write("/t/a", b"hello\0x")
        assert xs.read("/t/a") == b"hello\0x"
        assert xs.directory("/t") == ["a"]
        perms = [Perm(0, Access.NONE), Perm(3, Access.READ), Perm(4, Access.BOTH)]
        xs.set_perms("/t/a", perms)
        assert xs.get_perms("/t/a") == perms
        with pytest.raises(XenStoreError) as info:
            xs.read("/t/missing")
        assert (info.value.errno_name, info.value.op) == ("ENOENT", "read")
        with pytest.raises(XenStoreError, match="EINVAL"):
            xs.read("/t/a\0b")
        xs.watch("/t", "tok")
        assert select.select([xs.fileno()], [], [], 5)[0]
        assert xs.read_watches() == [WatchEvent("/t", "tok")]  # fires once on registration
        tx = xs.transaction_start()
        xs.write("/t/b", "1", tx=tx)
        assert xs.transaction_end(tx)
        assert select.select([xs.fileno()], [], [], 5)[0]
        assert xs.read_watches() == [WatchEvent("/t/b", "tok")]
        assert xs.read_watches() == []
        xs.unwatch("/t", "tok")
        xs.rm("/t")
        xs.close()
    xs.close()  # idempotent


# -- the vTPM proxy endpoint ---------------------------------------------------------------


def test_new_dev_ioctl_number() -> None:
    """_IOWR(0xa1, 0x00, struct vtpm_proxy_new_dev): 20 bytes, read/write."""
    iowr = (3 << 30) | (struct.calcsize("<5I") << 16) | (0xA1 << 8) | 0x00
    assert VtpmProxyIoctl.NEW_DEV == iowr == 0xC014A100


def test_kernel_frontend_is_unbound_when_bound(tmp_path: Path) -> None:
    driver = tmp_path / "vtpm"
    driver.mkdir()
    (driver / "unbind").write_text("")
    assert not unbind_kernel_frontend(0, str(driver))  # not bound: nothing written
    assert (driver / "unbind").read_text() == ""
    (driver / "vtpm-0").mkdir()
    assert unbind_kernel_frontend(0, str(driver))
    assert (driver / "unbind").read_text() == "vtpm-0"


def test_warm_up_is_a_full_self_test() -> None:
    assert bytes.fromhex("80010000000b0000014301") == WARM_UP_COMMAND


def test_missing_vtpmx_says_modprobe(tmp_path: Path) -> None:
    with pytest.raises(VTPMError, match="modprobe tpm_vtpm_proxy"):
        create_proxy_device(str(tmp_path / "vtpmx"))


class FakeKernel:
    """The kernel's side of a proxy fd: a SEQPACKET socket (one message = one command)."""

    def __init__(self) -> None:
        self.created = 0
        self.sock: socket.socket = socket.socket()  # replaced by each create()
        self.device = ProxyDevice(-1, tpm_num=-1)

    def create(self) -> ProxyDevice:
        self.sock.close()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(5)
        self.device = ProxyDevice(theirs.detach(), tpm_num=3 + self.created)
        self.created += 1
        return self.device

    def fd_closed(self) -> bool:
        return self.fd_closed_for(self.device)

    @staticmethod
    def fd_closed_for(device: ProxyDevice) -> bool:
        try:
            os.fstat(device.fd)
        except OSError as e:
            return e.errno == errno.EBADF
        return False


Proxy = tuple[Loop, FakeKernel, VtpmProxyEndpoint, list[ProxyClient], list[bytes]]
RelayPair = tuple[RelayTransport, "FakeTpm", list[int]]


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    loop, kernel = Loop(), FakeKernel()
    endpoint = VtpmProxyEndpoint(create_device=kernel.create, warm_up_retry=0.05)
    clients: list[ProxyClient] = []
    commands: list[bytes] = []

    def on_command(client: ProxyClient, command: memoryview) -> None:
        clients.append(client)
        commands.append(bytes(command))

    endpoint.start(loop, on_command)
    # The device is created only once the warm-up command came back through the ring.
    assert (kernel.created, endpoint.device, commands) == (0, None, [WARM_UP_COMMAND])
    endpoint.start(loop, on_command)  # idempotent: Connected again while warming up
    assert len(commands) == 1
    clients.pop().reply(tpm.error_response(tpm.TPM_RC.FAILURE))  # not ready yet: retry
    assert kernel.created == 0
    endpoint.start(loop, on_command)  # a retry is due: no second warm-up now
    assert len(commands) == 1
    loop.run_once(1)
    assert len(commands) == 2 and endpoint.warm_ups == 2
    clients.pop().reply(RESPONSE)  # success: the device is created at once
    assert kernel.created == 1 and endpoint.device is not None
    commands.clear()
    try:
        yield loop, kernel, endpoint, clients, commands
    finally:
        endpoint.close()
        kernel.sock.close()
        loop.close()


def test_proxy_answers_set_locality_itself(proxy: Proxy) -> None:
    loop, kernel, endpoint, _clients, commands = proxy
    assert endpoint.device is not None and endpoint.device.name == "/dev/tpm3"
    kernel.sock.send(SET_LOCALITY)
    loop.run_once(1)
    assert kernel.sock.recv(4096) == tpm.success_response() == bytes.fromhex("80010000000a00000000")
    assert commands == []


def test_proxy_hands_commands_over_and_writes_replies(proxy: Proxy) -> None:
    loop, kernel, endpoint, clients, commands = proxy
    kernel.sock.send(GET_RANDOM_16)
    loop.run_once(1)
    assert commands == [GET_RANDOM_16]
    clients[0].reply(RESPONSE)
    assert kernel.sock.recv(4096) == RESPONSE
    assert not clients[0].alive
    clients[0].reply(RESPONSE)  # a second reply is never written
    assert endpoint.commands == 1


def test_proxy_drops_the_late_reply_to_a_command_the_kernel_gave_up(proxy: Proxy) -> None:
    loop, kernel, _endpoint, clients, _commands = proxy
    kernel.sock.send(GET_RANDOM_16)
    loop.run_once(1)
    kernel.sock.send(GET_RANDOM_16)  # the kernel timed the first out and moved on
    loop.run_once(1)
    first, second = clients
    assert not first.alive and second.alive
    first.reply(RESPONSE)  # late: must not become the second command's response
    second.reply(tpm.error_response(tpm.TPM_RC.FAILURE))
    assert kernel.sock.recv(4096) == tpm.error_response(tpm.TPM_RC.FAILURE)


def test_proxy_makes_a_new_device_when_the_kernel_gives_one_up(proxy: Proxy) -> None:
    """A failed probe closes the kernel's side (reads: EPIPE); a new device is made."""
    loop, kernel, endpoint, clients, commands = proxy
    lost = kernel.device
    kernel.sock.close()
    loop.run_once(1)
    assert endpoint.device is None and kernel.fd_closed_for(lost)
    assert commands == [WARM_UP_COMMAND]  # warming up again before a new device
    clients[-1].reply(RESPONSE)
    assert kernel.created == 2
    assert endpoint.device is not None and endpoint.device.name == "/dev/tpm4"
    kernel.sock.send(SET_LOCALITY)
    loop.run_once(1)
    assert kernel.sock.recv(4096) == tpm.success_response()
    assert endpoint.recreated == 1


def test_proxy_close_closes_the_fd_once(proxy: Proxy) -> None:
    _loop, kernel, endpoint, _clients, _commands = proxy
    endpoint.close()
    assert kernel.fd_closed() and endpoint.device is None
    endpoint.close()
    assert kernel.sock.recv(4096) == b""  # the kernel side sees the fd go (device removed)


# -- the relay and its transport -----------------------------------------------------------


def test_frame_bytes_are_pinned() -> None:
    assert relay.Frame(relay.FrameKind.COMMAND, b"\x80\x01").to_bytes() == b"C\0\0\0\x02\x80\x01"
    assert relay.Frame(relay.FrameKind.ERROR, b"EINVAL").to_bytes() == b"E\0\0\0\x06EINVAL"
    with pytest.raises(relay.FramingError):
        relay.Frame.parse_header(b"X\0\0\0\0")
    with pytest.raises(relay.FramingError):
        relay.Frame.parse_header(b"C\xff\xff\xff\xff")


class FakeTpm:
    """A TPM character device: one write = one command, one read = its response."""

    def __init__(self) -> None:
        self.host, self.device = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.seen: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.device, select.POLLIN | select.POLLRDHUP)
        hangup = select.POLLHUP | select.POLLRDHUP
        while True:
            try:
                command = self.device.recv(65536)
            except OSError:
                return
            if not command and any(ev & hangup for _, ev in poller.poll(0)):
                return
            self.seen.append(command)
            try:
                self.device.send(RESPONSE)
            except OSError:
                return

    def close(self) -> None:
        self.host.close()  # the thread sees the hang-up and returns
        self._thread.join(5)
        self.device.close()


@pytest.fixture
def relay_pair() -> Iterator[RelayPair]:
    tpm_dev = FakeTpm()
    ours, theirs = socket.socketpair()
    status: list[int] = []
    def relay_process() -> None:  # what the relay's exit does: its stdout closes
        status.append(
            relay.serve(tpm_dev.host.fileno(), "/dev/tpm9", theirs.fileno(), theirs.fileno())
        )
        theirs.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=relay_process, daemon=True)
    thread.start()
    transport = RelayTransport(ours, "test", hello_timeout=5)
    try:
        yield transport, tpm_dev, status
    finally:
        transport.close()
        thread.join(5)
        theirs.close()
        tpm_dev.close()


def test_relay_round_trip(relay_pair: RelayPair) -> None:
    transport, tpm_dev, status = relay_pair
    assert transport.device == "/dev/tpm9"
    assert transport.transmit(GET_RANDOM_16, timeout=5) == RESPONSE
    assert transport.transmit(GET_RANDOM_16[:6], timeout=5) == RESPONSE  # bytes as given
    assert tpm_dev.seen == [GET_RANDOM_16, GET_RANDOM_16[:6]]
    transport.close()
    with pytest.raises(TransportClosed):
        transport.transmit(GET_RANDOM_16)
    for _ in range(100):
        if status:
            break
        time.sleep(0.05)
    assert status == [0]  # end of stdin: the relay exits cleanly


def test_relay_transport_close_waits_for_the_relay_to_exit(relay_pair: RelayPair) -> None:
    """close() returns only once the relay has let go of the device: the kernel answers
    EBUSY to the next opener of /dev/tpm0 until then."""
    transport, _, status = relay_pair
    assert transport.transmit(GET_RANDOM_16, timeout=5) == RESPONSE
    transport.close()
    assert status == [0]  # no polling: the relay had already returned


def test_relay_error_frame_carries_the_errno() -> None:
    dead, gone = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    gone.close()  # writes now fail with EPIPE, as /dev/tpm0 fails with EINVAL/ETIME
    ours, theirs = socket.socketpair()
    def relay_process() -> None:  # what the relay's exit does: its stdout closes
        relay.serve(dead.fileno(), "/dev/tpm0", theirs.fileno(), theirs.fileno())
        theirs.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=relay_process)
    thread.start()
    try:
        with RelayTransport(ours, "test", hello_timeout=5) as transport:
            with pytest.raises(DeviceRefused) as info:
                transport.transmit(GET_RANDOM_16, timeout=5)
            assert info.value.errno_name == "EPIPE"
            with pytest.raises(DeviceRefused):  # the transport stays usable
                transport.transmit(GET_RANDOM_16, timeout=5)
    finally:
        thread.join(5)
        theirs.close()
        dead.close()


def test_relay_transport_fails_on_a_silent_or_failed_relay() -> None:
    ours, theirs = socket.socketpair()
    with pytest.raises(TransportTimeout):
        RelayTransport(ours, "silent", hello_timeout=0.2)
    theirs.close()
    ours, theirs = socket.socketpair()
    theirs.sendall(relay.Frame(relay.FrameKind.ERROR, b"EBUSY").to_bytes())
    with pytest.raises(DeviceRefused, match="EBUSY"):
        RelayTransport(ours, "busy", hello_timeout=5)
    theirs.close()


def test_relay_main_opens_the_device_and_reports_failure(tmp_path: Path) -> None:
    """The CLI as the harness runs it: a missing device is one E frame and exit 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "xenvtpm", "relay", "--device", str(tmp_path / "tpm0")],
        cwd=REPO_ROOT,
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stdout == relay.Frame(relay.FrameKind.ERROR, b"ENOENT").to_bytes()
    assert "relay --device /dev/tpm0" in relay_command()


# -- the frontend serving a proxy device, over the simulated Xen --------------------------


def test_frontend_creates_the_device_only_once_the_vtpm_answers(tmp_path: Path) -> None:
    """``frontend --device`` ordering, end to end with the real backend, manager and swtpm:
    ring Connected, then a warm-up GetRandom through it, then the device; the kernel's
    SET_LOCALITY is answered locally and its commands reach swtpm."""
    from simenv import SimEnv

    from xenvtpm.frontend.frontend import Frontend
    from xenvtpm.sim.adapter import SimHypervisor

    env = SimEnv(tmp_path)
    loop, kernel = Loop(), FakeKernel()
    hv: SimHypervisor | None = None
    frontend: Frontend | None = None
    try:
        env.start_hypervisor()
        env.start_manager()
        env.start_backend()
        assert env.control is not None
        domid = env.add_domain("dev", instance=7)
        hv = SimHypervisor.from_fds(*env.control.connect_domain(domid))
        endpoint = VtpmProxyEndpoint(create_device=kernel.create)
        frontend = Frontend(hv, loop, endpoint, serve_on_connect=True)
        frontend.start()
        deadline = time.monotonic() + 60
        while not kernel.created:
            assert time.monotonic() < deadline, env.logs()
            loop.run_once(0.1)
        assert endpoint.warm_up_seconds is not None
        assert hv.xenstore.read("device/vtpm/0/state") == b"4"  # Connected before created
        kernel.sock.send(SET_LOCALITY)
        loop.run_once(1)
        assert kernel.sock.recv(4096) == tpm.success_response()
        kernel.sock.send(GET_RANDOM_16)
        kernel.sock.setblocking(False)
        response = b""
        while not response:
            assert time.monotonic() < deadline, env.logs()
            loop.run_once(0.1)
            with contextlib.suppress(BlockingIOError):
                response = kernel.sock.recv(4096)
        assert tpm.response_code(response) == tpm.TPM_RC.SUCCESS and len(response) == 28
        frontend.close()
        assert kernel.fd_closed()  # closing the fd removes /dev/tpmN
    finally:
        if frontend is not None:
            frontend.close()
        if hv is not None:
            hv.close()
        loop.close()
        kernel.sock.close()
        env.close()
