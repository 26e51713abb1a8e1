"""Test doubles that are real implementations of the harness protocols (STYLE.md 9).

``FakeTPM`` is a ``RawTransport`` answering the handful of commands the harness sends
itself (Startup, GetRandom, GetCapability(HANDLES), FlushContext) from memory, so the
fixtures' cleanup and the TCTI can be tested without swtpm. Everything else gets
TPM_RC_COMMAND_CODE, as swtpm answers an unknown command.
"""

from __future__ import annotations

import os
import struct

from harness.errors import TransportClosed
from harness.tpmwire import CC, HEADER, RC, ST, Cap
from harness.transport import DEFAULT_TIMEOUT
from xenvtpm.lifecycle import Closeable


def response(code: int, body: bytes = b"") -> bytes:
    return HEADER.pack(ST.NO_SESSIONS, HEADER.size + len(body), code) + body


class FakeTPM(Closeable):
    """An in-memory TPM endpoint; ``handles`` are the loaded transient objects/sessions."""

    def __init__(self, handles: set[int] | None = None, page: int = 3) -> None:
        self.handles: set[int] = set(handles or ())
        self.page = page  # handles per GetCapability answer, to exercise moreData
        self.started = False
        self.commands: list[bytes] = []
        self.closed = False

    def transmit(self, cmd: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        if self.closed:
            raise TransportClosed("FakeTPM is closed")
        self.commands.append(bytes(cmd))
        if len(cmd) < HEADER.size:
            return response(RC.COMMAND_SIZE)
        _tag, size, code = HEADER.unpack_from(cmd)
        if size != len(cmd):
            return response(RC.COMMAND_SIZE)
        params = cmd[HEADER.size :]
        if code == CC.STARTUP:
            if self.started:
                return response(RC.INITIALIZE)
            self.started = True
            return response(RC.SUCCESS)
        if code == CC.GET_RANDOM:
            (n,) = struct.unpack(">H", params)
            return response(RC.SUCCESS, struct.pack(">H", n) + os.urandom(n))
        if code == CC.GET_CAPABILITY:
            cap, first, count = struct.unpack(">III", params)
            if cap != Cap.HANDLES:
                return response(RC.COMMAND_CODE)
            found = sorted(h for h in self.handles if h >= first and h >> 24 == first >> 24)
            shown = found[: min(count, self.page)]
            body = struct.pack(">BII", len(found) > len(shown), Cap.HANDLES, len(shown))
            return response(RC.SUCCESS, body + struct.pack(f">{len(shown)}I", *shown))
        if code == CC.FLUSH_CONTEXT:
            (handle,) = struct.unpack(">I", params)
            if handle not in self.handles:
                return response(0x18B)  # TPM_RC_HANDLE + parameter 1
            self.handles.discard(handle)
            return response(RC.SUCCESS)
        return response(RC.COMMAND_CODE)

    def close(self) -> None:
        self.closed = True
