"""The guest side of the vTPM split driver.

It grants one ring page and ten data pages to the backend once, at start, and keeps
them for its whole life; runs the xenbus handshake (and runs it again whenever the
backend goes away and comes back); and serves the guest's TPM endpoint, one command
at a time: the 2006 ring holds exactly one request.

    TPM client -> endpoint -> [Frontend] -> ring + event channel -> backend

Spec: seed interface.tex "Virtual TPM"; DESIGN.md section 2.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
from collections.abc import Callable
from typing import Protocol

from xenvtpm import tpm, tpmif
from xenvtpm.daemon import configure_logging, default_log_level, run_service
from xenvtpm.errors import MalformedMessage, TransactionConflict, XenStoreError
from xenvtpm.frontend.endpoint import SocketEndpoint
from xenvtpm.frontend.vtpm_proxy import VTPMX, VtpmProxyEndpoint, unbind_kernel_frontend
from xenvtpm.loop import Alarm, Loop, Timer
from xenvtpm.tpmif_v2 import FEATURE_PROTOCOL_V2
from xenvtpm.xen.interface import EventChannel, Hypervisor, SharedPages
from xenvtpm.xenbus import FRONTEND_MOVES, StateNode, XenbusState, read_state

log = logging.getLogger("xenvtpm.frontend")  # the daemon's name (daemon.py)

S = XenbusState
DATA_PAGES = tpmif.TPMIF_TX_RING_SIZE
CAPACITY = tpmif.capacity(DATA_PAGES)
DEFAULT_TIMEOUT = 180.0  # beyond the backend's own vTPM timeout; the backend answers first
PUBLISH_RETRY_S = 1.0  # after xenstored refused a state change at every attempt


class TpmClient(Protocol):
    """Who sent a command: ``endpoint.EndpointClient`` or ``vtpm_proxy.ProxyClient``."""

    alive: bool

    def reply(self, response: bytes | memoryview) -> None: ...


class Endpoint(Protocol):
    """The guest's TPM endpoint: a SEQPACKET socket (sim) or a vTPM proxy device."""

    def start(self, loop: Loop, on_command: Callable[[TpmClient, memoryview], None]) -> None: ...
    def close(self) -> None: ...


