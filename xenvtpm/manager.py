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
  :data:`xenvtpm.tpm.XENVTPM_CC_RESET` (an operator's) power-cycles it too. Control
  requests never block the loop (:mod:`xenvtpm.swtpm_control`): a hung swtpm stalls
  only its own instance.
- A running guest's TPM never silently resets (:mod:`xenvtpm.continuity`). A planned
  stop (SIGTERM) lets the commands in flight finish, then saves every swtpm's volatile
  state, which the next manager restores once. swtpm death (EOF or error on its data
  socket), a response that does not parse, or no response within ``command_timeout``
  loses that state: the in-flight command gets TPM_RC_FAILURE, swtpm is restarted
  from its state directory, and the instance answers in failure mode
  (:mod:`xenvtpm.failure_mode`) until its domain reboots or an operator resets it.
  A failed start answers the queued commands TPM_RC_FAILURE; a later packet retries.
- Acknowledged NV is on disk: when a command changed swtpm's state file, the file and
  its directory are fsync'ed before the answer goes back (swtpm 0.7.1 has no fsync of
  its own); so are they before the first answer after each swtpm start (manufacturing
  wrote them without fsync).

The loop is single-threaded (``selectors``) with non-blocking sockets; the per-command
path makes no thread hand-off, receives into preallocated buffers, replies with one
``sendmsg([prefix, response])`` and logs nothing unless debug is enabled.

