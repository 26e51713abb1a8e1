"""The two shared-memory protocols a backend device speaks, each as one small class.

:class:`~xenvtpm.backend.device.BackendDevice` owns everything the protocols share:
xenbus states, the event channel, the request in flight, its timeout and the manager.
What differs is only how pages are mapped at connect, how a request is taken out of them
and how an answer is put back. That is this module:

* :class:`Ring2006` -- the seed's ring: one ring page and the data pages its entries
  name, mapped once (``tpmif``). Our Python frontend speaks it.
* :class:`SharedPageV2` -- protocol v2 of Linux ``xen-tpmfront``: one shared page and
  its ``nr_extra_pages`` extra pages, mapped once (``tpmif_v2``).

Which one a device speaks is decided once per connection by :func:`frontend_protocol`,
from what the frontend itself wrote next to ``ring-ref``. Why the frontend's key and
not a toolstack key: xen-tpmfront writes ``feature-protocol-v2 = "1"`` into its own
directory in the same transaction as ``ring-ref`` and ``event-channel``
(drivers/char/tpm/xen-tpmfront.c, setup_ring), which is exactly the moment the backend
must know how to read ``ring-ref``; the 2006 frontend writes no such key. A toolstack key
would have to be kept in step with whichever driver the guest kernel happens to load
(xen-tpmfront or ours through vtpm_proxy), which only the guest knows. Letting the guest
pick costs nothing: both protocols are held to the same intake rules, and either way
it reaches only its own instance. The backend advertises ``feature-protocol-v2 = "1"``
in its own directory, as xen-tpmfront requires before it says Connected (tpmif.h: "5.
Backend maps grant and event channel, verifies feature-protocol-v2").

Spec: seed interface.tex "Virtual TPM"; Linux include/xen/interface/io/tpmif.h.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

from xenvtpm import tpm, tpmif, tpmif_v2
from xenvtpm.errors import MalformedMessage, XenStoreError
from xenvtpm.intake import Forward, NotSubmitted, intake, intake_v2
from xenvtpm.tpmif_v2 import FEATURE_PROTOCOL_V2
from xenvtpm.xen.interface import Hypervisor, MappedPages, XenStore
from xenvtpm.xenbus import parse_uint

_FAILURE = tpm.error_response(tpm.TPM_RC.FAILURE)
__all__ = [
    "FEATURE_PROTOCOL_V2",
    "Ring",
    "Ring2006",
    "SharedPageV2",
    "VtpmProtocol",
    "frontend_protocol",
    "map_ring",
]


class VtpmProtocol(enum.Enum):
    """Which shared-memory protocol a connected device speaks."""

    RING_2006 = "2006"
    V2 = "v2"


def frontend_protocol(xs: XenStore, frontend: str) -> VtpmProtocol:
    """The frontend's choice: ``feature-protocol-v2`` non-zero means v2, absent the ring.

    Parsed strictly (decimal, at most 10 digits); garbage raises MalformedMessage and the
    connection is refused, as for a garbage ``ring-ref``.
    """
    try:
        raw = xs.read(f"{frontend}/{FEATURE_PROTOCOL_V2}")
    except XenStoreError as e:
        if e.errno_name == "ENOENT":
            return VtpmProtocol.RING_2006
        raise
    return VtpmProtocol.V2 if parse_uint(raw) else VtpmProtocol.RING_2006


class Ring(Protocol):
    """One connection's pages, as the device uses them."""

    protocol: VtpmProtocol

    @property
    def describe(self) -> str:
        """For the connect log line."""
        ...

    def take(self) -> bytes | Forward | NotSubmitted:
        """The request the frontend signalled: an own answer, a forward, or none."""
        ...

    def cancel_requested(self) -> bool:
        """While a request is in flight: has the frontend asked to cancel it?"""
        ...

    def answer(self, response: bytes | memoryview) -> None:
        """Put the response where the frontend reads it (not notified here)."""
        ...

    def cancelled(self) -> None:
        """Tell the frontend its request is gone, answered by nobody."""
        ...

    def close(self) -> None: ...


def _close_all(maps: Sequence[MappedPages | None]) -> None:
    for pages in maps:
        if pages is not None:
            pages.close()


