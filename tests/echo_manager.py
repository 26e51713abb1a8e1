"""A stand-in vTPM manager that speaks the real manager protocol but answers by rule.

It lets the tests push packets larger than swtpm's 4096-byte limit through the ring in
both directions: each reply carries the SHA-256 of the request it answers (proving the
request arrived whole), padded to the size the request asks for.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading

ECHO_CC = 0x20000001
_REQUEST = struct.Struct(">HIII")  # tag, size, code, wanted response size


def echo_command(response_size: int, padding: int = 0) -> bytes:
    """A request of ``14 + padding`` bytes asking for a ``response_size``-byte reply."""
    size = _REQUEST.size + padding
    return _REQUEST.pack(0x8001, size, ECHO_CC, response_size) + bytes(
        i % 251 for i in range(padding)
    )


def expected_response(command: bytes) -> bytes:
    (_, _, _, wanted) = _REQUEST.unpack_from(command)
    body = hashlib.sha256(command).digest() + bytes(i % 241 for i in range(wanted))
    body = body[: wanted - 10]
    return struct.pack(">HII", 0x8001, wanted, 0) + body


class EchoManager:
    """Listens on ``path``; answers every instance-prefixed packet by the rule above."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.packets: list[tuple[int, int]] = []  # (instance, length) seen
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(path)
        self._listener.listen(4)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> EchoManager:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        self._listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _serve(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._stop_r, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj == self._stop_r:
                    sel.close()
                    return
                if key.fileobj is self._listener:
                    conn, _ = self._listener.accept()
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                packet = conn.recv(1 << 17)
                if not packet:
                    sel.unregister(conn)
                    conn.close()
                    continue
                instance, command = packet[:4], packet[4:]
                self.packets.append((struct.unpack(">I", instance)[0], len(command)))
                (code,) = struct.unpack_from(">I", command, 6)
                if code == ECHO_CC:
                    conn.send(instance + expected_response(command))
                else:  # BIND and anything else: plain success
                    conn.send(instance + struct.pack(">HII", 0x8001, 10, 0))
