"""Raw TPM transports: one command's bytes in, one response's bytes out.

``RawTransport`` is the protocol every target's guest hands out (``Guest.transport()``);
the TCTI (``tcti.py``) and the ``raw_tpm`` fixture sit on top of it. Implementations:

* ``SeqpacketTransport`` -- the sim frontend's endpoint, a unix SOCK_SEQPACKET socket:
  one message is one command, one message back is the response. A zero-length message
  is a legal "empty write" (the driver answers with a TPM error).
* ``SwtpmTransport`` -- a swtpm data socket (unix SOCK_STREAM). swtpm serves one data
  connection at a time and does not frame by ``commandSize`` (DESIGN.md 3), so this
  transport connects per command, like tpm2-tss's swtpm TCTI: several transports to one
  swtpm then interleave safely instead of the second one hanging in the backlog.

After a timeout a transport is closed: a late response would otherwise be taken as the
answer to the next command.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import time
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from harness.deadline import Deadline
from harness.errors import TransportClosed, TransportError, TransportTimeout
from xenvtpm.lifecycle import Closeable

DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE = 65536  # larger than any TPM 2.0 response (swtpm's is 4096)
TPM_HEADER = struct.Struct(">HII")  # tag, size, code. Spec: TPM 2.0 Part 1, 18.2
# Errors a connect may see while the endpoint is (re)starting.
_RETRY_CONNECT = (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)


@runtime_checkable
class RawTransport(Protocol):
    """A connection to one guest's TPM."""

    def transmit(self, cmd: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Send one raw command, return the raw response bytes."""
        ...

    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def _connect(family_type: int, path: Path, deadline: Deadline) -> socket.socket:
    """Connect a unix socket, retrying while the endpoint is not there yet."""
    last: OSError | None = None
    while True:
        sock = socket.socket(socket.AF_UNIX, family_type)
        sock.settimeout(max(deadline.remaining, 0.001))
        try:
            sock.connect(str(path))
            return sock
        except OSError as e:
            sock.close()
            if e.errno not in _RETRY_CONNECT:
                raise TransportError(f"connect {path}: {e}") from e
            last = e
        if deadline.expired:
            raise TransportClosed(f"connect {path}: {last}") from last
        time.sleep(min(0.02, deadline.remaining))


class _Base(Closeable):
    """Context management and closed-state bookkeeping shared by the transports."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"transport to {self.path} is closed")

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, closed={self._closed})"


class SeqpacketTransport(_Base):
    """One SOCK_SEQPACKET connection, held until ``close``."""

    def __init__(self, path: Path, connect_timeout: float = 5.0) -> None:
        super().__init__(path)
        self._sock: socket.socket | None = _connect(
            socket.SOCK_SEQPACKET, self.path, Deadline(connect_timeout)
        )

    def transmit(self, cmd: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        self._check_open()
        sock = self._sock
        assert sock is not None
        try:
            sock.settimeout(timeout)
            sock.send(cmd)
            reply = sock.recv(MAX_MESSAGE)
        except TimeoutError as e:
            self.close()
            raise TransportTimeout(f"{self.path}: no response within {timeout} s") from e
        except OSError as e:
            self.close()
            raise TransportClosed(f"{self.path}: {e}") from e
        if not reply:
            # TPM responses are never empty: a zero-length read is the peer closing.
            self.close()
            raise TransportClosed(f"{self.path}: endpoint closed the connection")
        return reply

    def close(self) -> None:
        super().close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _recv_exact(sock: socket.socket, n: int, path: Path) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise TransportClosed(f"{path}: closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class SwtpmTransport(_Base):
    """A swtpm data socket, connected anew for each command (swtpm serves one at a time)."""

    def transmit(self, cmd: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        self._check_open()
        if not cmd:
            raise TransportError(
                f"{self.path}: a stream socket cannot carry an empty write (swtpm has no framing)"
            )
        deadline = Deadline(timeout)
        sock = _connect(socket.SOCK_STREAM, self.path, deadline)
        try:
            sock.settimeout(max(deadline.remaining, 0.001))
            sock.sendall(cmd)
            head = _recv_exact(sock, TPM_HEADER.size, self.path)
            _tag, size, _code = TPM_HEADER.unpack(head)
            if not TPM_HEADER.size <= size <= MAX_MESSAGE:
                raise TransportError(f"{self.path}: response header claims {size} bytes")
            return head + _recv_exact(sock, size - TPM_HEADER.size, self.path)
        except TimeoutError as e:
            raise TransportTimeout(f"{self.path}: no response within {timeout} s") from e
        except TransportError:
            raise
        except OSError as e:
            raise TransportClosed(f"{self.path}: {e}") from e
        finally:
            sock.close()
