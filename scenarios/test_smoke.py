"""Smoke: the fixtures reach each guest's TPM, raw and through ESAPI."""

from __future__ import annotations

import struct

from harness.target import Guest
from harness.transport import RawTransport

GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")  # TPM2_GetRandom(16)


def test_get_random_raw(raw_tpm: RawTransport) -> None:
    resp = raw_tpm.transmit(GET_RANDOM_16)
    tag, size, code = struct.unpack_from(">HII", resp)
    assert (tag, size, code) == (0x8001, len(resp), 0)
    (n,) = struct.unpack_from(">H", resp, 10)
    assert n == 16 and len(resp) == 12 + 16


def test_get_random_esapi(esapi: object) -> None:
    a = bytes(esapi.get_random(16))  # type: ignore[attr-defined]
    b = bytes(esapi.get_random(16))  # type: ignore[attr-defined]
    assert len(a) == len(b) == 16 and a != b


def test_each_guest_answers(guests: list[Guest]) -> None:
    for g in guests:
        with g.transport() as t:
            assert struct.unpack_from(">I", t.transmit(GET_RANDOM_16), 6)[0] == 0
