"""The guest's TPM endpoint in the simulation: a unix SOCK_SEQPACKET socket.

A SEQPACKET message keeps the one property of ``/dev/tpm0`` that matters to a TPM
client: one write is one command, and the reply is one read. Malformed sizes, truncated
headers and empty writes therefore reach the driver pair intact, where the backend
answers them. Many clients may connect; the frontend serves their commands one at a
time, in arrival order, each whole.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import socket
from collections.abc import Callable

from xenvtpm.loop import Loop

log = logging.getLogger(__name__)

_HANGUP = select.POLLHUP | select.POLLRDHUP | select.POLLERR


class EndpointClient:
    """One connected TPM client."""

    def __init__(self, sock: socket.socket, endpoint: SocketEndpoint) -> None:
        self.sock = sock
        self._endpoint = endpoint
        self.alive = True

    def reply(self, response: bytes | memoryview) -> None:
        """Send one response; a client that left is dropped without fuss."""
        if not self.alive:
            return
        try:
            self.sock.send(response)
        except OSError as e:
            log.debug("client gone before its reply: %s", e)
            self.close()

    def close(self) -> None:
        if self.alive:
            self.alive = False
            self._endpoint.forget(self)


CommandHandler = Callable[[EndpointClient, memoryview], None]


class SocketEndpoint:
    """Listens on ``path``; hands each received command to ``on_command``.

    The memoryview passed to ``on_command`` is valid only during the call: the buffer
    is reused for the next command, so a handler that queues must copy.
    """

    def __init__(self, path: str, max_command: int, backlog: int = 64) -> None:
        self.path = path
        self._buffer = bytearray(max_command + 1)  # one byte more reveals oversize
        self._backlog = backlog
        self._listener: socket.socket | None = None
        self._clients: set[EndpointClient] = set()
        self._loop: Loop | None = None
        self._on_command: CommandHandler | None = None

    def start(self, loop: Loop, on_command: CommandHandler) -> None:
        if self._listener is not None:
            return
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(self.path)
            os.chmod(self.path, 0o660)
            listener.listen(self._backlog)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener, self._loop, self._on_command = listener, loop, on_command
        loop.add_reader(listener.fileno(), self._accept)
        log.info("TPM endpoint listening on %s", self.path)

    def close(self) -> None:
        for client in list(self._clients):
            client.close()
        if self._listener is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def forget(self, client: EndpointClient) -> None:
        self._clients.discard(client)
        if self._loop is not None:
            self._loop.remove_reader(client.sock.fileno())
        client.sock.close()

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        client = EndpointClient(sock, self)
        self._clients.add(client)
        self._loop.add_reader(sock.fileno(), functools.partial(self._receive, client))

    def _receive(self, client: EndpointClient) -> None:
        assert self._on_command is not None
        try:
            n = client.sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            client.close()
            return
        if n == 0 and self._hung_up(client.sock):
            client.close()
            return
        self._on_command(client, memoryview(self._buffer)[:n])

    @staticmethod
    def _hung_up(sock: socket.socket) -> bool:
        """Tell an empty message (a legal, if malformed, command) from end of file."""
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLRDHUP)
        return any(ev & _HANGUP for _, ev in poller.poll(0))
