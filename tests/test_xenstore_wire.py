"""The xenstore wire format: exact bytes both ways, and refusal of what cannot exist."""

from __future__ import annotations

import pytest

from xenvtpm.errors import MalformedMessage, XenStoreError
from xenvtpm.sim.xenstore_wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    XsHeader,
    XsPacket,
    XsType,
    check_reply,
    decode_error,
    decode_write,
    encode_write,
    join_strings,
    one_string,
    parse_decimal,
    split_strings,
)


def test_type_numbers_match_xs_wire_h() -> None:
    names = [
        "CONTROL",
        "DIRECTORY",
        "READ",
        "GET_PERMS",
        "WATCH",
        "UNWATCH",
        "TRANSACTION_START",
        "TRANSACTION_END",
        "INTRODUCE",
        "RELEASE",
        "GET_DOMAIN_PATH",
        "WRITE",
        "MKDIR",
        "RM",
        "SET_PERMS",
        "WATCH_EVENT",
        "ERROR",
        "IS_DOMAIN_INTRODUCED",
        "RESUME",
        "SET_TARGET",
    ]
    expected = {f"XS_{n}": i for i, n in enumerate(names)}
    expected |= {"XS_RESET_WATCHES": 21, "XS_DIRECTORY_PART": 22}  # 20 was XS_RESTRICT
    assert {t.name: int(t) for t in XsType} == expected


def test_read_request_exact_bytes() -> None:
    pkt = XsPacket(XsType.XS_READ, 7, 0, join_strings("device"))
    raw = bytes.fromhex("02000000070000000000000007000000") + b"device\x00"
    assert pkt.to_bytes() == raw
    assert XsPacket.from_bytes(raw) == pkt


def test_write_payload_has_no_trailing_nul() -> None:
    assert encode_write("a/b", b"v") == b"a/b\x00v"
    assert decode_write(b"a/b\x00v\x00x") == ("a/b", b"v\x00x")  # value is opaque bytes
    with pytest.raises(MalformedMessage):
        decode_write(b"no-nul")


def test_error_and_watch_event_shapes() -> None:
    err = XsPacket.error(3, 9, "EACCES")
    assert err.to_bytes() == bytes.fromhex("10000000030000000900000007000000") + b"EACCES\x00"
    assert decode_error(err.payload) == "EACCES"
    ev = XsPacket.watch_event("/x", "tok")
    assert (ev.type, ev.req_id, ev.payload) == (XsType.XS_WATCH_EVENT, 0, b"/x\x00tok\x00")
    with pytest.raises(XenStoreError) as info:
        check_reply(err, "read", "/p")
    assert info.value.errno_name == "EACCES" and info.value.path == "/p"


def test_strings() -> None:
    assert split_strings(b"") == []
    assert split_strings(b"a\x00b\x00") == ["a", "b"]
    assert one_string(b"x\x00") == "x"
    for bad in (b"a", b"a\x00b", b"\xff\x00"):
        with pytest.raises(MalformedMessage):
            split_strings(bad)
    with pytest.raises(MalformedMessage):
        one_string(b"a\x00b\x00")


def test_refuses_oversize_unknown_and_short() -> None:
    big = bytes.fromhex("020000000100000000000000") + (4097).to_bytes(4, "little")
    with pytest.raises(MalformedMessage):
        XsHeader.from_bytes(big)
    unknown = bytes.fromhex("14000000010000000000000000000000")  # 0x14: XS_RESTRICT
    with pytest.raises(MalformedMessage):
        XsHeader.from_bytes(unknown)
    with pytest.raises(MalformedMessage):
        XsHeader.from_bytes(b"\x02\x00\x00")
    with pytest.raises(MalformedMessage):
        XsPacket(XsType.XS_WRITE, 1, 0, b"x" * (XENSTORE_PAYLOAD_MAX + 1))
    with pytest.raises(MalformedMessage):
        XsPacket(XsType.XS_READ, -1, 0, b"")


def test_packet_length_must_match_header() -> None:
    raw = XsPacket(XsType.XS_READ, 1, 0, b"ab\x00").to_bytes()
    with pytest.raises(MalformedMessage):
        XsPacket.from_bytes(raw[:-1])
    with pytest.raises(MalformedMessage):
        XsPacket.from_bytes(raw + b"\x00")
    assert XsPacket.from_bytes(memoryview(raw)).payload == b"ab\x00"
    assert len(raw) == HEADER_SIZE + 3


def test_max_payload_accepted() -> None:
    pkt = XsPacket(XsType.XS_WRITE, 1, 2, b"p\x00" + b"v" * (XENSTORE_PAYLOAD_MAX - 2))
    assert XsPacket.from_bytes(pkt.to_bytes()) == pkt


def test_parse_decimal_takes_ascii_digits_only() -> None:
    assert parse_decimal("0", 0x7FEF) == 0
    assert parse_decimal("32751", 0x7FEF) == 0x7FEF
    for bad in (
        "",
        "\u00b2",
        "\u0665",
        "1\u00b2",
        "-1",
        "+1",
        " 1",
        "1_0",
        "0x10",
        "32752",
        "9" * 5000,
    ):
        with pytest.raises(MalformedMessage):
            parse_decimal(bad, 0x7FEF)
