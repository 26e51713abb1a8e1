"""A model of Linux ``xen-tpmfront`` (protocol v2), so the sim target exercises v2.

It does what drivers/char/tpm/xen-tpmfront.c does, step for step, over our hypervisor
interface instead of the kernel's:

* probe (tpmfront_probe -> setup_ring): grant one zeroed page, allocate an unbound
  port, write ``ring-ref``, ``event-channel`` and ``feature-protocol-v2 = "1"`` in one
  transaction, switch to Initialised. It does not wait for the backend's InitWait, and
  it may send a command at once (the kernel's probe asks for timeouts), before the
  backend is connected.
* backend_changed: when the backend says Initialised or Connected, read the backend's
  ``feature-protocol-v2``; 0 or missing -> fatal "vTPM protocol 2 required"; else
  Connected. Closing/Closed -> the device goes away.
* vtpm_send: refuse ``offset + count > PAGE_SIZE`` (EINVAL); wait for an idle status
  (IDLE or FINISH); copy the command, write ``length``, then ``state = SUBMIT``, notify;
  wait for idle again, else cancel (ETIME).
* vtpm_recv: IDLE means cancelled (ECANCELED); otherwise wait for FINISH and copy
  ``length`` bytes (clipped to the page) from ``8 + 4 * nr_extra_pages``.
* vtpm_cancel: ``state = CANCEL``, notify. vtpm_status maps states to status bits.

Tests also use it to break the rules on purpose (``page``, ``notify``), since it holds
the very page the backend maps.
"""

from __future__ import annotations

import errno
import select
import struct
import time
from types import TracebackType

from xenvtpm import tpm, tpmif_v2
from xenvtpm.errors import XenStoreError
from xenvtpm.sim.adapter import SimControl, SimHypervisor
from xenvtpm.tpmif_v2 import VtpmState
from xenvtpm.xen.interface import EventChannel, Hypervisor, SharedPages
from xenvtpm.xenbus import XenbusState

S = XenbusState
PAGE_SIZE = 4096
# enum status_bits in xen-tpmfront.c
STATUS_RUNNING, STATUS_IDLE, STATUS_RESULT, STATUS_CANCELED = 0x1, 0x2, 0x4, 0x8
TIMEOUT_C = 5.0  # the kernel's default timeout_c is 750 ms; the sim may be loaded


