"""The backend's traffic trace (``xenvtpm.backend.traffic_trace``), read and named for people.

A failed scenario's report gets, per guest, the lines of its vTPM's trace that fall in
the test's time window (``section``), and ``python -m harness trace GUEST`` prints the
same lines as they are written. The driver writes numbers only; the names come from
tpm2-pytss here (the harness has it), with the numbers kept beside them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

RC_SUCCESS = 0
TRACE_DIR_NAME = "trace"  # under a sim run directory


class TraceLine(NamedTuple):
    """One request as the backend saw it; -1: not known (a malformed request)."""

    started: float
    domid: int
    command_code: int
    command_size: int
    response_size: int
    response_code: int
    micros: int
    by: str


def trace_file(directory: Path, instance: int) -> Path:
    """Where the backend (``--trace DIRECTORY``) writes ``instance``'s trace."""
    return directory / f"instance-{int(instance)}.trace"


def read_trace(directory: Path, instance: int) -> list[str]:
    """The lines of ``instance``'s trace, the rotated file's first; [] if none yet."""
    base = trace_file(directory, instance)
    lines: list[str] = []
    for path in (base.with_suffix(".trace.1"), base):
        with contextlib.suppress(FileNotFoundError):
            lines += path.read_text(encoding="ascii", errors="replace").splitlines()
    return lines


def parse_line(line: str) -> TraceLine | None:
    """A line of ``instance-<N>.trace``; None for anything else (a line cut by rotation)."""
    first, *fields = line.split()
    try:
        values = dict(field.split("=", 1) for field in fields)
        return TraceLine(
            float(first),
            int(values["dom"]),
            _number(values["cc"]),
            int(values["cmd"]),
            int(values["rsp"]),
            _number(values["rc"]),
            int(values["us"]),
            values["by"],
        )
    except (KeyError, ValueError):
        return None


def _number(text: str) -> int:
    return -1 if text == "-" else int(text, 0)


def command_name(code: int) -> str:
    if code < 0:
        return "(malformed)"
    try:
        from tpm2_pytss.constants import TPM2_CC

        name: str = TPM2_CC.to_string(code)
        return name.removeprefix("TPM2_CC.")
    except (ImportError, ValueError):
        return f"0x{code:x}"


def response_name(code: int) -> str:
    if code < 0:
        return "(no response)"
    if code == RC_SUCCESS:
        return "SUCCESS"
    try:
        from tpm2_pytss import TSS2_Exception

        return f"0x{code:x} {TSS2_Exception(code)}"
    except ImportError:
        return f"0x{code:x}"


def render(t: TraceLine) -> str:
    """``11:52:01.123456 dom1 GetRandom 12 B -> 28 B SUCCESS 1.20 ms (manager)``"""
    when = datetime.fromtimestamp(t.started).strftime("%H:%M:%S.%f")
    size = f"{t.command_size} B" if t.command_size >= 0 else "?"
    return (
        f"{when} dom{t.domid} {command_name(t.command_code)} {size} -> "
        f"{t.response_size} B {response_name(t.response_code)} {t.micros / 1000:.2f} ms "
        f"({t.by})"
    )


def window(lines: Iterable[str], since: float, until: float | None = None) -> list[TraceLine]:
    """The requests that came in ``[since, until]`` (wall-clock time, as the trace's)."""
    found = []
    for line in lines:
        t = parse_line(line) if line.strip() else None
        if t is not None and t.started >= since and (until is None or t.started <= until):
            found.append(t)
    return found


def section(
    lines: Iterable[str], since: float, until: float | None = None, limit: int = 200
) -> str:
    """A report section: the window's requests, the last ``limit`` of them if more."""
    found = window(lines, since, until)
    if not found:
        return "(no TPM request in this test's time)"
    cut = len(found) - limit
    shown = [render(t) for t in found[-limit:]]
    return "\n".join(([f"... {cut} earlier requests left out"] if cut > 0 else []) + shown)
