"""The raw commands the harness sends itself, pinned byte for byte, and flush_all."""

from __future__ import annotations

import pytest

from harness import tpmwire
from harness.errors import TransportError
from harness.fakes import FakeTPM


def test_command_bytes() -> None:
    assert tpmwire.startup_clear() == bytes.fromhex("80010000000c000001440000")
    assert tpmwire.get_random(16) == bytes.fromhex("80010000000c0000017b0010")
    assert tpmwire.flush_context(0x80000001) == bytes.fromhex("80010000000e0000016580000001")
    assert tpmwire.get_capability_handles(0x80000000, 64) == bytes.fromhex(
        "8001000000160000017a000000018000000000000040"
    )


def test_nv_command_bytes_with_a_password_session() -> None:
    """The same bytes tests/test_faults.py sends; index 0x01000A90, empty passwords."""
    index = 0x01000A90
    assert tpmwire.nv_define_space(index, 8) == bytes.fromhex(
        "80020000002d0000012a40000001000000094000000900000100000000000e01000a90000b0204000400000008"
    )
    assert tpmwire.nv_write(index, b"\x01\x02") == bytes.fromhex(
        "8002000000250000013701000a9001000a9000000009400000090000010000000201020000"
    )
    assert tpmwire.nv_read(index, 8) == bytes.fromhex(
        "8002000000230000014e01000a9001000a900000000940000009000001000000080000"
    )
    assert tpmwire.nv_undefine_space(index) == bytes.fromhex(
        "80020000001f000001224000000101000a9000000009400000090000010000"
    )
    assert tpmwire.read_public(0x81010001) == bytes.fromhex("80010000000e0000017381010001")


def test_parse_nv_read_takes_the_data_after_the_parameter_size() -> None:
    resp = tpmwire.Response.from_bytes(
        bytes.fromhex("80020000001900000000000000060004deadbeef0000010000")
    )
    assert tpmwire.parse_nv_read(resp) == bytes.fromhex("deadbeef")


def test_parse_handles() -> None:
    resp = tpmwire.Response.from_bytes(
        bytes.fromhex("80010000001b000000000100000001000000028000000080000001")
    )
    assert tpmwire.parse_handles(resp) == (True, [0x80000000, 0x80000001])


def test_response_length_must_match() -> None:
    with pytest.raises(TransportError):
        tpmwire.Response.from_bytes(bytes.fromhex("80010000000b00000000"))
    with pytest.raises(TransportError):
        tpmwire.Response.from_bytes(b"\x80\x01")


def test_flush_all_flushes_every_range_across_pages() -> None:
    transients = {0x80000000 + i for i in range(7)}
    sessions = {0x02000000, 0x02000003, 0x03000001}
    tpm = FakeTPM(transients | sessions | {0x81000001}, page=3)  # persistent stays
    flushed = tpmwire.flush_all(tpm)
    assert set(flushed) == transients | sessions
    assert tpm.handles == {0x81000001}
    assert tpmwire.flush_all(tpm) == []


def test_startup_tolerates_initialize() -> None:
    tpm = FakeTPM()
    assert tpmwire.startup(tpm) == tpmwire.RC.SUCCESS
    assert tpmwire.startup(tpm) == tpmwire.RC.INITIALIZE
