"""``RawTransport`` to a real guest's TPM device: the in-guest relay over an SSH channel.

``open_relay(client)`` runs ``python3 -m xenvtpm relay --device /dev/tpm0`` in the guest
(``exec_command`` on a fresh paramiko session) and speaks its frames (``xenvtpm/tools/relay.py``:
``kind u8, length u32 BE, payload``): one C frame per command, one R frame back with the
device's response, or an E frame with the errno name when the kernel refused the write
or read (``EINVAL`` for a malformed command, ``ETIME`` when the TPM did not answer).

``RelayTransport`` itself only needs ``sendall``/``recv``/``settimeout``/``close``, which
a paramiko ``Channel`` and a ``socket`` both have: tests run it over a socketpair.

``/dev/tpm0`` admits one opener at a time (the kernel answers EBUSY to a second): hold
one transport per guest, or relay ``/dev/tpmrm0``, which admits many.
"""

from __future__ import annotations

import contextlib
import select
import shlex
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from harness.errors import DeviceRefused, TransportClosed, TransportError, TransportTimeout
from harness.transport import DEFAULT_TIMEOUT, RawTransport
from xenvtpm.lifecycle import Closeable
from xenvtpm.tools.relay import FRAME_HEADER_CI, PROTOCOL, Frame, FrameKind, FramingError

HELLO_TIMEOUT = 30.0  # python3 start-up in a TCG guest takes a few seconds
CLOSE_TIMEOUT = 60.0  # a relay blocked in write() exits when the TPM's command ends
REMOTE_PACKAGE_DIR = "/opt/xenvtpm"


class Channel(Protocol):
    """What the relay transport needs of a paramiko ``Channel`` (or a socket)."""

    def sendall(self, data: bytes) -> Any: ...
    def recv(self, n: int) -> bytes: ...
    def settimeout(self, timeout: float | None) -> Any: ...
    def close(self) -> Any: ...


