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
  requests never block the loop (:mod:`xenvtpm.manager.swtpm_control`): a hung swtpm stalls
  only its own instance.
- A running guest's TPM never silently resets (:mod:`xenvtpm.manager.continuity`). A planned
  stop (SIGTERM) lets the commands in flight finish, then saves every swtpm's volatile
  state, which the next manager restores once. swtpm death (EOF or error on its data
  socket), a response that does not parse, or no response within ``command_timeout``
  loses that state: the in-flight command gets TPM_RC_FAILURE, swtpm is restarted
  from its state directory, and the instance answers in failure mode
  (:mod:`xenvtpm.manager.failure_mode`) until its domain reboots or an operator resets it.
  A failed start answers the queued commands TPM_RC_FAILURE; a later packet retries.
- :data:`xenvtpm.tpm.XENVTPM_CC_CANCEL` (a guest cancelled its command, or the backend
  gave up on it) is answered nothing, so the backend's FIFO matching is unaffected.
  The connection's commands queued for the instance become TPM_RC_CANCELED answers in
  their FIFO place (payload dropped); if the command in flight came from that
  connection, swtpm is asked to cancel it (``CMD_CANCEL_TPM_CMD``, once, on the control
  channel).  swtpm 0.7.1 serves its control channel on the thread that runs commands:
  it answers the cancel only after the command, which runs to its end (measured), so
  the cancelled command is answered, and the backend's device slot freed, when swtpm is
  done with it.
- Bounds (issue 14): per instance, one connection may have at most
  :data:`QUEUE_PER_INSTANCE` commands queued behind the one in flight, and a connection
  at most :data:`UNREAD_REPLIES_MAX` replies it has not read.  The backend's link keeps
  below both (:mod:`xenvtpm.backend.manager_link`); a connection beyond them breaks the protocol
  and is closed, since any answer would break its FIFO matching of replies.  The link
  answers what it had sent TPM_RC_FAILURE and reconnects; a closed connection's queued
  commands are dropped at once.
- Acknowledged NV is on disk: when a command changed swtpm's state file, the file and
  its directory are fsync'ed before the answer goes back (swtpm 0.7.1 has no fsync of
  its own); so are they before the first answer after each swtpm start (manufacturing
  wrote them without fsync).

