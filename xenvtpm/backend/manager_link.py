"""The backend's connection to the vTPM manager (the seed's ``/dev/vtpm``).

One SOCK_SEQPACKET socket carries every device's traffic: each request is
``instance (4 bytes, big-endian) + command`` and each reply carries the same prefix.
The manager answers the requests of one instance in order, so the link matches replies
to requests with one FIFO per instance. A request whose caller stopped waiting (a
cancel, a timeout, a device that left) keeps its place in the FIFO, so its late reply
is recognised instead of being taken for the next one's; the caller still hears of it
(its slot frees then) and drops it. :meth:`ManagerLink.cancel` tells the manager
(``XENVTPM_CC_CANCEL``, answered nothing, so the FIFO is unaffected).

While the manager is away (restarting), requests wait in a backlog and are sent once
it is back; their callers' own timeouts bound the wait. Requests already sent when the
connection drops are answered TPM_RC_FAILURE.

Bounds (issue 14): at most :data:`PENDING_PER_INSTANCE` requests of one instance are
outstanding (sent and not answered, or in the backlog), and the backlog holds at most
:data:`BACKLOG_MAX`. A request over a bound is answered TPM_RC_RETRY (0x922: "not
started, retry"; Linux's TPM core retries it) by the link itself and never sent, so the
FIFO matching of replies is untouched. A device keeps one request outstanding
(:mod:`xenvtpm.backend.device`) and its BIND, so only many devices of one instance in
turn (the toolstack's doing) can reach the per-instance bound.

A ticket is always answered from the loop, never inside :meth:`ManagerLink.request`, so
a caller can record its ticket before any answer arrives.
"""

from __future__ import annotations

import collections
import logging
import socket
import struct
from collections.abc import Callable

from xenvtpm import tpm
from xenvtpm.errors import MalformedMessage
from xenvtpm.loop import Loop, Timer
from xenvtpm.tpmif import TPMIF_TX_RING_SIZE, capacity

log = logging.getLogger(__name__)

_INSTANCE_I = struct.Struct(">I")
PREFIX_SIZE = _INSTANCE_I.size
MAX_PACKET = PREFIX_SIZE + capacity(TPMIF_TX_RING_SIZE)
RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)
PENDING_PER_INSTANCE = 4
BACKLOG_MAX = 4096
_FAILURE = tpm.error_response(tpm.TPM_RC.FAILURE)
_RETRY = tpm.error_response(tpm.TPM_RC.RETRY)
_CANCELED = tpm.error_response(tpm.TPM_RC.CANCELED)
_CANCEL = tpm.cancel_command()

ReplyCallback = Callable[[memoryview], None]


class Ticket:
    """One request sent (or about to be sent) to the manager."""

    __slots__ = ("callback", "instance")

    def __init__(self, callback: ReplyCallback, instance: int) -> None:
        self.callback: ReplyCallback | None = callback
        self.instance = instance

    def resolve(self, response: memoryview | bytes) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback(memoryview(response))


