"""TPM 2.0 wire format: the 10-byte header, response codes, request validation.

Every hop of the data path (frontend, backend, manager) needs the same few facts about
a TPM 2.0 packet: is it one complete, consistent command, and what 10-byte error does a
TPM answer when it is not.  They live here, once, so that every hop answers a malformed
packet with the very bytes swtpm itself would answer.

Measured on swtpm 0.7.1 / libtpms (this machine kind), and mirrored by
:func:`validate_command`:

- tag neither ``0x8001`` nor ``0x8002`` -> ``80010000000a00000084`` (``TPM_RC_VALUE``),
  checked before the size: a bad tag with a wrong size field also answers 0x084;
- header ``commandSize`` different from the bytes written -> ``...00000142``
  (``TPM_RC_COMMAND_SIZE``);
- unknown command code -> ``...00000143`` (``TPM_RC_COMMAND_CODE``);
- ``TPM_PT_MAX_COMMAND_SIZE`` = ``TPM_PT_MAX_RESPONSE_SIZE`` = 4096.

Part 2 also defines ``TPM_RC_BAD_TAG`` (0x01E, kept for TPM 1.2 compatibility and used
with the response tag ``TPM_ST_RSP_COMMAND``), but swtpm answers ``TPM_RC_VALUE`` for a
bad command tag, so :data:`BAD_TAG_RC` is ``TPM_RC.VALUE``.

Spec: TCG TPM 2.0 Library Part 1, 18 (command/response structure);
Part 2, 6.5 (TPM_CC), 6.6 (TPM_RC), 6.9 (TPM_ST), 6.12 (TPM_SU).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

from xenvtpm.errors import MalformedMessage

__all__ = [
    "BAD_TAG_RC",
    "BIND_RESUMED",
    "HEADER_SIZE",
    "MAX_COMMAND_SIZE",
    "MAX_RESPONSE_SIZE",
    "TPM_CC",
    "TPM_CC_VENDOR_BIT",
    "TPM_RC",
    "TPM_ST",
    "TPM_SU",
    "VTPM_PROXY_CC_SET_LOCALITY",
    "XENVTPM_CC_BIND",
    "XENVTPM_CC_CANCEL",
    "XENVTPM_CC_RESERVED",
    "XENVTPM_CC_RESET",
    "MalformedCommand",
    "TpmHeader",
    "bad_tag_rc",
    "bind_command",
    "cancel_command",
    "error_response",
    "get_random_command",
    "parse_bind_command",
    "pcr_extend_command",
    "pcr_read_command",
    "response_code",
    "startup_command",
    "success_response",
    "validate_command",
    "validate_response",
]


class TPM_ST(IntEnum):
    """Structure tags that open every command and response.

    Spec: TCG TPM2 Part 2, 6.9 TPM_ST (tpm2-tss include/tss2/tss2_tpm2_types.h TPM2_ST_*).
    """

    RSP_COMMAND = 0x00C4
    NULL = 0x8000
    NO_SESSIONS = 0x8001
    SESSIONS = 0x8002


class TPM_RC(IntEnum):
    """Response codes a hop may answer by itself or needs to recognise.

    Format-zero codes are ``RC_VER1 (0x100) + n``; format-one codes are
    ``RC_FMT1 (0x080) + n`` (without a handle/parameter/session number).
    Spec: TCG TPM2 Part 2, 6.6 TPM_RC, Table 16.
    """

    SUCCESS = 0x000
    BAD_TAG = 0x01E
    # format one (RC_FMT1 = 0x080)
    ASYMMETRIC = 0x081
    ATTRIBUTES = 0x082
    HASH = 0x083
    VALUE = 0x084
    HIERARCHY = 0x085
    KEY_SIZE = 0x087
    MGF = 0x088
    MODE = 0x089
    TYPE = 0x08A
    HANDLE = 0x08B
    KDF = 0x08C
    RANGE = 0x08D
    AUTH_FAIL = 0x08E
    NONCE = 0x08F
    PP = 0x090
    SCHEME = 0x092
    SIZE = 0x095
    SYMMETRIC = 0x096
    TAG = 0x097
    SELECTOR = 0x098
    INSUFFICIENT = 0x09A
    SIGNATURE = 0x09B
    KEY = 0x09C
    POLICY_FAIL = 0x09D
    INTEGRITY = 0x09F
    TICKET = 0x0A0
    RESERVED_BITS = 0x0A1
    BAD_AUTH = 0x0A2
    EXPIRED = 0x0A3
    POLICY_CC = 0x0A4
    BINDING = 0x0A5
    CURVE = 0x0A6
    ECC_POINT = 0x0A7
    # format zero (RC_VER1 = 0x100)
    INITIALIZE = 0x100
    FAILURE = 0x101
    SEQUENCE = 0x103
    PRIVATE = 0x10B
    HMAC = 0x119
    DISABLED = 0x120
    EXCLUSIVE = 0x121
    AUTH_TYPE = 0x124
    AUTH_MISSING = 0x125
    POLICY = 0x126
    PCR = 0x127
    PCR_CHANGED = 0x128
    UPGRADE = 0x12D
    TOO_MANY_CONTEXTS = 0x12E
    AUTH_UNAVAILABLE = 0x12F
    REBOOT = 0x130
    UNBALANCED = 0x131
    COMMAND_SIZE = 0x142
    COMMAND_CODE = 0x143
    AUTHSIZE = 0x144
    AUTH_CONTEXT = 0x145
    NV_RANGE = 0x146
    NV_SIZE = 0x147
    NV_LOCKED = 0x148
    NV_AUTHORIZATION = 0x149
    NV_UNINITIALIZED = 0x14A
    NV_SPACE = 0x14B
    NV_DEFINED = 0x14C
    BAD_CONTEXT = 0x150
    CPHASH = 0x151
    PARENT = 0x152
    NEEDS_TEST = 0x153
    NO_RESULT = 0x154
    SENSITIVE = 0x155
    # warnings (RC_WARN = 0x900)
    CONTEXT_GAP = 0x901
    OBJECT_MEMORY = 0x902
    SESSION_MEMORY = 0x903
    MEMORY = 0x904
    SESSION_HANDLES = 0x905
    OBJECT_HANDLES = 0x906
    LOCALITY = 0x907
    YIELDED = 0x908
    CANCELED = 0x909
    TESTING = 0x90A
    NV_RATE = 0x920
    LOCKOUT = 0x921
    RETRY = 0x922
    NV_UNAVAILABLE = 0x923


class TPM_CC(IntEnum):
    """The command codes xenvtpm builds or inspects (a small subset).

    Spec: TCG TPM2 Part 2, 6.5.2 TPM_CC, Table 12.
    """

    NV_UndefineSpace = 0x122
    Clear = 0x126
    NV_DefineSpace = 0x12A
    CreatePrimary = 0x131
    NV_Write = 0x137
    SelfTest = 0x143
    Startup = 0x144
    Shutdown = 0x145
    NV_Read = 0x14E
    FlushContext = 0x165
    ReadPublic = 0x173
    GetCapability = 0x17A
    GetRandom = 0x17B
    GetTestResult = 0x17C
    PCR_Read = 0x17E
    PCR_Extend = 0x182


class TPM_SU(IntEnum):
    """TPM2_Startup / TPM2_Shutdown types.  Spec: TCG TPM2 Part 2, 6.12 TPM_SU."""

    CLEAR = 0x0000
    STATE = 0x0001


#: Commands with this bit set are vendor specific (Part 2, 6.5.2, TPMA_CC V bit 29).
TPM_CC_VENDOR_BIT = 0x20000000

#: Vendor command of the Linux vTPM proxy (include/uapi/linux/vtpm_proxy.h,
#: TPM2_CC_SET_LOCALITY); the proxy's fd owner answers it itself.
VTPM_PROXY_CC_SET_LOCALITY = 0x20001000

#: Vendor command reserved for the backend -> manager control path.
#:
#: The backend sends ``80010000000e20000f00`` + a 4-byte big-endian domid when a
#: frontend (a domain) connects to an instance.  The manager intercepts it, never
#: forwards it to swtpm, and, if the instance was last bound to a *different* domid,
#: power-cycles the instance (swtpm ctrl CMD_INIT, then TPM2_Startup(CLEAR)) so that the
#: PCRs reset as on a reboot of the new domain.  The same domid (a frontend or backend
#: restart) keeps the TPM state.  The manager answers a 10-byte success response.
#: A guest can never send this code: the backend filters it.
#:
#: A domain that *resumes* a saved one (``xl restore``: same guest, same boot, new
#: domid) must keep its PCRs, so the toolstack marks its backend directory
#: (``resume = True``) and the backend sends the 18-byte form: domid, then a u32 of
#: flags, :data:`BIND_RESUMED` set; the manager then binds without a power cycle.
XENVTPM_CC_BIND = TPM_CC_VENDOR_BIT | 0x0F00
BIND_RESUMED = 0x1

#: Operator command on the manager's socket (``python3 -m xenvtpm reset``): power-cycle
#: the instance (its PCRs reset) and end its failure mode. 10 bytes, no parameters.
XENVTPM_CC_RESET = TPM_CC_VENDOR_BIT | 0x0F01

#: Vendor command reserved for the backend -> manager control path: a guest cancelled
#: the command it has outstanding on this instance (protocol v2 CANCEL, or the backend
#: gave up on it: timeout, the frontend left).
#:
#: ``80010000000a20000f02``, no parameters. The manager answers nothing (the backend's
#: link matches replies to requests FIFO per instance, and this is no request): if the
#: instance's command in flight came from the same connection, it sends swtpm
#: ``CMD_CANCEL_TPM_CMD``; that connection's commands queued for the instance are
#: answered TPM_RC_CANCELED (0x909) in their FIFO place. A guest can never send this
#: code: the backend filters it.
XENVTPM_CC_CANCEL = TPM_CC_VENDOR_BIT | 0x0F02

#: Every code of this block belongs to the backend -> manager control path, present or
#: future: the backend answers a guest's command in it TPM_RC_COMMAND_CODE, unsent.
XENVTPM_CC_RESERVED = range(TPM_CC_VENDOR_BIT | 0x0F00, TPM_CC_VENDOR_BIT | 0x1000)

HEADER_SIZE = 10
#: swtpm 0.7.1: TPM_PT_MAX_COMMAND_SIZE (measured by TPM2_GetCapability).  swtpm does
#: not frame by commandSize: a larger write is read as several commands.
MAX_COMMAND_SIZE = 4096
#: swtpm 0.7.1: TPM_PT_MAX_RESPONSE_SIZE (measured).
MAX_RESPONSE_SIZE = 4096

#: What a TPM answers for a command tag that is not a TPM_ST at all (0x8003, 0x0000...):
#: measured on swtpm 0.7.1 as ``TPM_RC_VALUE`` (0x084). See :func:`bad_tag_rc`.
BAD_TAG_RC = TPM_RC.VALUE

#: TPM_ST values libtpms knows that are not command tags; as a command tag they get
#: ``TPM_RC_BAD_TAG`` (0x01E) instead. Measured on swtpm 0.7.1 over 0x0000..0x00FF and
#: 0x8000..0x80FF: exactly RSP_COMMAND, NULL, the attestation tags 0x8014..0x801A and
#: the ticket/check tags 0x8021..0x8025. Spec: Part 2, 6.9 TPM_ST; libtpms
#: TPMI_ST_COMMAND_TAG_Unmarshal (TPM_ST_Unmarshal first, then the command check).
_NON_COMMAND_ST = frozenset((0x00C4, 0x8000, *range(0x8014, 0x801B), *range(0x8021, 0x8026)))


def bad_tag_rc(tag: int) -> int:
    """The code a TPM answers for a command with this (non-command) tag."""
    return TPM_RC.BAD_TAG if tag in _NON_COMMAND_ST else BAD_TAG_RC


_COMMAND_TAGS = frozenset((TPM_ST.NO_SESSIONS, TPM_ST.SESSIONS))
_RESPONSE_TAGS = frozenset((TPM_ST.NO_SESSIONS, TPM_ST.SESSIONS, TPM_ST.RSP_COMMAND))

# tag u16, size u32, command/response code u32; big-endian (Part 1, 18.2).
_HEADER_HII = struct.Struct(">HII")
_BIND_HIII = struct.Struct(">HIII")
_BIND_HIIII = struct.Struct(">HIIII")
_GET_RANDOM_HIIH = struct.Struct(">HIIH")
_STARTUP_HIIH = _GET_RANDOM_HIIH
# PCR_Extend: header, pcrHandle, authorizationSize, TPMS_AUTH_COMMAND for TPM_RS_PW
# (handle, nonce size 0, attributes 0, hmac size 0), TPML_DIGEST_VALUES count, hashAlg.
_PCR_EXTEND_HIIIIIHBHIH = struct.Struct(">HIIIIIHBHIH")
# PCR_Read: header, TPML_PCR_SELECTION count, hash, sizeofSelect (then the bitmap).
_PCR_READ_HIIIHB = struct.Struct(">HIIIHB")

_TPM_RS_PW = 0x40000009
_TPM_ALG_SHA256 = 0x000B
_SHA256_SIZE = 32


class MalformedCommand(MalformedMessage):
    """A TPM command that must not reach a TPM; ``rc`` is the code to answer with.

    Spec: Part 1, 18.2 (commandSize is the size of the whole command); seed
    000_a1dfc4f903a123f1.txt ("the length indicator ... must correctly indicate
    the length of the request").
    """

    def __init__(self, rc: int, reason: str) -> None:
        super().__init__(f"{reason} (answer TPM_RC 0x{rc:03x})")
        self.rc = rc
        self.reason = reason


class TpmHeader(NamedTuple):
    """The 10-byte header shared by commands (``code`` = TPM_CC) and responses (TPM_RC).

    Immutable like a frozen dataclass, but a tuple: every command is parsed five times
    on its way (backend, manager and three responses), and a frozen dataclass's
    ``__init__`` costs about 1 us there, a tuple's about 0.2 us (issue 20).

    Spec: TCG TPM2 Part 1, 18.2 / 18.8: ``tag u16, commandSize/responseSize u32,
    commandCode/responseCode u32``, big-endian.
    """

    tag: int
    size: int
    code: int

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> TpmHeader:
        """Parse the first 10 bytes; raise :class:`MalformedMessage` if fewer."""
        try:
            tag, size, code = _HEADER_HII.unpack_from(data, 0)
        except struct.error as exc:
            raise MalformedMessage(
                f"TPM header needs {HEADER_SIZE} bytes, got {len(data)}"
            ) from exc
        return cls._make((tag, size, code))

    def to_bytes(self) -> bytes:
        try:
            return _HEADER_HII.pack(self.tag, self.size, self.code)
        except struct.error as exc:
            raise MalformedMessage(f"TPM header field out of range: {self}") from exc


def validate_command(
    data: bytes | bytearray | memoryview, max_size: int | None = None
) -> TpmHeader:
    """Check that ``data`` is exactly one well-formed TPM 2.0 command; return its header.

    Rules (DESIGN.md 2, in swtpm's order): fewer than 10 bytes -> COMMAND_SIZE; a tag
    that is neither NO_SESSIONS nor SESSIONS -> :data:`BAD_TAG_RC` (swtpm checks the tag
    first); ``commandSize != len(data)`` -> COMMAND_SIZE; ``len(data) > max_size``
    (when given, e.g. :data:`MAX_COMMAND_SIZE`) -> COMMAND_SIZE.
    Raises :class:`MalformedCommand` carrying the ``rc`` to answer.

    Spec: TCG TPM2 Part 1, 18.2; measured swtpm 0.7.1 answers (module docstring).
    """
    length = len(data)
    if length < HEADER_SIZE:
        raise MalformedCommand(TPM_RC.COMMAND_SIZE, f"command of {length} bytes < header")
    header = TpmHeader._make(_HEADER_HII.unpack_from(data, 0))
    if header.tag not in _COMMAND_TAGS:
        raise MalformedCommand(bad_tag_rc(header.tag), f"command tag 0x{header.tag:04x}")
    if header.size != length:
        raise MalformedCommand(
            TPM_RC.COMMAND_SIZE, f"commandSize {header.size} != {length} bytes received"
        )
    if max_size is not None and length > max_size:
        raise MalformedCommand(TPM_RC.COMMAND_SIZE, f"command of {length} bytes > {max_size}")
    return header


def validate_response(data: bytes | bytearray | memoryview) -> TpmHeader:
    """Check that ``data`` is exactly one TPM 2.0 response; return its header.

    A response must have a header, a known response tag (including TPM_ST_RSP_COMMAND,
    which a TPM may use to answer a bad tag) and ``responseSize == len(data)``.
    Raises :class:`MalformedMessage` otherwise.

    Spec: TCG TPM2 Part 1, 18.8; Part 2, 6.9 (TPM_ST_RSP_COMMAND).
    """
    if len(data) < HEADER_SIZE:
        raise MalformedMessage(f"TPM header needs {HEADER_SIZE} bytes, got {len(data)}")
    header = TpmHeader._make(_HEADER_HII.unpack_from(data, 0))
    if header.tag not in _RESPONSE_TAGS:
        raise MalformedMessage(f"response tag 0x{header.tag:04x}")
    if header.size != len(data):
        raise MalformedMessage(f"responseSize {header.size} != {len(data)} bytes received")
    return header


def error_response(rc: int) -> bytes:
    """The 10-byte response a TPM gives for an error: tag NO_SESSIONS, size 10, ``rc``.

    Spec: TCG TPM2 Part 1, 18.8 (an error response has no handles or parameters).
    """
    return _HEADER_HII.pack(TPM_ST.NO_SESSIONS, HEADER_SIZE, rc)


def success_response() -> bytes:
    """A 10-byte TPM_RC_SUCCESS response (answer to a command without output)."""
    return error_response(TPM_RC.SUCCESS)


def response_code(data: bytes | bytearray | memoryview) -> int:
    """The response code of a response (header only is checked)."""
    return TpmHeader.from_bytes(data).code


def get_random_command(n: int) -> bytes:
    """TPM2_GetRandom(bytesRequested=n).  Spec: TCG TPM2 Part 3, 16.1."""
    return _GET_RANDOM_HIIH.pack(TPM_ST.NO_SESSIONS, 12, TPM_CC.GetRandom, n)


def startup_command(clear: bool = True) -> bytes:
    """TPM2_Startup(CLEAR or STATE).  Spec: TCG TPM2 Part 3, 9.3."""
    su = TPM_SU.CLEAR if clear else TPM_SU.STATE
    return _STARTUP_HIIH.pack(TPM_ST.NO_SESSIONS, 12, TPM_CC.Startup, su)


def bind_command(domid: int, resumed: bool = False) -> bytes:
    """The manager control command :data:`XENVTPM_CC_BIND` for ``domid``; ``resumed``:
    the domain resumes a saved one, so the TPM is kept (the 18-byte form)."""
    try:
        if resumed:
            return _BIND_HIIII.pack(TPM_ST.NO_SESSIONS, 18, XENVTPM_CC_BIND, domid, BIND_RESUMED)
        return _BIND_HIII.pack(TPM_ST.NO_SESSIONS, 14, XENVTPM_CC_BIND, domid)
    except struct.error as exc:
        raise MalformedMessage(f"domid {domid} does not fit in u32") from exc


def cancel_command() -> bytes:
    """The manager control command :data:`XENVTPM_CC_CANCEL` (10 bytes, no reply)."""
    return _HEADER_HII.pack(TPM_ST.NO_SESSIONS, HEADER_SIZE, XENVTPM_CC_CANCEL)


def reset_command() -> bytes:
    """The operator's :data:`XENVTPM_CC_RESET` (the instance is in the packet prefix)."""
    return _HEADER_HII.pack(TPM_ST.NO_SESSIONS, HEADER_SIZE, XENVTPM_CC_RESET)


def parse_bind_command(data: bytes | bytearray | memoryview) -> tuple[int, bool]:
    """``(domid, resumed)`` of a :data:`XENVTPM_CC_BIND` command; raise MalformedCommand."""
    flags = 0
    try:
        if len(data) == _BIND_HIIII.size:
            tag, size, code, domid, flags = _BIND_HIIII.unpack(data)
        else:
            tag, size, code, domid = _BIND_HIII.unpack(data)
    except struct.error as exc:
        raise MalformedCommand(TPM_RC.COMMAND_SIZE, f"BIND of {len(data)} bytes") from exc
    if code != XENVTPM_CC_BIND or size != len(data) or tag != TPM_ST.NO_SESSIONS:
        raise MalformedCommand(TPM_RC.VALUE, "not a well-formed XENVTPM_CC_BIND")
    if flags & ~BIND_RESUMED:
        raise MalformedCommand(TPM_RC.VALUE, f"XENVTPM_CC_BIND flags {flags:#x} unknown")
    return int(domid), bool(flags & BIND_RESUMED)


def pcr_extend_command(pcr: int, digest: bytes) -> bytes:
    """TPM2_PCR_Extend(pcr, {sha256: digest}) with an empty password session.

    Spec: TCG TPM2 Part 3, 22.2; Part 1, 19.8.4 (TPM_RS_PW session).
    """
    if len(digest) != _SHA256_SIZE:
        raise ValueError(f"sha256 digest must be 32 bytes, got {len(digest)}")
    size = _PCR_EXTEND_HIIIIIHBHIH.size + _SHA256_SIZE
    return (
        _PCR_EXTEND_HIIIIIHBHIH.pack(
            TPM_ST.SESSIONS,
            size,
            TPM_CC.PCR_Extend,
            pcr,
            9,
            _TPM_RS_PW,
            0,
            0,
            0,
            1,
            _TPM_ALG_SHA256,
        )
        + digest
    )


def pcr_read_command(pcr: int) -> bytes:
    """TPM2_PCR_Read of one sha256 PCR (0..23).  Spec: TCG TPM2 Part 3, 22.4."""
    if not 0 <= pcr < 24:
        raise ValueError(f"PCR index {pcr} out of range 0..23")
    select = bytearray(3)
    select[pcr // 8] = 1 << (pcr % 8)
    size = _PCR_READ_HIIIHB.size + 3
    return _PCR_READ_HIIIHB.pack(
        TPM_ST.NO_SESSIONS, size, TPM_CC.PCR_Read, 1, _TPM_ALG_SHA256, 3
    ) + bytes(select)
