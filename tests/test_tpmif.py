"""The 2006 ring: byte layout against the C struct, exact bytes, page slicing."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from xenvtpm.errors import MalformedMessage
from xenvtpm.tpmif import (
    PAGE_SIZE,
    RING_BYTES,
    TPMIF_TX_RING_SIZE,
    TX_REQUEST_SIZE,
    TxRequest,
    capacity,
    gather,
    packet_length,
    page_sizes,
    pages_needed,
    read_length,
    read_ring,
    ring_entries,
    scatter,
    write_packet,
    write_ring,
)


class CTxRequest(ctypes.Structure):
    """tpmif_tx_request_t as the C compiler lays it out on LP64."""

    _fields_ = [
        ("addr", ctypes.c_ulong),
        ("ref", ctypes.c_uint32),
        ("unused", ctypes.c_uint16),
        ("size", ctypes.c_uint16),
    ]


def test_layout_matches_c_struct() -> None:
    assert ctypes.sizeof(ctypes.c_ulong) == 8, "tests assume LP64"
    assert CTxRequest.addr.offset == 0
    assert CTxRequest.ref.offset == 8
    assert CTxRequest.unused.offset == 12
    assert CTxRequest.size.offset == 14
    assert ctypes.sizeof(CTxRequest) == TX_REQUEST_SIZE == 16
    assert TPMIF_TX_RING_SIZE == 10 and RING_BYTES == 160


def test_tx_request_bytes_match_ctypes() -> None:
    c = CTxRequest(0x0102030405060708, 0x11223344, 0x5566, 0x7788)
    raw = bytes(c)
    req = TxRequest(0x0102030405060708, 0x11223344, 0x5566, 0x7788)
    assert req.to_bytes() == raw
    assert TxRequest.from_bytes(memoryview(raw)) == req
    # pinned little-endian bytes (every Xen host is little-endian)
    assert TxRequest(0, 8, 0, 4096).to_bytes() == bytes.fromhex("00000000000000000800000000000010")
    assert TxRequest(1, 2, 3, 0xFFFF).to_bytes() == bytes.fromhex(
        "01000000000000000200000003 00ffff".replace(" ", "")
    )


def test_tx_request_rejects() -> None:
    with pytest.raises(MalformedMessage):
        TxRequest.from_bytes(bytes(15))
    with pytest.raises(MalformedMessage):
        TxRequest(0, 0, 0, 0x10000).to_bytes()
    with pytest.raises(MalformedMessage):
        TxRequest(0, -1, 0, 0).to_bytes()


def test_ring_read_write_against_ctypes_array() -> None:
    page = bytearray(PAGE_SIZE)
    entries = tuple(TxRequest(0, 100 + i, 0, 40960 - i * PAGE_SIZE) for i in range(10))
    # sizes > 0xffff do not exist; 40960 fits u16
    write_ring(page, entries)
    carr = (CTxRequest * 10).from_buffer_copy(page[:RING_BYTES])
    assert [(c.ref, c.size) for c in carr] == [(e.ref, e.size) for e in entries]
    assert read_ring(memoryview(page)) == entries
    assert page[RING_BYTES:] == bytes(PAGE_SIZE - RING_BYTES)
    with pytest.raises(ValueError):
        write_ring(page, entries + entries[:1])
    with pytest.raises(MalformedMessage):
        read_ring(memoryview(bytes(159)))


def test_read_ring_takes_a_private_copy() -> None:
    page = bytearray(PAGE_SIZE)
    write_ring(page, [TxRequest(0, 5, 0, 12)])
    entries = read_ring(memoryview(page))
    page[14:16] = b"\xff\xff"  # the peer rewrites the size after we read
    assert entries[0].size == 12


def test_sizes() -> None:
    assert [pages_needed(n) for n in (0, 1, 4095, 4096, 4097, 40960)] == [0, 1, 1, 1, 2, 10]
    assert capacity(10) == 40960 and capacity(0) == 0
    with pytest.raises(ValueError):
        capacity(11)
    assert page_sizes(5000, 3) == [5000, 904, 0]
    assert page_sizes(4096, 2) == [4096, 0]
    with pytest.raises(MalformedMessage):
        page_sizes(4097, 1)


def _pages(n: int) -> tuple[mmap.mmap, list[memoryview]]:
    m = mmap.mmap(-1, n * PAGE_SIZE)
    mv = memoryview(m)
    return m, [mv[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(n)]


@pytest.mark.parametrize("length", [10, 4095, 4096, 4097, 8192, 8193, 20000, 40959, 40960])
def test_round_trip(length: int) -> None:
    packet = os.urandom(length)
    m, pages = _pages(10)
    ring = bytearray(PAGE_SIZE)
    refs = list(range(8, 18))
    write_packet(ring, pages, refs, packet)
    entries = read_ring(memoryview(ring))
    assert bytes(ring[:RING_BYTES]) == b"".join(
        e.to_bytes() for e in ring_entries(refs, page_sizes(length, 10))
    )
    used = pages_needed(length)
    assert [e.ref for e in entries] == refs
    assert all(e.addr == 0 and e.unused == 0 for e in entries)
    assert [e.size for e in entries[:used]] == [length - i * PAGE_SIZE for i in range(used)]
    assert all(e.size == 0 for e in entries[used:])
    n = packet_length(entries, len(pages))
    assert read_length(memoryview(ring), len(pages)) == n
    out = gather(pages, n)
    assert type(out) is bytes and out == packet
    for p in pages:
        p.release()
    m.close()


@pytest.mark.parametrize("npages", range(1, 11))
def test_round_trip_every_page_count(npages: int) -> None:
    length = npages * PAGE_SIZE - 1
    packet = os.urandom(length)
    _m, pages = _pages(npages)
    sizes = scatter(packet, pages)
    assert sizes[0] == length and len(sizes) == npages
    assert gather(pages, length) == packet
    assert bytes(pages[-1][-1:]) == b"\0"
    with pytest.raises(MalformedMessage):
        scatter(bytes(npages * PAGE_SIZE + 1), pages)


def test_packet_length_and_gather_reject_oversize() -> None:
    _m, pages = _pages(2)
    entries = ring_entries([1, 2], [8193, 97])
    with pytest.raises(MalformedMessage):
        packet_length(entries, 2)
    with pytest.raises(MalformedMessage):
        packet_length((), 2)
    with pytest.raises(MalformedMessage):
        gather(pages, 8193)
    with pytest.raises(MalformedMessage):
        gather([memoryview(bytearray(100))], 200)
    with pytest.raises(ValueError):
        ring_entries([1], [1, 2])


def test_read_length_copies_entry_zero_and_bounds_it() -> None:
    ring = bytearray(PAGE_SIZE)
    write_ring(ring, ring_entries([1, 2], [8192, 4096]))
    assert read_length(memoryview(ring), 2) == 8192
    write_ring(ring, ring_entries([1, 2], [8193, 97]))
    with pytest.raises(MalformedMessage):
        read_length(memoryview(ring), 2)
