"""The xenbus device handshake: states, and the transitions each side may make.

Both ends publish a ``state`` node and watch the other's. The frontend and the backend
each own one table of legal moves; a move not in it raises ``StateError``, so a peer
that jumps around (or a bug here) is caught at the first wrong step.

Spec: xen/include/public/io/xenbus.h, enum xenbus_state.
"""

from __future__ import annotations

import enum
import logging
import re
import time

from xenvtpm.errors import MalformedMessage, StateError, TransactionConflict, XenStoreError
from xenvtpm.xen.interface import XenStore

log = logging.getLogger(__name__)


class XenbusState(enum.IntEnum):
    """xen/include/public/io/xenbus.h"""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


S = XenbusState
_UINT = re.compile(rb"\A[0-9]{1,10}\Z")


#: Pauses between the attempts of one ``StateNode.publish`` that xenstored answers EAGAIN:
#: the first retry at once (a conflict is normally one other writer, done by then), then
#: doubling; 7 attempts, ~31 ms of pauses in all. The backend's one thread serves every
#: device, so a transaction that can never commit must cost it that, not for ever.
PUBLISH_BACKOFF_S = (0.0, 0.001, 0.002, 0.004, 0.008, 0.016)

#: Toolstack key in a vTPM's backend directory: "True" when the domain resumes a saved
#: one (``xl restore``), so its vTPM keeps its state (PCRs too) instead of power-cycling.
#: libxl writes "False" or "True"; "1" and "0" (older xenvtpm) are read as well.
RESUME_KEY = "resume"
_FLAGS = {b"True": True, b"1": True, b"False": False, b"0": False}


def parse_uint(raw: bytes, limit: int = 0xFFFFFFFF) -> int:
    """A decimal xenstore value, strictly: digits only, at most ``limit``."""
    value = raw.strip(b"\0")
    if not _UINT.match(value) or int(value) > limit:
        raise MalformedMessage(f"not a number in 0..{limit}: {raw[:32]!r}")
    return int(value)


def parse_flag(raw: bytes) -> bool:
    """A toolstack flag as libxl spells it ("True"/"False") or as "1"/"0"; nothing else."""
    try:
        return _FLAGS[raw.strip(b"\0")]
    except KeyError:
        raise MalformedMessage(f"not True, False, 1 or 0: {raw[:32]!r}") from None


# Moves a frontend makes. Initialising is re-entered after the backend went away, so the
# frontend can connect again to a restarted backend without its domain rebooting.
FRONTEND_MOVES: dict[XenbusState, frozenset[XenbusState]] = {
    S.UNKNOWN: frozenset({S.INITIALISING}),
    S.INITIALISING: frozenset({S.INITIALISED, S.CLOSING, S.CLOSED}),
    S.INITIALISED: frozenset({S.CONNECTED, S.INITIALISING, S.CLOSING, S.CLOSED}),
    S.CONNECTED: frozenset({S.INITIALISING, S.CLOSING, S.CLOSED}),
    S.CLOSING: frozenset({S.CLOSED}),
    S.CLOSED: frozenset({S.INITIALISING}),
}

# Moves a backend makes. Like Linux backends (xenbus_probe_backend), a closed device
# goes back to InitWait when its frontend starts over.
BACKEND_MOVES: dict[XenbusState, frozenset[XenbusState]] = {
    S.UNKNOWN: frozenset({S.INIT_WAIT, S.CLOSING, S.CLOSED}),
    S.INITIALISING: frozenset({S.INIT_WAIT, S.CLOSING, S.CLOSED}),
    S.INIT_WAIT: frozenset({S.CONNECTED, S.CLOSING, S.CLOSED}),
    S.CONNECTED: frozenset({S.INIT_WAIT, S.CLOSING, S.CLOSED}),
    S.CLOSING: frozenset({S.CLOSED, S.INIT_WAIT}),
    S.CLOSED: frozenset({S.INIT_WAIT, S.CLOSED}),
}


def parse_state(raw: bytes) -> XenbusState:
    """A peer's ``state`` node, as a state; anything unparsable reads as UNKNOWN."""
    try:
        return XenbusState(int(raw.strip(b"\0").decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return XenbusState.UNKNOWN


def read_state(xs: XenStore, node: str) -> XenbusState:
    """The state published at ``node/state``; a missing node reads as CLOSED."""
    try:
        return parse_state(xs.read(f"{node}/state"))
    except XenStoreError as e:
        if e.errno_name == "ENOENT":
            return XenbusState.CLOSED
        raise


class StateNode:
    """Our own side's published state, moved only along ``moves``."""

    def __init__(
        self,
        xs: XenStore,
        node: str,
        moves: dict[XenbusState, frozenset[XenbusState]],
        logger: logging.Logger = log,
    ) -> None:
        self._xs = xs
        self._node = node
        self._moves = moves
        self._log = logger
        self.state = XenbusState.UNKNOWN

    def switch(self, new: XenbusState) -> None:
        """Publish ``new``; raises StateError if our table has no such move."""
        self.publish(new, {})

    def publish(self, new: XenbusState, nodes: dict[str, str]) -> None:
        """Write ``nodes`` (beside ``state``) and ``new`` in one transaction.

        The peer sees the keys and the state change together, as Linux frontends
        publish ring-ref and event-channel. Retried while xenstored says EAGAIN, with
        the pauses of ``PUBLISH_BACKOFF_S``; then logged and TransactionConflict raised,
        with nothing published and ``state`` unchanged.
        """
        if new == self.state and not nodes:
            return
        allowed = self._moves.get(self.state, frozenset())
        if new != self.state and new not in allowed:
            raise StateError(self.state.name, "/".join(s.name for s in sorted(allowed)))
        values = {**nodes, "state": str(int(new))}
        start = time.monotonic()
        for attempt, pause in enumerate((*PUBLISH_BACKOFF_S, None), 1):
            tx = self._xs.transaction_start()
            try:
                for key, value in values.items():
                    self._xs.write(f"{self._node}/{key}", value, tx=tx)
            except BaseException:
                self._xs.transaction_end(tx, commit=False)
                raise
            if self._xs.transaction_end(tx, commit=True):
                break
            if pause is None:
                error = TransactionConflict(self._node, attempt, time.monotonic() - start)
                self._log.error("%s: cannot publish %s: %s", self._node, new.name, error)
                raise error
            time.sleep(pause)
        self._log.info("%s: %s -> %s", self._node, self.state.name, new.name)
        self.state = new
