"""TPM 2.0 wire format: exact bytes in both directions, validation rules and codes."""

from __future__ import annotations

import pytest

from xenvtpm.errors import MalformedMessage
from xenvtpm.tpm import (
    BAD_TAG_RC,
    HEADER_SIZE,
    MAX_COMMAND_SIZE,
    TPM_CC,
    TPM_RC,
    TPM_ST,
    XENVTPM_CC_BIND,
    MalformedCommand,
    TpmHeader,
    bind_command,
    cancel_command,
    error_response,
    get_random_command,
    parse_bind_command,
    pcr_extend_command,
    pcr_read_command,
    response_code,
    startup_command,
    success_response,
    validate_command,
    validate_response,
)

GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")


def test_constants_match_spec() -> None:
    assert HEADER_SIZE == 10
    assert int(TPM_ST.NO_SESSIONS) == 0x8001 and int(TPM_ST.SESSIONS) == 0x8002
    assert int(TPM_RC.SUCCESS) == 0 and int(TPM_RC.BAD_TAG) == 0x01E and int(TPM_RC.VALUE) == 0x084
    assert int(TPM_RC.INITIALIZE) == 0x100 and int(TPM_RC.FAILURE) == 0x101
    assert int(TPM_RC.COMMAND_SIZE) == 0x142 and int(TPM_RC.COMMAND_CODE) == 0x143
    assert int(TPM_CC.Startup) == 0x144 and int(TPM_CC.GetRandom) == 0x17B
    assert int(TPM_CC.GetCapability) == 0x17A and int(TPM_CC.PCR_Extend) == 0x182
    assert XENVTPM_CC_BIND == 0x20000F00
    # measured on swtpm 0.7.1: a bad command tag is answered 0x084 (TPM_RC_VALUE)
    assert BAD_TAG_RC == 0x084
    assert MAX_COMMAND_SIZE == 4096


def test_header_round_trip() -> None:
    h = TpmHeader.from_bytes(memoryview(GET_RANDOM_16))
    assert h == TpmHeader(0x8001, 12, 0x17B)
    assert h.to_bytes() == GET_RANDOM_16[:10]
    with pytest.raises(MalformedMessage):
        TpmHeader.from_bytes(b"\x80\x01\x00")
    with pytest.raises(MalformedMessage):
        TpmHeader(0x10000, 10, 0).to_bytes()


def test_builders_exact_bytes() -> None:
    assert get_random_command(16) == GET_RANDOM_16
    assert startup_command() == bytes.fromhex("80010000000c000001440000")
    assert startup_command(clear=False) == bytes.fromhex("80010000000c000001440001")
    assert bind_command(7) == bytes.fromhex("80010000000e20000f0000000007")
    assert parse_bind_command(bind_command(0xFFFFFFFF)) == (0xFFFFFFFF, False)
    assert bind_command(7, resumed=True) == bytes.fromhex("80010000001220000f000000000700000001")
    assert parse_bind_command(bind_command(9, resumed=True)) == (9, True)
    assert cancel_command() == bytes.fromhex("80010000000a20000f02")  # XENVTPM_CC_CANCEL
    assert pcr_read_command(10) == bytes.fromhex("8001000000140000017e00000001000b03000400")
    assert pcr_extend_command(10, b"\x01" * 32) == bytes.fromhex(
        "800200000041000001820000000a0000000940000009000000000000000001000b" + "01" * 32
    )
    assert error_response(TPM_RC.COMMAND_SIZE) == bytes.fromhex("80010000000a00000142")
    assert success_response() == bytes.fromhex("80010000000a00000000")


