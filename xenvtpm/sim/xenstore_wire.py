"""The xenstore wire format: one 16-byte header, then at most 4096 payload bytes.

Pure functions and frozen values only, so that the client, the simulated daemon and the
fuzzers share one parser. Spec: xen/include/public/io/xs_wire.h, ``struct xsd_sockmsg``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from xenvtpm.errors import MalformedMessage, XenStoreError

XENSTORE_PAYLOAD_MAX = 4096  # xs_wire.h
XENSTORE_ABS_PATH_MAX = 3072  # xs_wire.h
XENSTORE_REL_PATH_MAX = 2048  # xs_wire.h

HEADER_IIII = struct.Struct("<IIII")  # type, req_id, tx_id, len; host order (x86: little)
HEADER_SIZE = HEADER_IIII.size
UINT32_MAX = 0xFFFFFFFF


class XsType(enum.IntEnum):
    """Message types. Spec: xen/include/public/io/xs_wire.h, enum xsd_sockmsg_type."""

    XS_CONTROL = 0x00  # alias XS_DEBUG
    XS_DIRECTORY = 0x01
    XS_READ = 0x02
    XS_GET_PERMS = 0x03
    XS_WATCH = 0x04
    XS_UNWATCH = 0x05
    XS_TRANSACTION_START = 0x06
    XS_TRANSACTION_END = 0x07
    XS_INTRODUCE = 0x08
    XS_RELEASE = 0x09
    XS_GET_DOMAIN_PATH = 0x0A
    XS_WRITE = 0x0B
    XS_MKDIR = 0x0C
    XS_RM = 0x0D
    XS_SET_PERMS = 0x0E
    XS_WATCH_EVENT = 0x0F
    XS_ERROR = 0x10
    XS_IS_DOMAIN_INTRODUCED = 0x11
    XS_RESUME = 0x12
    XS_SET_TARGET = 0x13
    # 0x14 was XS_RESTRICT, removed
    XS_RESET_WATCHES = 0x15
    XS_DIRECTORY_PART = 0x16


_XS_TYPES = frozenset(int(t) for t in XsType)


@dataclass(frozen=True)
class XsHeader:
    """A parsed ``xsd_sockmsg``; refuses a payload length above XENSTORE_PAYLOAD_MAX."""

    type: XsType
    req_id: int
    tx_id: int
    length: int

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> XsHeader:
        if len(data) < HEADER_SIZE:
            raise MalformedMessage(f"xenstore header needs {HEADER_SIZE} bytes, got {len(data)}")
        type_, req_id, tx_id, length = HEADER_IIII.unpack_from(data)
        if type_ not in _XS_TYPES:
            raise MalformedMessage(f"unknown xenstore message type {type_:#x}")
        if length > XENSTORE_PAYLOAD_MAX:
            raise MalformedMessage(f"xenstore payload of {length} bytes exceeds 4096")
        return cls(XsType(type_), req_id, tx_id, length)


@dataclass(frozen=True)
class XsPacket:
    """One whole xenstore message. Spec: xs_wire.h, struct xsd_sockmsg + payload."""

    type: XsType
    req_id: int
    tx_id: int
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.payload) > XENSTORE_PAYLOAD_MAX:
            raise MalformedMessage(f"xenstore payload of {len(self.payload)} bytes exceeds 4096")
        if not (0 <= self.req_id <= UINT32_MAX and 0 <= self.tx_id <= UINT32_MAX):
            raise MalformedMessage("xenstore req_id/tx_id out of uint32 range")

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> XsPacket:
        """Parse exactly one packet: header plus ``len`` payload bytes, nothing more."""
        header = XsHeader.from_bytes(data)
        if len(data) != HEADER_SIZE + header.length:
            raise MalformedMessage(
                f"xenstore packet is {len(data)} bytes, header says {HEADER_SIZE + header.length}"
            )
        return cls(header.type, header.req_id, header.tx_id, bytes(data[HEADER_SIZE:]))

    def to_bytes(self) -> bytes:
        return (
            HEADER_IIII.pack(int(self.type), self.req_id, self.tx_id, len(self.payload))
            + self.payload
        )

    # --- constructors for the common shapes -------------------------------------------

    @classmethod
    def error(cls, req_id: int, tx_id: int, errno_name: str) -> XsPacket:
        """An error reply: ``XS_ERROR`` carrying e.g. ``"EACCES\\0"``."""
        return cls(XsType.XS_ERROR, req_id, tx_id, join_strings(errno_name))

    @classmethod
    def ok(cls, type_: XsType, req_id: int, tx_id: int) -> XsPacket:
        """The acknowledgement xenstored sends for writes, watches...: ``"OK\\0"``."""
        return cls(type_, req_id, tx_id, b"OK\x00")

    @classmethod
    def watch_event(cls, path: str, token: str) -> XsPacket:
        return cls(XsType.XS_WATCH_EVENT, 0, 0, join_strings(path, token))


# --- payload helpers ----------------------------------------------------------------


def join_strings(*parts: str) -> bytes:
    """Each string NUL-terminated, as ``path\\0token\\0``."""
    return b"".join(p.encode() + b"\x00" for p in parts)


def _decode(raw: bytes) -> str:
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"xenstore string is not UTF-8: {raw[:64]!r}") from exc
    return text


def split_strings(payload: bytes) -> list[str]:
    """The inverse of ``join_strings``: every string must be NUL-terminated."""
    if not payload:
        return []
    if not payload.endswith(b"\x00"):
        raise MalformedMessage(f"xenstore strings not NUL-terminated: {payload[:64]!r}")
    return [_decode(p) for p in payload[:-1].split(b"\x00")]


def one_string(payload: bytes) -> str:
    """Exactly one NUL-terminated string (``XS_READ``, ``XS_RM``...)."""
    parts = split_strings(payload)
    if len(parts) != 1:
        raise MalformedMessage(f"expected one xenstore string, got {len(parts)}")
    return parts[0]


def parse_decimal(text: str, limit: int) -> int:
    """A decimal number in ``0..limit``: ASCII digits only, so never more than int() takes.

    ``str.isdigit()`` also accepts digits int() refuses ("\u00b2") and ones it converts
    ("\u0665" is 5): a guest's string is parsed here instead, into MalformedMessage.
    """
    if not 0 < len(text) <= len(str(limit)) or not text.isascii() or not text.isdigit():
        raise MalformedMessage(f"not a number in 0..{limit}: {text[:32]!r}")
    value = int(text)
    if value > limit:
        raise MalformedMessage(f"not a number in 0..{limit}: {text[:32]!r}")
    return value


def encode_write(path: str, value: bytes) -> bytes:
    """``XS_WRITE`` payload: ``path\\0value`` with no NUL after the value."""
    return path.encode() + b"\x00" + value


def decode_write(payload: bytes) -> tuple[str, bytes]:
    path, sep, value = payload.partition(b"\x00")
    if not sep:
        raise MalformedMessage("XS_WRITE payload has no NUL after the path")
    return _decode(path), value


def decode_error(payload: bytes) -> str:
    """The errno name of an ``XS_ERROR`` payload, tolerating a missing NUL."""
    name = payload.rstrip(b"\x00")
    return _decode(name) if name else "EIO"


def check_reply(packet: XsPacket, op: str, path: str = "") -> bytes:
    """The payload of a reply, or XenStoreError carrying an ``XS_ERROR``'s errno name."""
    if packet.type is XsType.XS_ERROR:
        raise XenStoreError(decode_error(packet.payload), op, path)
    return packet.payload
