"""``python3 -m xenvtpm relay --device /dev/tpm0``: a guest's TPM device over stdin/stdout.

The harness reaches a real guest's ``/dev/tpm0`` through this relay, run over an SSH
channel (``harness/transport_ssh.py``): each command frame read from stdin is written
to the device in one ``write()``, the response is read back in one ``read()``, and sent
as one frame on stdout. A kernel refusal (``EINVAL`` for a malformed write, ``ETIME``
when the TPM did not answer in time, ``EBUSY`` when ``/dev/tpm0`` is already open) is
sent back as an error frame carrying the errno name, so the caller sees exactly what a
local TPM client would have seen.

Frames, both ways: ``kind u8, length u32 big-endian, payload``.

    C  host -> relay   a command (any bytes, even empty or malformed)
    H  relay -> host   hello, once, after the device opened: "xenvtpm-relay 1 <device>"
    R  relay -> host   the device's response
    E  relay -> host   an OSError: its errno name (e.g. "EINVAL"); after a failed open,
                       the relay exits

Standard library only: it deploys with the driver into any guest.
"""

from __future__ import annotations

import argparse
import errno as errno_mod
import os
import struct
import sys
from dataclasses import dataclass
from enum import Enum

PROTOCOL = "xenvtpm-relay 1"
MAX_FRAME = 1 << 20  # a TPM command is at most 4096 bytes through /dev/tpm0
READ_SIZE = 65536  # more than any response: one read() returns the whole of it

#: frame header: kind, payload length
FRAME_HEADER_CI = struct.Struct(">cI")


class FrameKind(Enum):
    COMMAND = b"C"
    HELLO = b"H"
    RESPONSE = b"R"
    ERROR = b"E"


class FramingError(Exception):
    """The byte stream is not a sequence of frames (or ended inside one)."""


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    payload: bytes

    def to_bytes(self) -> bytes:
        return FRAME_HEADER_CI.pack(self.kind.value, len(self.payload)) + self.payload

    @classmethod
    def parse_header(cls, header: bytes) -> tuple[FrameKind, int]:
        try:
            raw_kind, length = FRAME_HEADER_CI.unpack(header)
            kind = FrameKind(raw_kind)
        except (struct.error, ValueError) as exc:
            raise FramingError(f"bad frame header {header!r}") from exc
        if length > MAX_FRAME:
            raise FramingError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        return kind, length


def errno_name(exc: OSError) -> str:
    return errno_mod.errorcode.get(exc.errno or 0, "EIO")


def read_exact(fd: int, n: int) -> bytes | None:
    """``n`` bytes from ``fd``; None at end of file before the first byte."""
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            if not buf:
                return None
            raise FramingError(f"end of file after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_frame(fd: int) -> Frame | None:
    """The next frame on ``fd``; None at a clean end of file."""
    header = read_exact(fd, FRAME_HEADER_CI.size)
    if header is None:
        return None
    kind, length = Frame.parse_header(header)
    payload = read_exact(fd, length) if length else b""
    if payload is None:
        raise FramingError(f"end of file before a {length}-byte payload")
    return Frame(kind, payload)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def transact(device_fd: int, command: bytes) -> Frame:
    """One command through the device: one write, one read. Errors become E frames."""
    try:
        written = os.write(device_fd, command)
        if written != len(command):
            return Frame(FrameKind.ERROR, b"EIO")  # the TPM char device never does this
        return Frame(FrameKind.RESPONSE, os.read(device_fd, READ_SIZE))
    except OSError as exc:
        return Frame(FrameKind.ERROR, errno_name(exc).encode())


def serve(device_fd: int, device: str, in_fd: int, out_fd: int) -> int:
    """Say hello, then relay commands until stdin ends. Returns the exit status."""
    write_all(out_fd, Frame(FrameKind.HELLO, f"{PROTOCOL} {device}".encode()).to_bytes())
    while True:
        try:
            frame = read_frame(in_fd)
        except FramingError as exc:
            print(f"relay: {exc}", file=sys.stderr)
            return 2
        if frame is None:
            return 0
        if frame.kind is not FrameKind.COMMAND:
            print(f"relay: unexpected {frame.kind.name} frame", file=sys.stderr)
            return 2
        write_all(out_fd, transact(device_fd, frame.payload).to_bytes())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xenvtpm relay",
        description="Relay framed TPM commands from stdin to a TPM device and its "
        "responses to stdout (the harness's transport to a real guest).",
    )
    p.add_argument("--device", default="/dev/tpm0", help="TPM character device")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device_fd = os.open(args.device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        write_all(1, Frame(FrameKind.ERROR, errno_name(exc).encode()).to_bytes())
        print(f"relay: cannot open {args.device}: {exc}", file=sys.stderr)
        return 1
    try:
        return serve(device_fd, args.device, 0, 1)
    except BrokenPipeError:
        return 0  # the harness went away
    finally:
        os.close(device_fd)
