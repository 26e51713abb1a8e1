"""The 2006 vTPM shared ring: byte layout of ``tpmif_tx_request_t``, page slicing, sizes.

One ring page holds ``TPMIF_TX_RING_SIZE`` (10) entries; entry ``i`` names data page
``i`` by its grant reference and carries ``size``, the number of packet bytes remaining
from that page on.  A packet of N bytes therefore occupies ``ceil(N / 4096)`` pages;
entry 0's ``size`` is the whole packet length.  The request and its response travel in
the same pages, one at a time.

Shared memory is hostile: the peer may rewrite it at any moment.  So :func:`read_ring`
copies the 160 ring bytes once and parses only the private copy, :func:`gather` copies
the packet out in one pass into private ``bytes``, and :func:`packet_length` checks the
one frontend-controlled length before anything is indexed with it (the XSA-155 lesson:
no double fetch).  ``addr`` (a machine address in 2006) is meaningless to a userspace
frontend: writers put 0 there and readers never use it.

Spec: 000_a1dfc4f903a123f1.txt (Xen interface.tex, "Virtual TPM ring interface");
xen/include/public/io/tpmif.h (Xen 3.0: tpmif_tx_request_t, TPMIF_TX_RING_SIZE).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from xenvtpm.errors import MalformedMessage

__all__ = [
    "PAGE_SIZE",
    "RING_BYTES",
    "TPMIF_TX_RING_SIZE",
    "TX_REQUEST_SIZE",
    "TxRequest",
    "capacity",
    "gather",
    "packet_length",
    "page_sizes",
    "pages_needed",
    "read_length",
    "read_ring",
    "ring_entries",
    "scatter",
    "write_packet",
    "write_ring",
]

#: xen/include/public/io/tpmif.h: ``#define TPMIF_TX_RING_SIZE 10``.
TPMIF_TX_RING_SIZE = 10
#: x86 page size; a data page carries at most this many packet bytes.
PAGE_SIZE = 4096

# tpmif_tx_request_t on LP64, host byte order, no padding:
#   unsigned long addr @0 (u64); grant_ref_t ref @8 (u32); uint16_t unused @12;
#   uint16_t size @14; sizeof == 16.
_TX_REQUEST_QIHH = struct.Struct("=QIHH")
TX_REQUEST_SIZE = _TX_REQUEST_QIHH.size
#: struct tpmif_tx_interface { struct tpmif_ring ring[TPMIF_TX_RING_SIZE]; }
RING_BYTES = TX_REQUEST_SIZE * TPMIF_TX_RING_SIZE
_RING_10QIHH = struct.Struct("=" + "QIHH" * TPMIF_TX_RING_SIZE)


@dataclass(frozen=True, slots=True)
class TxRequest:
    """One ring entry.  Spec: tpmif.h ``tpmif_tx_request_t`` (addr, ref, unused, size)."""

    addr: int
    ref: int
    unused: int
    size: int

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> TxRequest:
        """Parse exactly 16 bytes; raise :class:`MalformedMessage` otherwise."""
        try:
            addr, ref, unused, size = _TX_REQUEST_QIHH.unpack(data)
        except struct.error as exc:
            raise MalformedMessage(
                f"tpmif_tx_request_t needs {TX_REQUEST_SIZE} bytes, got {len(data)}"
            ) from exc
        return cls(addr, ref, unused, size)

    def to_bytes(self) -> bytes:
        try:
            return _TX_REQUEST_QIHH.pack(self.addr, self.ref, self.unused, self.size)
        except struct.error as exc:
            raise MalformedMessage(f"tpmif_tx_request_t field out of range: {self}") from exc


def read_ring(page: bytes | bytearray | memoryview) -> tuple[TxRequest, ...]:
    """Copy the 10 ring entries out of shared memory once and parse the private copy.

    Spec: DESIGN.md 2 ("reads the request from shared memory exactly once").
    """
    private = bytes(page[:RING_BYTES])
    try:
        fields = _RING_10QIHH.unpack(private)
    except struct.error as exc:
        raise MalformedMessage(f"ring page needs {RING_BYTES} bytes, got {len(private)}") from exc
    return tuple(
        TxRequest(fields[i], fields[i + 1], fields[i + 2], fields[i + 3])
        for i in range(0, 4 * TPMIF_TX_RING_SIZE, 4)
    )


def write_ring(page: memoryview | bytearray, entries: Sequence[TxRequest]) -> None:
    """Write up to 10 entries at the start of the ring page, entry ``i`` at ``16 * i``."""
    if len(entries) > TPMIF_TX_RING_SIZE:
        raise ValueError(f"{len(entries)} ring entries > {TPMIF_TX_RING_SIZE}")
    try:
        for i, e in enumerate(entries):
            _TX_REQUEST_QIHH.pack_into(page, i * TX_REQUEST_SIZE, e.addr, e.ref, e.unused, e.size)
    except struct.error as exc:
        raise MalformedMessage(f"cannot write ring entry: {exc}") from exc


def pages_needed(n: int) -> int:
    """Data pages a packet of ``n`` bytes occupies: ``ceil(n / 4096)``."""
    return -(-n // PAGE_SIZE)


def capacity(npages: int) -> int:
    """Largest packet ``npages`` data pages (at most 10) can carry."""
    if not 0 <= npages <= TPMIF_TX_RING_SIZE:
        raise ValueError(f"{npages} data pages, must be 0..{TPMIF_TX_RING_SIZE}")
    return npages * PAGE_SIZE


def page_sizes(length: int, npages: int) -> list[int]:
    """The ``size`` of each of ``npages`` entries for a packet of ``length`` bytes.

    Entry ``i`` carries the bytes remaining from page ``i`` on; pages beyond the packet
    carry 0.  Spec: seed, "size: The size of the remaining packet".
    """
    if not 0 <= length <= capacity(npages):
        raise MalformedMessage(f"packet of {length} bytes does not fit {npages} pages")
    return [max(length - i * PAGE_SIZE, 0) for i in range(npages)]


def scatter(packet: bytes | bytearray | memoryview, pages: Sequence[memoryview]) -> list[int]:
    """Copy ``packet`` into consecutive data pages; return the ring ``size`` per page.

    Raises :class:`MalformedMessage` if the packet does not fit ``pages`` (at most 10).
    """
    sizes = page_sizes(len(packet), len(pages))
    src = memoryview(packet)
    for i, remaining in enumerate(sizes):
        if remaining == 0:
            break
        n = min(remaining, PAGE_SIZE)
        off = i * PAGE_SIZE
        pages[i][:n] = src[off : off + n]
    return sizes


def ring_entries(refs: Sequence[int], sizes: Sequence[int]) -> tuple[TxRequest, ...]:
    """Entries for the given grant refs and sizes; ``addr`` and ``unused`` are 0."""
    if len(refs) != len(sizes):
        raise ValueError(f"{len(refs)} refs but {len(sizes)} sizes")
    return tuple(TxRequest(0, ref, 0, size) for ref, size in zip(refs, sizes, strict=True))


#: The ring entries of 1..10 data pages, packed in one call on the per-command path.
_RING_PREFIXES = {n: struct.Struct("=" + "QIHH" * n) for n in range(1, TPMIF_TX_RING_SIZE + 1)}


def write_packet(
    ring: memoryview | bytearray,
    pages: Sequence[memoryview],
    refs: Sequence[int],
    packet: bytes | bytearray | memoryview,
) -> None:
    """Scatter ``packet`` into ``pages`` and write the matching entries into ``ring``.

    Entry ``i`` keeps page ``i``'s grant ref; its ``size`` is the bytes remaining from
    page ``i`` on (0 for pages the packet does not reach).  Data goes first, then the
    ring, so a peer that looks early sees no size pointing at stale data.  It runs
    twice per command, so it builds no entry objects: one slice copy per page and one
    ``pack_into`` for the ring, from a copy of the entries' fields kept per set of refs
    (the same bytes as :func:`write_ring` of :func:`ring_entries`, pinned by the tests).
    """
    npages = len(pages)
    if len(refs) != npages or not 0 < npages <= TPMIF_TX_RING_SIZE:
        raise ValueError(f"{len(refs)} refs for {npages} pages")
    length = len(packet)
    if length > npages * PAGE_SIZE:
        raise MalformedMessage(f"packet of {length} bytes does not fit {npages} pages")
    fields = _ring_fields(refs)
    if length <= PAGE_SIZE:  # every command of a TPM 2.0 client so far
        pages[0][:length] = packet
        fields[3] = length
    else:
        src = memoryview(packet)
        for i in range(pages_needed(length)):
            off = i * PAGE_SIZE
            n = min(length - off, PAGE_SIZE)
            pages[i][:n] = src[off : off + n]
            fields[4 * i + 3] = length - off
    try:
        _RING_PREFIXES[npages].pack_into(ring, 0, *fields)
    except struct.error as exc:
        raise MalformedMessage(f"cannot write ring entries: {exc}") from exc


#: Per set of data-page refs, the ring entries' fields with every ``size`` 0.
_FIELDS: dict[tuple[int, ...], list[int]] = {}
_FIELDS_MAX = 4096  # refs sets kept (one per connected device); beyond: built per call


def _ring_fields(refs: Sequence[int]) -> list[int]:
    """A fresh list ``[addr 0, ref, unused 0, size 0]`` per entry, for ``pack_into``."""
    key = refs if isinstance(refs, tuple) else tuple(refs)
    fields = _FIELDS.get(key)
    if fields is None:
        fields = [x for ref in key for x in (0, ref, 0, 0)]
        if len(_FIELDS) < _FIELDS_MAX:
            _FIELDS[key] = fields
    return fields.copy()


def read_length(ring: bytes | bytearray | memoryview, npages: int) -> int:
    """Entry 0's ``size``, copied out of shared memory once and checked against ``npages``.

    What :func:`packet_length` takes from :func:`read_ring`, for the per-command path:
    only entry 0 is ever used, so only its 16 bytes are copied and parsed.
    """
    private = bytes(ring[:TX_REQUEST_SIZE])
    try:
        length: int = _TX_REQUEST_QIHH.unpack(private)[3]
    except struct.error as exc:
        raise MalformedMessage(f"ring page needs {TX_REQUEST_SIZE} bytes") from exc
    if length > capacity(npages):
        raise MalformedMessage(f"ring size {length} > capacity {capacity(npages)}")
    return length


def packet_length(entries: Sequence[TxRequest], npages: int) -> int:
    """The packet length announced by entry 0, checked against ``npages`` pages.

    Only entry 0's size is used: the other entries are redundant and never trusted.
    Raises :class:`MalformedMessage` if it exceeds :func:`capacity`.
    """
    if not entries:
        raise MalformedMessage("empty ring")
    length = entries[0].size
    if length > capacity(npages):
        raise MalformedMessage(f"ring size {length} > capacity {capacity(npages)}")
    return length


def gather(pages: Sequence[memoryview], length: int) -> bytes:
    """Copy ``length`` bytes out of consecutive data pages into one private ``bytes``.

    One pass, one allocation (the result): one slice copy if the packet fits a page,
    else ``bytes.join`` over page slices.
    ``length`` must already be checked (:func:`packet_length`); it is re-checked here.
    """
    if not 0 <= length <= len(pages) * PAGE_SIZE:
        raise MalformedMessage(f"packet of {length} bytes exceeds {len(pages)} pages")
    if 0 < length <= PAGE_SIZE:
        data = bytes(pages[0][:length])
    else:
        full, rest = divmod(length, PAGE_SIZE)
        parts = [pages[i][:PAGE_SIZE] for i in range(full)]
        if rest:
            parts.append(pages[full][:rest])
        data = b"".join(parts)
    if len(data) != length:
        raise MalformedMessage(f"pages hold {len(data)} of {length} bytes (short page)")
    return data
