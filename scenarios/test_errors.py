"""Error handling: malformed packets through a guest's raw TPM transport.

Each scenario writes raw bytes, checks the exact 10-byte answer (tag 0x8001, size 10,
the response code a TPM gives), then checks that the same channel still carries a good
command: a bad packet must cost that one command only, never desynchronise the channel.

Scenarios marked ``needs("validation")`` rely on the driver's own checks: plain swtpm
(the ``direct`` target) waits forever for the rest of a short header, cannot receive an
empty write on a stream socket, and reads an oversize write as several commands.

On a Linux guest (``guest.kernel_device``) a client's write meets the kernel's TPM
character device first, which refuses or trims bad sizes before any driver sees them
(Linux 6.1, drivers/char/tpm/tpm-dev-common.c ``tpm_common_write`` and tpm-interface.c
``tpm_try_transmit``): a write over 4096 bytes is E2BIG; shorter than 6 bytes or than
its header's commandSize, EINVAL; a commandSize of 0, ENODATA; and of a longer write
only the first commandSize bytes are sent. Those scenarios state both expectations; the
driver's own checks on Xen are proven by the rogue frontend (scenarios/test_hostile.py).

Expected codes were measured on swtpm 0.7.1/libtpms (DESIGN.md section 3), the TPM every
target runs, so the driver must answer what swtpm would: see xenvtpm/tpm.py BAD_TAG_RC.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Any

import pytest
from tpm2_pytss import ESYS_TR
from tpm_helpers import open_esapi, read_pcr

from harness.errors import DeviceRefused
from harness.tpmwire import (
    CC,
    DEBUG_PCR,
    HEADER,
    RC,
    RING_CAPACITY,
    ST,
    TPM_MAX_COMMAND_SIZE,
    Response,
    assert_channel_works,
    command,
    error_response,
    get_random,
)
from harness.transport import RawTransport

TIMEOUT = 10.0  # a malformed packet must be answered at once, not time out


@dataclass(frozen=True)
class Refused:
    """The guest kernel's TPM device refused the write: the errno its client sees."""

    errno: str


def answer(transport: RawTransport, packet: bytes) -> bytes | Refused:
    try:
        return transport.transmit(packet, timeout=TIMEOUT)
    except DeviceRefused as e:
        return Refused(e.errno_name)


def seen_by_client(guest: Any, driver: bytes, kernel: bytes | Refused) -> bytes | Refused:
    """What the guest's TPM client sees: the driver's answer, or, through a Linux guest's
    TPM device, what the kernel makes of the packet first (see the module docstring)."""
    return kernel if guest.kernel_device else driver


# GetRandom cut short by the kernel (commandSize 10 or 11 of 12 bytes sent): the TPM's
# own answer, TPM_RC_INSUFFICIENT for parameter 1.
INSUFFICIENT_P1 = error_response(0x1DA)


# ---- size field ---------------------------------------------------------------------


# claimed commandSize -> what a client of a Linux guest's /dev/tpm0 sees
KERNEL_WRONG_SIZE: dict[int, bytes | Refused] = {
    14: Refused("EINVAL"),
    11: INSUFFICIENT_P1,
    10: INSUFFICIENT_P1,
    0: Refused("ENODATA"),
    4096: Refused("EINVAL"),
    0xFFFFFFFF: Refused("EINVAL"),
}


@pytest.mark.parametrize(
    "claimed", list(KERNEL_WRONG_SIZE), ids=["more", "less", "header-only", "zero", "max", "huge"]
)
def test_wrong_size_field(raw_tpm: RawTransport, guest: Any, claimed: int) -> None:
    """A 12-byte GetRandom whose header claims another size gets TPM_RC_COMMAND_SIZE
    from the driver (through a Linux guest kernel: see KERNEL_WRONG_SIZE)."""
    packet = get_random(8)
    packet = packet[:2] + struct.pack(">I", claimed) + packet[6:]
    expected = seen_by_client(guest, error_response(RC.COMMAND_SIZE), KERNEL_WRONG_SIZE[claimed])
    assert answer(raw_tpm, packet) == expected
    assert_channel_works(raw_tpm)


