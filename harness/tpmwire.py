"""TPM 2.0 on the wire, for the harness and the scenarios: one module, no TSS.

The raw commands the harness sends itself (readiness, cleanup, smoke, the NV commands
of the NV-write benchmark and the power-cut scenario), the malformed ones the scenarios
send on purpose, and the values and structures they check answers against.

Built by hand so that cleanup works even when an ESAPI context is dead, so that a
command is sent and answered with nothing else in between (no TSS round trips), and so
that the checks stay outside the TSS under test. What needs tpm2-pytss (ESAPI, public
templates) stays in ``scenarios/tpm_helpers.py``: the harness must import without it.

Spec: TCG TPM 2.0 Library Part 1 (response codes), Part 2 (structures), Part 3
(commands); TCG EK Credential Profile 2.0 (EK certificate NV indices); codes from
tpm2-tss ``tss2_tpm2_types.h``.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from harness.errors import TransportError
from harness.transport import RawTransport

HEADER = struct.Struct(">HII")  # tag, size, code: Part 1, 18.2 / 18.4


class ST(enum.IntEnum):
    """Command and response tags. Spec: Part 2, 6.9 TPM_ST."""

    NO_SESSIONS = 0x8001
    SESSIONS = 0x8002


class CC(enum.IntEnum):
    """Command codes sent as raw bytes. Spec: Part 2, 6.5.2 TPM_CC."""

    NV_UNDEFINE_SPACE = 0x0122
    NV_DEFINE_SPACE = 0x012A
    CREATE_PRIMARY = 0x0131
    NV_WRITE = 0x0137
    STARTUP = 0x0144
    NV_READ = 0x014E
    FLUSH_CONTEXT = 0x0165
    READ_PUBLIC = 0x0173
    START_AUTH_SESSION = 0x0176
    GET_CAPABILITY = 0x017A
    GET_RANDOM = 0x017B
    PCR_READ = 0x017E
    POLICY_PCR = 0x017F


class RC(enum.IntEnum):
    """Response codes the harness and the scenarios expect. Spec: Part 2, 6.6 TPM_RC."""

    SUCCESS = 0x000
    BAD_TAG = 0x01E
    INITIALIZE = 0x100  # TPM_RC_INITIALIZE: already started
    FAILURE = 0x101
    COMMAND_SIZE = 0x142
    COMMAND_CODE = 0x143
    # TPM_RC_VALUE (RC_FMT1 + 0x004): what swtpm/libtpms answers for a tag that is no
    # TPM_ST value at all (measured: 0x084); BAD_TAG is for a TPM_ST that is not a
    # command tag (scenarios/test_errors.BAD_TAGS).
    VALUE = 0x084


class Cap(enum.IntEnum):
    HANDLES = 0x00000001  # TPM_CAP_HANDLES


class HandleRange(enum.IntEnum):
    """First handle of each range (TPM_HT_* << 24)."""

    HMAC_SESSION = 0x02000000
    POLICY_SESSION = 0x03000000
    TRANSIENT = 0x80000000


SU_CLEAR = 0x0000
RH_OWNER = 0x40000001  # TPM_RH_OWNER
RS_PW = 0x40000009  # TPM_RS_PW: the password session
ALG_SHA256 = 0x000B  # TPM_ALG_SHA256
ALG_NULL = 0x0010  # TPM_ALG_NULL
RH_NULL = 0x40000007  # TPM_RH_NULL
SE_HMAC = 0x00  # TPM_SE_HMAC

ERROR_RESPONSE_SIZE = 10
TPM_MAX_COMMAND_SIZE = 4096  # swtpm's TPM_PT_MAX_COMMAND_SIZE (measured)
RING_CAPACITY = 10 * 4096  # TPMIF_TX_RING_SIZE pages: xen/include/public/io/tpmif.h

TPM2_PT_MANUFACTURER = 0x105  # Part 2, 6.13 TPM_PT (PT_FIXED + 5)
TPM2_PT_NV_BUFFER_MAX = 0x12C

# Resettable debug PCR (locality 0 may PCR_Reset it). Spec: PC Client PTP, PCR 16.
DEBUG_PCR = 16

# EK certificate NV indices. Spec: TCG EK Credential Profile 2.0, 2.2.1.4.
EK_CERT_RSA2048 = 0x01C00002
EK_CERT_ECC_P256 = 0x01C0000A
EK_CERT_ECC_P384 = 0x01C00016
# Where swtpm_setup --createek persists the EKs (measured with swtpm_setup 0.7).
EK_PERSISTENT_RSA = 0x81010001

# Per-scenario NV indices and persistent handles live in these owner ranges; each
# scenario passes its own small offset so that scenarios never share one.
NV_BASE = 0x01000A00
PERSISTENT_BASE = 0x81000A00


def nv_index(offset: int) -> int:
    return NV_BASE + offset


def persistent_handle(offset: int) -> int:
    return PERSISTENT_BASE + offset


class NVAttr(enum.IntFlag):
    """TPMA_NV bits (Part 2, 13.4)."""

    AUTHWRITE = 0x00000004
    AUTHREAD = 0x00040000
    NO_DA = 0x02000000


# TPMS_AUTH_COMMAND of a password session with an empty password: handle, no nonce,
# continueSession, no hmac (Part 1, 19.8.4).
_PASSWORD_SESSION = struct.pack(">IHBH", RS_PW, 0, 0x01, 0)


@dataclass(frozen=True)
class Response:
    """A TPM 2.0 response, parsed once. Spec: Part 1, 18.4 response header."""

    tag: int
    size: int
    code: int
    body: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Response:
        if len(data) < HEADER.size:
            raise TransportError(f"TPM response of {len(data)} bytes is shorter than a header")
        tag, size, code = HEADER.unpack_from(data)
        if size != len(data):
            raise TransportError(f"TPM response says {size} bytes, carries {len(data)}")
        return cls(tag, size, code, bytes(data[HEADER.size :]))


def command(
    code: int, params: bytes = b"", tag: int = ST.NO_SESSIONS, *, size: int | None = None
) -> bytes:
    """A raw command; ``size`` overrides the header's commandSize field (to lie in it)."""
    total = HEADER.size + len(params) if size is None else size
    return HEADER.pack(tag, total, code) + params