class RelayTransport(Closeable):
    """One relay session: commands in order, one at a time, until ``close``."""

    def __init__(
        self,
        channel: Channel,
        name: str = "relay",
        *,
        hello_timeout: float = HELLO_TIMEOUT,
        stderr: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self._channel: Channel | None = channel
        self._stderr = stderr
        self.device = ""
        try:
            hello = self._read_frame(hello_timeout, "the relay's hello")
            if hello.kind is FrameKind.ERROR:
                raise DeviceRefused(f"{name}: opening the device", hello.payload.decode())
            text = hello.payload.decode(errors="replace")
            if hello.kind is not FrameKind.HELLO or not text.startswith(PROTOCOL + " "):
                raise TransportError(f"{name}: not a xenvtpm relay: {hello}")
            self.device = text[len(PROTOCOL) + 1 :]
        except BaseException:
            self._abort()
            raise

    def _evidence(self) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(Exception):
            text = self._stderr().strip()
            if text:
                return f"; relay stderr: {text[-1000:]}"
        return ""

    def _recv_exact(self, n: int, what: str) -> bytes:
        channel = self._channel
        assert channel is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = channel.recv(n - len(buf))
            if not chunk:
                raise TransportClosed(
                    f"{self.name}: relay closed after {len(buf)} of {n} bytes of {what}"
                    + self._evidence()
                )
            buf += chunk
        return bytes(buf)

    def _read_frame(self, timeout: float, what: str) -> Frame:
        channel = self._channel
        if channel is None:
            raise TransportClosed(f"{self.name}: transport is closed")
        channel.settimeout(timeout)
        try:
            kind, length = Frame.parse_header(self._recv_exact(FRAME_HEADER_CI.size, what))
            payload = self._recv_exact(length, what) if length else b""
        except TimeoutError as e:
            self._abort()
            raise TransportTimeout(f"{self.name}: no {what} within {timeout} s") from e
        except FramingError as e:
            self._abort()
            raise TransportError(f"{self.name}: {e}{self._evidence()}") from e
        except TransportError:
            self._abort()
            raise
        except OSError as e:
            self._abort()
            raise TransportClosed(f"{self.name}: {e}") from e
        return Frame(kind, payload)

    def transmit(self, cmd: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        channel = self._channel
        if channel is None:
            raise TransportClosed(f"{self.name}: transport is closed")
        try:
            channel.settimeout(timeout)
            channel.sendall(Frame(FrameKind.COMMAND, bytes(cmd)).to_bytes())
        except TimeoutError as e:
            self._abort()
            raise TransportTimeout(f"{self.name}: send blocked for {timeout} s") from e
        except OSError as e:
            self._abort()
            raise TransportClosed(f"{self.name}: {e}") from e
        frame = self._read_frame(timeout, "response")
        if frame.kind is FrameKind.RESPONSE:
            return frame.payload
        if frame.kind is FrameKind.ERROR:
            raise DeviceRefused(f"{self.name}: {self.device}", frame.payload.decode())
        self._abort()
        raise TransportError(f"{self.name}: unexpected {frame.kind.name} frame")

    def close(self) -> None:
        """End the relay and wait (up to ``CLOSE_TIMEOUT``) until it has exited. Idempotent.

        Synchronous on purpose: the relay releases ``/dev/tpm0`` only when it exits, and
        the kernel answers EBUSY to the next opener until then. So: end of file on its
        stdin, then wait for its exit status (a paramiko channel) or end of file (a
        socket), then close.
        """
        channel = self._channel
        if channel is None:
            return
        with contextlib.suppress(Exception):
            end_of_input(channel)
            wait_for_exit(channel, CLOSE_TIMEOUT)
        self._abort()

    def usable(self) -> bool:
        """Open, and its relay still there: an idle relay never speaks first, so end of
        file, an exit status or bytes waiting on its channel mean it is gone or astray."""
        channel = self._channel
        return channel is not None and channel_idle(channel)

    def abort(self) -> None:
        """Close the channel without waiting: the relay sees end of file and exits."""
        self._abort()

    def _abort(self) -> None:
        """Close the channel without waiting (the relay is silent or broken)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()

    def __repr__(self) -> str:
        return f"RelayTransport({self.name!r}, device={self.device!r})"


def channel_idle(channel: Channel) -> bool:
    """Nothing has happened on ``channel`` since its last frame: not closed, no end of
    file or exit status (a paramiko channel), nothing to read and no hang-up (a socket)."""
    if getattr(channel, "closed", False) or getattr(channel, "eof_received", False):
        return False
    exit_status_ready = getattr(channel, "exit_status_ready", None)
    if exit_status_ready is not None and exit_status_ready():
        return False
    recv_ready = getattr(channel, "recv_ready", None)
    if recv_ready is not None:
        return not recv_ready()
    if isinstance(channel, socket.socket):
        poller = select.poll()
        poller.register(channel, select.POLLIN | select.POLLHUP | select.POLLRDHUP)
        return not poller.poll(0)
    return True


def end_of_input(channel: Channel) -> None:
    """End of file on the relay's stdin: paramiko's ``shutdown_write``, a socket's
    ``shutdown(SHUT_WR)``."""
    shutdown_write = getattr(channel, "shutdown_write", None)
    if shutdown_write is not None:
        shutdown_write()
    elif isinstance(channel, socket.socket):
        channel.shutdown(socket.SHUT_WR)


def wait_for_exit(channel: Channel, timeout: float) -> None:
    """Until the relay behind ``channel`` has exited, or ``timeout`` passed.

    A paramiko channel reports the remote exit status; elsewhere end of file on the
    channel (the relay closes its device before its stdout) is the sign.
    """
    deadline = time.monotonic() + timeout
    status_ready = getattr(channel, "exit_status_ready", None)
    while time.monotonic() < deadline:
        if status_ready is not None and status_ready():
            return
        channel.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))
        try:
            if not channel.recv(65536) and status_ready is None:
                return
        except TimeoutError:
            continue
        if status_ready is not None and getattr(channel, "eof_received", False):
            time.sleep(0.01)  # stdout closed; the exit status follows


def relay_command(device: str = "/dev/tpm0", package_dir: str = REMOTE_PACKAGE_DIR) -> str:
    return (
        f"cd {shlex.quote(package_dir)} && "
        f"exec python3 -m xenvtpm relay --device {shlex.quote(device)}"
    )


def open_relay(
    client: Any,
    device: str = "/dev/tpm0",
    *,
    name: str = "guest",
    package_dir: str = REMOTE_PACKAGE_DIR,
    timeout: float = HELLO_TIMEOUT,
) -> RelayTransport:
    """Start the relay in the guest that ``client`` (a paramiko ``SSHClient``) logs into."""
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise TransportClosed(f"{name}: SSH connection is not active")
    channel = transport.open_session(timeout=timeout)
    channel.exec_command(relay_command(device, package_dir))

    def stderr() -> str:
        data = b""
        while channel.recv_stderr_ready():
            data += channel.recv_stderr(65536)
        return data.decode(errors="replace")

    return RelayTransport(channel, f"{name}:{device}", hello_timeout=timeout, stderr=stderr)


if TYPE_CHECKING:  # mypy proves the relay transport is a RawTransport

    def _conforms(t: RelayTransport) -> RawTransport:
        return t