@pytest.mark.needs("validation")
@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_truncated_header(raw_tpm: RawTransport, guest: Any, length: int) -> None:
    """Fewer than the 10 header bytes get TPM_RC_COMMAND_SIZE, not a hang."""
    expected = seen_by_client(guest, error_response(RC.COMMAND_SIZE), Refused("EINVAL"))
    assert answer(raw_tpm, get_random(8)[:length]) == expected
    assert_channel_works(raw_tpm)


@pytest.mark.needs("validation")
@pytest.mark.parametrize(
    "length", [TPM_MAX_COMMAND_SIZE + 1, 5000, RING_CAPACITY, RING_CAPACITY + 1, 65536]
)
def test_oversize_packet(raw_tpm: RawTransport, guest: Any, length: int) -> None:
    """A consistent header over the TPM's 4096-byte maximum (up to past the 40960-byte
    ring) gets one TPM_RC_COMMAND_SIZE, and no trailing answers for the excess bytes."""
    packet = command(CC.GET_RANDOM, bytes(length - HEADER.size))
    assert len(packet) == length
    expected = seen_by_client(guest, error_response(RC.COMMAND_SIZE), Refused("E2BIG"))
    assert answer(raw_tpm, packet) == expected
    assert_channel_works(raw_tpm)
    assert_channel_works(raw_tpm)


@pytest.mark.needs("validation")
def test_empty_write(raw_tpm: RawTransport, guest: Any) -> None:
    """An empty write gets TPM_RC_COMMAND_SIZE."""
    expected = seen_by_client(guest, error_response(RC.COMMAND_SIZE), Refused("EINVAL"))
    assert answer(raw_tpm, b"") == expected
    assert_channel_works(raw_tpm)


def test_largest_command_accepted(raw_tpm: RawTransport, guest: Any) -> None:
    """The largest command the guest's path carries (4096 bytes, the TPM's maximum;
    4088 through stock xen-tpmfront, whose one page also holds its 8-byte header)
    reaches the TPM: its answer is the TPM's own parameter error (TPM_RC_SIZE for
    GetRandom's trailing bytes), not COMMAND_SIZE. Through xen-tpmfront a 4096-byte
    command is refused by the guest's kernel (EINVAL), and the device still works."""
    largest = guest.max_command_size
    packet = command(CC.GET_RANDOM, struct.pack(">H", 8) + bytes(largest - 12))
    reply = answer(raw_tpm, packet)
    assert isinstance(reply, bytes), f"the guest's kernel refused it: {reply}"
    resp = Response.from_bytes(reply)
    assert resp.code not in (RC.COMMAND_SIZE, RC.FAILURE)
    assert resp.code == 0x095  # TPM_RC_SIZE: unmarshalled bytes left over
    if largest < TPM_MAX_COMMAND_SIZE:
        full = command(CC.GET_RANDOM, struct.pack(">H", 8) + bytes(TPM_MAX_COMMAND_SIZE - 12))
        assert answer(raw_tpm, full) == Refused("EINVAL")
    assert_channel_works(raw_tpm)


# ---- tag and command code -----------------------------------------------------------


# libtpms unmarshals the tag as a TPM_ST first: a value that is no TPM_ST at all gets
# TPM_RC_VALUE; a TPM_ST that is not a command tag (0x00C4 RSP_COMMAND, 0x8000 NULL,
# 0x8014..0x801A attestation tags, 0x8021..0x8025 tickets) gets TPM_RC_BAD_TAG.
# Measured on swtpm 0.7.1 for every tag in 0x8000..0x802F and 0x00C1..0x00C6.
BAD_TAGS = {
    0x8003: RC.VALUE,
    0x0000: RC.VALUE,
    0xFFFF: RC.VALUE,
    0x00C1: RC.VALUE,
    0x8000: RC.BAD_TAG,
    0x00C4: RC.BAD_TAG,
    0x8018: RC.BAD_TAG,
    0x8024: RC.BAD_TAG,
}


@pytest.mark.parametrize("tag", list(BAD_TAGS), ids=[f"{t:#06x}" for t in BAD_TAGS])
def test_unknown_tag(raw_tpm: RawTransport, tag: int) -> None:
    """A command tag other than 0x8001/0x8002 gets exactly the TPM's own bad-tag answer."""
    packet = command(CC.GET_RANDOM, struct.pack(">H", 8), tag=tag)
    assert answer(raw_tpm, packet) == error_response(BAD_TAGS[tag])
    assert_channel_works(raw_tpm)


