"""One relay per guest TPM device for the whole session, leased to each transport.

Starting ``python3 -m xenvtpm relay`` in a TCG guest costs seconds, and a scenario opens
several transports (the ``esapi`` fixture's TCTI and its flush afterwards,
``open_esapi`` before and after a disturbance, ``raw_tpm``). So the relay on a guest's
``/dev/tpm0`` is started once and kept: ``lease`` hands it out as a ``RawTransport``,
and the lease's ``close`` gives it back instead of ending it. A guest application that
keeps its TPM device open is what the kernel sees either way: the character device has
no state per opener beyond the one command in flight.

What is never handed out again:

- a relay that broke (a timeout or a closed channel: ``RelayTransport`` closes itself,
  so a relay stuck in a command never answers the next test's command), or whose
  channel ended while it sat idle (the relay exited, the login died);
- a relay given back after ``release``: the target releases a guest's relays before
  anything that needs its device free or gone (a frontend stop, a reboot, ``xl save``,
  ``xl destroy``), and the fixtures before a scenario that opens the device itself
  (marker ``device``: the kernel's selftests, tpm2-tools).

A shared connection (``/dev/tpmrm0``) is a client of the kernel's resource manager,
whose space (the client's transient objects and sessions) lives exactly as long as the
open file. Its relay is reused only if every command it carried is one that leaves
nothing in a space (``SpacelessCommand``): then the next client finds the space as empty as a
fresh open would. Any other command (StartAuthSession, CreatePrimary, Load, ...) and
the relay ends with its client, as before, and the kernel flushes the space.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from harness.errors import TransportClosed
from harness.transport import DEFAULT_TIMEOUT, RawTransport
from harness.transport_ssh import RelayTransport
from xenvtpm.lifecycle import Closeable

Key = tuple[str, str]  # (guest name, device path)
Stamp = tuple[int, int]  # (pool epoch, guest generation) when the relay was leased
SHARED_IDLE_MAX = 8  # idle relays kept per shared device (the scenarios' most clients)
COMMAND_CODE = struct.Struct(">I")  # at offset 6 of a command. Spec: Part 1, 18.2


class SpacelessCommand(enum.IntEnum):
    """Commands that create no transient object or session: a resource manager space
    they ran in is still empty. Spec: TPM 2.0 Part 2, 6.5.2 TPM_CC."""

    NV_UNDEFINE_SPACE = 0x0122
    NV_DEFINE_SPACE = 0x012A
    NV_WRITE = 0x0137
    PCR_EVENT = 0x013C
    PCR_RESET = 0x013D
    SELF_TEST = 0x0143
    STARTUP = 0x0144
    NV_READ = 0x014E
    FLUSH_CONTEXT = 0x0165
    NV_READ_PUBLIC = 0x0169
    READ_PUBLIC = 0x0173
    GET_CAPABILITY = 0x017A
    GET_RANDOM = 0x017B
    GET_TEST_RESULT = 0x017C
    HASH = 0x017D
    PCR_READ = 0x017E
    READ_CLOCK = 0x0181
    PCR_EXTEND = 0x0182
    TEST_PARMS = 0x018A


_SPACELESS = frozenset(SpacelessCommand)


def leaves_space_empty(command: bytes) -> bool:
    """``command`` cannot have left anything in its resource manager space."""
    if len(command) < 10:
        return True  # refused by the kernel before any TPM saw it
    return COMMAND_CODE.unpack_from(command, 6)[0] in _SPACELESS


class RelayPool(Closeable):
    """Idle relays by (guest, device); thread-safe (scenario threads lease too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Key, list[RelayTransport]] = {}
        self._epoch = 0  # bumped by release() of every guest
        self._generation: dict[str, int] = {}  # bumped by release(guest)
        self.started = 0  # relays started, for the run's report
        self.reused = 0  # leases served by an idle relay

    def lease(
        self,
        guest: str,
        device: str,
        start: Callable[[], RelayTransport],
        *,
        shared: bool = False,
    ) -> RelayLease:
        """An idle relay for ``device`` of ``guest`` if one is still sound, else a new
        one from ``start`` (which raises as ``open_relay`` does, e.g. EBUSY).
        ``shared``: a resource-managed device (see the module docstring)."""
        key = (guest, device)
        relay = None
        while relay is None:
            with self._lock:
                idle = self._idle.get(key)
                relay = idle.pop() if idle else None
                stamp = self._stamp(guest)
            if relay is None:
                break
            if not relay.usable():
                relay.abort()
                relay = None
        if relay is None:
            relay = start()
            with self._lock:
                self.started += 1
        else:
            with self._lock:
                self.reused += 1
        return RelayLease(self, key, relay, stamp, shared)

    def release(self, guest: str | None = None, *, wait: bool = True) -> None:
        """End the idle relays of ``guest`` (None: of every guest), and the leased ones
        when they are given back. ``wait``: until each has exited (and so closed the
        device, which the kernel holds busy until then)."""
        with self._lock:
            if guest is None:
                self._epoch += 1
                keys = list(self._idle)
            else:
                self._generation[guest] = self._generation.get(guest, 0) + 1
                keys = [k for k in self._idle if k[0] == guest]
            relays = [relay for k in keys for relay in self._idle.pop(k)]
        for relay in relays:
            end_relay(relay, wait)

    def close(self) -> None:
        """End every idle relay without waiting (the machine goes away or is handed on:
        a closed channel ends its relay), and every leased one when it comes back."""
        self.release(wait=False)

    def _stamp(self, guest: str) -> Stamp:
        return self._epoch, self._generation.get(guest, 0)

    def _give_back(self, key: Key, relay: RelayTransport, stamp: Stamp, room: int) -> None:
        """Keep ``relay`` idle if it is sound, not released meanwhile, and the device
        has ``room`` for it (an exclusive device: one; a shared one: a few)."""
        with self._lock:
            idle = self._idle.setdefault(key, [])
            keep = stamp == self._stamp(key[0]) and len(idle) < room and relay.usable()
            if keep:
                idle.append(relay)
        if not keep:
            end_relay(relay, wait=True)

    def __repr__(self) -> str:
        idle = {k: len(v) for k, v in self._idle.items() if v}
        return f"RelayPool(idle={idle}, started={self.started}, reused={self.reused})"


