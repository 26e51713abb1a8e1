"""The backend's request intake as a pure function: shared pages in, a decision out.

``intake(ring, pages, npages)`` is what the backend does with one request, without any
I/O: read the ring page once, take entry 0's ``size``, bound it by the ``npages`` pages
mapped at connect, copy that many bytes out of the data pages once, and validate only
that private copy. The answer is either the 10-byte error the backend sends back by
itself, or :class:`Forward` carrying the private copy for the manager. It never raises:
whatever the guest put in its pages, the backend has an answer. This is the unit the
fuzzer drives (``nox -s fuzz``), so it must stay the same code the backend runs.

Spec: DESIGN.md section 2 (validation rules, error codes; XSA-155: no double fetch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xenvtpm import tpm, tpmif
from xenvtpm.errors import MalformedMessage

#: Codes the manager itself interprets; a guest may never send them.
RESERVED_CODES = frozenset({tpm.XENVTPM_CC_BIND})


@dataclass(frozen=True, slots=True)
class Forward:
    """A well-formed command, copied out of shared memory: send it to the manager."""

    command: bytes
    code: int


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
        header = tpm.validate_command(command)
    except tpm.MalformedCommand as e:
        return tpm.error_response(e.rc)
    except MalformedMessage:
        return tpm.error_response(tpm.TPM_RC.COMMAND_SIZE)
    if header.code in RESERVED_CODES:
        return tpm.error_response(tpm.TPM_RC.COMMAND_CODE)
    return Forward(command, header.code)