class ManagerLink:
    """Sends instance-prefixed requests and routes each reply back to its ticket."""

    def __init__(
        self,
        path: str,
        loop: Loop,
        on_up: Callable[[], None],
    ) -> None:
        self.path = path
        self._loop = loop
        self._on_up = on_up
        self._sock: socket.socket | None = None
        self._buffer = bytearray(MAX_PACKET + 1)
        self._pending: dict[int, collections.deque[Ticket]] = {}
        self._backlog: collections.deque[tuple[int, bytes, Ticket]] = collections.deque()
        self._backlogged: collections.Counter[int] = collections.Counter()  # per instance
        self._retry: Timer | None = None
        self._attempt = 0
        self._closed = True
        self.dropped_replies = 0

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def start(self) -> None:
        if not self._closed:
            return
        self._closed = False
        self._connect()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._disconnect("closing")
        self._backlogged.clear()
        while self._backlog:
            self._backlog.popleft()[2].resolve(_FAILURE)

    def request(self, instance: int, command: bytes, callback: ReplyCallback) -> Ticket:
        """Send ``command`` for ``instance``; ``callback`` gets the reply (once, at most,
        and never before this returns)."""
        ticket = Ticket(callback, instance)
        if self.outstanding(instance) >= PENDING_PER_INSTANCE or (
            self._sock is None and len(self._backlog) >= BACKLOG_MAX
        ):
            log.warning("instance %d: too many requests outstanding: TPM_RC_RETRY", instance)
            self._answer_soon([ticket], _RETRY)
        elif self._sock is None:
            self._backlog.append((instance, command, ticket))
            self._backlogged[instance] += 1
        else:
            self._send(instance, command, ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Nobody waits for this request's answer: stop it where it is, if it can be.

        In the backlog: dropped, answered TPM_RC_CANCELED. Sent: the manager is told
        (:data:`~xenvtpm.tpm.XENVTPM_CC_CANCEL`, which it answers nothing), and the ticket
        is answered when the manager answers or drops the command, so that its caller
        knows when the command has left the path.
        """
        if ticket.callback is None:
            return  # answered already
        instance = ticket.instance
        for i, (_, _, queued) in enumerate(self._backlog):
            if queued is ticket:
                del self._backlog[i]
                self._unbacklogged(instance)
                self._answer_soon([ticket], _CANCELED)
                return
        if self._sock is None or ticket not in self._pending.get(instance, ()):
            return
        try:
            self._sock.sendmsg([_INSTANCE_I.pack(instance), _CANCEL])
        except BlockingIOError:
            log.warning("manager is not reading: cancel for instance %d not sent", instance)
        except OSError as e:
            self._disconnect(f"send failed: {e}")

    def outstanding(self, instance: int) -> int:
        """Requests of ``instance`` sent and not answered, or waiting in the backlog."""
        return len(self._pending.get(instance, ())) + self._backlogged.get(instance, 0)

    # -- internals -------------------------------------------------------------------

    def _answer_soon(self, tickets: list[Ticket], response: bytes) -> None:
        """Answer from the loop: never inside request(), whose caller holds no ticket yet."""

        def answer() -> None:
            for ticket in tickets:
                ticket.resolve(response)

        self._loop.call_later(0, answer)

    def _unbacklogged(self, instance: int) -> None:
        self._backlogged[instance] -= 1
        if not self._backlogged[instance]:
            del self._backlogged[instance]

    def _send(self, instance: int, command: bytes, ticket: Ticket) -> None:
        assert self._sock is not None
        queue = self._pending.get(instance)
        try:
            self._sock.sendmsg([_INSTANCE_I.pack(instance), command])
        except BlockingIOError:
            log.warning("manager is not reading: instance %d answered TPM_RC_FAILURE", instance)
            self._answer_soon([ticket], _FAILURE)
            return
        except OSError as e:
            self._answer_soon([ticket], _FAILURE)
            self._disconnect(f"send failed: {e}")
            return
        if queue is None:
            self._pending[instance] = queue = collections.deque()
        queue.append(ticket)

    def _connect(self) -> None:
        self._retry = None
        if self._closed:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            delay = RECONNECT_DELAYS[min(self._attempt, len(RECONNECT_DELAYS) - 1)]
            if self._attempt == 0:
                log.warning("manager at %s unreachable (%s); retrying", self.path, e)
            self._attempt += 1
            self._retry = self._loop.call_later(delay, self._connect)
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.setblocking(False)
        self._sock = sock
        self._attempt = 0
        self._loop.add_reader(sock.fileno(), self._on_readable)
        log.info("connected to the vTPM manager at %s", self.path)
        self._on_up()
        while self._backlog and self._sock is not None:
            instance, command, ticket = self._backlog.popleft()
            self._unbacklogged(instance)
            if ticket.callback is not None:
                self._send(instance, command, ticket)

    def _disconnect(self, why: str) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(sock.fileno())
        sock.close()
        pending, self._pending = self._pending, {}
        failed = [ticket for queue in pending.values() for ticket in queue]
        log.warning(
            "lost the vTPM manager (%s); %d requests answered TPM_RC_FAILURE", why, len(failed)
        )
        self._answer_soon(failed, _FAILURE)
        if not self._closed:
            self._retry = self._loop.call_later(RECONNECT_DELAYS[0], self._connect)

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            n = self._sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._disconnect(str(e))
            return
        if n == 0:
            self._disconnect("manager closed the connection")
            return
        if n < PREFIX_SIZE:
            log.error("manager sent a %d-byte packet: dropped", n)
            return
        view = memoryview(self._buffer)[:n]
        (instance,) = _INSTANCE_I.unpack_from(view)
        queue = self._pending.get(instance)
        if not queue:
            self.dropped_replies += 1
            log.warning("unexpected reply for instance %d: dropped", instance)
            return
        ticket = queue.popleft()  # an empty FIFO stays, for the instance's next request
        response = view[PREFIX_SIZE:]
        try:
            if n > MAX_PACKET:  # the buffer holds one byte more than any legal packet
                raise MalformedMessage(f"reply of more than {MAX_PACKET - PREFIX_SIZE} bytes")
            tpm.validate_response(response)
        except MalformedMessage as e:
            log.error("instance %d: manager sent a malformed response (%s)", instance, e)
            response = memoryview(_FAILURE)
        callback, ticket.callback = ticket.callback, None
        if callback is None:
            self.dropped_replies += 1
        else:
            callback(response)
