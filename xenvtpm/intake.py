"""The backend's request intake as pure functions: shared pages in, a decision out.

``intake(ring, pages, npages)`` is what the backend does with one request of the 2006
ring, without any I/O: read the ring page once, take entry 0's ``size``, bound it by the
``npages`` pages mapped at connect, copy that many bytes out of the data pages once, and
validate only that private copy. ``intake_v2(shared, extra, nr_extra)`` does the same for
protocol v2's shared page: copy its 8-byte header once, act only on SUBMIT, bound
``length`` (and the ``nr_extra_pages`` read in that copy) by what was mapped at connect,
copy the command once. Both then run :func:`judge`, so the two protocols answer a
malformed command with the same bytes.

The answer is the 10-byte error the backend sends back by itself, :class:`Forward`
carrying the private copy for the manager, or (v2 only) :class:`NotSubmitted` when the
page holds no request. They never raise: whatever the guest put in its pages, the
backend has an answer. These are the units the fuzzer drives (``nox -s fuzz``), so they
must stay the code the backend runs.

Spec: DESIGN.md section 2 (validation rules, error codes; XSA-155: no double fetch);
Linux include/xen/interface/io/tpmif.h (v2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from xenvtpm import tpm, tpmif, tpmif_v2
from xenvtpm.errors import MalformedMessage

#: Codes the manager itself interprets (BIND, RESET and the rest of their block); a
#: guest may never send them.
RESERVED_CODES = tpm.XENVTPM_CC_RESERVED


class Forward(NamedTuple):
    """A well-formed command, copied out of shared memory: send it to the manager.

    ``locality`` is what a v2 frontend asked for (0 on the 2006 ring, which has none).
    A tuple, not a frozen dataclass: one per command, at a fifth of the cost (issue 20).
    """

    command: bytes
    code: int
    locality: int = 0


@dataclass(frozen=True, slots=True)
class NotSubmitted:
    """A v2 page whose state (as copied, possibly garbage) is not SUBMIT: no request."""

    state: int


def judge(command: bytes) -> bytes | Forward:
    """Validate a private copy: the backend's own 10-byte answer, or the forward."""
    try:
        header = tpm.validate_command(command)
    except tpm.MalformedCommand as e:
        return tpm.error_response(e.rc)
    if header.code in RESERVED_CODES:
        return tpm.error_response(tpm.TPM_RC.COMMAND_CODE)
    return Forward(command, header.code)


def intake(
    ring: bytes | bytearray | memoryview,
    pages: Sequence[memoryview],
    npages: int,
) -> bytes | Forward:
    """One request: the backend's own answer (bytes), or the command to forward.

    ``ring`` is the ring page, ``pages`` the data pages mapped at connect and ``npages``
    how many of them there are (``len(pages)``; passed so a caller cannot get it from the
    guest). Entry 0's ``size`` is the only ring field used: ``ref`` and ``addr`` of every
    entry, and the other entries' sizes, are ignored.
    """
    try:
        length = tpmif.read_length(ring, npages)  # the one read of the ring (entry 0)
        command = tpmif.gather(pages[:npages], length)  # the one read of the data
    except MalformedMessage:
        return tpm.error_response(tpm.TPM_RC.COMMAND_SIZE)
    return judge(command)


def intake_v2(
    shared: bytes | bytearray | memoryview,
    extra: Sequence[bytes | bytearray | memoryview],
    nr_extra: int,
) -> bytes | Forward | NotSubmitted:
    """One v2 request: the backend's own answer, the command to forward, or no request.

    ``shared`` is the page ``ring-ref`` names, ``extra`` the extra pages mapped at
    connect and ``nr_extra`` how many (fixed at connect). The header is copied once; a
    ``nr_extra_pages`` in that copy that differs from ``nr_extra`` (the layout the
    frontend announced at connect) or a ``length`` beyond the capacity is answered
    TPM_RC_COMMAND_SIZE without reading the data. Only then is the data copied, once.
    """
    try:
        header = tpmif_v2.read_header(shared)  # the one read of the header
    except MalformedMessage:
        return tpm.error_response(tpm.TPM_RC.COMMAND_SIZE)
    if header.state != tpmif_v2.VtpmState.SUBMIT:
        return NotSubmitted(header.state)
    if header.nr_extra_pages != nr_extra:
        return tpm.error_response(tpm.TPM_RC.COMMAND_SIZE)
    try:
        command = tpmif_v2.gather(shared, extra, nr_extra, header.length)  # the one read
    except MalformedMessage:
        return tpm.error_response(tpm.TPM_RC.COMMAND_SIZE)
    decision = judge(command)
    if isinstance(decision, Forward):
        return Forward(decision.command, decision.code, header.locality)
    return decision
