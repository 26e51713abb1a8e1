"""A tpm2-pytss TCTI over any ``RawTransport``, so ESAPI runs on every target.

Spec: tpm2-pytss ``TCTI.py`` ``PyTCTI``: ``do_transmit(command: bytes) -> None`` and
``do_receive(timeout: int) -> bytes`` (timeout in milliseconds, negative = block).

The transports are synchronous (``transmit`` returns the response), so the command is
held by ``do_transmit`` and the round trip happens in ``do_receive``, which is where the
TSS gives us its timeout. Any exception is kept by PyTCTI and re-raised to the ESAPI
caller; after one the ESAPI context is dead (DESIGN.md 3): build a new one.
"""

from __future__ import annotations

import logging

from tpm2_pytss import PyTCTI

from harness.errors import TransportError
from harness.transport import DEFAULT_TIMEOUT, RawTransport

MAX_RESPONSE = 4096
log = logging.getLogger(__name__)


class TransportTCTI(PyTCTI):  # type: ignore[misc]  # tpm2_pytss has no type information
    """PyTCTI over a RawTransport; owns the transport and closes it in ``finalize``."""

    def __init__(self, transport: RawTransport, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(max_size=MAX_RESPONSE, magic=b"XENVTPM\x00")
        self.transport = transport
        self.timeout = timeout
        self._pending: bytes | None = None
        self.last_error: Exception | None = None  # what the transport last raised

    def do_transmit(self, command: bytes) -> None:
        if self._pending is not None:
            raise TransportError("a command is already in flight on this TCTI")
        self._pending = bytes(command)

    def do_receive(self, timeout: int) -> bytes:
        command, self._pending = self._pending, None
        if command is None:
            raise TransportError("receive without a command in flight")
        seconds = self.timeout if timeout < 0 else max(timeout / 1000.0, self.timeout)
        try:
            return self.transport.transmit(command, seconds)
        except Exception as e:
            # ESAPI turns this into "tcti:Catch all..." and drops it: keep the evidence.
            self.last_error = e
            log.warning("%r: command %s failed: %s", self, command[:10].hex(), e)
            raise

    def do_finalize(self) -> None:
        self.transport.close()

    def close(self) -> None:
        """Close the transport (the ESAPI context using this TCTI must be closed first)."""
        self.transport.close()

    def __repr__(self) -> str:
        return f"TransportTCTI({self.transport!r})"
