"""One vTPM device as the backend sees it: its xenbus state, mapped pages and requests.

Connect maps the frontend's ring page and data pages once and binds its event channel;
each request is then copied out once, validated, and sent to the manager with a
timeout. The frontend is untrusted: every value read from its xenstore directory or its
pages is parsed strictly and bounded before use, and a failure costs this device only.

Spec: seed interface.tex "Virtual TPM"; DESIGN.md section 2; Linux
drivers/xen/xenbus/xenbus_probe_backend.c for the backend's state moves.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenvtpm import tpm, tpmif
from xenvtpm.errors import MalformedMessage, XenError, XenStoreError
from xenvtpm.intake import Forward, intake
from xenvtpm.loop import Timer
from xenvtpm.manager_link import Ticket
from xenvtpm.xen.interface import EventChannel, MappedPages
from xenvtpm.xenbus import BACKEND_MOVES, StateNode, XenbusState, read_state

if TYPE_CHECKING:
    from xenvtpm.backend import Backend

log = logging.getLogger("xenvtpm.backend")

S = XenbusState
_UINT = re.compile(rb"\A[0-9]{1,10}\Z")
_FAILURE = tpm.error_response(tpm.TPM_RC.FAILURE)


def parse_uint(raw: bytes, limit: int = 0xFFFFFFFF) -> int:
    """A decimal xenstore value, strictly: digits only, at most ``limit``."""
    value = raw.strip(b"\0")
    if not _UINT.match(value) or int(value) > limit:
        raise MalformedMessage(f"not a number in 0..{limit}: {raw[:32]!r}")
    return int(value)


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

    def __init__(self, key: DeviceKey, backend: Backend) -> None:
        self.key = key
        self._backend = backend
        self._xs = backend.xs
        self._hv = backend.hv
        self.path = f"backend/vtpm/{key.domid}/{key.devid}"
        self.log = log.getChild(f"dom{key.domid}")
        self._state = StateNode(self._xs, self.path, BACKEND_MOVES, self.log)
        self.frontend = ""
        self.instance = -1
        self._ring: MappedPages | None = None
        self._data: MappedPages | None = None
        self._refs: tuple[int, ...] = ()
        self._channel: EventChannel | None = None
        self._ticket: Ticket | None = None
        self._timer: Timer | None = None
        self.requests = 0

    @property
    def connected(self) -> bool:
        return self._channel is not None

    @property
    def state(self) -> XenbusState:
        return self._state.state

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Read what the toolstack wrote, watch the frontend, and say InitWait."""
        try:
            frontend_id = parse_uint(self._xs.read(f"{self.path}/frontend-id"), 0x7FEF)
            self.frontend = self._xs.read(f"{self.path}/frontend").decode("ascii")
            self.instance = parse_uint(self._xs.read(f"{self.path}/instance"))
        except (XenStoreError, MalformedMessage, UnicodeDecodeError) as e:
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
        self._state.switch(S.INIT_WAIT)
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

    def on_frontend_changed(self) -> None:
        if not self.frontend:
            return
        frontend = read_state(self._xs, self.frontend)
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
        """Map the ring and data pages, bind the event channel, then say Connected."""
        domid = self.key.domid
        try:
            other = self._backend.device_for_instance(self.instance)
            if other is not None and other is not self:
                raise MalformedMessage(
                    f"instance {self.instance} is already serving domain {other.key.domid}"
                )
            ring_ref = parse_uint(self._xs.read(f"{self.frontend}/ring-ref"))
            port = parse_uint(self._xs.read(f"{self.frontend}/event-channel"))
            self._ring = self._hv.grants.map_grant_refs(domid, [ring_ref])
            entries = tpmif.read_ring(self._ring.pages[0])
            refs = []
            for entry in entries:
                if entry.ref == 0:
                    break
                refs.append(entry.ref)
            if not refs:
                raise MalformedMessage("the ring names no data page")
            self._refs = tuple(refs)
            self._data = self._hv.grants.map_grant_refs(domid, self._refs)
            channel = self._hv.events.bind_interdomain(domid, port)
        except (XenError, MalformedMessage) as e:
            self._fatal(f"connect failed: {e}")
            return
        channel.consume()  # bind_interdomain leaves one spurious event pending (DESIGN 4)
        self._channel = channel
        self._backend.loop.add_reader(channel.fileno(), self._on_event)
        self._bind()
        self._switch(S.CONNECTED)
        self.log.info(
            "vtpm %d connected: ring ref %d, %d data pages, port %d",
            self.key.devid,
            ring_ref,
            len(self._refs),
            port,
        )

    def disconnect(self) -> None:
        """Drop the request in flight (its late reply will be discarded) and unmap."""
        self._cancel_request()
        if self._channel is not None:
            self._backend.loop.remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None
        for pages in (self._data, self._ring):
            if pages is not None:
                pages.close()
        self._data = self._ring = None

    def _fatal(self, message: str) -> None:
        """Like xenbus_dev_fatal: tell the frontend why, and close this device only."""
        self.log.error("vtpm %d: %s", self.key.devid, message)
        self.disconnect()
        with contextlib.suppress(XenStoreError):
            self._xs.write(f"{self.path}/error", message[:256])
        self._switch(S.CLOSING)

    def _switch(self, state: XenbusState) -> None:
        try:
            self._state.switch(state)
        except XenStoreError as e:
            self.log.warning("cannot publish %s: %s", state.name, e)

    def _bind(self) -> None:
        """Tell the manager which domain now drives this instance (PCRs reset on change)."""

        def check(reply: memoryview) -> None:
            if tpm.response_code(reply) != tpm.TPM_RC.SUCCESS:
                self.log.error("manager refused to bind instance %d", self.instance)

        self._backend.manager.request(self.instance, tpm.bind_command(self.key.domid), check)

    # -- requests --------------------------------------------------------------------

    def _on_event(self) -> None:
        channel = self._channel
        assert channel is not None
        if not channel.consume():
            self.log.warning("vtpm %d: event channel closed by the frontend", self.key.devid)
            self.disconnect()
            self._switch(S.CLOSED)
            return
        if self._ticket is not None:
            return  # one request at a time: events while one is in flight mean nothing
        self._handle_request()

    def _handle_request(self) -> None:
        assert self._ring is not None and self._data is not None
        self.requests += 1
        decision = intake(self._ring.pages[0], self._data.pages, len(self._refs))
        if not isinstance(decision, Forward):
            self._answer(decision)  # malformed: the backend answers by itself
            return
        ticket = self._backend.manager.request(self.instance, decision.command, self._on_reply)
        if ticket.callback is not None:  # not already answered (manager unwritable)
            self._ticket = ticket
            self._timer = self._backend.loop.call_later(self._backend.timeout, self._on_timeout)

    def _on_reply(self, response: memoryview) -> None:
        self._ticket = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._answer(response)

    def _on_timeout(self) -> None:
        self.log.warning(
            "vtpm %d: instance %d silent for %.0f s: TPM_RC_FAILURE",
            self.key.devid,
            self.instance,
            self._backend.timeout,
        )
        self._timer = None
        self._cancel_request()
        self._answer(_FAILURE)

    def _cancel_request(self) -> None:
        if self._ticket is not None:
            self._ticket.abandon()
            self._ticket = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _answer(self, response: bytes | memoryview) -> None:
        if self._channel is None or self._ring is None or self._data is None:
            return
        if len(response) > tpmif.capacity(len(self._refs)):
            response = _FAILURE
        tpmif.write_packet(self._ring.pages[0], self._data.pages, self._refs, response)
        self._channel.notify()