def test_unknown_tag_beats_wrong_size(raw_tpm: RawTransport, guest: Any) -> None:
    """With both a bad tag and a wrong size, the tag is reported, as the TPM does (a
    Linux guest kernel refuses the write first: commandSize 99 > 12 bytes written)."""
    packet = command(CC.GET_RANDOM, struct.pack(">H", 8), tag=0x8003, size=99)
    assert answer(raw_tpm, packet) == seen_by_client(
        guest, error_response(RC.VALUE), Refused("EINVAL")
    )
    assert_channel_works(raw_tpm)


@pytest.mark.parametrize("code", [0x00000000, 0x00000FFF, 0x0000011E, 0x20000000, 0xFFFFFFFF])
def test_unknown_command_code(raw_tpm: RawTransport, code: int) -> None:
    """An unimplemented command code (TPM 2.0 range or vendor) gets TPM_RC_COMMAND_CODE."""
    assert answer(raw_tpm, command(code)) == error_response(RC.COMMAND_CODE)
    assert_channel_works(raw_tpm)


@pytest.mark.hostile
@pytest.mark.needs("shared-clients")
def test_guest_cannot_send_manager_control_command(raw_tpm: RawTransport, guest: Any) -> None:
    """The backend-to-manager BIND vendor command (0x20000f00, xenvtpm/tpm.py) sent by a
    guest is an unknown command: TPM_RC_COMMAND_CODE, and the vTPM is not power-cycled
    (an extended PCR keeps its value). The ESAPI beside ``raw_tpm`` is a shared one
    (on a Linux guest, /dev/tpmrm0, since /dev/tpm0 admits one opener)."""
    with open_esapi(guest, shared=True) as esapi:
        esapi.pcr_reset(ESYS_TR.PCR16)
        esapi.pcr_event(ESYS_TR.PCR16, b"must survive")
        before = read_pcr(esapi, DEBUG_PCR)
        assert before != bytes(32)
        domid = getattr(guest, "domid", None) or 0
        for other in (domid + 1, 0, 0x7FEF):
            packet = command(0x20000F00, struct.pack(">I", other))
            assert answer(raw_tpm, packet) == error_response(RC.COMMAND_CODE)
        assert read_pcr(esapi, DEBUG_PCR) == before
    assert_channel_works(raw_tpm)


# ---- many bad packets in a row ------------------------------------------------------


def test_errors_back_to_back(raw_tpm: RawTransport) -> None:
    """Alternating bad and good commands: every answer belongs to its own command."""
    for i in range(20):
        bad = command(CC.GET_RANDOM, struct.pack(">H", 8), tag=0x8003)
        assert answer(raw_tpm, bad) == error_response(RC.VALUE)
        assert len(assert_channel_works(raw_tpm, 1 + i)) == 1 + i


# Commands a random body cannot turn into a state change: reads and computations only.
SAFE_CODES = [
    CC.GET_RANDOM,
    CC.GET_CAPABILITY,
    CC.PCR_READ,
    0x0181,  # ReadClock
    0x017C,  # GetTestResult
    0x0173,  # ReadPublic
    0x017D,  # Hash
    0x0169,  # NV_ReadPublic
    0x0178,  # TestParms
]


@pytest.mark.hostile
def test_random_bodies_get_wellformed_answers(raw_tpm: RawTransport) -> None:
    """200 well-framed commands with random bodies (seeded): every answer is one
    well-formed TPM response, and the channel works afterwards."""
    rng = random.Random(0x5EED)
    for _ in range(200):
        body = rng.randbytes(rng.randrange(0, 64))
        tag = rng.choice([ST.NO_SESSIONS, ST.SESSIONS])
        packet = command(rng.choice(SAFE_CODES), body, tag=tag)
        reply = answer(raw_tpm, packet)
        assert isinstance(reply, bytes), (packet.hex(), reply)  # well-framed: no refusal
        resp = Response.from_bytes(reply)  # size field == length
        assert resp.tag in (ST.NO_SESSIONS, ST.SESSIONS)
        if resp.code != RC.SUCCESS:
            assert resp.size == 10 and resp.tag == ST.NO_SESSIONS
    assert_channel_works(raw_tpm)
