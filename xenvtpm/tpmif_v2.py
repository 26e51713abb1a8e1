"""vTPM protocol v2 (Linux ``xen-tpmfront``): the shared page's layout, parsed once.

One page, granted by the frontend as ``ring-ref``, starts with ``struct
vtpm_shared_page`` (host byte order, 8 bytes, then ``nr_extra_pages`` u32 grant refs):

    @0 u32 length   request, then response, length in bytes
    @4 u8  state    IDLE 0, SUBMIT 1, FINISH 2, CANCEL 3
    @5 u8  locality for the current request
    @6 u8  pad
    @7 u8  nr_extra_pages, @8 u32 extra_pages[nr_extra_pages]

The command, and then the response, sit at ``8 + 4 * nr_extra_pages`` and run on into
the extra pages in order (the header names no other layout; xen-tpmfront always uses
``nr_extra_pages == 0``, so a packet holds at most 4088 bytes there). The frontend moves
``state`` only to SUBMIT or CANCEL, the backend only to IDLE or FINISH.

The peer may rewrite the page at any moment, so :func:`read_header` copies the 8 header
bytes once into a :class:`SharedHeader`, :func:`read_extra_refs` copies the refs once,
and :func:`gather` copies a packet once; every length is bounded before anything is
sliced with it (XSA-155: no double fetch, no guest value used as an unchecked index).

Spec: Linux include/xen/interface/io/tpmif.h (struct vtpm_shared_page, enum
vtpm_shared_page_state); drivers/char/tpm/xen-tpmfront.c (shr_data_offset, vtpm_send,
vtpm_recv, vtpm_cancel).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from xenvtpm.errors import MalformedMessage
from xenvtpm.tpmif import PAGE_SIZE

__all__ = [
    "FEATURE_PROTOCOL_V2",
    "HEADER_SIZE",
    "MAX_EXTRA_PAGES",
    "SharedHeader",
    "VtpmState",
    "capacity",
    "data_offset",
    "gather",
    "read_extra_refs",
    "read_header",
    "read_response",
    "write_header",
    "write_packet",
    "write_state",
]


#: The xenstore key of protocol v2, in both device directories: the backend advertises
#: it, xen-tpmfront writes ``1`` next to ``ring-ref`` (and requires the backend's).
FEATURE_PROTOCOL_V2 = "feature-protocol-v2"


class VtpmState(enum.IntEnum):
    """include/xen/interface/io/tpmif.h: enum vtpm_shared_page_state."""

    IDLE = 0x0  # no contents / vTPM idle / cancel complete
    SUBMIT = 0x1  # request ready / vTPM working
    FINISH = 0x2  # response ready / vTPM idle
    CANCEL = 0x3  # cancel requested / vTPM working


# struct vtpm_shared_page without its flexible array: u32 length; u8 state, locality,
# pad, nr_extra_pages. Host byte order, sizeof == 8.
_SHARED_IBBBB = struct.Struct("=IBBBB")
HEADER_SIZE = _SHARED_IBBBB.size
_STATE_OFFSET = 4
_EXTRA_REF_I = struct.Struct("=I")
#: Our bound on ``nr_extra_pages`` (the u8 allows 255). Ten pages in all, as the 2006
#: ring; a TPM 2.0 command (swtpm: at most 4096 bytes) needs one extra page at most.
MAX_EXTRA_PAGES = 9


@dataclass(frozen=True, slots=True)
class SharedHeader:
    """The 8 header bytes of ``struct vtpm_shared_page``, as one private copy.

    ``state`` stays a plain int: a guest may write any byte there (see
    :attr:`known_state`).
    """

    length: int
    state: int
    locality: int
    pad: int
    nr_extra_pages: int

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SharedHeader:
        """Parse exactly 8 bytes; raise :class:`MalformedMessage` otherwise."""
        try:
            return cls(*_SHARED_IBBBB.unpack(data))
        except struct.error as exc:
            raise MalformedMessage(
                f"vtpm_shared_page needs {HEADER_SIZE} bytes, got {len(data)}"
            ) from exc

    def to_bytes(self) -> bytes:
        try:
            return _SHARED_IBBBB.pack(
                self.length, self.state, self.locality, self.pad, self.nr_extra_pages
            )
        except struct.error as exc:
            raise MalformedMessage(f"vtpm_shared_page field out of range: {self}") from exc

    @property
    def known_state(self) -> VtpmState | None:
        """The state, or None for a byte that names no state."""
        try:
            return VtpmState(self.state)
        except ValueError:
            return None


def read_header(page: bytes | bytearray | memoryview) -> SharedHeader:
    """Copy the header out of shared memory once and parse the private copy."""
    return SharedHeader.from_bytes(bytes(page[:HEADER_SIZE]))


def _check_extra(nr_extra_pages: int) -> None:
    if not 0 <= nr_extra_pages <= MAX_EXTRA_PAGES:
        raise MalformedMessage(f"nr_extra_pages {nr_extra_pages} > {MAX_EXTRA_PAGES}")


def data_offset(nr_extra_pages: int) -> int:
    """Where the packet starts in the shared page. Spec: xen-tpmfront shr_data_offset."""
    _check_extra(nr_extra_pages)
    return HEADER_SIZE + _EXTRA_REF_I.size * nr_extra_pages


def capacity(nr_extra_pages: int) -> int:
    """Largest packet the shared page plus ``nr_extra_pages`` pages carry (4088 for 0)."""
    return PAGE_SIZE - data_offset(nr_extra_pages) + PAGE_SIZE * nr_extra_pages


def read_extra_refs(page: bytes | bytearray | memoryview, nr_extra_pages: int) -> tuple[int, ...]:
    """The extra pages' grant refs, bounded first and copied once."""
    end = data_offset(nr_extra_pages)
    private = bytes(page[HEADER_SIZE:end])
    if len(private) != end - HEADER_SIZE:
        raise MalformedMessage(f"shared page too short for {nr_extra_pages} extra refs")
    return tuple(r for (r,) in _EXTRA_REF_I.iter_unpack(private))


