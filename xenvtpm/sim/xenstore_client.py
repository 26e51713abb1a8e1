"""A xenstore client over a stream socket: the simulated daemon or a real xenstored.

One reader thread owns the socket's receive side: it routes each reply to the waiter
registered under its req_id and queues watch events, signalling them through a pipe whose
read end is ``fileno()`` (like libxenstore's xs_fileno). Every request has a timeout, and
a reader that dies fails every waiter with ChannelClosed. Spec: xs_wire.h; xs.c.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import socket
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self, TypeVar

from xenvtpm.errors import ChannelClosed, MalformedMessage, XenStoreError
from xenvtpm.sim.xenstore_wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    XsHeader,
    XsPacket,
    XsType,
    check_reply,
    encode_write,
    join_strings,
    split_strings,
)
from xenvtpm.xen.interface import MAX_WATCH_BATCH, Perm, WatchEvent

log = logging.getLogger(__name__)

XENSTORED_SOCKET = "/run/xenstored/socket"
DEFAULT_TIMEOUT = 10.0
T = TypeVar("T")


class _Waiter:
    """One outstanding request: the reader fills in ``reply`` or ``error``."""

    __slots__ = ("done", "error", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: XsPacket | None = None
        self.error: BaseException | None = None


class XenStoreClient:
    """Implements ``interface.XenStore`` over one connected ``SOCK_STREAM`` socket."""

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._sock = sock
        self.timeout = timeout
        self._lock = threading.Lock()  # guards the fields below and serialises sends
        self._waiters: dict[int, _Waiter] = {}
        self._events: collections.deque[WatchEvent] = collections.deque()
        self._next_req = 1
        self._dead: BaseException | None = None
        self._started = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._watch_r, self._watch_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # --- construction and lifecycle ----------------------------------------------------

    @classmethod
    def open_unix(cls, path: str = XENSTORED_SOCKET, *, timeout: float = DEFAULT_TIMEOUT) -> Self:
        """Connect to a xenstored unix socket (real or simulated) and start reading."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        client = cls(sock, timeout=timeout)
        client.start()
        return client

    @classmethod
    def from_fd(cls, fd: int, *, timeout: float = DEFAULT_TIMEOUT) -> Self:
        """Adopt an inherited, already connected descriptor (a simulated guest's)."""
        client = cls(socket.socket(fileno=fd), timeout=timeout)
        client.start()
        return client

    def start(self) -> None:
        """Start the reader thread. Idempotent."""
        with self._lock:
            if self._started:
                return
            if self._closed:
                raise ChannelClosed("xenstore client is closed")
            # A timeout (internally non-blocking) bounds sends; the reader only recv()s
            # after select() said readable, so it never waits in recv.
            self._sock.settimeout(self.timeout)
            self._thread = threading.Thread(
                target=self._reader, name=f"xenstore-reader-{self._sock.fileno()}", daemon=True
            )
            self._thread.start()
            self._started = True

    def close(self) -> None:
        """Stop the reader, fail waiters, close the socket and pipes. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        os.write(self._stop_w, b"x")
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._fail_all(ChannelClosed("xenstore client closed"))
        self._sock.close()
        for fd in (self._watch_r, self._watch_w, self._stop_r, self._stop_w):
            os.close(fd)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the reader --------------------------------------------------------------------

    def _reader(self) -> None:
        buf = bytearray()
        error: BaseException = ChannelClosed("xenstore connection closed by peer")
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self._sock, selectors.EVENT_READ)
                sel.register(self._stop_r, selectors.EVENT_READ)
                while True:
                    ready = {key.fd for key, _ in sel.select()}
                    if self._stop_r in ready:
                        return
                    try:
                        data = self._sock.recv(65536)
                    except (BlockingIOError, TimeoutError):
                        continue
                    if not data:
                        break
                    buf += data
                    while len(buf) >= HEADER_SIZE:
                        header = XsHeader.from_bytes(buf)
                        end = HEADER_SIZE + header.length
                        if len(buf) < end:
                            break
                        self._route(XsPacket.from_bytes(memoryview(buf)[:end]))
                        del buf[:end]
        except MalformedMessage as exc:
            log.error("xenstore sent a malformed message: %s", exc)
            error = ChannelClosed(f"xenstore connection dropped: {exc}")
        except OSError as exc:
            error = ChannelClosed(f"xenstore connection failed: {exc}")
        except BaseException as exc:  # the reader must never die silently
            log.exception("xenstore reader crashed")
            error = ChannelClosed(f"xenstore reader crashed: {exc!r}")
        self._fail_all(error)

    def _route(self, packet: XsPacket) -> None:
        if packet.type is XsType.XS_WATCH_EVENT:
            parts = split_strings(packet.payload)
            if len(parts) < 2:
                raise MalformedMessage(f"watch event with {len(parts)} strings")
            with self._lock:
                self._events.append(WatchEvent(parts[0], parts[1]))
                self._signal()
            return
        with self._lock:
            waiter = self._waiters.pop(packet.req_id, None)
        if waiter is None:
            log.warning("xenstore reply to unknown req_id %d dropped", packet.req_id)
            return
        waiter.reply = packet
        waiter.done.set()

    def _signal(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full pipe: already readable
            os.write(self._watch_w, b"w")

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = error
            waiters, self._waiters = self._waiters, {}
            if not self._closed:
                self._signal()  # wake pollers: read_watches() will raise
        for waiter in waiters.values():
            waiter.error = error
            waiter.done.set()

    # --- requests ----------------------------------------------------------------------

    def _request(
        self, type_: XsType, payload: bytes, op: str, path: str = "", tx: int = 0
    ) -> bytes:
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise XenStoreError("E2BIG", op, path)
        self.start()
        waiter = _Waiter()
        send_error: OSError | None = None
        with self._lock:
            if self._dead is not None:
                raise ChannelClosed(f"xenstore {op}: connection is gone") from self._dead
            req_id = self._next_req
            self._next_req = self._next_req % 0xFFFFFFFF + 1
            self._waiters[req_id] = waiter  # registered before sending: no lost reply
            try:
                self._sock.sendall(XsPacket(type_, req_id, tx, payload).to_bytes())
            except OSError as exc:
                self._waiters.pop(req_id, None)
                send_error = exc
        if send_error is not None:
            # A partial send leaves the stream unframed: the connection is unusable.
            self._fail_all(ChannelClosed(f"xenstore send failed: {send_error}"))
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            raise ChannelClosed(f"xenstore {op}: send failed: {send_error}") from send_error
        if not waiter.done.wait(self.timeout):
            with self._lock:
                self._waiters.pop(req_id, None)
            raise XenStoreError("ETIMEDOUT", op, path)
        if waiter.error is not None:
            raise ChannelClosed(f"xenstore {op} {path!r}: {waiter.error}") from waiter.error
        assert waiter.reply is not None
        return check_reply(waiter.reply, op, path)

    def read(self, path: str, tx: int = 0) -> bytes:
        return self._request(XsType.XS_READ, join_strings(path), "read", path, tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        self._request(XsType.XS_WRITE, encode_write(path, raw), "write", path, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self._request(XsType.XS_MKDIR, join_strings(path), "mkdir", path, tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self._request(XsType.XS_RM, join_strings(path), "rm", path, tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        reply = self._request(XsType.XS_DIRECTORY, join_strings(path), "directory", path, tx)
        return [name for name in split_strings(reply) if name]  # tolerate b"\0" for none

    def get_perms(self, path: str, tx: int = 0) -> list[Perm]:
        reply = self._request(XsType.XS_GET_PERMS, join_strings(path), "get_perms", path, tx)
        return [Perm.from_wire(p) for p in split_strings(reply)]

    def set_perms(self, path: str, perms: Sequence[Perm], tx: int = 0) -> None:
        payload = join_strings(path, *(p.to_wire() for p in perms))
        self._request(XsType.XS_SET_PERMS, payload, "set_perms", path, tx)

    def get_domain_path(self, domid: int) -> str:
        reply = self._request(
            XsType.XS_GET_DOMAIN_PATH, join_strings(str(domid)), "get_domain_path"
        )
        return reply.rstrip(b"\x00").decode()

    def transaction_start(self) -> int:
        reply = self._request(XsType.XS_TRANSACTION_START, b"\x00", "transaction_start")
        return int(reply.rstrip(b"\x00"))

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        try:
            arg = join_strings("T" if commit else "F")
            self._request(XsType.XS_TRANSACTION_END, arg, "transaction_end", tx=tx)
        except XenStoreError as exc:
            if exc.errno_name == "EAGAIN":
                return False
            raise
        return True

    def transact(self, body: Callable[[int], T], *, attempts: int = 16) -> T:
        """Run ``body(tx)`` in a transaction, retrying on EAGAIN; abort if it raises."""
        for _ in range(attempts):
            tx = self.transaction_start()
            try:
                result = body(tx)
            except BaseException:
                try:
                    self.transaction_end(tx, commit=False)
                except (XenStoreError, ChannelClosed):
                    log.debug("abort of transaction %d failed", tx, exc_info=True)
                raise
            if self.transaction_end(tx, commit=True):
                return result
        raise XenStoreError("EAGAIN", "transaction", f"{attempts} attempts")

    # --- watches -----------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        self._request(XsType.XS_WATCH, join_strings(path, token), "watch", path)

    def unwatch(self, path: str, token: str) -> None:
        self._request(XsType.XS_UNWATCH, join_strings(path, token), "unwatch", path)

    def fileno(self) -> int:
        """Readable while watch events wait (or once the connection died)."""
        return self._watch_r

    def read_watches(self) -> list[WatchEvent]:
        """The oldest ``MAX_WATCH_BATCH`` queued watch events at most; ``fileno()`` stays
        readable while more wait. ChannelClosed if none and the connection is gone."""
        with self._lock:
            if self._closed:
                raise ChannelClosed("xenstore client is closed")
            queue = self._events
            events = [queue.popleft() for _ in range(min(len(queue), MAX_WATCH_BATCH))]
            if not events and self._dead is not None:
                raise ChannelClosed("xenstore connection is gone") from self._dead
            if not queue:  # each event queued wrote a byte: quiet only once all are taken
                try:
                    while os.read(self._watch_r, 4096):
                        pass
                except BlockingIOError:
                    pass
        return events
