"""``RawTransport`` to a real guest's TPM device: the in-guest relay over an SSH channel.

``open_relay(client)`` runs ``python3 -m xenvtpm relay --device /dev/tpm0`` in the guest
(``exec_command`` on a fresh paramiko session) and speaks its frames (``xenvtpm/relay.py``:
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
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from harness.errors import TransportClosed, TransportError, TransportTimeout
from harness.transport import DEFAULT_TIMEOUT, RawTransport
from xenvtpm.lifecycle import Closeable
from xenvtpm.relay import FRAME_HEADER_CI, PROTOCOL, Frame, FrameKind, FramingError

HELLO_TIMEOUT = 30.0  # python3 start-up in a TCG guest takes a few seconds
REMOTE_PACKAGE_DIR = "/opt/xenvtpm"


class DeviceRefused(TransportError):
    """The guest kernel refused the command (write/read failed); ``errno_name`` says how.

    The transport stays usable: this is what a local TPM client would have seen.
    """

    def __init__(self, where: str, errno_name: str) -> None:
        super().__init__(f"{where}: the TPM device refused the command: {errno_name}")
        self.errno_name = errno_name


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
            self.close()
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
            self.close()
            raise TransportTimeout(f"{self.name}: no {what} within {timeout} s") from e
        except FramingError as e:
            self.close()
            raise TransportError(f"{self.name}: {e}{self._evidence()}") from e
        except TransportError:
            self.close()
            raise
        except OSError as e:
            self.close()
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
            self.close()
            raise TransportTimeout(f"{self.name}: send blocked for {timeout} s") from e
        except OSError as e:
            self.close()
            raise TransportClosed(f"{self.name}: {e}") from e
        frame = self._read_frame(timeout, "response")
        if frame.kind is FrameKind.RESPONSE:
            return frame.payload
        if frame.kind is FrameKind.ERROR:
            raise DeviceRefused(f"{self.name}: {self.device}", frame.payload.decode())
        self.close()
        raise TransportError(f"{self.name}: unexpected {frame.kind.name} frame")

    def close(self) -> None:
        """Close the channel: the relay sees end of file and exits. Idempotent."""
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()

    def __repr__(self) -> str:
        return f"RelayTransport({self.name!r}, device={self.device!r})"


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