class KernelFrontend:
    """One ``device/vtpm/<devid>`` served the way xen-tpmfront serves it."""

    def __init__(self, hv: Hypervisor, devid: int = 0) -> None:
        self.hv = hv
        self.xs = hv.xenstore
        self.node = f"device/vtpm/{devid}"
        self.backend_id = int(self.xs.read(f"{self.node}/backend-id"))
        self.backend = self.xs.read(f"{self.node}/backend").decode()
        self.shared: SharedPages | None = None
        self.extra: SharedPages | None = None
        self.channel: EventChannel | None = None
        self.state = S.INITIALISING

    @classmethod
    def in_domain(cls, control: SimControl, domid: int, devid: int = 0) -> KernelFrontend:
        """A frontend running as domain ``domid`` (its own xenstore and grant rights)."""
        xs_fd, hc_fd = control.connect_domain(domid)
        return cls(SimHypervisor.from_fds(xs_fd, hc_fd), devid)

    # -- setup_ring / backend_changed ------------------------------------------------

    @property
    def page(self) -> memoryview:
        assert self.shared is not None
        return self.shared.pages[0]

    def probe(
        self,
        *,
        nr_extra_pages: int = 0,
        before_initialised: bytes | None = None,
        feature: str = "1",
    ) -> None:
        """setup_ring: grant, port, one transaction of keys, Initialised.

        ``nr_extra_pages`` (xen-tpmfront: always 0) grants that many more pages and
        writes their refs after the header. ``before_initialised`` puts a command with
        SUBMIT on the page before saying Initialised: what the kernel's probe does when
        it beats the backend, made deterministic.
        """
        self.shared = self.hv.grants.share_pages(self.backend_id, 1)  # zeroed: IDLE
        page = self.page
        if nr_extra_pages:
            self.extra = self.hv.grants.share_pages(self.backend_id, nr_extra_pages)
            refs = list(self.extra.refs)
            for i, ref in enumerate(refs):
                page[8 + 4 * i : 12 + 4 * i] = ref.to_bytes(4, "little")
        page[7] = nr_extra_pages & 0xFF
        self.channel = self.hv.events.bind_unbound_port(self.backend_id)
        if before_initialised is not None:
            self._submit(before_initialised)
        values = {
            "ring-ref": str(self.shared.refs[0]),
            "event-channel": str(self.channel.port),
            "feature-protocol-v2": feature,
        }
        while True:
            tx = self.xs.transaction_start()
            for key, value in values.items():
                self.xs.write(f"{self.node}/{key}", value, tx=tx)
            if self.xs.transaction_end(tx, commit=True):
                break
        self._switch(S.INITIALISED)

    def _switch(self, state: XenbusState) -> None:
        self.xs.write(f"{self.node}/state", str(int(state)))
        self.state = state

    def backend_state(self) -> XenbusState:
        try:
            return XenbusState(int(self.xs.read(f"{self.backend}/state")))
        except (XenStoreError, ValueError):
            return S.UNKNOWN

    def wait_connected(self, timeout: float = 15.0) -> None:
        """backend_changed until Connected; raise on a refusal, like xenbus_dev_fatal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            backend = self.backend_state()
            if backend in (S.INITIALISED, S.CONNECTED):
                try:
                    v2 = int(self.xs.read(f"{self.backend}/feature-protocol-v2"))
                except (XenStoreError, ValueError):
                    v2 = 0
                if not v2:
                    self._switch(S.CLOSING)
                    raise OSError(errno.EINVAL, "vTPM protocol 2 required")
                self._switch(S.CONNECTED)
                return
            if backend in (S.CLOSING, S.CLOSED):
                raise ConnectionError(f"backend went {backend.name}: {self.backend_error()}")
            time.sleep(0.005)
        raise TimeoutError(f"backend still {self.backend_state().name}")

    def backend_error(self) -> str | None:
        try:
            return self.xs.read(f"{self.backend}/error").decode(errors="replace")
        except XenStoreError:
            return None

    # -- tpm_class_ops -----------------------------------------------------------------

    def status(self) -> int:
        """vtpm_status."""
        state = self.page[4]
        if state == VtpmState.IDLE:
            return STATUS_IDLE | STATUS_CANCELED
        if state == VtpmState.FINISH:
            return STATUS_IDLE | STATUS_RESULT
        if state in (VtpmState.SUBMIT, VtpmState.CANCEL):
            return STATUS_RUNNING
        return 0

    def notify(self) -> None:
        assert self.channel is not None
        self.channel.notify()

    def wait_status(self, mask: int, timeout: float) -> bool:
        """wait_for_tpm_stat with check_cancel: the status has ``mask``, or cancelled."""
        assert self.channel is not None
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status & mask == mask:
                return True
            if status & STATUS_CANCELED:
                raise OSError(errno.ECANCELED, "cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.channel.fileno()], [], [], min(left, 0.005))
            if ready:
                self.channel.consume()

    def _submit(self, command: bytes, locality: int | None = None) -> None:
        page = self.page
        offset = 8 + 4 * page[7]
        page[offset : offset + len(command)] = command
        page[0:4] = len(command).to_bytes(4, "little")
        if locality is not None:
            page[5] = locality
        page[4] = VtpmState.SUBMIT

    def send(self, command: bytes, timeout: float = 30.0, locality: int | None = None) -> None:
        """vtpm_send: the command is on the page and answered, or OSError."""
        offset = 8 + 4 * self.page[7]
        if offset > PAGE_SIZE or offset + len(command) > PAGE_SIZE:
            raise OSError(errno.EINVAL, f"{len(command)} bytes do not fit at offset {offset}")
        if not self.wait_status(STATUS_IDLE, TIMEOUT_C):
            self.cancel()
            raise OSError(errno.ETIME, "the vTPM is still busy")
        self._submit(command, locality)
        self.notify()
        if not self.wait_status(STATUS_IDLE, timeout):
            self.cancel()
            raise OSError(errno.ETIME, "no answer")

    def recv(self, count: int = PAGE_SIZE) -> bytes:
        """vtpm_recv."""
        if self.page[4] == VtpmState.IDLE:
            raise OSError(errno.ECANCELED, "cancelled")
        if not self.wait_status(STATUS_RESULT, TIMEOUT_C):
            self.cancel()
            raise OSError(errno.ETIME, "no result")
        return tpmif_v2.read_response(self.page, count)

    def cancel(self) -> None:
        """vtpm_cancel."""
        self.page[4] = VtpmState.CANCEL
        self.notify()

    def transmit(self, command: bytes, timeout: float = 30.0) -> bytes:
        """What /dev/tpm0 does with one write and one read: send, then recv."""
        self.send(command, timeout)
        return self.recv()

    # -- tpmfront_remove ---------------------------------------------------------------

    def close(self) -> None:
        """Closed, port unbound, grants revoked, xenstore connection closed."""
        try:
            if self.state != S.CLOSED:
                self._switch(S.CLOSED)
        except (XenStoreError, OSError):
            pass
        for res in (self.channel, self.extra, self.shared):
            if res is not None:
                res.close()
        self.channel = self.extra = self.shared = None
        self.hv.close()

    def __enter__(self) -> KernelFrontend:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def get_random_v2(fe: KernelFrontend, n: int = 16) -> bytes:
    """GetRandom(n) through the v2 page; asserts the exact response header."""
    response = fe.transmit(tpm.get_random_command(n))
    assert response[:12] == struct.pack(">HIIH", 0x8001, 12 + n, 0, n), response.hex()
    assert len(response) == 12 + n
    return response[12:]
