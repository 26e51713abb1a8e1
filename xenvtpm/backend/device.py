"""One vTPM device as the backend sees it: its xenbus state, mapped pages and requests.

Connect picks the protocol the frontend announced (the 2006 ring, or v2 of Linux
xen-tpmfront: :mod:`xenvtpm.backend.rings`), maps its pages once and binds its event
channel; each request is then copied out once, validated, and sent to the manager with
a timeout. Both protocols share this class: states, channel, the one request in flight,
its timeout and the manager link; only the page layout differs. The frontend is
untrusted: every value read from its xenstore directory or its pages is parsed strictly
and bounded before use, and a failure costs this device only.

One slot per device (issue 14): at most one request of a device is anywhere on the path
(the manager link, the manager, swtpm), cancelled and timed-out ones included. The slot
is held until the manager answers or drops that request; a request the frontend gave up
on (v2 CANCEL), the backend gave up on (timeout) or whose frontend left keeps it, its
answer dropped, and the manager is told (``XENVTPM_CC_CANCEL``). A request signalled
meanwhile is deferred: the page is looked at once when the slot frees, or answered
TPM_RC_FAILURE if the slot stays held for the whole timeout. A v2 CANCEL is completed
(IDLE, which xen-tpmfront reads as "cancelled") only when the slot frees, so a frontend
cannot put a second command behind its cancelled one.

Spec: seed interface.tex "Virtual TPM"; DESIGN.md section 2; Linux
drivers/xen/xenbus/xenbus_probe_backend.c for the backend's state moves; Linux
include/xen/interface/io/tpmif.h for v2's handshake and states.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from xenvtpm import tpm
from xenvtpm.backend.manager_link import ManagerLink, Ticket
from xenvtpm.backend.rings import (
    FEATURE_PROTOCOL_V2,
    Ring,
    VtpmProtocol,
    frontend_protocol,
    map_ring,
)
from xenvtpm.backend.traffic_trace import AnsweredBy, TrafficTrace
from xenvtpm.errors import MalformedMessage, TransactionConflict, XenError, XenStoreError
from xenvtpm.intake import Forward, NotSubmitted
from xenvtpm.loop import Alarm, Loop
from xenvtpm.tpmif_v2 import VtpmState
from xenvtpm.xen.interface import EventChannel, Hypervisor, XenStore
from xenvtpm.xenbus import (
    BACKEND_MOVES,
    RESUME_KEY,
    StateNode,
    XenbusState,
    parse_flag,
    parse_uint,
    read_state,
)


class Owner(Protocol):
    """What a device uses of the backend that owns it: a protocol rather than the
    ``Backend`` class, so that this module does not import ``backend.py`` back."""

    xs: XenStore
    hv: Hypervisor
    loop: Loop
    timeout: float
    binds: dict[int, Ticket]  # per instance: the latest BIND sent
    manager: ManagerLink
    trace: TrafficTrace | None

    def instance_for_uuid(self, uuid: str) -> int: ...

    def device_for_instance(self, instance: int) -> BackendDevice | None: ...


log = logging.getLogger("xenvtpm.backend")

S = XenbusState
CANCEL = int(VtpmState.CANCEL)
_FAILURE = tpm.error_response(tpm.TPM_RC.FAILURE)
__all__ = ["BackendDevice", "DeviceKey", "parse_uint"]


@dataclass(frozen=True)
class DeviceKey:
    """``backend/vtpm/<domid>/<devid>``"""

    domid: int
    devid: int

    @classmethod
    def parse(cls, domid: str, devid: str) -> DeviceKey | None:
        try:
            return cls(parse_uint(domid.encode(), 0x7FEF), parse_uint(devid.encode(), 0xFFFF))
        except MalformedMessage:
            return None

    @property
    def token(self) -> str:
        return f"fe:{self.domid}:{self.devid}"

    @classmethod
    def from_token(cls, token: str) -> DeviceKey | None:
        parts = token.split(":")
        if len(parts) != 3 or parts[0] != "fe":
            return None
        return cls.parse(parts[1], parts[2])


class BackendDevice:
    """The backend half of one frontend's vTPM."""

    def __init__(self, key: DeviceKey, backend: Owner) -> None:
        self.key = key
        self._backend = backend
        self._xs = backend.xs
        self._hv = backend.hv
        self.path = f"backend/vtpm/{key.domid}/{key.devid}"
        self.log = log.getChild(f"dom{key.domid}")
        self._state = StateNode(self._xs, self.path, BACKEND_MOVES, self.log)
        self.frontend = ""
        self.instance = -1
        self.resumed = False  # the toolstack's ``resume``: this domain resumes a saved one
        self.offline = False  # the toolstack wrote ``online = 0``: it is taking it away
        self._ring: Ring | None = None
        self._channel: EventChannel | None = None
        self._ticket: Ticket | None = None  # the slot: this device's request on the path
        self._waiting = False  # the frontend waits for that request's answer
        self._deferred = False  # signalled while the slot was held: look when it frees
        # the frontend's wait (answered FAILURE at expiry), and the deferred request's
        loop = backend.loop
        self._wait = Alarm(loop, backend.timeout, self._on_timeout)
        self._deferral = Alarm(loop, backend.timeout, self._on_deferred_timeout)
        self._bind_ticket: Ticket | None = None
        self.requests = 0
        self._traced = (0.0, -1, -1)  # with --trace: the request in flight's time, code, size

    @property
    def connected(self) -> bool:
        return self._channel is not None

    @property
    def state(self) -> XenbusState:
        return self._state.state

    @property
    def protocol(self) -> VtpmProtocol | None:
        """What the connected frontend speaks (None while not connected)."""
        return self._ring.protocol if self._ring is not None else None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Read what the toolstack wrote, watch the frontend, and say InitWait."""
        try:
            frontend_id = parse_uint(self._xs.read(f"{self.path}/frontend-id"), 0x7FEF)
            self.frontend = self._xs.read(f"{self.path}/frontend").decode("ascii")
            self.instance = self._read_instance()
            self.resumed = self._read_flag(RESUME_KEY)
        except (XenStoreError, MalformedMessage, UnicodeDecodeError, ValueError, OSError) as e:
            self.log.error("vtpm %d: incomplete toolstack entries: %s", self.key.devid, e)
            return
        expected = f"/local/domain/{self.key.domid}/device/vtpm/"
        if frontend_id != self.key.domid or not self.frontend.startswith(expected):
            self.log.error(
                "vtpm %d: frontend %r does not belong to domain %d",
                self.key.devid,
                self.frontend,
                self.key.domid,
            )
            return
        self._xs.watch(f"{self.frontend}/state", self.key.token)
        if self._publish_init_wait():
            self.log.info(
                "vtpm %d: instance %d, waiting for %s", self.key.devid, self.instance, self.frontend
            )

    def remove(self, publish: bool) -> None:
        """Forget the device: disconnect, stop watching, and say Closed if asked."""
        self.disconnect()
        if self.frontend:
            with contextlib.suppress(XenStoreError):
                self._xs.unwatch(f"{self.frontend}/state", self.key.token)
        if publish:
            self._switch(S.CLOSED)

    def on_toolstack_changed(self) -> None:
        """``online = 0`` (libxl's device remove, with ``state = 5``): close now and stay
        closed, so libxl sees Closed within its 10 s whether or not a frontend is there."""
        if self.offline or not self.frontend:
            return
        try:
            self.offline = self._xs.read(f"{self.path}/online").strip(b"\0") == b"0"
        except XenStoreError:
            return  # gone: the rescan forgets the device
        if self.offline:
            self.log.info("vtpm %d: the toolstack takes it away (online = 0)", self.key.devid)
            self.disconnect()
            self._switch(S.CLOSED)

    def on_frontend_changed(self) -> None:
        if not self.frontend:
            return
        if self.offline:
            return  # Closed for good: only the toolstack's removal comes next
        frontend = read_state(self._xs, self.frontend)
        mine = self._state.state
        if mine == S.UNKNOWN:  # start() could not publish InitWait: again, then go on
            if not self._publish_init_wait():
                return
            mine = self._state.state
        if frontend == S.INITIALISED and mine == S.INIT_WAIT:
            self.connect()
        elif frontend == S.INITIALISING and mine in (S.CONNECTED, S.CLOSING, S.CLOSED):
            self.disconnect()
            self._switch(S.INIT_WAIT)
        elif frontend == S.CLOSING and mine != S.CLOSED:
            self.disconnect()
            self._switch(S.CLOSING)
        elif frontend in (S.CLOSED, S.UNKNOWN) and mine != S.CLOSED:
            self.disconnect()
            self._switch(S.CLOSED)

    def on_manager_up(self) -> None:
        if self.connected:
            self._bind()

    # -- connect / disconnect --------------------------------------------------------

    def connect(self) -> None:
        """Map the pages the frontend's protocol names, bind the channel, say Connected.

        A v2 frontend (xen-tpmfront) may submit its first command right after
        Initialised, before anyone listens to its event channel (its probe asks for
        timeouts at once): that notify is lost, so the page is looked at once here.
        """
        domid = self.key.domid
        try:
            other = self._backend.device_for_instance(self.instance)
            if other is not None and other is not self:
                raise MalformedMessage(
                    f"instance {self.instance} is already serving domain {other.key.domid}"
                )
            ring_ref = parse_uint(self._xs.read(f"{self.frontend}/ring-ref"))
            port = parse_uint(self._xs.read(f"{self.frontend}/event-channel"))
            protocol = frontend_protocol(self._xs, self.frontend)
            self._ring = map_ring(protocol, self._hv, domid, ring_ref)
            channel = self._hv.events.bind_interdomain(domid, port)
        except (XenError, MalformedMessage) as e:
            self._fatal(f"connect failed: {e}")
            return
        channel.consume()  # bind_interdomain leaves one spurious event pending (DESIGN 4)
        self._channel = channel
        self._backend.loop.add_reader(channel.fileno(), self._on_event)
        self._bind()
        if not self._switch(S.CONNECTED):
            self.disconnect()  # still InitWait: the frontend's next change connects again
            return
        self.log.info(
            "vtpm %d connected: ring ref %d, %s, port %d",
            self.key.devid,
            ring_ref,
            self._ring.describe,
            port,
        )
        if protocol is VtpmProtocol.V2:
            if self._ticket is None:
                self._handle_request()
            else:
                self._defer()  # the last connection's request still holds the slot

    def disconnect(self) -> None:
        """Give up on the request in flight (it keeps the slot until the manager lets
        go of it; its answer is dropped), forget deferred ones, and unmap."""
        if self._waiting:
            self._give_up()
        self._deferred = False
        self._wait.close()
        self._deferral.close()
        if self._channel is not None:
            self._backend.loop.remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _fatal(self, message: str) -> None:
        """Like xenbus_dev_fatal: tell the frontend why, and close this device only."""
        self.log.error("vtpm %d: %s", self.key.devid, message)
        self.disconnect()
        with contextlib.suppress(XenStoreError):
            self._xs.write(f"{self.path}/error", message[:256])
        self._switch(S.CLOSING)

    def _publish_init_wait(self) -> bool:
        # Both protocols are served; xen-tpmfront refuses a backend without this key.
        return self._switch(S.INIT_WAIT, {FEATURE_PROTOCOL_V2: "1"})

    def _switch(self, state: XenbusState, nodes: dict[str, str] | None = None) -> bool:
        """Publish ``state`` (and ``nodes``). False if xenstore refused: logged, and only
        this device waits, for its frontend's next change (every device shares the
        backend's one thread, so a refusal is never retried here for long)."""
        try:
            self._state.publish(state, nodes or {})
        except TransactionConflict:
            return False  # StateNode logged it
        except XenStoreError as e:
            self.log.warning("cannot publish %s: %s", state.name, e)
            return False
        return True

    def _read_instance(self) -> int:
        """The toolstack's ``instance`` (the seed's interface) where it wrote one, else
        the instance of xl's ``uuid`` (xenvtpm.backend.vtpm_identity)."""
        try:
            return parse_uint(self._xs.read(f"{self.path}/instance"))
        except XenStoreError as e:
            if e.errno_name != "ENOENT":
                raise
        uuid = self._xs.read(f"{self.path}/uuid").decode("ascii")
        return self._backend.instance_for_uuid(uuid)

    def _read_flag(self, key: str) -> bool:
        """An optional toolstack flag in the backend directory: absent means False."""
        try:
            return parse_flag(self._xs.read(f"{self.path}/{key}"))
        except XenStoreError as e:
            if e.errno_name == "ENOENT":
                return False
            raise

    def _bind(self) -> None:
        """Tell the manager which domain now drives this instance (PCRs reset on change,
        unless this domain resumes a saved one: then the same boot goes on).

        Not again while this device's BIND is on its way and is the instance's latest:
        a frontend reconnecting in a loop must not pile BINDs up in front of a busy TPM.
        """
        binds = self._backend.binds
        last = binds.get(self.instance)
        if last is not None and last is self._bind_ticket and last.callback is not None:
            return

        def check(reply: memoryview) -> None:
            if tpm.response_code(reply) != tpm.TPM_RC.SUCCESS:
                self.log.error("manager refused to bind instance %d", self.instance)

        bind = tpm.bind_command(self.key.domid, resumed=self.resumed)
        self._bind_ticket = self._backend.manager.request(self.instance, bind, check)
        binds[self.instance] = self._bind_ticket

    # -- requests --------------------------------------------------------------------

    def _on_event(self) -> None:
        channel = self._channel
        assert channel is not None and self._ring is not None
        if not channel.consume():
            self.log.warning("vtpm %d: event channel closed by the frontend", self.key.devid)
            self.disconnect()
            self._switch(S.CLOSED)
            return
        if self._ticket is None:
            self._handle_request()
        elif self._waiting:
            # One request at a time: an event while one is in flight can only be a v2
            # CANCEL (xen-tpmfront's vtpm_cancel); anything else (a second SUBMIT) is
            # ignored. The cancelled command keeps the slot; IDLE once it is gone.
            if self._ring.cancel_requested():
                self.log.info("vtpm %d: the frontend cancelled its request", self.key.devid)
                self._trace(AnsweredBy.CANCELLED, None)
                self._give_up()
                self._deferred = True
        else:
            self._defer()

    def _handle_request(self) -> None:
        """Look at the pages once (the slot is free): answer, forward, or nothing."""
        ring = self._ring
        assert ring is not None and self._ticket is None
        decision = ring.take()
        if isinstance(decision, NotSubmitted):
            # v2: nothing submitted. A CANCEL with nothing in flight (the answer crossed
            # it, or the cancelled command is gone now) completes: IDLE, so the frontend
            # can go on.
            if decision.state == CANCEL and self._channel is not None:
                ring.cancelled()
                self._channel.notify()
            return
        self.requests += 1
        if not isinstance(decision, Forward):
            self._trace(AnsweredBy.BACKEND, decision, (time.time(), -1, -1))
            self._answer(decision)  # malformed: the backend answers by itself
            return
        if self._backend.trace is not None:
            self._traced = (time.time(), decision.code, len(decision.command))
        self._ticket = self._backend.manager.request(
            self.instance, decision.command, self._on_reply
        )
        self._waiting = True
        self._wait.arm()

    def _on_reply(self, response: memoryview) -> None:
        """The manager answered (or the link dropped) this device's request: the slot is
        free. Answer the frontend if it still waits, else look at what it signalled."""
        self._ticket = None
        self._stop_timer()
        if self._waiting:
            self._waiting = False
            self._trace(AnsweredBy.MANAGER, response)
            self._answer(response)
        elif self._deferred:
            self._deferred = False
            if self._ring is not None:
                self._handle_request()

    def _on_timeout(self) -> None:
        self.log.warning(
            "vtpm %d: instance %d silent for %.0f s: TPM_RC_FAILURE",
            self.key.devid,
            self.instance,
            self._backend.timeout,
        )
        self._trace(AnsweredBy.TIMEOUT, _FAILURE)
        self._give_up()
        self._answer(_FAILURE)

    def _give_up(self) -> None:
        """Nobody waits for the answer in flight any more: it will be dropped, and the
        manager is asked to cancel the command. The slot stays held until it is gone."""
        self._waiting = False
        self._stop_timer()
        if self._ticket is not None:
            self._backend.manager.cancel(self._ticket)

    def _defer(self) -> None:
        """The frontend signalled while the slot is held for an answer nobody waits for:
        look at its pages when the slot frees, or answer by the timeout."""
        self._deferred = True
        if not self._deferral.armed:
            self._deferral.arm()

    def _on_deferred_timeout(self) -> None:
        """The slot stayed held for the whole timeout: answer what the frontend put on
        its pages (one look) without forwarding it, as for a silent vTPM. A v2 CANCEL
        keeps waiting for the slot: its answer is IDLE, and only the slot's end gives it."""
        if not self._deferred or self._ring is None:
            return
        decision = self._ring.take()
        if isinstance(decision, NotSubmitted):
            self._deferred = decision.state == CANCEL
            return
        self._deferred = False
        self.requests += 1
        self.log.warning(
            "vtpm %d: instance %d still busy with a dropped request: TPM_RC_FAILURE",
            self.key.devid,
            self.instance,
        )
        if isinstance(decision, Forward):
            request = (time.time(), decision.code, len(decision.command))
            self._trace(AnsweredBy.TIMEOUT, _FAILURE, request)
            self._answer(_FAILURE)
        else:
            self._trace(AnsweredBy.BACKEND, decision, (time.time(), -1, -1))
            self._answer(decision)

    def _trace(
        self,
        by: AnsweredBy,
        response: bytes | memoryview | None,
        request: tuple[float, int, int] | None = None,
    ) -> None:
        """A line in the traffic trace, if the backend keeps one: ``request`` (its time,
        code and size; -1: unknown, a malformed one) or else the one in flight."""
        trace = self._backend.trace
        if trace is not None:
            started, code, size = request or self._traced
            trace.record(self.instance, self.key.domid, started, code, size, response, by)

    def _stop_timer(self) -> None:
        self._wait.disarm()
        self._deferral.disarm()

    def _answer(self, response: bytes | memoryview) -> None:
        if self._channel is None or self._ring is None:
            return
        self._ring.answer(response)  # a response beyond the pages becomes TPM_RC_FAILURE
        self._channel.notify()