def error_response(rc: int) -> bytes:
    """The exact 10-byte answer to a command that fails before any parameter."""
    return HEADER.pack(ST.NO_SESSIONS, ERROR_RESPONSE_SIZE, rc)


def rc_of(response: bytes) -> int:
    """Response code of a raw response (the header is validated first)."""
    return Response.from_bytes(response).code


def startup_clear() -> bytes:
    return command(CC.STARTUP, struct.pack(">H", SU_CLEAR))


def get_random(count: int) -> bytes:
    """TPM2_GetRandom(bytesRequested). Spec: Part 3, 16.1."""
    return command(CC.GET_RANDOM, struct.pack(">H", count))


def flush_context(handle: int) -> bytes:
    return command(CC.FLUSH_CONTEXT, struct.pack(">I", handle))


def get_capability_handles(first: int, count: int = 64) -> bytes:
    return command(CC.GET_CAPABILITY, struct.pack(">III", Cap.HANDLES, first, count))


def with_password(code: int, handles: bytes, params: bytes = b"") -> bytes:
    """A command with one password session (empty password) on its authorized handle."""
    body = handles + struct.pack(">I", len(_PASSWORD_SESSION)) + _PASSWORD_SESSION + params
    return command(code, body, ST.SESSIONS)


def nv_define_space(index: int, size: int) -> bytes:
    """NV_DefineSpace under the owner: an ordinary index, read and written with its own
    (empty) auth, no dictionary-attack lockout."""
    attrs = NVAttr.AUTHWRITE | NVAttr.AUTHREAD | NVAttr.NO_DA
    public = struct.pack(">IHIHH", index, ALG_SHA256, attrs, 0, size)  # TPMS_NV_PUBLIC
    params = struct.pack(">H", 0) + struct.pack(">H", len(public)) + public  # auth, publicInfo
    return with_password(CC.NV_DEFINE_SPACE, struct.pack(">I", RH_OWNER), params)