def _segments(nr_extra_pages: int, length: int) -> list[tuple[int, int, int]]:
    """(page index, start, end) of each piece of a ``length``-byte packet; 0 = shared."""
    if not 0 <= length <= capacity(nr_extra_pages):
        raise MalformedMessage(
            f"packet of {length} bytes > capacity {capacity(nr_extra_pages)} "
            f"({nr_extra_pages} extra pages)"
        )
    offset = data_offset(nr_extra_pages)
    first = min(length, PAGE_SIZE - offset)
    pieces = [(0, offset, offset + first)]
    rest = length - first
    page = 1
    while rest > 0:
        n = min(rest, PAGE_SIZE)
        pieces.append((page, 0, n))
        rest -= n
        page += 1
    return pieces


def gather(
    shared: bytes | bytearray | memoryview,
    extra: Sequence[bytes | bytearray | memoryview],
    nr_extra_pages: int,
    length: int,
) -> bytes:
    """Copy a ``length``-byte packet out once, into one private ``bytes``.

    ``nr_extra_pages`` is the number of pages mapped (``len(extra)`` at most), never a
    value read again from the page; ``length`` is checked against its capacity.
    """
    pages = [shared, *extra[:nr_extra_pages]]
    pieces = _segments(nr_extra_pages, length)
    if len(pieces) > len(pages):
        raise MalformedMessage(f"packet needs {len(pieces) - 1} extra pages, {len(extra)} mapped")
    data = b"".join(pages[i][start:end] for i, start, end in pieces)
    if len(data) != length:
        raise MalformedMessage(f"pages hold {len(data)} of {length} bytes (short page)")
    return data


def write_header(page: memoryview | bytearray, header: SharedHeader) -> None:
    """Write all 8 header bytes (a frontend's setup; the backend writes length+state)."""
    page[:HEADER_SIZE] = header.to_bytes()


def write_state(page: memoryview | bytearray, state: VtpmState) -> None:
    """The one byte that hands the page to the other side: written last."""
    page[_STATE_OFFSET] = int(state)


def write_packet(
    shared: memoryview | bytearray,
    extra: Sequence[memoryview | bytearray],
    nr_extra_pages: int,
    packet: bytes | bytearray | memoryview,
    state: VtpmState,
) -> None:
    """Data first, then ``length``, then ``state``, as xen-tpmfront's vtpm_send orders it.

    ``nr_extra_pages`` is the writer's own value (mapped at connect), not re-read.
    Raises :class:`MalformedMessage` when the packet does not fit.
    """
    pages = [shared, *extra[:nr_extra_pages]]
    pieces = _segments(nr_extra_pages, len(packet))
    if len(pieces) > len(pages):
        raise MalformedMessage(f"packet needs {len(pieces) - 1} extra pages, {len(extra)} mapped")
    src = memoryview(packet)
    pos = 0
    for i, start, end in pieces:
        n = end - start
        pages[i][start:end] = src[pos : pos + n]
        pos += n
    struct.pack_into("=I", shared, 0, len(packet))
    write_state(shared, state)


def read_response(shared: bytes | bytearray | memoryview, max_length: int) -> bytes:
    """What xen-tpmfront's vtpm_recv copies out: header once, length clipped to the page.

    Only for frontends (the backend's peer is trusted here no more than it is there).
    """
    header = read_header(shared)
    offset = HEADER_SIZE + _EXTRA_REF_I.size * header.nr_extra_pages  # <= 1028: in the page
    length = min(header.length, PAGE_SIZE - offset, max_length)
    return bytes(shared[offset : offset + length])
