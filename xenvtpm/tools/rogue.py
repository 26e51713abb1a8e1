"""``python3 -m xenvtpm rogue ATTACK``: a frontend that breaks every rule, on demand.

It runs where a frontend runs (a guest domain: ``open_hypervisor()``), does the xenbus
handshake like :mod:`xenvtpm.frontend.frontend` and then performs one attack against the backend.
It prints one JSON object per line for each observation, so a test (or a person) can
judge what the backend did:

    {"attack": "header-size", "case": "0", "result": "response", "rc": 322, "hex": "..."}
    {"attack": "garbage-nodes", "case": "ring-ref=abc", "result": "refused",
     "backend_state": 5, "error": "connect failed: ..."}

``result`` is one of ``response`` (the backend answered: ``rc``, ``hex``, ``ms``),
``no-response`` (nothing within ``--timeout``), ``refused`` (the backend would not
connect: it published ``error`` and Closing), ``state`` (the backend's state after a
step), ``summary`` (counts of a long attack) or ``skipped``.

What the backend is expected to do with each attack is in docs/threat-model.md. In
short: the backend maps the ring page and the data pages named by the ring entries once,
at connect; per request it reads entry 0's ``size`` and the data pages, and nothing
else. Per-request ``ref`` and ``addr`` are ignored (so a garbage or revoked ref in a
request cannot make it map anything); bad refs at connect make it refuse the device.

Standard library only: it deploys with the driver into any domain.
Spec: DESIGN.md section 2; seed interface.tex "Virtual TPM".
"""

from __future__ import annotations

import argparse
import json
import select
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from xenvtpm import tpm, tpmif
from xenvtpm.errors import MalformedMessage, XenStoreError
from xenvtpm.xen.interface import EventChannel, Hypervisor, SharedPages
from xenvtpm.xenbus import XenbusState

S = XenbusState
DATA_PAGES = tpmif.TPMIF_TX_RING_SIZE
HEADER_HII = struct.Struct(">HII")
ENTRY0_SIZE_OFFSET = 14  # tpmif_tx_request_t.size of entry 0 in the ring page
U16_NATIVE = struct.Struct("=H")
GARBAGE_VALUES = ("", "abc", "-1", "0x10", "1 2", "99999999999", "4294967295", "0", "7" * 300)


class RogueError(Exception):
    """The rogue could not get as far as its attack (no backend, handshake stuck)."""


def emit(attack: str, case: str, result: str, **fields: Any) -> None:
    print(json.dumps({"attack": attack, "case": case, "result": result, **fields}), flush=True)