class Frontend:
    """One vTPM device (``device/vtpm/<devid>``) of this domain."""

    def __init__(
        self,
        hv: Hypervisor,
        loop: Loop,
        endpoint: Endpoint,
        devid: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        serve_on_connect: bool = False,
    ) -> None:
        """``serve_on_connect`` starts the endpoint only once the ring is Connected: a
        vTPM proxy device is probed by the kernel the moment it exists, with ~2 s
        timeouts (DESIGN.md 4), so it must not exist before commands can flow."""
        self._hv = hv
        self._xs = hv.xenstore
        self._loop = loop
        self._endpoint = endpoint
        self._serve_on_connect = serve_on_connect
        self._timeout = timeout
        self.node = f"device/vtpm/{devid}"
        self.log = log.getChild(f"vtpm{devid}")
        self._state = StateNode(self._xs, self.node, FRONTEND_MOVES, self.log)
        self._pages: SharedPages | None = None
        self._data_refs: tuple[int, ...] = ()
        self._channel: EventChannel | None = None
        self._backend_id = -1
        self._backend_path = ""
        self._queue: collections.deque[tuple[TpmClient, bytes]] = collections.deque()
        self._inflight: TpmClient | None = None  # whose command is on the ring
        self._abandoned = False  # we gave up waiting; the late answer must be dropped
        self._alarm = Alarm(loop, timeout, self._on_timeout)
        self._retry: Timer | None = None
        self._started = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Grant the pages, publish Initialising and start watching the backend."""
        if self._started:
            return
        self._started = True
        try:
            self._backend_id = int(self._xs.read(f"{self.node}/backend-id"))
            self._backend_path = self._xs.read(f"{self.node}/backend").decode()
            self._pages = self._hv.grants.share_pages(self._backend_id, 1 + DATA_PAGES)
            self._state.switch(S.INITIALISING)
            self._xs.watch(f"{self._backend_path}/state", "backend-state")
            self._loop.add_reader(self._xs.fileno(), self._on_xenstore)
            if not self._serve_on_connect:
                self._endpoint.start(self._loop, self._on_command)
        except BaseException:
            self.close()
            raise
        self.log.info(
            "granted ring ref %d and %d data pages to domain %d",
            self._pages.refs[0],
            DATA_PAGES,
            self._backend_id,
        )

    def close(self) -> None:
        """Closing, then Closed; fail what is queued; revoke the grants. Idempotent."""
        if not self._started:
            return
        self._started = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._endpoint.close()
        self._fail_all(tpm.TPM_RC.FAILURE)
        self._alarm.close()
        self._loop.remove_reader(self._xs.fileno())
        try:
            if self._state.state not in (S.UNKNOWN, S.CLOSED):
                self._state.switch(S.CLOSING)
                self._state.switch(S.CLOSED)
        except XenStoreError as e:
            self.log.warning("could not publish Closed: %s", e)
        self._drop_channel()
        if self._pages is not None:
            self._pages.close()
            self._pages = None

    # -- xenbus ------------------------------------------------------------------

    def _on_xenstore(self) -> None:
        if self._xs.read_watches():
            self._look_at_backend()

    def _look_at_backend(self) -> None:
        """React to the backend's state. A state change that xenstored refused at every
        attempt (StateNode logged it) is tried again a little later, as a fresh look."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        try:
            backend = read_state(self._xs, self._backend_path)
        except XenStoreError as e:
            # the toolstack removed the device (xl vtpm-detach): its directory is gone,
            # which xenstored answers ENOENT or EACCES; wait for the next one
            self.log.info("backend's state unreadable (%s): as gone", e.errno_name)
            backend = S.UNKNOWN
        try:
            self._react(backend)
        except TransactionConflict:
            self._retry_later()

    def _retry_later(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._retry = self._loop.call_later(PUBLISH_RETRY_S, self._look_at_backend)

    def _react(self, backend: XenbusState) -> None:
        mine = self._state.state
        if mine in (S.INITIALISED, S.CONNECTED) and backend in (
            S.INIT_WAIT,
            S.CLOSING,
            S.CLOSED,
            S.UNKNOWN,
        ):
            self.log.warning("backend went %s: reconnecting", backend.name)
            self._disconnect()
            mine = self._state.state
        if mine == S.INITIALISING and backend == S.INIT_WAIT:
            self._publish()
        elif mine == S.INITIALISED and backend == S.CONNECTED:
            self._state.switch(S.CONNECTED)
            self.log.info("connected to backend domain %d", self._backend_id)
            self._endpoint.start(self._loop, self._on_command)  # idempotent
            self._send_next()

    def _publish(self) -> None:
        """Write the ring refs, allocate the event channel, and say Initialised.

        ``feature-protocol-v2 = 0`` goes in the same transaction: the backend reads the
        protocol from this key, and the kernel's xen-tpmfront, which udev may have bound
        to this device first (see ``vtpm_proxy.unbind_kernel_frontend``), leaves a ``1``
        behind that would make the backend read our ring as a v2 shared page.
        """
        assert self._pages is not None
        refs = self._pages.refs
        self._data_refs = tuple(refs[1:])
        ring_page, data_pages = self._pages.pages[0], self._pages.pages[1:]
        tpmif.write_ring(ring_page, tpmif.ring_entries(self._data_refs, [0] * len(data_pages)))
        self._channel = self._hv.events.bind_unbound_port(self._backend_id)
        self._loop.add_reader(self._channel.fileno(), self._on_event)
        try:
            self._state.publish(
                S.INITIALISED,
                {
                    "ring-ref": str(refs[0]),
                    "event-channel": str(self._channel.port),
                    FEATURE_PROTOCOL_V2: "0",  # the 2006 ring
                },
            )
        except XenStoreError:
            self._drop_channel()  # nothing was published: the next try binds afresh
            raise

    def _disconnect(self) -> None:
        """The backend left: fail the command in flight, drop the channel, start over."""
        self._fail_inflight()
        self._drop_channel()
        self._state.switch(S.INITIALISING)

    def _drop_channel(self) -> None:
        if self._channel is not None:
            self._loop.remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None

    # -- the ring ----------------------------------------------------------------

    def _on_command(self, client: TpmClient, command: memoryview) -> None:
        if len(command) > CAPACITY:
            client.reply(tpm.error_response(tpm.TPM_RC.COMMAND_SIZE))
            return
        if self._inflight is None and not self._queue and self._ready():
            self._submit(client, command)  # the ring is free: straight onto the pages
            return
        self._queue.append((client, bytes(command)))
        self._send_next()

    def _ready(self) -> bool:
        """Connected, with a channel (not dropped and waiting to publish again)."""
        return self._state.state == S.CONNECTED and self._channel is not None

    def _send_next(self) -> None:
        if self._inflight is not None or not self._ready():
            return
        while self._queue:
            client, command = self._queue.popleft()
            if client.alive:
                break
        else:
            return
        self._submit(client, command)

    def _submit(self, client: TpmClient, command: bytes | memoryview) -> None:
        """Put one command on the ring and signal it: the ring's one request."""
        assert self._pages is not None and self._channel is not None
        pages = self._pages.pages
        tpmif.write_packet(pages[0], pages[1:], self._data_refs, command)
        self._inflight = client
        self._abandoned = False
        self._alarm.arm()
        self._channel.notify()

    def _on_event(self) -> None:
        channel = self._channel
        assert channel is not None
        if not channel.consume():
            self.log.warning("event channel closed by the backend")
            try:
                self._disconnect()
            except TransactionConflict:
                self._retry_later()
            return
        client = self._inflight
        if client is None:
            return  # spurious: the backend only ever answers a request
        assert self._pages is not None
        pages = self._pages.pages
        try:
            response = tpmif.gather(pages[1:], tpmif.read_length(pages[0], DATA_PAGES))
            tpm.validate_response(response)
        except MalformedMessage as e:
            self.log.warning("backend sent a malformed response: %s", e)
            response = tpm.error_response(tpm.TPM_RC.FAILURE)
        self._inflight = None
        self._alarm.disarm()
        if not self._abandoned:
            client.reply(response)
        if self._queue:
            self._send_next()

    def _on_timeout(self) -> None:
        client = self._inflight
        if client is None or self._abandoned:
            return
        self.log.warning("no answer from the backend in %.0f s", self._timeout)
        self._abandoned = True
        client.reply(tpm.error_response(tpm.TPM_RC.FAILURE))

    def _fail_inflight(self) -> None:
        client, self._inflight = self._inflight, None
        self._alarm.disarm()
        if client is not None and not self._abandoned:
            client.reply(tpm.error_response(tpm.TPM_RC.FAILURE))

    def _fail_all(self, rc: int) -> None:
        self._fail_inflight()
        while self._queue:
            client, _ = self._queue.popleft()
            client.reply(tpm.error_response(rc))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xenvtpm frontend",
        description="Guest side of the Xen vTPM split driver: connects device/vtpm/<devid> "
        "to its backend and serves the guest's TPM endpoint.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="path of the TPM endpoint (SOCK_SEQPACKET)")
    where.add_argument(
        "--device",
        action="store_true",
        help=f"create the guest's /dev/tpmN through {VTPMX} (tpm_vtpm_proxy) once connected",
    )
    p.add_argument("--devid", type=int, default=0, help="vTPM device id (default 0)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per command")
    p.add_argument("--log-level", default=default_log_level())
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("frontend", args.log_level)
    if args.device and not os.path.exists(VTPMX):
        log.error("%s is missing: modprobe tpm_vtpm_proxy", VTPMX)
        return 1
    if args.device and unbind_kernel_frontend(args.devid):
        log.warning("unbound the kernel's xen-tpmfront from vtpm-%d: blacklist it", args.devid)
    endpoint: Endpoint = (
        VtpmProxyEndpoint(CAPACITY) if args.device else SocketEndpoint(args.socket, CAPACITY)
    )
    return run_service(
        "frontend",
        args.log_level,
        lambda hv, loop: Frontend(
            hv, loop, endpoint, args.devid, args.timeout, serve_on_connect=args.device
        ),
    )
