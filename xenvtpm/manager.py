"""The vTPM manager: the seed's ``/dev/vtpm``, routing instance-prefixed packets to swtpm.

Backends connect to a unix ``SOCK_SEQPACKET`` socket.  Each message is one packet: a
4-byte big-endian instance id, then one TPM command; each reply carries the same prefix
and one TPM response, and ``4 + responseSize == len(reply)`` always holds.

Routing rules, and why:

- One swtpm per instance, started on the instance's first packet in a worker thread
  (manufacturing takes ~1 s) so that other instances never stall; the worker signals
  completion through a pipe and the instance's packets wait in its queue meanwhile.
- Per instance, commands are strictly FIFO with one in flight (swtpm serves one command
  at a time and does not frame by commandSize).  Every packet of an instance, even one
  the manager answers itself, takes its place in that FIFO, so replies for one instance
  never overtake each other.  Different instances proceed independently.
- A reply goes only to the connection that sent the request, under the prefix of the
  instance the request named: the in-flight record holds both, nothing else does.
- Malformed packets never reach swtpm (it would wait forever on a short header, or read
  a long write as two commands): they get the 10-byte answer swtpm itself would give
  (:func:`xenvtpm.tpm.validate_command`); a command above 4096 bytes (swtpm's
  TPM_PT_MAX_COMMAND_SIZE) gets TPM_RC_COMMAND_SIZE.  A packet shorter than 4 bytes has
  no instance id: it is dropped and logged.  A zero-length packet cannot be told from
  EOF by ``recv`` and closes the connection.
- :data:`xenvtpm.tpm.XENVTPM_CC_BIND` is handled here, never forwarded: binding an
  instance to a different domain than before power-cycles it (ctrl CMD_INIT, then
  TPM2_Startup(CLEAR)) once it has executed commands, so PCRs reset as on a reboot;
  a BIND marked *resumed* (``xl restore``: the same boot goes on) keeps the TPM.
  CMD_INIT takes ~0.15 ms (measured), so it is sent synchronously from the loop, with
  a 5 s timeout; TPM2_Startup goes through the instance's FIFO like any command.
- Bounds (issue 14): per instance, one connection may have at most
  :data:`QUEUE_PER_INSTANCE` commands queued behind the one in flight, and a connection
  at most :data:`UNREAD_REPLIES_MAX` replies it has not read.  The backend's link keeps
  below both (:mod:`xenvtpm.manager_link`); a connection beyond them breaks the protocol
  and is closed, since any answer would break its FIFO matching of replies.  The link
  answers what it had sent TPM_RC_FAILURE and reconnects; a closed connection's queued
  commands are dropped at once.
- :data:`xenvtpm.tpm.XENVTPM_CC_CANCEL` (a guest cancelled its command, or the backend
  gave up on it) is answered nothing, so the backend's FIFO matching is unaffected.
  The connection's commands queued for the instance become TPM_RC_CANCELED answers in
  their FIFO place (payload dropped); if the command in flight came from that
  connection, swtpm is asked to cancel it (``CMD_CANCEL_TPM_CMD``).  swtpm 0.7.1 runs
  its control channel on the thread that runs commands: it answers the cancel only
  after the command, which runs to its end (measured), so the cancelled command is
  answered, and the backend's device slot freed, when swtpm is done with it.
- swtpm death (EOF or error on its data socket), a response that does not parse, or no
  response within ``command_timeout``: the in-flight command gets TPM_RC_FAILURE, swtpm
  is restarted from its state directory, and queued commands continue.  A failed start
  answers the queued commands TPM_RC_FAILURE; a later packet retries.

The loop is single-threaded (``selectors``) with non-blocking sockets; the per-command
path makes no thread hand-off, receives into preallocated buffers, replies with one
``sendmsg([prefix, response])`` and logs nothing unless debug is enabled.

Spec: 000_a1dfc4f903a123f1.txt ("a 4-byte virtual TPM instance identifier is prepended
to each packet ... in network byte order"); DESIGN.md 2, 3.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from queue import SimpleQueue
from types import FrameType

from .errors import InstanceStartError, MalformedMessage, VTPMError
from .manager_client import PREFIX_SIZE, ManagerClient
from .swtpm import Swtpm, SwtpmConfig
from .tpm import (
    HEADER_SIZE,
    MAX_COMMAND_SIZE,
    MAX_RESPONSE_SIZE,
    TPM_RC,
    XENVTPM_CC_BIND,
    XENVTPM_CC_CANCEL,
    MalformedCommand,
    error_response,
    parse_bind_command,
    startup_command,
    success_response,
    validate_command,
    validate_response,
)

__all__ = [
    "InstanceStatus",
    "Manager",
    "ManagerClient",
    "build_parser",
    "main",
    "status_counts",
]

# "xenvtpm.manager" also when run as ``python -m xenvtpm.manager``
log = logging.getLogger("xenvtpm.manager")

_PREFIX_I = struct.Struct(">I")  # instance id, network byte order (seed)
_HEADER_SIZE_AT_2_I = struct.Struct(">I")  # responseSize at offset 2 of the TPM header
_RX_PACKET_BYTES = PREFIX_SIZE + MAX_COMMAND_SIZE + 1  # one more: detects oversize
_FAILURE = error_response(TPM_RC.FAILURE)
_SUCCESS = success_response()
_CANCELED = error_response(TPM_RC.CANCELED)
_STARTUP_CLEAR = startup_command(clear=True)
#: Commands one connection may queue per instance, behind the one in flight: above the
#: backend link's own bound (manager_link.PENDING_PER_INSTANCE, in flight included).
QUEUE_PER_INSTANCE = 4
#: Replies one connection may leave unread (its socket buffer full) before it is closed.
UNREAD_REPLIES_MAX = 4096


class InstanceState(Enum):
    STOPPED = "stopped"  # no swtpm; the next packet starts one
    STARTING = "starting"  # a worker is (re)starting swtpm
    RUNNING = "running"


class _Kind(Enum):
    FORWARD = 1  # a TPM command for swtpm
    REPLY = 2  # answered by the manager itself, in FIFO order (payload is the answer)
    BIND = 3  # XENVTPM_CC_BIND


class _Conn:
    """One backend connection: the socket and the replies it could not take yet."""

    __slots__ = ("closed", "fd", "handler", "out", "sock")

    def __init__(self, sock: socket.socket, handler: Callable[[_Conn, int], None]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.out: deque[bytes] = deque()
        self.closed = False
        self.handler = functools.partial(handler, self)


class _Request:
    __slots__ = ("conn", "domid", "kind", "payload", "resumed")

    def __init__(
        self, conn: _Conn, kind: _Kind, payload: bytes, domid: int = 0, resumed: bool = False
    ) -> None:
        self.conn = conn
        self.kind = kind
        self.payload = payload
        self.domid = domid
        self.resumed = resumed  # BIND: the domain resumes a saved one (keep the TPM)


@dataclass(frozen=True)
class InstanceStatus:
    """What :meth:`Manager.status` reports per instance (for leak counting and logs)."""

    instance: int
    state: str
    pid: int | None
    queued: int
    in_flight: bool
    bound_domid: int | None
    peak: int  # most guest commands (BINDs not counted) held at once, in flight + queued


class _Instance:
    """Routing state of one vTPM instance; all fields belong to the loop thread."""

    def __init__(
        self, instance: int, config: SwtpmConfig, handler: Callable[[_Instance, int], None]
    ) -> None:
        self.id = instance
        self.handler = functools.partial(handler, self)
        self.prefix = _PREFIX_I.pack(instance)
        self.config = config
        self.log = log.getChild(f"instance{instance}")
        self.state = InstanceState.STOPPED
        self.swtpm: Swtpm | None = None
        self.generation = 0  # tags worker results; a stale result is discarded
        self.queue: deque[_Request] = deque()
        self.inflight: _Request | None = None
        self.deadline = 0.0
        self.tx_rest = b""  # unsent tail of the in-flight command (rare)
        self.rx = bytearray(MAX_RESPONSE_SIZE)
        self.rxview = memoryview(self.rx)
        self.rx_len = 0
        self.bound_domid: int | None = None
        self.dirty = False  # commands executed since swtpm (re)started or was reset
        self.peak = 0  # most guest commands held at once (status, leak and abuse checks)

    def count_peak(self) -> None:
        """Note how many guest commands (not BINDs) this instance holds now."""
        held = sum(1 for r in self.queue if r.kind is not _Kind.BIND)
        if self.inflight is not None and self.inflight.kind is not _Kind.BIND:
            held += 1
        self.peak = max(self.peak, held)


class Manager:
    """Accepts backend connections and routes their packets to one swtpm per instance.

    ``start()`` binds the socket; ``serve_forever()`` runs the loop until
    ``request_stop()`` (signal- and thread-safe); ``close()`` stops every swtpm (SIGTERM,
    wait, SIGKILL) and unlinks the socket.  Both are idempotent; use it as a context
    manager.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        state_root: str | os.PathLike[str],
        *,
        swtpm: str = "swtpm",
        swtpm_setup: str = "swtpm_setup",
        command_timeout: float = 60.0,
        start_timeout: float = 120.0,
        max_instances: int = 1024,
        swtpm_log_level: int | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.state_root = Path(state_root).absolute()
        self.config = SwtpmConfig(
            self.state_root,
            swtpm=swtpm,
            swtpm_setup=swtpm_setup,
            start_timeout=start_timeout,
            log_level=swtpm_log_level,
        )
        self.command_timeout = command_timeout
        self.max_instances = max_instances
        self._instances: dict[int, _Instance] = {}
        self._busy: set[_Instance] = set()  # instances with a command in flight
        self._sel: selectors.DefaultSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._done: SimpleQueue[tuple[int, int, Swtpm | None, BaseException | None]]
        self._done = SimpleQueue()
        self._threads: set[threading.Thread] = set()  # loop thread only
        self._wake_lock = threading.RLock()  # re-entrant: signal handlers wake too
        self._rx = bytearray(_RX_PACKET_BYTES)
        self._rxview = memoryview(self._rx)
        self._stop = False
        self._started = False
        self._closed = False
        self._status_requested = False
        self._debug = log.isEnabledFor(logging.DEBUG)

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Manager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the state root and bind the listening socket (mode 0600).

        Idempotent; a failed start rolls back.  Raises :class:`VTPMError` if another
        manager already serves the socket path.
        """
        if self._started:
            return
        try:
            self.state_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._sel = selectors.DefaultSelector()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
            self._listener = self._bind()
            self._sel.register(self._listener, selectors.EVENT_READ, self._on_accept)
        except BaseException:
            self.close()
            raise
        self._started = True
        self._debug = log.isEnabledFor(logging.DEBUG)
        log.info("listening on %s, state root %s", self.socket_path, self.state_root)

    def _bind(self) -> socket.socket:
        path = str(self.socket_path)
        if self.socket_path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
            except OSError:
                self.socket_path.unlink()  # stale: nobody serves it
            else:
                raise VTPMError(f"another manager already serves {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o177)  # the socket is born 0600: no window for others
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def request_stop(self) -> None:
        """Ask the loop to return; safe from signal handlers and other threads."""
        self._stop = True
        self._wake()

    def request_status(self) -> None:
        """Ask the loop to log :meth:`status` (SIGUSR1)."""
        self._status_requested = True
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock, contextlib.suppress(OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"\0")

    def close(self) -> None:
        """Stop accepting, stop every swtpm (soft, then hard), unlink the socket."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self._instances:
            log.info("stopping: %s", self._status_line())
        swtpms = [i.swtpm for i in self._instances.values() if i.swtpm is not None]
        for s in swtpms:
            s.terminate()  # all at once: channels closed, SIGTERM
        for s in swtpms:
            s.close()  # waits, SIGKILL after stop_timeout
        for t in list(self._threads):  # workers see _closing and roll back quickly
            t.join(self.config.start_timeout)
        while not self._done.empty():
            _, _, late, _ = self._done.get()
            if late is not None:
                late.close()
        if self._sel is not None:
            for key in list(self._sel.get_map().values()):
                if isinstance(key.fileobj, socket.socket) and key.fileobj is not self._listener:
                    key.fileobj.close()
            self._sel.close()
        with self._wake_lock:  # a late worker must never write to a reused fd
            fds = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = -1
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    # -- status -----------------------------------------------------------------------

    def status(self) -> list[InstanceStatus]:
        """Instances, their state and swtpm pid (loop thread, or when stopped)."""
        return [
            InstanceStatus(
                i.id,
                i.state.value,
                i.swtpm.pid if i.swtpm is not None and i.state is not InstanceState.STOPPED
                else None,
                len(i.queue),
                i.inflight is not None,
                i.bound_domid,
                i.peak,
            )
            for i in self._instances.values()
        ]  # fmt: skip

    def _status_line(self) -> str:
        parts = [
            f"{s.instance}:{s.state}:pid={s.pid}:queued={s.queued}:in_flight={int(s.in_flight)}"
            f":peak={s.peak}"
            for s in self.status()
        ]
        return f"{len(parts)} instance(s) " + " ".join(parts)

    # -- loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run the event loop until :meth:`request_stop`."""
        self.start()
        sel = self._sel
        assert sel is not None
        while not self._stop:
            timeout = None
            if self._busy:
                now = time.monotonic()
                timeout = max(min(i.deadline for i in self._busy) - now, 0.0)
            ready = sel.select(timeout)
            registered = sel.get_map()
            for key, mask in ready:
                # an earlier callback of this batch may have torn this channel down (a
                # swtpm restarted): its readiness is stale, and acting on it would crash
                if registered.get(key.fd) is key:
                    key.data(mask)
            if self._busy:
                now = time.monotonic()
                for inst in [i for i in self._busy if i.deadline <= now]:
                    inst.log.error("no response in %.1f s: restarting swtpm", self.command_timeout)
                    self._swtpm_failed(inst)

    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 512)
        while not self._done.empty():
            self._on_started(*self._done.get())
        if self._status_requested:
            self._status_requested = False
            log.info("status: %s", self._status_line())

    def _on_accept(self, mask: int) -> None:
        assert self._listener is not None and self._sel is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            conn = _Conn(sock, self._on_conn_event)
            self._sel.register(sock, selectors.EVENT_READ, conn.handler)
            log.debug("backend connected (fd %d)", conn.fd)

    # -- backend connections ----------------------------------------------------------

    def _on_conn_event(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._read_packets(conn)

    def _read_packets(self, conn: _Conn) -> None:
        rx, mv = self._rx, self._rxview
        for _ in range(64):  # bounded: one busy backend cannot starve the others
            try:
                n = conn.sock.recv_into(rx, len(rx), socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("backend connection failed: %s", exc)
                self._close_conn(conn)
                return
            if n == 0:
                self._close_conn(conn)
                return
            self._on_packet(conn, mv, n)

    def _on_packet(self, conn: _Conn, mv: memoryview, n: int) -> None:
        if n < PREFIX_SIZE:
            log.warning("dropped a %d-byte packet: no instance id", n)
            return
        (instance,) = _PREFIX_I.unpack_from(mv)
        end = min(n, _RX_PACKET_BYTES)  # n > buffer: truncated, so > MAX_COMMAND_SIZE
        command = mv[PREFIX_SIZE:end]
        try:
            header = validate_command(command, max_size=MAX_COMMAND_SIZE)
            if header.code == XENVTPM_CC_CANCEL:
                if len(command) != HEADER_SIZE:
                    raise MalformedCommand(TPM_RC.VALUE, "not a well-formed XENVTPM_CC_CANCEL")
                self._cancel(conn, instance)
                return  # no answer: it is no request
            if header.code == XENVTPM_CC_BIND:
                domid, resumed = parse_bind_command(command)
                req = _Request(conn, _Kind.BIND, b"", domid, resumed)
            else:
                req = None
        except MalformedCommand as exc:
            if self._debug:
                log.debug("instance %d: malformed command (%s)", instance, exc)
            req = _Request(conn, _Kind.REPLY, error_response(exc.rc))
        inst = self._instances.get(instance)
        if req is not None and req.kind is _Kind.REPLY:
            if inst is None or (inst.inflight is None and not inst.queue):
                # nothing of this instance is pending: answer now, start nothing
                self._reply(conn, _PREFIX_I.pack(instance), req.payload)
                return
        elif inst is None:
            if len(self._instances) >= self.max_instances:
                log.error("instance %d refused: %d instances", instance, self.max_instances)
                self._reply(conn, _PREFIX_I.pack(instance), _FAILURE)
                return
            inst = _Instance(instance, self.config, self._on_swtpm_event)
            self._instances[instance] = inst
        assert inst is not None
        if self._debug:
            log.debug("instance %d: %d-byte command", instance, end - PREFIX_SIZE)
        if (
            req is None
            and inst.inflight is None
            and not inst.queue
            and inst.state is InstanceState.RUNNING
        ):
            # fast path: idle instance, send straight from the receive buffer
            self._send_command(inst, _Request(conn, _Kind.FORWARD, b""), command)
            inst.peak = max(inst.peak, 1)
            return
        if sum(1 for r in inst.queue if r.conn is conn) >= QUEUE_PER_INSTANCE:
            log.error(
                "backend fd %d queued more than %d commands for instance %d: disconnected",
                conn.fd,
                QUEUE_PER_INSTANCE,
                instance,
            )
            self._close_conn(conn)
            return
        if req is None:
            req = _Request(conn, _Kind.FORWARD, bytes(command))
        inst.queue.append(req)
        inst.count_peak()
        if inst.state is InstanceState.STOPPED:
            self._start_instance(inst, None)
        elif inst.state is InstanceState.RUNNING and inst.inflight is None:
            self._pump(inst)

    def _cancel(self, conn: _Conn, instance: int) -> None:
        """XENVTPM_CC_CANCEL from ``conn``: its queued commands for ``instance`` become
        TPM_RC_CANCELED in their place; its command in flight is cancelled in swtpm."""
        inst = self._instances.get(instance)
        if inst is None:
            return
        for queued in inst.queue:
            if queued.conn is conn and queued.kind is _Kind.FORWARD:
                queued.kind, queued.payload = _Kind.REPLY, _CANCELED
        running = inst.inflight
        if running is not None and running.conn is conn and running.kind is _Kind.FORWARD:
            self._cancel_in_flight(inst)

    def _cancel_in_flight(self, inst: _Instance) -> None:
        """Ask swtpm to stop the command it runs (ctrl ``CMD_CANCEL_TPM_CMD``).

        Its answer still comes through the data channel and goes to the backend like any
        (the backend drops it and frees the guest's slot).  Not wired yet: it needs the
        asynchronous control channel (a hung swtpm must not block this loop); swtpm
        0.7.1 would not shorten the command anyway (module docstring).
        """
        if self._debug:
            inst.log.debug("cancel of the command in flight requested")

    def _reply(self, conn: _Conn, prefix: bytes, payload: bytes | memoryview) -> None:
        if conn.closed:
            return
        if len(conn.out) >= UNREAD_REPLIES_MAX:
            log.error("backend fd %d left %d replies unread: disconnected", conn.fd, len(conn.out))
            self._close_conn(conn)
            return
        if conn.out:
            conn.out.append(prefix + bytes(payload))
            return
        try:
            conn.sock.sendmsg([prefix, payload])
        except (BlockingIOError, InterruptedError):
            conn.out.append(prefix + bytes(payload))
            assert self._sel is not None
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn.handler)
        except OSError as exc:
            log.info("backend connection failed on reply: %s", exc)
            self._close_conn(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                conn.sock.send(conn.out[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("backend connection failed on reply: %s", exc)
                self._close_conn(conn)
                return
            conn.out.popleft()
        assert self._sel is not None
        self._sel.modify(conn.sock, selectors.EVENT_READ, conn.handler)

    def _close_conn(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True  # its queued requests are skipped, its replies dropped
        assert self._sel is not None
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()
        conn.out.clear()
        for inst in self._instances.values():  # its queued commands go at once
            if any(r.conn is conn for r in inst.queue):
                inst.queue = deque(r for r in inst.queue if r.conn is not conn)
        log.debug("backend disconnected (fd %d)", conn.fd)

    # -- instances --------------------------------------------------------------------

    def _pump(self, inst: _Instance) -> None:
        """Serve the head of the queue until a command is in flight or it is empty."""
        while inst.inflight is None and inst.queue and inst.state is InstanceState.RUNNING:
            req = inst.queue.popleft()
            if req.conn.closed:
                continue
            if req.kind is _Kind.REPLY:
                self._reply(req.conn, inst.prefix, req.payload)
            elif req.kind is _Kind.BIND:
                self._bind_instance(inst, req)
            else:
                self._send_command(inst, req, req.payload)

    def _bind_instance(self, inst: _Instance, req: _Request) -> None:
        if req.domid == inst.bound_domid or not inst.dirty or req.resumed:
            if req.resumed and req.domid != inst.bound_domid:
                inst.log.info(
                    "bound to domain %d, which resumes domain %s: TPM kept",
                    req.domid,
                    inst.bound_domid,
                )
            elif req.domid != inst.bound_domid:
                inst.log.info("bound to domain %d (fresh TPM)", req.domid)
            inst.bound_domid = req.domid
            self._reply(req.conn, inst.prefix, _SUCCESS)
            return
        inst.log.info(
            "bound to domain %d (was %s): power-cycling the TPM", req.domid, inst.bound_domid
        )
        assert inst.swtpm is not None
        try:
            inst.swtpm.ctrl_init()
        except VTPMError as exc:
            inst.log.error("%s: restarting swtpm", exc)
            inst.inflight = req  # answered TPM_RC_FAILURE by the restart
            self._swtpm_failed(inst)
            return
        self._send_command(inst, req, _STARTUP_CLEAR)  # completes in _on_response

    def _send_command(self, inst: _Instance, req: _Request, command: bytes | memoryview) -> None:
        assert inst.swtpm is not None and inst.swtpm.data is not None
        inst.inflight = req
        inst.rx_len = 0
        inst.deadline = time.monotonic() + self.command_timeout
        self._busy.add(inst)
        if req.kind is _Kind.FORWARD:
            inst.dirty = True
        try:
            sent = inst.swtpm.data.send(command)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            inst.log.error("swtpm data channel failed on send: %s", exc)
            self._swtpm_failed(inst)
            return
        if sent < len(command):  # rare: the socket buffer is full; finish on EVENT_WRITE
            inst.tx_rest = bytes(command[sent:])
            self._watch_swtpm(inst, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _watch_swtpm(self, inst: _Instance, events: int) -> None:
        assert self._sel is not None and inst.swtpm is not None and inst.swtpm.data is not None
        self._sel.modify(inst.swtpm.data, events, inst.handler)

    def _on_swtpm_event(self, inst: _Instance, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and inst.tx_rest:
            assert inst.swtpm is not None and inst.swtpm.data is not None
            try:
                sent = inst.swtpm.data.send(inst.tx_rest)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                inst.log.error("swtpm data channel failed on send: %s", exc)
                self._swtpm_failed(inst)
                return
            inst.tx_rest = inst.tx_rest[sent:]
            if not inst.tx_rest:
                self._watch_swtpm(inst, selectors.EVENT_READ)
        if mask & selectors.EVENT_READ:
            self._read_response(inst)

    def _read_response(self, inst: _Instance) -> None:
        if inst.swtpm is None or inst.swtpm.data is None:
            return  # torn down since the event was reported
        try:
            n = inst.swtpm.data.recv_into(inst.rxview[inst.rx_len :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            inst.log.error("swtpm data channel failed: %s", exc)
            self._swtpm_failed(inst)
            return
        if n == 0:
            inst.log.error("swtpm pid %s closed its data channel", inst.swtpm.pid)
            self._swtpm_failed(inst)
            return
        if inst.inflight is None:
            inst.log.error("swtpm sent %d unsolicited bytes: restarting it", n)
            self._swtpm_failed(inst)
            return
        inst.rx_len += n
        if inst.rx_len < HEADER_SIZE:
            return
        (size,) = _HEADER_SIZE_AT_2_I.unpack_from(inst.rx, 2)
        if inst.rx_len < size <= MAX_RESPONSE_SIZE:
            return  # more to come
        if size < HEADER_SIZE or size > MAX_RESPONSE_SIZE or inst.rx_len > size:
            inst.log.error("swtpm response framing broken (size %d, %d bytes)", size, inst.rx_len)
            self._swtpm_failed(inst)  # the stream cannot be resynchronised
            return
        self._on_response(inst, inst.rxview[:size])

    def _on_response(self, inst: _Instance, response: memoryview) -> None:
        req = inst.inflight
        assert req is not None
        inst.inflight = None
        inst.rx_len = 0
        self._busy.discard(inst)
        try:
            header = validate_response(response)
        except MalformedMessage as exc:
            inst.log.error("unparseable swtpm response (%s): answering TPM_RC_FAILURE", exc)
            response = memoryview(_FAILURE)
        else:
            if req.kind is _Kind.BIND:
                if header.code == TPM_RC.SUCCESS:
                    inst.bound_domid = req.domid
                    inst.dirty = False
                    response = memoryview(_SUCCESS)
                else:
                    inst.log.error("Startup(CLEAR) after CMD_INIT: 0x%x", header.code)
                    response = memoryview(_FAILURE)
        self._reply(req.conn, inst.prefix, response)
        if inst.queue:
            self._pump(inst)

    def _swtpm_failed(self, inst: _Instance) -> None:
        """swtpm died, hung or broke framing: fail the command in flight, restart swtpm."""
        req = inst.inflight
        inst.inflight = None
        inst.tx_rest = b""
        inst.rx_len = 0
        self._busy.discard(inst)
        if req is not None:
            self._reply(req.conn, inst.prefix, _FAILURE)
        old = inst.swtpm
        if old is not None and old.data is not None and self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(old.data)
        self._start_instance(inst, old)

    def _start_instance(self, inst: _Instance, old: Swtpm | None) -> None:
        """(Re)start swtpm in a worker thread; the loop hears back through the pipe."""
        inst.state = InstanceState.STARTING
        inst.generation += 1
        inst.swtpm = Swtpm(inst.id, self.config)
        if self._closed or self._stop:
            return
        self._threads = {t for t in self._threads if t.is_alive()}
        t = threading.Thread(
            target=self._worker,
            args=(inst.id, inst.generation, inst.swtpm, old),
            name=f"swtpm-start-{inst.id}",
            daemon=True,
        )
        self._threads.add(t)
        t.start()

    def _worker(self, instance: int, generation: int, new: Swtpm, old: Swtpm | None) -> None:
        err: BaseException | None = None
        try:
            if old is not None:
                old.close()
            new.start()
        except BaseException as exc:  # reported to the loop, which logs it
            err = exc
        finally:
            self._done.put((instance, generation, None if err else new, err))
            self._wake()

    def _on_started(
        self, instance: int, generation: int, swtpm: Swtpm | None, err: BaseException | None
    ) -> None:
        inst = self._instances.get(instance)
        if inst is None or generation != inst.generation or self._closed:
            if swtpm is not None:
                swtpm.close()
            return
        if swtpm is None or err is not None:
            inst.state = InstanceState.STOPPED
            if isinstance(err, InstanceStartError):
                inst.log.error("%s", err)
            else:
                inst.log.error("start failed: %r", err)
            while inst.queue:
                req = inst.queue.popleft()
                answer = req.payload if req.kind is _Kind.REPLY else _FAILURE
                self._reply(req.conn, inst.prefix, answer)
            return
        assert swtpm.data is not None and self._sel is not None
        swtpm.data.setblocking(False)
        self._sel.register(swtpm.data, selectors.EVENT_READ, inst.handler)
        inst.state = InstanceState.RUNNING
        inst.dirty = False
        self._pump(inst)


def status_counts(line: str, instance: int) -> dict[str, int] | None:
    """``queued``, ``in_flight`` and ``peak`` of ``instance`` in a logged status line
    (SIGUSR1), for tests and operators; None if the line does not name it."""
    for part in line.split():
        if part.startswith(f"{instance}:"):
            fields = dict(f.split("=", 1) for f in part.split(":")[2:] if "=" in f)
            return {k: int(v) for k, v in fields.items() if k != "pid"}
    return None


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m xenvtpm manager`` (everything after ``manager``)."""
    p = argparse.ArgumentParser(
        prog="xenvtpm manager",
        description="vTPM manager: route instance-prefixed TPM packets to one swtpm each.",
    )
    p.add_argument("--socket", required=True, help="SOCK_SEQPACKET path to listen on")
    p.add_argument("--state-root", required=True, help="directory of per-instance state")
    p.add_argument("--swtpm", default="swtpm", help="swtpm executable (default: %(default)s)")
    p.add_argument("--swtpm-setup", default="swtpm_setup", help="swtpm_setup executable")
    p.add_argument(
        "--command-timeout",
        type=float,
        default=60.0,
        help="seconds before a silent swtpm is restarted (default: %(default)s)",
    )
    p.add_argument("--max-instances", type=int, default=1024, help="instances served at most")
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the manager until SIGTERM/SIGINT; exit 0 after a clean shutdown."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("xenvtpm").setLevel(args.log_level)
    manager = Manager(
        args.socket,
        args.state_root,
        swtpm=args.swtpm,
        swtpm_setup=args.swtpm_setup,
        command_timeout=args.command_timeout,
        max_instances=args.max_instances,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        manager.request_stop()

    def status(signum: int, frame: FrameType | None) -> None:
        manager.request_status()

    previous = {
        sig: signal.signal(sig, handler)
        for sig, handler in (
            (signal.SIGTERM, stop),
            (signal.SIGINT, stop),
            (signal.SIGUSR1, status),
        )
    }
    try:
        try:
            manager.start()
        except (OSError, VTPMError) as exc:
            log.error("cannot start: %s", exc)
            return 1
        manager.serve_forever()
    finally:
        manager.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