class Rogue:
    """One misbehaving vTPM frontend of this domain (``device/vtpm/<devid>``)."""

    def __init__(self, hv: Hypervisor, devid: int, timeout: float) -> None:
        self.hv = hv
        self.xs = hv.xenstore
        self.node = f"device/vtpm/{devid}"
        self.timeout = timeout
        self.backend_id = int(self.xs.read(f"{self.node}/backend-id"))
        self.backend = self.xs.read(f"{self.node}/backend").decode()
        self.pages: SharedPages | None = None
        self.channel: EventChannel | None = None

    # -- resources -----------------------------------------------------------------

    def grant(self, count: int = 1 + DATA_PAGES) -> SharedPages:
        self.ungrant()
        self.pages = self.hv.grants.share_pages(self.backend_id, count)
        return self.pages

    def ungrant(self) -> None:
        if self.pages is not None:
            self.pages.close()
            self.pages = None

    def drop_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def close(self) -> None:
        self.drop_channel()
        self.ungrant()

    @property
    def ring(self) -> memoryview:
        assert self.pages is not None
        return self.pages.pages[0]

    @property
    def data(self) -> Sequence[memoryview]:
        assert self.pages is not None
        return self.pages.pages[1:]

    # -- xenstore ------------------------------------------------------------------

    def set_state(self, state: int | str) -> None:
        self.xs.write(f"{self.node}/state", str(state))

    def backend_state(self) -> int:
        try:
            return int(self.xs.read(f"{self.backend}/state"))
        except (XenStoreError, ValueError):
            return -1

    def backend_error(self) -> str | None:
        try:
            return self.xs.read(f"{self.backend}/error").decode(errors="replace")
        except XenStoreError:
            return None

    def wait_backend(self, states: Sequence[int], timeout: float | None = None) -> int:
        """Poll the backend's state until it is one of ``states``; return the last seen."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            state = self.backend_state()
            if state in states or time.monotonic() > deadline:
                return state
            time.sleep(0.005)

    def restart(self) -> None:
        """Back to Initialising (as a frontend that starts over) and wait for InitWait."""
        self.set_state(S.INITIALISING)
        self.drop_channel()
        if self.wait_backend([S.INIT_WAIT]) != S.INIT_WAIT:
            raise RogueError(f"backend stuck in state {self.backend_state()} after Initialising")

    def publish(
        self,
        ring_ref: str | None = None,
        port: str | None = None,
        data_refs: Sequence[int] | None = None,
    ) -> None:
        """Write the ring entries, ring-ref and event-channel, then say Initialised."""
        pages = self.pages if self.pages is not None else self.grant()
        refs = list(pages.refs[1:]) if data_refs is None else list(data_refs)
        entries = [tpmif.TxRequest(0, r, 0, 0) for r in refs[:DATA_PAGES]]
        entries += [tpmif.TxRequest(0, 0, 0, 0)] * (DATA_PAGES - len(entries))
        tpmif.write_ring(self.ring, entries)
        if self.channel is None:
            self.channel = self.hv.events.bind_unbound_port(self.backend_id)
        self.xs.write(f"{self.node}/ring-ref", str(pages.refs[0]) if ring_ref is None else ring_ref)
        self.xs.write(
            f"{self.node}/event-channel", str(self.channel.port) if port is None else port
        )
        self.set_state(S.INITIALISED)

    def connect(self, **publish: Any) -> int:
        """Publish and wait for Connected (4) or a refusal (5/6); return that state."""
        self.publish(**publish)
        state = self.wait_backend([S.CONNECTED, S.CLOSING, S.CLOSED])
        if state == S.CONNECTED:
            self.set_state(S.CONNECTED)
            time.sleep(0.01)
            self.drain()  # bind_interdomain leaves one event pending for us (DESIGN 4)
        return state

    def connect_ok(self) -> None:
        state = self.connect()
        if state != S.CONNECTED:
            raise RogueError(f"backend refused a correct handshake: {self.backend_error()}")

    # -- the ring ------------------------------------------------------------------

    def drain(self) -> None:
        """Take every event pending now (one ``consume`` may leave some)."""
        for _ in range(100_000):
            if self.channel is None or not select.select([self.channel.fileno()], [], [], 0)[0]:
                return
            if not self.channel.consume():
                return

    def put(self, packet: bytes, size: int | None = None, **entry: int) -> None:
        """Scatter ``packet`` into the data pages; entry 0's size is ``size`` if given."""
        pages = self.data
        tpmif.scatter(packet, pages)
        sizes = tpmif.page_sizes(len(packet), len(pages))
        if size is not None:
            sizes[0] = size
        assert self.pages is not None
        refs = self.pages.refs[1:]
        addr, ref = entry.get("addr"), entry.get("ref")
        entries = [
            tpmif.TxRequest(
                i * 0x1000 + addr if addr is not None else 0,
                ref if ref is not None else refs[i],
                entry.get("unused", 0),
                s,
            )
            for i, s in enumerate(sizes)
        ]
        tpmif.write_ring(self.ring, entries)

    def notify(self) -> None:
        assert self.channel is not None
        self.channel.notify()

    def wait_event(self, timeout: float | None = None) -> bool:
        assert self.channel is not None
        ready, _, _ = select.select([self.channel.fileno()], [], [], timeout or self.timeout)
        if not ready:
            return False
        return self.channel.consume()

    def read_response(self) -> bytes:
        entries = tpmif.read_ring(self.ring)
        try:
            return tpmif.gather(self.data, tpmif.packet_length(entries, len(self.data)))
        except MalformedMessage:
            return bytes(self.data[0][:16])

    def transact(self, packet: bytes, size: int | None = None, **entry: int) -> bytes | None:
        self.put(packet, size, **entry)
        self.notify()
        if not self.wait_event():
            return None
        return self.read_response()


# -- observations ---------------------------------------------------------------------


def report(attack: str, case: str, response: bytes | None, t0: float) -> None:
    ms = round((time.monotonic() - t0) * 1000, 2)
    if response is None:
        emit(attack, case, "no-response", ms=ms)
        return
    rc = tpm.response_code(response) if len(response) >= 10 else -1
    emit(attack, case, "response", rc=rc, hex=response[:64].hex(), length=len(response), ms=ms)


def send_case(
    r: Rogue, attack: str, case: str, packet: bytes, size: int | None = None, **entry: int
) -> None:
    t0 = time.monotonic()
    report(attack, case, r.transact(packet, size, **entry), t0)


def refused_or_connected(r: Rogue, attack: str, case: str, **publish: Any) -> None:
    """Publish (maybe garbage); report whether the backend refused; start over."""
    before = r.backend_error()
    state = r.connect(**publish)
    error = r.backend_error()
    if state == S.CONNECTED:
        emit(attack, case, "connected", backend_state=state)
    else:
        emit(
            attack,
            case,
            "refused",
            backend_state=state,
            error=error if error != before or error else None,
        )
    r.restart()


def command(size: int | None = None, tag: int = 0x8001, n: int = 16) -> bytes:
    """GetRandom(n) whose header claims ``size`` (default: the truth)."""
    body = tpm.get_random_command(n)
    if size is None and tag == 0x8001:
        return body
    return (
        HEADER_HII.pack(tag, len(body) if size is None else size, tpm.TPM_CC.GetRandom)
        + (body[10:])
    )


# -- attacks --------------------------------------------------------------------------

Attack = Callable[[Rogue, argparse.Namespace], None]
ATTACKS: dict[str, tuple[Attack, str]] = {}


def attack(name: str, text: str) -> Callable[[Attack], Attack]:
    def register(fn: Attack) -> Attack:
        ATTACKS[name] = (fn, text)
        return fn

    return register