def nv_undefine_space(index: int) -> bytes:
    return with_password(CC.NV_UNDEFINE_SPACE, struct.pack(">II", RH_OWNER, index))


def nv_write(index: int, data: bytes, offset: int = 0) -> bytes:
    params = struct.pack(">H", len(data)) + data + struct.pack(">H", offset)
    return with_password(CC.NV_WRITE, struct.pack(">II", index, index), params)


def nv_read(index: int, size: int, offset: int = 0) -> bytes:
    return with_password(
        CC.NV_READ, struct.pack(">II", index, index), struct.pack(">HH", size, offset)
    )


def start_hmac_session(nonce: bytes) -> bytes:
    """TPM2_StartAuthSession: an unbound, unsalted HMAC session with SHA256 and no
    symmetric cipher; ``nonce`` is nonceCaller (16 bytes or more). Spec: Part 3, 11.1."""
    params = (
        struct.pack(">II", RH_NULL, RH_NULL)  # tpmKey, bind
        + struct.pack(">H", len(nonce))
        + nonce
        + struct.pack(">HBHH", 0, SE_HMAC, ALG_NULL, ALG_SHA256)  # salt, type, symmetric, hash
    )
    return command(CC.START_AUTH_SESSION, params)


def parse_session_handle(resp: Response) -> int:
    """The sessionHandle of a StartAuthSession response."""
    try:
        (handle,) = struct.unpack_from(">I", resp.body)
    except struct.error as e:
        raise TransportError(f"malformed StartAuthSession response {resp.body.hex()}") from e
    return int(handle)


def read_public(handle: int) -> bytes:
    return command(CC.READ_PUBLIC, struct.pack(">I", handle))


def parse_nv_read(resp: Response) -> bytes:
    """The data of an NV_Read response: parameterSize, then a TPM2B_MAX_NV_BUFFER."""
    try:
        (length,) = struct.unpack_from(">H", resp.body, 4)
    except struct.error as e:
        raise TransportError(f"malformed NV_Read response {resp.body.hex()}") from e
    return resp.body[6 : 6 + length]


def parse_random(resp: Response) -> bytes:
    (n,) = struct.unpack_from(">H", resp.body)
    return resp.body[2 : 2 + n]


def parse_handles(resp: Response) -> tuple[bool, list[int]]:
    """(moreData, handles) of a GetCapability(HANDLES) response. Spec: TPML_HANDLE."""
    try:
        more, cap, count = struct.unpack_from(">BII", resp.body)
        handles = list(struct.unpack_from(f">{count}I", resp.body, 9))
    except struct.error as e:
        raise TransportError(f"malformed GetCapability response {resp.body.hex()}") from e
    if cap != Cap.HANDLES:
        raise TransportError(f"GetCapability answered capability {cap:#x}")
    return bool(more), handles


def flush_all(transport: RawTransport, timeout: float = 10.0) -> list[int]:
    """Flush every transient object and every loaded or saved session; return the handles.

    Sent as raw commands so it works whatever state an ESAPI context was left in. A
    handle that is already gone (flushed meanwhile) is not an error.
    """
    flushed: list[int] = []
    for first in (HandleRange.TRANSIENT, HandleRange.HMAC_SESSION, HandleRange.POLICY_SESSION):
        # Flushing removes handles, so re-query from the start until the range is empty.
        for _ in range(64):
            resp = Response.from_bytes(transport.transmit(get_capability_handles(first), timeout))
            if resp.code != RC.SUCCESS:
                raise TransportError(f"GetCapability(HANDLES {first:#x}) failed: {resp.code:#x}")
            _more, handles = parse_handles(resp)
            handles = [h for h in handles if h >> 24 == first >> 24]
            if not handles:
                break
            for handle in handles:
                transport.transmit(flush_context(handle), timeout)
                flushed.append(handle)
    return flushed


