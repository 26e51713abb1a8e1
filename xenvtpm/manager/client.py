"""A small synchronous client of the vTPM manager, for tests, benchmarks and tools.

It speaks the backend side of the manager's protocol: one ``SOCK_SEQPACKET`` message
per packet, a 4-byte big-endian instance id, then one TPM command; the reply carries
the same prefix and one TPM response with ``4 + responseSize == len(reply)``.

Spec: 000_a1dfc4f903a123f1.txt ("a 4-byte virtual TPM instance identifier is prepended
to each packet ... in network byte order").
"""

from __future__ import annotations

import os
import socket
import struct

from xenvtpm.errors import ChannelClosed, MalformedMessage
from xenvtpm.lifecycle import Closeable
from xenvtpm.tpm import MAX_RESPONSE_SIZE, validate_response

__all__ = ["PREFIX_SIZE", "ManagerClient"]

PREFIX_SIZE = 4
_PREFIX_I = struct.Struct(">I")  # instance id, network byte order (seed)


class ManagerClient(Closeable):
    """A small synchronous backend-side client, for tests and benchmarks.

    One request at a time: :meth:`transact` sends ``prefix + command`` and returns the
    TPM response after checking that the reply carries the same prefix and that
    ``4 + responseSize == len(reply)``.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._buf = bytearray(PREFIX_SIZE + MAX_RESPONSE_SIZE + 1)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(self.path)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_packet(self, packet: bytes) -> None:
        """Send one raw packet (prefix included), as a backend would."""
        self.sock.send(packet)

    def recv_packet(self, timeout: float | None = None) -> bytes:
        """Receive one raw reply packet.  Raises TimeoutError or :class:`ChannelClosed`."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        n = self.sock.recv_into(self._buf)
        if n == 0:
            raise ChannelClosed(f"manager at {self.path} closed the connection")
        return bytes(self._buf[:n])

    def transact(self, instance: int, command: bytes, timeout: float | None = None) -> bytes:
        """Send ``command`` to ``instance``; return its TPM response (without prefix)."""
        prefix = _PREFIX_I.pack(instance)
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        self.sock.sendmsg([prefix, command])
        reply = self.recv_packet(timeout)
        if reply[:PREFIX_SIZE] != prefix:
            raise MalformedMessage(
                f"reply for instance {instance} carries prefix {reply[:PREFIX_SIZE].hex()}"
            )
        response = reply[PREFIX_SIZE:]
        validate_response(response)
        return response