class Ring2006:
    """The 2006 ring: ring page + the data pages named by its entries, mapped once."""

    protocol = VtpmProtocol.RING_2006

    def __init__(self, ring: MappedPages, data: MappedPages, refs: tuple[int, ...]) -> None:
        self._ring = ring
        self._data = data
        self._refs = refs
        # the mappings' own views, looked up once: their close releases these very views
        self._ring_page = ring.pages[0]
        self._data_pages = data.pages
        self._npages = len(refs)
        self._capacity = tpmif.capacity(len(refs))

    @classmethod
    def map(cls, hv: Hypervisor, domid: int, ring_ref: int) -> Ring2006:
        """Map the ring page, read its entries once, map the data pages they name."""
        ring = hv.grants.map_grant_refs(domid, [ring_ref])
        data: MappedPages | None = None
        try:
            refs = []
            for entry in tpmif.read_ring(ring.pages[0]):
                if entry.ref == 0:
                    break
                refs.append(entry.ref)
            if not refs:
                raise MalformedMessage("the ring names no data page")
            data = hv.grants.map_grant_refs(domid, refs)
            return cls(ring, data, tuple(refs))
        except BaseException:
            _close_all([data, ring])
            raise

    @property
    def describe(self) -> str:
        return f"2006 ring, {len(self._refs)} data pages"

    def take(self) -> bytes | Forward:
        return intake(self._ring_page, self._data_pages, self._npages)

    def cancel_requested(self) -> bool:
        return False  # the 2006 ring has no cancel: events in flight mean nothing

    def answer(self, response: bytes | memoryview) -> None:
        if len(response) > self._capacity:
            response = _FAILURE
        tpmif.write_packet(self._ring_page, self._data_pages, self._refs, response)

    def cancelled(self) -> None:
        pass  # never asked for (cancel_requested is always False)

    def close(self) -> None:
        _close_all([self._data, self._ring])


class SharedPageV2:
    """Protocol v2: the shared page and its extra pages, mapped once at connect.

    ``nr_extra_pages`` and the extra refs are read once, at connect, and bounded by
    :data:`tpmif_v2.MAX_EXTRA_PAGES`; a request whose header later names another count
    is answered TPM_RC_COMMAND_SIZE (the pages are never mapped per request). The backend
    writes ``state`` only to FINISH (with an answer) or IDLE (a cancel done), and writes
    it last.
    """

    protocol = VtpmProtocol.V2

    def __init__(self, shared: MappedPages, extra: MappedPages | None, nr_extra: int) -> None:
        self._shared = shared
        self._extra = extra
        self._nr_extra = nr_extra
        self.last_locality = 0
        self.nonzero_localities = 0

    @classmethod
    def map(cls, hv: Hypervisor, domid: int, ring_ref: int) -> SharedPageV2:
        shared = hv.grants.map_grant_refs(domid, [ring_ref])
        try:
            page = shared.pages[0]
            header = tpmif_v2.read_header(page)
            nr_extra = header.nr_extra_pages
            if nr_extra > tpmif_v2.MAX_EXTRA_PAGES:
                raise MalformedMessage(f"nr_extra_pages {nr_extra} > {tpmif_v2.MAX_EXTRA_PAGES}")
            refs = tpmif_v2.read_extra_refs(page, nr_extra)
            del page  # a view into the mapping must not outlive it
            extra = hv.grants.map_grant_refs(domid, refs) if refs else None
        except BaseException:
            shared.close()
            raise
        return cls(shared, extra, nr_extra)

    @property
    def describe(self) -> str:
        return f"protocol v2, {self._nr_extra} extra pages"

    @property
    def _extra_pages(self) -> Sequence[memoryview]:
        return self._extra.pages if self._extra is not None else ()

    def take(self) -> bytes | Forward | NotSubmitted:
        decision = intake_v2(self._shared.pages[0], self._extra_pages, self._nr_extra)
        if isinstance(decision, Forward):
            # Recorded, not forwarded: the manager's packet (instance id + command) has
            # no locality, so every command runs at swtpm's default locality 0.
            self.last_locality = decision.locality
            if decision.locality:
                self.nonzero_localities += 1
        return decision

    def cancel_requested(self) -> bool:
        state = tpmif_v2.read_header(self._shared.pages[0]).state  # one copy
        return state == tpmif_v2.VtpmState.CANCEL

    def answer(self, response: bytes | memoryview) -> None:
        if len(response) > tpmif_v2.capacity(self._nr_extra):
            response = _FAILURE
        tpmif_v2.write_packet(
            self._shared.pages[0],
            self._extra_pages,
            self._nr_extra,
            response,
            tpmif_v2.VtpmState.FINISH,
        )

    def cancelled(self) -> None:
        tpmif_v2.write_state(self._shared.pages[0], tpmif_v2.VtpmState.IDLE)

    def close(self) -> None:
        _close_all([self._extra, self._shared])


def map_ring(protocol: VtpmProtocol, hv: Hypervisor, domid: int, ring_ref: int) -> Ring:
    """Map what ``ring-ref`` names, the way ``protocol`` lays it out."""
    if protocol is VtpmProtocol.V2:
        return SharedPageV2.map(hv, domid, ring_ref)
    return Ring2006.map(hv, domid, ring_ref)
