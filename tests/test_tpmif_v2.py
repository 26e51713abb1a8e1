"""Protocol v2's shared page (xenvtpm.tpmif_v2) and its intake, as pure functions.

Exact bytes both ways, capacity to the byte, and every page read at most once.
"""

from __future__ import annotations

import struct

import pytest

from xenvtpm import tpm, tpmif_v2
from xenvtpm.errors import MalformedMessage
from xenvtpm.intake import Forward, NotSubmitted, intake_v2
from xenvtpm.tpmif_v2 import SharedHeader, VtpmState

PAGE = 4096


class OnceOnly:
    """A page that counts its reads (slices)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0

    def __getitem__(self, item: slice) -> bytes:
        self.reads += 1
        return self.data[item]

    def __len__(self) -> int:
        return len(self.data)


def page(
    length: int,
    state: int,
    locality: int = 0,
    nr_extra: int = 0,
    body: bytes = b"",
    refs: tuple[int, ...] = (),
) -> bytearray:
    p = bytearray(PAGE)
    struct.pack_into("=IBBBB", p, 0, length, state, locality, 0, nr_extra)
    for i, r in enumerate(refs):
        struct.pack_into("=I", p, 8 + 4 * i, r)
    off = 8 + 4 * nr_extra
    p[off : off + len(body)] = body[: PAGE - off]
    return p


def test_header_bytes_both_ways() -> None:
    raw = struct.pack("=IBBBB", 0x11223344, 1, 3, 0, 2)
    header = SharedHeader.from_bytes(raw)
    assert header == SharedHeader(0x11223344, 1, 3, 0, 2)
    assert header.to_bytes() == raw and header.known_state is VtpmState.SUBMIT
    assert SharedHeader(0, 0x77, 0, 0, 0).known_state is None
    assert tpmif_v2.HEADER_SIZE == 8
    with pytest.raises(MalformedMessage):
        SharedHeader.from_bytes(raw[:7])


def test_offsets_and_capacity() -> None:
    assert [tpmif_v2.data_offset(n) for n in (0, 1, 9)] == [8, 12, 44]
    assert tpmif_v2.capacity(0) == 4088  # xen-tpmfront: offset + count <= PAGE_SIZE
    assert tpmif_v2.capacity(1) == 4096 - 12 + 4096
    with pytest.raises(MalformedMessage):
        tpmif_v2.data_offset(10)


def test_write_packet_then_gather_across_an_extra_page() -> None:
    shared, extra = bytearray(PAGE), bytearray(PAGE)
    packet = bytes(range(256)) * 20  # 5120 bytes
    tpmif_v2.write_packet(shared, [extra], 1, packet, VtpmState.FINISH)
    assert shared[:8] == struct.pack("=IBBBB", 5120, 2, 0, 0, 0)
    assert shared[12:] == packet[:4084] and extra[: 5120 - 4084] == packet[4084:]
    assert tpmif_v2.gather(shared, [extra], 1, 5120) == packet
    with pytest.raises(MalformedMessage):
        tpmif_v2.write_packet(shared, [], 0, bytes(4089), VtpmState.FINISH)
    with pytest.raises(MalformedMessage):
        tpmif_v2.gather(shared, [], 0, 4089)


def test_read_response_clips_like_vtpm_recv() -> None:
    p = page(0xFFFFFFFF, VtpmState.FINISH, body=b"\xab" * 4088)
    assert tpmif_v2.read_response(p, 10_000) == b"\xab" * 4088
    p = page(20, VtpmState.FINISH, nr_extra=255, body=b"\xcd" * 20)
    assert tpmif_v2.read_response(p, 10) == b"\xcd" * 10


def test_intake_v2_forwards_with_locality_and_reads_once() -> None:
    command = tpm.get_random_command(16)
    shared = OnceOnly(bytes(page(len(command), VtpmState.SUBMIT, 2, body=command)))
    assert intake_v2(shared, [], 0) == Forward(command, 0x17B, 2)  # type: ignore[arg-type]
    assert shared.reads == 2  # the header once, the data once


@pytest.mark.parametrize(
    ("p", "nr_extra", "expected"),
    [
        (page(12, VtpmState.IDLE), 0, NotSubmitted(0)),
        (page(12, VtpmState.CANCEL), 0, NotSubmitted(3)),
        (page(12, 0x77), 0, NotSubmitted(0x77)),
        (page(4089, VtpmState.SUBMIT), 0, tpm.error_response(tpm.TPM_RC.COMMAND_SIZE)),
        (page(0xFFFFFFFF, VtpmState.SUBMIT), 0, tpm.error_response(tpm.TPM_RC.COMMAND_SIZE)),
        (page(0, VtpmState.SUBMIT), 0, tpm.error_response(tpm.TPM_RC.COMMAND_SIZE)),
        (
            page(12, VtpmState.SUBMIT, nr_extra=255, body=tpm.get_random_command(1)),
            0,
            tpm.error_response(tpm.TPM_RC.COMMAND_SIZE),
        ),
        (
            page(12, VtpmState.SUBMIT, body=tpm.get_random_command(1)),
            1,
            tpm.error_response(tpm.TPM_RC.COMMAND_SIZE),
        ),
        (
            page(12, VtpmState.SUBMIT, body=struct.pack(">HIIH", 0x8003, 12, 0x17B, 1)),
            0,
            tpm.error_response(tpm.BAD_TAG_RC),
        ),
        (
            page(14, VtpmState.SUBMIT, body=tpm.bind_command(3)),
            0,
            tpm.error_response(tpm.TPM_RC.COMMAND_CODE),
        ),
        (
            page(10, VtpmState.SUBMIT, body=bytes.fromhex("80010000000a20000f02")),
            0,
            tpm.error_response(tpm.TPM_RC.COMMAND_CODE),
        ),  # XENVTPM_CC_CANCEL
    ],
)
def test_intake_v2_decisions(p: bytearray, nr_extra: int, expected: object) -> None:
    shared = OnceOnly(bytes(p))
    extra = [OnceOnly(bytes(PAGE))] * nr_extra
    assert intake_v2(shared, extra, nr_extra) == expected  # type: ignore[arg-type]
    assert shared.reads <= 2 and all(e.reads <= 1 for e in extra)
