"""The guest relay and its harness transport, over socketpairs and a fake TPM device."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import DeviceRefused, TransportClosed, TransportTimeout
from harness.paths import REPO_ROOT
from harness.transport_ssh import RelayTransport, relay_command
from xenvtpm.tools import relay

GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")
RESPONSE = bytes.fromhex("80010000000e00000000000200aa")


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


RelayPair = tuple[RelayTransport, FakeTpm, list[int]]


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