Spec: 000_a1dfc4f903a123f1.txt ("a 4-byte virtual TPM instance identifier is prepended
to each packet ... in network byte order"); DESIGN.md 2, 3.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
import time
from pathlib import Path

from . import failure_mode
from .continuity import BOOT_ID_FILE, Continuity, read_boot_id
from .durability import Signature, StateFileWatch, Syncer
from .errors import InstanceStartError, MalformedMessage, VTPMError
from .manager_client import PREFIX_SIZE, ManagerClient
from .manager_instance import (
    PREFIX_I,
    Conn,
    Instance,
    InstanceState,
    InstanceStatus,
    Kind,
    Request,
)
from .swtpm import PTM_CMD, Swtpm, SwtpmConfig
from .swtpm_control import RESULT_SIZE, ControlChannel, store_volatile
from .swtpm_starter import Started, SwtpmStarter
from .tpm import (
    HEADER_SIZE,
    MAX_COMMAND_SIZE,
    MAX_RESPONSE_SIZE,
    TPM_RC,
    XENVTPM_CC_BIND,
    XENVTPM_CC_RESET,
    MalformedCommand,
    error_response,
    parse_bind_command,
    startup_command,
    success_response,
    validate_command,
    validate_response,
)

__all__ = ["InstanceStatus", "Manager", "ManagerClient"]

log = logging.getLogger("xenvtpm.manager")

_HEADER_SIZE_AT_2_I = struct.Struct(">I")  # responseSize at offset 2 of the TPM header
_RX_PACKET_BYTES = PREFIX_SIZE + MAX_COMMAND_SIZE + 1  # one more: detects oversize
_FAILURE = error_response(TPM_RC.FAILURE)
_SUCCESS = success_response()
_STARTUP_CLEAR = startup_command(clear=True)
_CTRL_INIT_FLAGS_I = struct.Struct(">I")  # struct ptm_init: init_flags (tpm_ioctl.h)
#: A planned stop waits this long for commands in flight, then for the volatile saves.
DRAIN_TIMEOUT = 10.0


class Manager:
    """Accepts backend connections and routes their packets to one swtpm per instance.

    ``start()`` binds the socket; ``serve_forever()`` runs the loop until
    ``request_stop()`` (signal- and thread-safe), letting the commands in flight finish;
    ``close()`` saves every swtpm's volatile state (a planned stop), stops every swtpm
    (SIGTERM, wait, SIGKILL) and unlinks the socket. Both are idempotent; use it as a
    context manager.
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
        boot_id_file: str | os.PathLike[str] = BOOT_ID_FILE,
        durable: bool = True,
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
        self.boot_id_file = boot_id_file
        self.boot_id = ""
        self.durable = durable
        self._instances: dict[int, Instance] = {}
        self._busy: set[Instance] = set()  # a command in flight in swtpm (data deadline)
        self._controlling: set[Instance] = set()  # a control request in flight
        self._sel: selectors.DefaultSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._starter = SwtpmStarter(self._wake)
        self._syncer = Syncer(self._wake)
        self._wake_lock = threading.RLock()  # re-entrant: signal handlers wake too
        self._rx = bytearray(_RX_PACKET_BYTES)
        self._rxview = memoryview(self._rx)
        self._stop = False
        self._drain_deadline: float | None = None
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
            self.boot_id = read_boot_id(self.boot_id_file)
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
        """Ask the loop to return once the commands in flight are answered (a planned
        stop); safe from signal handlers and other threads."""
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
        """Save each swtpm's volatile state, stop every swtpm, unlink the socket."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self._instances:
            self._save_volatile_states(time.monotonic() + DRAIN_TIMEOUT)
            log.info("stopping: %s", self._status_line())
        swtpms = [i.swtpm for i in self._instances.values() if i.swtpm is not None]
        for s in swtpms:
            s.terminate()  # all at once: channels closed, SIGTERM
        for s in swtpms:
            s.close()  # waits, SIGKILL after stop_timeout
        self._starter.close(self.config.start_timeout)
        self._syncer.close()
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

    def _save_volatile_states(self, deadline: float) -> None:
        """A planned stop: every idle, healthy swtpm saves its volatile state; each one
        saved in time is recorded so, and the next manager restores it (continuity.py).
        One not saved in time is restored by nobody: its domain finds it in failure
        mode, never reset."""
        idle = {}
        for inst in self._instances.values():
            if inst.state is not InstanceState.RUNNING or inst.control is None or inst.failed:
                continue
            if inst.inflight is not None:
                inst.log.error("a command still in flight at stop: volatile state not saved")
                continue
            idle[inst.id] = inst.control
        for instance in store_volatile(idle, deadline):
            self._instances[instance].record(saved=True)
            self._instances[instance].log.info("volatile state saved for the next manager")

    # -- status -----------------------------------------------------------------------

    def status(self) -> list[InstanceStatus]:
        """Instances, their state and swtpm pid (loop thread, or when stopped)."""
        return [i.status() for i in self._instances.values()]

    def _status_line(self) -> str:
        parts = [
            f"{s.instance}:{s.state}:pid={s.pid}" + (":FAILED" if s.failed else "")
            for s in self.status()
        ]
        return f"{len(parts)} instance(s) " + " ".join(parts)

    # -- loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run the event loop until :meth:`request_stop`, then drain (bounded)."""
        self.start()
        sel = self._sel
        assert sel is not None
        while True:
            if self._stop and self._drained():
                break
            ready = sel.select(self._next_timeout())
            registered = sel.get_map()
            for key, mask in ready:
                # an earlier callback of this batch may have torn this channel down (a
                # swtpm restarted): its readiness is stale, and acting on it would crash
                if registered.get(key.fd) is key:
                    key.data(mask)
            self._expire(time.monotonic())

    def _drained(self) -> bool:
        now = time.monotonic()
        if self._drain_deadline is None:
            self._drain_deadline = now + DRAIN_TIMEOUT
        if now >= self._drain_deadline:
            log.warning("stopping with commands still in flight")
            return True
        return all(i.inflight is None for i in self._instances.values())

    def _next_timeout(self) -> float | None:
        deadlines = [i.deadline for i in self._busy]
        deadlines += [d for i in self._controlling if i.control and (d := i.control.deadline)]
        if self._stop and self._drain_deadline is not None:
            deadlines.append(self._drain_deadline)
        if not deadlines:
            return None
        return max(min(deadlines) - time.monotonic(), 0.0)

    def _expire(self, now: float) -> None:
        for inst in [i for i in self._busy if i.deadline <= now]:
            inst.log.error("no response in %.1f s: restarting swtpm", self.command_timeout)
            self._swtpm_failed(inst)
        for inst in list(self._controlling):
            control = inst.control
            if control is not None and control.pending:
                control.expire(now)  # a timeout fails the requests: their callbacks act
            if inst.control is None or not inst.control.pending:
                self._controlling.discard(inst)

    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 512)
        for started in self._starter.results():
            self._on_started(started)
        for instance, generation, sig in self._syncer.results():
            self._on_synced(instance, generation, sig)
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
            conn = Conn(sock, self._on_conn_event)
            self._sel.register(sock, selectors.EVENT_READ, conn.handler)
            log.debug("backend connected (fd %d)", conn.fd)

    # -- backend connections ----------------------------------------------------------

    def _on_conn_event(self, conn: Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._read_packets(conn)

    def _read_packets(self, conn: Conn) -> None:
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

    def _on_packet(self, conn: Conn, mv: memoryview, n: int) -> None:
        if n < PREFIX_SIZE:
            log.warning("dropped a %d-byte packet: no instance id", n)
            return
        (instance,) = PREFIX_I.unpack_from(mv)
        end = min(n, _RX_PACKET_BYTES)  # n > buffer: truncated, so > MAX_COMMAND_SIZE
        command = mv[PREFIX_SIZE:end]
        try:
            header = validate_command(command, max_size=MAX_COMMAND_SIZE)
            if header.code == XENVTPM_CC_BIND:
                domid, resumed = parse_bind_command(command)
                req = Request(conn, Kind.BIND, b"", domid, resumed)
            elif header.code == XENVTPM_CC_RESET and header.size == HEADER_SIZE:
                req = Request(conn, Kind.RESET, b"")
            else:
                req = None
        except MalformedCommand as exc:
            if self._debug:
                log.debug("instance %d: malformed command (%s)", instance, exc)
            req = Request(conn, Kind.REPLY, error_response(exc.rc))
        inst = self._instances.get(instance)
        if req is not None and req.kind is Kind.REPLY:
            if inst is None or (inst.inflight is None and not inst.queue):
                # nothing of this instance is pending: answer now, start nothing
                self._reply(conn, PREFIX_I.pack(instance), req.payload)
                return
        elif inst is None:
            if len(self._instances) >= self.max_instances:
                log.error("instance %d refused: %d instances", instance, self.max_instances)
                self._reply(conn, PREFIX_I.pack(instance), _FAILURE)
                return
            inst = Instance(
                instance, self.config, self.boot_id, self._on_swtpm_event, self._on_control_event
            )
            self._instances[instance] = inst
        assert inst is not None
        if self._debug:
            log.debug("instance %d: %d-byte command", instance, end - PREFIX_SIZE)
        if (
            req is None
            and inst.inflight is None
            and not inst.queue
            and inst.state is InstanceState.RUNNING
            and not inst.failed
            and not self._stop
        ):
            # fast path: idle instance, send straight from the receive buffer
            self._send_command(inst, Request(conn, Kind.FORWARD, b""), command)
            return
        if req is None:
            req = Request(conn, Kind.FORWARD, bytes(command))
        inst.queue.append(req)
        if inst.state is InstanceState.STOPPED:
            self._start_instance(inst, None, None)
        elif inst.state is InstanceState.RUNNING and inst.inflight is None:
            self._pump(inst)

    def _reply(self, conn: Conn, prefix: bytes, payload: bytes | memoryview) -> None:
        if conn.closed:
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

    def _flush(self, conn: Conn) -> None:
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

    def _close_conn(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True  # its queued requests are skipped, its replies dropped
        assert self._sel is not None
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()
        conn.out.clear()
        log.debug("backend disconnected (fd %d)", conn.fd)

    # -- instances: commands ----------------------------------------------------------

    def _pump(self, inst: Instance) -> None:
        """Serve the head of the queue until a command is in flight or it is empty.

        During a planned stop nothing new starts: the queue waits for the next manager
        (its backend link answers the waiting requests TPM_RC_FAILURE when we go)."""
        while (
            inst.inflight is None
            and inst.queue
            and inst.state is InstanceState.RUNNING
            and not self._stop
        ):
            req = inst.queue.popleft()
            if req.conn.closed:
                continue
            if req.kind is Kind.REPLY:
                self._reply(req.conn, inst.prefix, req.payload)
            elif req.kind is Kind.BIND:
                self._bind_instance(inst, req)
            elif req.kind is Kind.RESET:
                inst.log.warning("operator reset: power-cycling the TPM")
                req.domid = inst.bound_domid if inst.bound_domid is not None else -1
                self._power_cycle(inst, req)
            elif inst.failed and (answer := failure_mode.answer(_code(req.payload))):
                self._reply(req.conn, inst.prefix, answer)
            else:
                self._send_command(inst, req, req.payload)

    def _send_command(self, inst: Instance, req: Request, command: bytes | memoryview) -> None:
        assert inst.swtpm is not None and inst.swtpm.data is not None
        inst.inflight = req
        inst.rx_len = 0
        inst.deadline = time.monotonic() + self.command_timeout
        self._busy.add(inst)
        if req.kind is Kind.FORWARD:
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

    def _watch_swtpm(self, inst: Instance, events: int) -> None:
        assert self._sel is not None and inst.swtpm is not None and inst.swtpm.data is not None
        self._sel.modify(inst.swtpm.data, events, inst.handler)

    def _on_swtpm_event(self, inst: Instance, mask: int) -> None:
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

    def _read_response(self, inst: Instance) -> None:
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
        if inst.inflight is None or inst.syncing is not None:
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

    def _on_response(self, inst: Instance, response: memoryview) -> None:
        req = inst.inflight
        assert req is not None
        inst.rx_len = 0
        self._busy.discard(inst)
        try:
            header = validate_response(response)
        except MalformedMessage as exc:
            inst.log.error("unparseable swtpm response (%s): answering TPM_RC_FAILURE", exc)
            response = memoryview(_FAILURE)
        else:
            if req.kind in (Kind.BIND, Kind.RESET):
                response = memoryview(self._power_cycled(inst, req, header.code))
            elif inst.watch is not None and (sig := inst.watch.changed()) is not None:
                # acknowledged state must be on disk first: fsync off the loop thread
                inst.syncing = (bytes(response), sig)
                self._syncer.sync(inst.id, inst.generation, inst.watch, sig)
                return
        inst.inflight = None
        self._reply(req.conn, inst.prefix, response)
        if inst.queue:
            self._pump(inst)

    # -- instances: durability --------------------------------------------------------

    def _on_synced(self, instance: int, generation: int, sig: Signature) -> None:
        inst = self._instances.get(instance)
        if inst is None or inst.generation != generation or inst.syncing is None:
            return  # swtpm failed meanwhile: its command was answered TPM_RC_FAILURE
        response, _ = inst.syncing
        inst.syncing = None
        if inst.watch is not None:
            inst.watch.synced(sig)
        req, inst.inflight = inst.inflight, None
        assert req is not None
        self._reply(req.conn, inst.prefix, response)
        if inst.queue:
            self._pump(inst)

    # -- instances: binding and power cycles ------------------------------------------

    def _bind_instance(self, inst: Instance, req: Request) -> None:
        new_boot = req.domid != inst.bound_domid and not req.resumed
        if new_boot and inst.dirty:
            inst.log.info(
                "bound to domain %d (was %s): power-cycling the TPM", req.domid, inst.bound_domid
            )
            self._power_cycle(inst, req)
            return
        if new_boot:
            if inst.failed:
                inst.log.info("domain %d is a new boot: failure mode ends", req.domid)
            inst.failed = False
            inst.log.info("bound to domain %d (fresh TPM)", req.domid)
        elif req.resumed and req.domid != inst.bound_domid:
            inst.log.info(
                "bound to domain %d, which resumes domain %s: TPM kept",
                req.domid,
                inst.bound_domid,
            )
        if req.domid != inst.bound_domid or new_boot:
            inst.bound_domid = req.domid
            inst.record()
        self._reply(req.conn, inst.prefix, _SUCCESS)

    def _power_cycle(self, inst: Instance, req: Request) -> None:
        """CMD_INIT (through the control channel, never blocking the loop), then
        TPM2_Startup(CLEAR) through the FIFO; completes in :meth:`_power_cycled`."""
        assert inst.control is not None
        inst.inflight = req
        generation = inst.generation

        def initialised(answer: bytes | None) -> None:
            if inst.generation != generation or inst.inflight is not req:
                return  # swtpm restarted meanwhile: req was answered TPM_RC_FAILURE
            if answer != bytes(RESULT_SIZE):
                inst.log.error("CMD_INIT failed (%s): restarting swtpm", answer)
                self._new_boot(inst, req)  # a fresh swtpm is what the cycle was for
                self._swtpm_failed(inst, lost=False)
                return
            self._send_command(inst, req, _STARTUP_CLEAR)

        inst.control.request(
            PTM_CMD.INIT,
            _CTRL_INIT_FLAGS_I.pack(0),
            initialised,
            timeout=self.config.ctrl_timeout,
        )
        self._controlling.add(inst)

    def _power_cycled(self, inst: Instance, req: Request, rc: int) -> bytes:
        """TPM2_Startup(CLEAR) of a power cycle answered ``rc``: the reply to send."""
        if rc != TPM_RC.SUCCESS:
            inst.log.error("Startup(CLEAR) after CMD_INIT: 0x%x", rc)
            return _FAILURE
        self._new_boot(inst, req)
        return _SUCCESS

    def _new_boot(self, inst: Instance, req: Request) -> None:
        if req.kind is Kind.BIND:
            inst.bound_domid = req.domid
        inst.dirty = False
        inst.failed = False
        inst.record()

    def _on_control_event(self, inst: Instance, mask: int) -> None:
        control = inst.control
        if control is None:
            return
        generation = inst.generation
        if not control.on_readable() and inst.generation == generation:
            inst.log.error("swtpm control channel broken: restarting swtpm")
            self._swtpm_failed(inst)

    # -- instances: swtpm processes ---------------------------------------------------

    def _swtpm_failed(self, inst: Instance, lost: bool | None = None) -> None:
        """swtpm died, hung or broke framing: fail the command in flight, restart swtpm.

        ``lost``: its volatile state was lost under a running domain (default: it held
        any), so the instance goes to failure mode (continuity.py)."""
        req = inst.inflight
        inst.inflight = None
        inst.syncing = None
        inst.tx_rest = b""
        inst.rx_len = 0
        self._busy.discard(inst)
        if req is not None:
            self._reply(req.conn, inst.prefix, _FAILURE)
        if lost if lost is not None else inst.dirty:
            if not inst.failed:
                inst.log.error(
                    "volatile state lost under domain %s: failure mode until it reboots "
                    "or an operator resets the instance",
                    inst.bound_domid,
                )
            inst.failed = True
        inst.dirty = False
        inst.record()
        old = self._detach_swtpm(inst)
        self._start_instance(inst, old, Continuity.LOST if inst.failed else Continuity.FRESH)

    def _detach_swtpm(self, inst: Instance) -> Swtpm | None:
        """Take the swtpm's channels out of the loop; fail its control requests."""
        old, control = inst.swtpm, inst.control
        inst.control = None
        self._controlling.discard(inst)
        if self._sel is not None:
            for fileobj in (old.data if old is not None else None, control):
                if fileobj is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._sel.unregister(fileobj)
        if control is not None:
            control.fail_all()
        return old

    def _start_instance(
        self, inst: Instance, old: Swtpm | None, continuity: Continuity | None
    ) -> None:
        """(Re)start swtpm in a worker thread; :meth:`_on_started` hears back.

        ``continuity`` None: the first start in this process, decided by the record."""
        inst.state = InstanceState.STARTING
        inst.generation += 1
        inst.swtpm = Swtpm(inst.id, self.config)
        if not (self._closed or self._stop):
            self._starter.start(
                inst.id, inst.generation, inst.continuity, inst.swtpm, old, continuity
            )

    def _on_started(self, started: Started) -> None:
        instance, generation, swtpm, err, how, record = started
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
                answer = req.payload if req.kind is Kind.REPLY else _FAILURE
                self._reply(req.conn, inst.prefix, answer)
            return
        assert swtpm.data is not None and swtpm.ctrl is not None and self._sel is not None
        swtpm.data.setblocking(False)
        self._sel.register(swtpm.data, selectors.EVENT_READ, inst.handler)
        inst.control = ControlChannel(swtpm.ctrl, inst.id)
        self._sel.register(inst.control, selectors.EVENT_READ, inst.control_handler)
        inst.watch = StateFileWatch(swtpm.state_dir) if self.durable else None
        inst.state = InstanceState.RUNNING
        inst.dirty = how is Continuity.RESTORED
        if record is not None:  # continued from the last manager's record
            inst.bound_domid = record.domid
            inst.failed = how is Continuity.LOST
            if inst.failed:
                inst.log.error(
                    "volatile state of domain %s was lost with the last manager: failure "
                    "mode until it reboots or an operator resets the instance",
                    record.domid,
                )
                inst.record()
            else:
                inst.log.info("volatile state of domain %s restored", record.domid)
        self._pump(inst)


def _code(command: bytes) -> int:
    """The command code of a validated command (header offset 6)."""
    return int.from_bytes(command[6:10], "big")
