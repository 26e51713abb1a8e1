"""The few raw TPM 2.0 commands the harness itself sends (readiness, cleanup, smoke,
and the NV commands of the NV-write benchmark and the power-cut scenario).

Built by hand so that cleanup works even when an ESAPI context is dead, and so that a
command is sent and answered with nothing else in between (no TSS round trips). Spec:
TPM 2.0 Library Part 3 (commands) and Part 2 (structures); codes from tpm2-tss
``tss2_tpm2_types.h``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from harness.errors import TransportError
from harness.transport import RawTransport

HEADER = struct.Struct(">HII")  # tag, commandSize/responseSize, commandCode/responseCode


class Tag(enum.IntEnum):
    NO_SESSIONS = 0x8001  # TPM_ST_NO_SESSIONS
    SESSIONS = 0x8002  # TPM_ST_SESSIONS


class CC(enum.IntEnum):
    NV_UNDEFINE_SPACE = 0x0122
    NV_DEFINE_SPACE = 0x012A
    NV_WRITE = 0x0137
    STARTUP = 0x0144
    NV_READ = 0x014E
    FLUSH_CONTEXT = 0x0165
    READ_PUBLIC = 0x0173
    GET_CAPABILITY = 0x017A
    GET_RANDOM = 0x017B


class RC(enum.IntEnum):
    SUCCESS = 0x000
    INITIALIZE = 0x100  # TPM_RC_INITIALIZE: already started
    FAILURE = 0x101
    COMMAND_SIZE = 0x142
    COMMAND_CODE = 0x143


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
    tag: int
    code: int
    body: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Response:
        if len(data) < HEADER.size:
            raise TransportError(f"TPM response of {len(data)} bytes is shorter than a header")
        tag, size, code = HEADER.unpack_from(data)
        if size != len(data):
            raise TransportError(f"TPM response says {size} bytes, carries {len(data)}")
        return cls(tag, code, bytes(data[HEADER.size :]))


def command(code: int, params: bytes = b"", tag: int = Tag.NO_SESSIONS) -> bytes:
    return HEADER.pack(tag, HEADER.size + len(params), code) + params


def startup_clear() -> bytes:
    return command(CC.STARTUP, struct.pack(">H", SU_CLEAR))


def get_random(count: int) -> bytes:
    return command(CC.GET_RANDOM, struct.pack(">H", count))


def flush_context(handle: int) -> bytes:
    return command(CC.FLUSH_CONTEXT, struct.pack(">I", handle))


def get_capability_handles(first: int, count: int = 64) -> bytes:
    return command(CC.GET_CAPABILITY, struct.pack(">III", Cap.HANDLES, first, count))


def with_password(code: int, handles: bytes, params: bytes = b"") -> bytes:
    """A command with one password session (empty password) on its authorized handle."""
    body = handles + struct.pack(">I", len(_PASSWORD_SESSION)) + _PASSWORD_SESSION + params
    return command(code, body, Tag.SESSIONS)


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