def startup(transport: RawTransport, timeout: float = 10.0) -> int:
    """Startup(CLEAR); returns the response code, TPM_RC_INITIALIZE meaning already started."""
    code = Response.from_bytes(transport.transmit(startup_clear(), timeout)).code
    if code not in (RC.SUCCESS, RC.INITIALIZE):
        raise TransportError(f"Startup(CLEAR) failed: {code:#x}")
    return code


def assert_channel_works(transport: RawTransport, n: int = 8) -> bytes:
    """GetRandom(n) through ``transport`` answers success with n bytes: the channel lives."""
    resp = Response.from_bytes(transport.transmit(get_random(n), timeout=30))
    assert (resp.tag, resp.code) == (ST.NO_SESSIONS, RC.SUCCESS), resp
    (count,) = struct.unpack_from(">H", resp.body)
    assert count == n and len(resp.body) == 2 + n, resp
    return resp.body[2:]


# ---- PCR arithmetic -----------------------------------------------------------------


def pcr_extended(old: bytes, digest: bytes) -> bytes:
    """PCR_Extend: new = H(old || digest). Spec: Part 1, 17.2."""
    return hashlib.sha256(old + digest).digest()


def pcr_selection_bytes(pcrs: list[int], alg: int = ALG_SHA256) -> bytes:
    """TPML_PCR_SELECTION with one bank, 3-byte bitmap. Spec: Part 2, 10.6 / 10.9.7."""
    bitmap = bytearray(3)
    for p in pcrs:
        bitmap[p // 8] |= 1 << (p % 8)
    return struct.pack(">IHB", 1, alg, 3) + bytes(bitmap)


def pcr_read(pcr: int) -> bytes:
    """Raw TPM2_PCR_Read of one SHA-256 PCR (its value is the answer's last 32 bytes)."""
    return command(CC.PCR_READ, pcr_selection_bytes([pcr]))


def policy_pcr_digest(pcr_select: bytes, pcr_digest: bytes) -> bytes:
    """policyDigest after one PolicyPCR from a fresh session. Spec: Part 3, 23.7."""
    return hashlib.sha256(
        bytes(32) + struct.pack(">I", CC.POLICY_PCR) + pcr_select + pcr_digest
    ).digest()


# ---- attestation structures ---------------------------------------------------------

TPM_GENERATED_VALUE = 0xFF544347  # Part 2, 6.2
TPM_ST_ATTEST_QUOTE = 0x8018  # Part 2, 6.9


@dataclass(frozen=True)
class QuoteInfo:
    """TPMS_ATTEST carrying TPMS_QUOTE_INFO, parsed from the signed bytes.

    Spec: Part 2, 10.12.8 TPMS_ATTEST, 10.12.1 TPMS_CLOCK_INFO, 10.12.4 TPMS_QUOTE_INFO.
    """

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: int
    firmware_version: int
    pcr_select: bytes
    pcr_digest: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> QuoteInfo:
        view = memoryview(data)
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            if pos + n > len(view):
                raise ValueError("attest structure truncated")
            out = bytes(view[pos : pos + n])
            pos += n
            return out

        def tpm2b() -> bytes:
            (n,) = struct.unpack(">H", take(2))
            return take(n)

        magic, typ = struct.unpack(">IH", take(6))
        signer = tpm2b()
        extra = tpm2b()
        clock, resets, restarts, safe = struct.unpack(">QIIB", take(17))
        (firmware,) = struct.unpack(">Q", take(8))
        sel_start = pos
        (count,) = struct.unpack(">I", take(4))
        for _ in range(count):
            _alg, size = struct.unpack(">HB", take(3))
            take(size)
        pcr_select = bytes(view[sel_start:pos])
        digest = tpm2b()
        if pos != len(view):
            raise ValueError("trailing bytes after TPMS_QUOTE_INFO")
        return cls(
            magic, typ, signer, extra, clock, resets, restarts, safe, firmware, pcr_select, digest
        )
