"""A trace of the TPM traffic that crosses each vTPM, taken on the backend's side.

When the backend runs with ``--trace DIR``, every request it takes off a frontend's
pages becomes one line in ``DIR/instance-<N>.trace`` once it is answered: when it came,
how long its answer took, its command code, the sizes and the response code, and who
answered it (the manager, or the backend itself: a malformed request, a timeout, a
cancel). The harness puts the lines of a failed test's time window into its report and
``python -m harness trace GUEST`` follows the file live; both name the codes
(``harness.traffic``). Only numbers are written here, so the driver needs no table of
names and a line costs one formatted write.

A guest chooses how much traffic it makes, and dom0's disk (or tmpfs) is not its to
fill: a file is rotated at ``max_bytes`` to ``.trace.1``, the one before is dropped.

Line format, space-separated (``harness.traffic.parse_line`` reads it)::

    <unix time> dom=<domid> cc=0x<code> cmd=<bytes> rsp=<bytes> rc=0x<code> us=<micros> by=<who>
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

MAX_BYTES = 256 * 1024  # per instance, and as much again in the rotated file
_CODE_AT_6 = struct.Struct(">I")  # a command's code and a response's code. Part 1, 18.2


class AnsweredBy(enum.Enum):
    MANAGER = "manager"  # the instance's swtpm answered (or the manager, for it)
    BACKEND = "backend"  # refused by the backend's checks, never forwarded
    TIMEOUT = "timeout"  # the vTPM stayed silent: the backend answered TPM_RC_FAILURE
    CANCELLED = "cancelled"  # the frontend cancelled (v2): its answer is dropped


def code_at_6(data: bytes | bytearray | memoryview) -> int:
    """The command or response code of a TPM message; -1 if it is too short to have one."""
    return _CODE_AT_6.unpack_from(data, 6)[0] if len(data) >= 10 else -1


class TrafficTrace:
    """One append-only file per vTPM instance under ``directory``."""

    def __init__(self, directory: str | Path, max_bytes: int = MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._files: dict[int, IO[str]] = {}
        self.failed = ""  # why the trace stopped, if it did

    def path(self, instance: int) -> Path:
        return self.directory / f"instance-{instance}.trace"

    def record(
        self,
        instance: int,
        domid: int,
        started: float,
        command_code: int,
        command_size: int,
        response: bytes | bytearray | memoryview | None,
        by: AnsweredBy,
    ) -> None:
        """One request, once it is answered (``response`` None: no answer was given)."""
        now = time.time()
        rsp, rc = (len(response), code_at_6(response)) if response is not None else (0, -1)
        line = (
            f"{started:.6f} dom={domid} cc={_hex(command_code)} cmd={command_size} "
            f"rsp={rsp} rc={_hex(rc)} us={int((now - started) * 1e6)} by={by.value}\n"
        )
        if self.failed:
            return
        try:
            f = self._files.get(instance)
            if f is None:
                f = self._files[instance] = self._open(instance)
            f.write(line)
            if f.tell() >= self.max_bytes:
                self._rotate(instance)
        except OSError as e:  # a full disk: the trace stops, the vTPMs go on
            self.failed = f"{e}"
            log.warning("traffic trace stopped: %s", e)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _open(self, instance: int) -> IO[str]:
        return open(self.path(instance), "a", buffering=1, encoding="ascii")

    def _rotate(self, instance: int) -> None:
        self._files.pop(instance).close()
        path = self.path(instance)
        os.replace(path, path.with_suffix(".trace.1"))


def _hex(code: int) -> str:
    return f"0x{code:x}" if code >= 0 else "-"