def test_builders_reject_bad_arguments() -> None:
    with pytest.raises(MalformedMessage):
        bind_command(1 << 32)
    with pytest.raises(ValueError):
        pcr_extend_command(0, b"short")
    with pytest.raises(ValueError):
        pcr_read_command(24)
    with pytest.raises(MalformedCommand) as ei:
        parse_bind_command(GET_RANDOM_16[:10] + b"\0\0\0\0")
    assert ei.value.rc == TPM_RC.VALUE
    with pytest.raises(MalformedCommand):  # a flag nobody defined
        parse_bind_command(bytes.fromhex("80010000001220000f000000000700000002"))
    with pytest.raises(MalformedCommand):  # the size field must match the form
        parse_bind_command(bytes.fromhex("80010000000e20000f000000000700000001"))
    with pytest.raises(MalformedCommand):
        parse_bind_command(bind_command(1) + b"\0")


def test_validate_command_accepts_both_tags() -> None:
    assert validate_command(GET_RANDOM_16) == TpmHeader(0x8001, 12, 0x17B)
    ext = pcr_extend_command(0, bytes(32))
    assert validate_command(memoryview(ext)).tag == TPM_ST.SESSIONS
    assert validate_command(GET_RANDOM_16[:10].replace(b"\x00\x0c", b"\x00\x0a", 1)).size == 10


@pytest.mark.parametrize(
    ("data", "rc"),
    [
        (b"", TPM_RC.COMMAND_SIZE),
        (bytes.fromhex("8001000000"), TPM_RC.COMMAND_SIZE),  # truncated header
        (GET_RANDOM_16[:-1], TPM_RC.COMMAND_SIZE),  # one byte short
        (GET_RANDOM_16 + b"\x00", TPM_RC.COMMAND_SIZE),  # one byte extra
        (bytes.fromhex("80010000000900000000ff"), TPM_RC.COMMAND_SIZE),  # size < header
        (bytes.fromhex("00c10000000c0000017b0010"), TPM_RC.VALUE),  # TPM 1.2 tag
        (bytes.fromhex("80030000000c0000017b0010"), TPM_RC.VALUE),
        (bytes.fromhex("80000000000c0000017b0010"), TPM_RC.BAD_TAG),  # TPM_ST_NULL
        (bytes.fromhex("80180000000c0000017b0010"), TPM_RC.BAD_TAG),  # TPM_ST_ATTEST_QUOTE
        # swtpm checks the tag before the size: bad tag and bad size -> 0x084
        (bytes.fromhex("00c10000000d0000017b0010"), TPM_RC.VALUE),
    ],
)
def test_validate_command_rejects(data: bytes, rc: int) -> None:
    with pytest.raises(MalformedCommand) as ei:
        validate_command(data)
    assert ei.value.rc == rc
    assert isinstance(ei.value, MalformedMessage)


def test_validate_command_max_size() -> None:
    big = bytes.fromhex("8001") + (4097).to_bytes(4, "big") + bytes(4091)
    assert validate_command(big).size == 4097
    with pytest.raises(MalformedCommand) as ei:
        validate_command(big, max_size=MAX_COMMAND_SIZE)
    assert ei.value.rc == TPM_RC.COMMAND_SIZE
    ok = bytes.fromhex("8001") + (4096).to_bytes(4, "big") + bytes(4090)
    assert validate_command(ok, max_size=MAX_COMMAND_SIZE).size == 4096


def test_validate_response() -> None:
    rsp = bytes.fromhex("80010000001c000000000010") + bytes(16)
    assert validate_response(rsp) == TpmHeader(0x8001, 28, 0)
    assert validate_response(bytes.fromhex("00c40000000a0000001e")).code == TPM_RC.BAD_TAG
    for bad in (rsp[:-1], rsp + b"\0", b"\x80\x01", bytes.fromhex("12340000000a00000000")):
        with pytest.raises(MalformedMessage):
            validate_response(bad)


def test_response_code() -> None:
    assert response_code(bytes.fromhex("80010000000a00000101")) == TPM_RC.FAILURE
    assert response_code(memoryview(success_response())) == 0
    with pytest.raises(MalformedMessage):
        response_code(b"\x80\x01\x00\x00")
