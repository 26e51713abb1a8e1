"""The manager's swtpm lifecycle: start and restart, bind and power cycles, failure mode,
control requests' timeouts, and the answers held for fsync.

The base of :class:`xenvtpm.manager.commands.CommandPath` and so of
:class:`xenvtpm.manager.manager.Manager`, which owns the loop, the connections and the
routing; it only adds, and relies on the attributes and methods declared below (mypy
checks both sides). Split out to keep each module readable.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import struct
import time
from typing import TYPE_CHECKING

from xenvtpm.errors import InstanceStartError
from xenvtpm.loop import Loop, Timer
from xenvtpm.manager.continuity import Continuity
from xenvtpm.manager.durability import Signature, StateFileWatch
from xenvtpm.manager.instance import Conn, Instance, InstanceState, Kind, Request
from xenvtpm.manager.swtpm import PTM_CMD, Swtpm, SwtpmConfig
from xenvtpm.manager.swtpm_control import RESULT_SIZE, ControlChannel
from xenvtpm.manager.swtpm_starter import Started, SwtpmStarter
from xenvtpm.tpm import TPM_RC, error_response, startup_command, success_response

log = logging.getLogger("xenvtpm.manager")

_FAILURE = error_response(TPM_RC.FAILURE)
_SUCCESS = success_response()
_STARTUP_CLEAR = startup_command(clear=True)
_CTRL_INIT_FLAGS_I = struct.Struct(">I")  # struct ptm_init: init_flags (tpm_ioctl.h)


class SwtpmLifecycle:
    """swtpm processes of the manager's instances, and the TPM's life cycle in them."""

    config: SwtpmConfig
    durable: bool
    _instances: dict[int, Instance]
    _controlling: set[Instance]
    _control_timer: Timer | None
    _starter: SwtpmStarter
    _closed: bool
    _stop: bool

    if TYPE_CHECKING:  # in xenvtpm/manager/manager.py and commands.py
        _loop: Loop | None

        @property
        def loop(self) -> Loop: ...
        def _reply(self, conn: Conn, prefix: bytes, payload: bytes | memoryview) -> None: ...
        def _pump(self, inst: Instance) -> None: ...
        def _send_command(
            self, inst: Instance, req: Request, command: bytes | memoryview
        ) -> None: ...

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
        if req.domid != inst.bound_domid:
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
        self._watch_controls()

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
        self._watch_controls()  # the next request's timeout runs from now

    def _watch_controls(self) -> None:
        """One timer for the control requests' timeouts, set for the earliest: swtpm
        must answer each in time, or it is restarted (a request whose send failed has
        deadline 0, and fails at once). Called whenever a deadline may have moved."""
        deadlines = []
        for inst in list(self._controlling):
            control = inst.control
            if control is None or not control.pending:
                self._controlling.discard(inst)
            elif (deadline := control.deadline) is not None:
                deadlines.append(deadline)
        timer = self._control_timer
        if not deadlines:
            if timer is not None:
                timer.cancel()
                self._control_timer = None
            return
        due = min(deadlines)
        if timer is None or timer.callback is None or timer.when > due:
            if timer is not None:
                timer.cancel()
            delay = max(due - time.monotonic(), 0.0)
            self._control_timer = self.loop.call_later(delay, self._expire_controls)

    def _expire_controls(self) -> None:
        self._control_timer = None
        now = time.monotonic()
        for inst in list(self._controlling):
            control = inst.control
            if control is not None and control.pending:
                control.expire(now)  # a timeout fails the requests: their callbacks act
        self._watch_controls()

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
        inst.alarm.disarm()
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
        if self._loop is not None:
            for fileobj in (old.data if old is not None else None, control):
                if fileobj is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._loop.unregister(fileobj)
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
        assert swtpm.data is not None and swtpm.ctrl is not None
        swtpm.data.setblocking(False)
        self.loop.register(swtpm.data, selectors.EVENT_READ, inst.handler)
        inst.control = ControlChannel(swtpm.ctrl, inst.id)
        self.loop.register(inst.control, selectors.EVENT_READ, inst.control_handler)
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