The loop is single-threaded (:class:`xenvtpm.loop.Loop`, every daemon's loop) with
non-blocking sockets; the per-command path makes no thread hand-off, receives into
preallocated buffers (one backend packet per readiness), replies with one
``sendmsg([prefix, response])`` and logs nothing unless debug is enabled.

Three modules, each adding to the one below: this one routes backend connections'
packets; :mod:`xenvtpm.manager.commands` runs each instance's FIFO of commands to its
swtpm; :mod:`xenvtpm.manager.lifecycle` starts, restarts and power-cycles the swtpms.

Spec: 000_a1dfc4f903a123f1.txt ("a 4-byte virtual TPM instance identifier is prepended
to each packet ... in network byte order"); DESIGN.md 2, 3.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from xenvtpm.errors import VTPMError
from xenvtpm.loop import Loop, Timer
from xenvtpm.manager.client import PREFIX_SIZE, ManagerClient
from xenvtpm.manager.commands import CommandPath
from xenvtpm.manager.confinement import Confinement
from xenvtpm.manager.continuity import BOOT_ID_FILE, read_boot_id
from xenvtpm.manager.durability import Syncer
from xenvtpm.manager.instance import (
    PREFIX_I,
    Conn,
    Instance,
    InstanceState,
    InstanceStatus,
    Kind,
    Request,
)
from xenvtpm.manager.swtpm import SwtpmConfig
from xenvtpm.manager.swtpm_control import store_volatile
from xenvtpm.manager.swtpm_starter import SwtpmStarter
from xenvtpm.tpm import (
    HEADER_SIZE,
    MAX_COMMAND_SIZE,
    TPM_RC,
    XENVTPM_CC_BIND,
    XENVTPM_CC_CANCEL,
    XENVTPM_CC_RESET,
    MalformedCommand,
    error_response,
    parse_bind_command,
    validate_command,
)

__all__ = ["InstanceStatus", "Manager", "ManagerClient", "status_counts"]

log = logging.getLogger("xenvtpm.manager")

_RX_PACKET_BYTES = PREFIX_SIZE + MAX_COMMAND_SIZE + 1  # one more: detects oversize
_FAILURE = error_response(TPM_RC.FAILURE)
_CANCELED = error_response(TPM_RC.CANCELED)
#: A planned stop waits this long for commands in flight, then for the volatile saves.
DRAIN_TIMEOUT = 10.0
#: Commands one connection may queue per instance, behind the one in flight: above the
#: backend link's own bound (manager_link.PENDING_PER_INSTANCE, in flight included).
QUEUE_PER_INSTANCE = 4
#: Replies one connection may leave unread (its socket buffer full) before it is closed.
UNREAD_REPLIES_MAX = 4096


class Manager(CommandPath):
    """Accepts backend connections and routes their packets to one swtpm per instance.

    ``start()`` binds the socket; ``serve_forever()`` runs the loop until
    ``request_stop()`` (signal- and thread-safe), letting the commands in flight finish;
    ``close()`` saves every swtpm's volatile state (a planned stop), stops every swtpm
    (SIGTERM, wait, SIGKILL) and unlinks the socket. Both are idempotent; use it as a
    context manager. Given a ``loop`` (a daemon's, :func:`xenvtpm.daemon.serve`),
    it serves on it, and a planned stop ends its ``run()``; else it makes its own.
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
        loop: Loop | None = None,
        confinement: Confinement | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.state_root = Path(state_root).absolute()
        self.config = SwtpmConfig(
            self.state_root,
            swtpm=swtpm,
            swtpm_setup=swtpm_setup,
            start_timeout=start_timeout,
            log_level=swtpm_log_level,
            confinement=confinement,
        )
        self.command_timeout = command_timeout
        self.max_instances = max_instances
        self.boot_id_file = boot_id_file
        self.boot_id = ""
        self.durable = durable
        self._instances: dict[int, Instance] = {}
        self._controlling: set[Instance] = set()  # a control request in flight
        self._control_timer: Timer | None = None  # the earliest control request's timeout
        self._loop = loop
        self._own_loop = loop is None  # made in start(), closed in close()
        self._listener: socket.socket | None = None
        self._conns: set[Conn] = set()
        self._starter = SwtpmStarter(self._wake)
        self._syncer = Syncer(self._wake)
        self._rx = bytearray(_RX_PACKET_BYTES)
        self._rxview = memoryview(self._rx)
        self._stop = False
        self._drain_timer: Timer | None = None
        self._started = False
        self._closed = False
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
            if self._loop is None:
                self._loop = Loop()
            self._listener = self._bind()
            self._loop.register(self._listener, selectors.EVENT_READ, self._on_accept)
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

    @property
    def loop(self) -> Loop:
        assert self._loop is not None, "the manager is not started"
        return self._loop

    def request_stop(self) -> None:
        """Ask the loop to return once the commands in flight are answered (a planned
        stop); safe from signal handlers and other threads."""
        self._stop = True
        self._call_soon(self._begin_drain)

    def request_status(self) -> None:
        """Ask the loop to log :meth:`status` (SIGUSR1)."""
        self._call_soon(self._log_status)

    def _wake(self) -> None:
        """A worker (swtpm start, fsync) has a result for the loop thread."""
        self._call_soon(self._collect)

    def _call_soon(self, callback: Callable[[], None]) -> None:
        if self._loop is not None:  # else nothing runs, and start() makes it
            self._loop.call_soon_threadsafe(callback)

    def close(self) -> None:
        """Save each swtpm's volatile state, stop every swtpm, unlink the socket."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if self._listener is not None:
            if loop is not None:
                with contextlib.suppress(KeyError):
                    loop.unregister(self._listener)
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        for timer in (self._control_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        if self._instances:
            self._save_volatile_states(time.monotonic() + DRAIN_TIMEOUT)
            log.info("stopping: %s", self._status_line())
        for inst in self._instances.values():
            inst.alarm.close()
            if loop is not None and inst.swtpm is not None:
                for fileobj in (inst.swtpm.data, inst.control):
                    if fileobj is not None:
                        with contextlib.suppress(KeyError, ValueError, OSError):
                            loop.unregister(fileobj)
        swtpms = [i.swtpm for i in self._instances.values() if i.swtpm is not None]
        for s in swtpms:
            s.terminate()  # all at once: channels closed, SIGTERM
        for s in swtpms:
            s.close()  # waits, SIGKILL after stop_timeout
        self._starter.close(self.config.start_timeout)
        self._syncer.close()
        for conn in self._conns:
            if loop is not None:
                with contextlib.suppress(KeyError, ValueError):
                    loop.unregister(conn.sock)
            conn.sock.close()
        self._conns.clear()
        if loop is not None and self._own_loop:
            loop.close()  # workers joined above: none of them calls it any more

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
            f"{s.instance}:{s.state}:pid={s.pid}:queued={s.queued}:in_flight={int(s.in_flight)}"
            f":peak={s.peak}" + (":FAILED" if s.failed else "")
            for s in self.status()
        ]
        return f"{len(parts)} instance(s) " + " ".join(parts)

    # -- loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run the event loop until :meth:`request_stop`, then drain (bounded)."""
        self.start()
        if self._stop:  # asked before the loop could hear it
            self._call_soon(self._begin_drain)
        self.loop.run()

    def _begin_drain(self) -> None:
        """A planned stop: the loop runs on until the commands in flight are answered
        (each answer looks, in :meth:`_reply`), for at most :data:`DRAIN_TIMEOUT`."""
        if self._drain_timer is None:
            self._drain_timer = self.loop.call_later(DRAIN_TIMEOUT, self._drain_expired)
        self._check_drained()

    def _check_drained(self) -> None:
        if all(i.inflight is None for i in self._instances.values()):
            self.loop.stop()

    def _drain_expired(self) -> None:
        log.warning("stopping with commands still in flight")
        self.loop.stop()

    def _command_timed_out(self, inst: Instance) -> None:
        inst.log.error("no response in %.1f s: restarting swtpm", self.command_timeout)
        self._swtpm_failed(inst)

    def _collect(self) -> None:
        """Hear back from the workers (a swtpm started, a state file synced)."""
        for started in self._starter.results():
            self._on_started(started)
        for instance, generation, sig in self._syncer.results():
            self._on_synced(instance, generation, sig)

    def _log_status(self) -> None:
        log.info("status: %s", self._status_line())

    def _on_accept(self, mask: int) -> None:
        assert self._listener is not None
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
            self.loop.register(sock, selectors.EVENT_READ, conn.handler)
            self._conns.add(conn)
            log.debug("backend connected (fd %d)", conn.fd)

    # -- backend connections ----------------------------------------------------------

    def _on_conn_event(self, conn: Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._read_packets(conn)

    def _read_packets(self, conn: Conn) -> None:
        """One packet per readiness: the loop is level-triggered, so the next one comes
        in the next round, after every other ready channel had its turn (one busy
        backend cannot starve the others), and no ``recv`` is spent finding the socket
        empty when, as most often, one packet was there."""
        rx = self._rx
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
        self._on_packet(conn, self._rxview, n)

    def _on_packet(self, conn: Conn, mv: memoryview, n: int) -> None:
        if n < PREFIX_SIZE:
            log.warning("dropped a %d-byte packet: no instance id", n)
            return
        (instance,) = PREFIX_I.unpack_from(mv)
        end = min(n, _RX_PACKET_BYTES)  # n > buffer: truncated, so > MAX_COMMAND_SIZE
        command = mv[PREFIX_SIZE:end]
        try:
            header = validate_command(command, max_size=MAX_COMMAND_SIZE)
            if header.code == XENVTPM_CC_CANCEL:
                if header.size != HEADER_SIZE:
                    raise MalformedCommand(TPM_RC.VALUE, "not a well-formed XENVTPM_CC_CANCEL")
                self._cancel(conn, instance)
                return  # no answer: it is no request
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
                instance,
                self.config,
                self.boot_id,
                self._on_swtpm_event,
                self._on_control_event,
                self.loop,
                self.command_timeout,
                self._command_timed_out,
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
            req = Request(conn, Kind.FORWARD, bytes(command))
        inst.queue.append(req)
        inst.count_peak()
        if inst.state is InstanceState.STOPPED:
            self._start_instance(inst, None, None)
        elif inst.state is InstanceState.RUNNING and inst.inflight is None:
            self._pump(inst)

    def _cancel(self, conn: Conn, instance: int) -> None:
        """XENVTPM_CC_CANCEL from ``conn``: its queued commands for ``instance`` become
        TPM_RC_CANCELED in their place; its command in flight is cancelled in swtpm."""
        inst = self._instances.get(instance)
        if inst is None:
            return
        for queued in inst.queue:
            if queued.conn is conn and queued.kind is Kind.FORWARD:
                queued.kind, queued.payload = Kind.REPLY, _CANCELED
        running = inst.inflight
        if running is not None and running.conn is conn and running.kind is Kind.FORWARD:
            self._cancel_in_flight(inst, running)

    def _reply(self, conn: Conn, prefix: bytes, payload: bytes | memoryview) -> None:
        if self._stop:  # every command in flight ends in a reply: the last one stops
            self._check_drained()
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
            self.loop.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn.handler)
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
        self.loop.modify(conn.sock, selectors.EVENT_READ, conn.handler)

    def _close_conn(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True  # its queued requests are skipped, its replies dropped
        self._conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.loop.unregister(conn.sock)
        conn.sock.close()
        conn.out.clear()
        for inst in self._instances.values():  # its queued commands go at once
            if any(r.conn is conn for r in inst.queue):
                inst.queue = deque(r for r in inst.queue if r.conn is not conn)
        log.debug("backend disconnected (fd %d)", conn.fd)


def status_counts(line: str, instance: int) -> dict[str, int] | None:
    """``queued``, ``in_flight`` and ``peak`` of ``instance`` in a logged status line
    (SIGUSR1), for tests and operators; None if the line does not name it. Only the part
    after "instance(s)" is read: the log's time, at 20:xx, would otherwise pass for
    instance 20."""
    _, found, parts = line.rpartition(" instance(s) ")
    for part in parts.split() if found else ():
        if part.startswith(f"{instance}:"):
            fields = dict(f.split("=", 1) for f in part.split(":")[2:] if "=" in f)
            return {k: int(v) for k, v in fields.items() if k != "pid"}
    return None
