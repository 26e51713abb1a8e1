"""The vTPM proxy endpoint, over a SEQPACKET socketpair standing in for the proxy fd,
and the frontend serving a proxy device over the simulated Xen.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenvtpm import tpm
from xenvtpm.errors import VTPMError
from xenvtpm.frontend.frontend import TpmClient
from xenvtpm.frontend.vtpm_proxy import (
    WARM_UP_COMMAND,
    ProxyDevice,
    VtpmProxyEndpoint,
    VtpmProxyIoctl,
    create_proxy_device,
    unbind_kernel_frontend,
)
from xenvtpm.loop import Loop

SET_LOCALITY = bytes.fromhex("80020000000b2000100000")  # measured: the kernel's first command
GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")
RESPONSE = bytes.fromhex("80010000000e00000000000200aa")


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


Proxy = tuple[Loop, FakeKernel, VtpmProxyEndpoint, list[TpmClient], list[bytes]]


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    loop, kernel = Loop(), FakeKernel()
    endpoint = VtpmProxyEndpoint(create_device=kernel.create, warm_up_retry=0.05)
    clients: list[TpmClient] = []
    commands: list[bytes] = []

    def on_command(client: TpmClient, command: memoryview) -> None:
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
    assert (endpoint.device, kernel.fd_closed_for(lost)) == (None, True)
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