def end_relay(relay: RelayTransport, wait: bool = True) -> None:
    """End ``relay``: ``wait`` (and it is sound): end of input, then until it exited
    (the device is free when this returns); else close its channel at once."""
    if wait and relay.usable():
        relay.close()  # end of input, then until it exited
    else:
        relay.abort()


class RelayLease(Closeable):
    """A ``RawTransport`` on a pooled relay, until ``close`` gives the relay back."""

    def __init__(
        self, pool: RelayPool, key: Key, relay: RelayTransport, stamp: Stamp, shared: bool
    ) -> None:
        self._pool = pool
        self._key = key
        self._relay: RelayTransport | None = relay
        self._stamp = stamp
        self.shared = shared
        self.space_empty = True  # a shared device: nothing this lease sent left state
        self.name = relay.name
        self.device = relay.device

    def transmit(self, cmd: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        relay = self._relay
        if relay is None:
            raise TransportClosed(f"{self.name}: transport is closed")
        if self.shared and self.space_empty and not leaves_space_empty(cmd):
            self.space_empty = False
        return relay.transmit(cmd, timeout)

    def close(self) -> None:
        """Give the relay back (idempotent); a broken one, or a shared one whose space
        may hold something, is ended instead."""
        relay, self._relay = self._relay, None
        if relay is None:
            return
        if self.shared and not self.space_empty:
            end_relay(relay, wait=True)  # the kernel flushes the space as the relay exits
        else:
            self._pool._give_back(
                self._key, relay, self._stamp, SHARED_IDLE_MAX if self.shared else 1
            )

    def __repr__(self) -> str:
        state = "closed" if self._relay is None else "open"
        return f"RelayLease({self.name!r}, {state})"


if TYPE_CHECKING:  # mypy proves a lease is a RawTransport

    def _conforms(t: RelayLease) -> RawTransport:
        return t
