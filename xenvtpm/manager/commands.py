"""The manager's command path: each instance's FIFO to its swtpm, one command in flight.

A command goes out on swtpm's data socket (the rest on EVENT_WRITE if the buffer is
full), its response is framed by the TPM header's responseSize and validated, then
answered, or held until the state file is on disk (:mod:`xenvtpm.manager.durability`).
A command in flight that its backend cancels is cancelled in swtpm through the control
channel. The rules and their reasons are in :mod:`xenvtpm.manager.manager`'s docstring.

Between the swtpm lifecycle below it (:class:`SwtpmLifecycle`) and the routing of
backend connections above it (:class:`xenvtpm.manager.manager.Manager`), it only adds;
what it needs from the routing is declared below (mypy checks both sides). Split out
so that each module holds one concept.
"""

from __future__ import annotations

import logging
import selectors
import struct
import time
from typing import TYPE_CHECKING

from xenvtpm.errors import MalformedMessage
from xenvtpm.manager import failure_mode
from xenvtpm.manager.durability import Syncer
from xenvtpm.manager.instance import Conn, Instance, InstanceState, Kind, Request
from xenvtpm.manager.lifecycle import SwtpmLifecycle
from xenvtpm.manager.swtpm import PTM_CMD
from xenvtpm.tpm import (
    HEADER_SIZE,
    MAX_RESPONSE_SIZE,
    TPM_RC,
    error_response,
    validate_response,
)

log = logging.getLogger("xenvtpm.manager")

_HEADER_SIZE_AT_2_I = struct.Struct(">I")  # responseSize at offset 2 of the TPM header
_FAILURE = error_response(TPM_RC.FAILURE)


class CommandPath(SwtpmLifecycle):
    """Commands of the manager's instances, to swtpm and back."""

    command_timeout: float
    _syncer: Syncer
    _debug: bool

    if TYPE_CHECKING:  # the routing, in xenvtpm/manager/manager.py

        def _reply(self, conn: Conn, prefix: bytes, payload: bytes | memoryview) -> None: ...

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
        inst.alarm.arm()
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
        assert inst.swtpm is not None and inst.swtpm.data is not None
        self.loop.modify(inst.swtpm.data, events, inst.handler)

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
        inst.alarm.disarm()
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

    def _cancel_in_flight(self, inst: Instance, req: Request) -> None:
        """Ask swtpm to stop the command it runs (ctrl ``CMD_CANCEL_TPM_CMD``), once.

        Its answer still comes through the data channel and goes to the backend like any
        (the backend drops it and frees the guest's slot). swtpm answers control requests
        only between commands, so the cancel may wait as long as the command may run."""
        control = inst.control
        if control is None or req.cancelled or inst.syncing is not None:
            return  # no channel (restarting), asked already, or already done
        req.cancelled = True
        generation = inst.generation

        def done(answer: bytes | None) -> None:
            if answer is None and inst.generation == generation and inst.control is control:
                inst.log.error("swtpm control channel broken on a cancel: restarting swtpm")
                self._swtpm_failed(inst)
            elif self._debug:
                inst.log.debug("CMD_CANCEL_TPM_CMD answered %s", answer)

        now = time.monotonic()
        timeout = max((inst.alarm.deadline or now) - now, 0.0) + self.config.ctrl_timeout
        control.request(PTM_CMD.CANCEL_TPM_CMD, b"", done, timeout=timeout)
        self._controlling.add(inst)
        self._watch_controls()


def _code(command: bytes) -> int:
    """The command code of a validated command (header offset 6)."""
    return int.from_bytes(command[6:10], "big")
