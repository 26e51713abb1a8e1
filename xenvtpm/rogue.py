"""``python3 -m xenvtpm rogue ATTACK``: a frontend that breaks every rule, on demand.

It runs where a frontend runs (a guest domain: ``open_hypervisor()``), does the xenbus
handshake like :mod:`xenvtpm.frontend` and then performs one attack against the backend.
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
import contextlib
import json
import os
import select
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from xenvtpm import tpm, tpmif
from xenvtpm.errors import MalformedMessage, XenError, XenStoreError
from xenvtpm.xen import open_hypervisor
from xenvtpm.xen.interface import EventChannel, Hypervisor, SharedPages
from xenvtpm.xenbus import XenbusState

S = XenbusState
DATA_PAGES = tpmif.TPMIF_TX_RING_SIZE
_HEADER_HII = struct.Struct(">HII")
_SIZE_OFFSET = 14  # tpmif_tx_request_t.size of entry 0 in the ring page
_U16 = struct.Struct("=H")
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


def send_case(r: Rogue, attack: str, case: str, packet: bytes, size: int | None = None,
              **entry: int) -> None:  # fmt: skip
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
        emit(attack, case, "refused", backend_state=state,
             error=error if error != before or error else None)  # fmt: skip
    r.restart()


def command(size: int | None = None, tag: int = 0x8001, n: int = 16) -> bytes:
    """GetRandom(n) whose header claims ``size`` (default: the truth)."""
    body = tpm.get_random_command(n)
    if size is None and tag == 0x8001:
        return body
    return (
        _HEADER_HII.pack(tag, len(body) if size is None else size, tpm.TPM_CC.GetRandom)
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


@attack("hello", "a correct GetRandom(16): the baseline")
def _hello(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    send_case(r, "hello", "get-random", command())


@attack("size-mismatch", "ring size disagrees with the header's commandSize")
def _size_mismatch(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    good = command()
    for case, size in (("ring-larger", len(good) + 8), ("ring-smaller", len(good) - 1),
                       ("ring-one-page", 4096), ("ring-zero", 0), ("ring-9", 9)):  # fmt: skip
        send_case(r, "size-mismatch", case, good, size)
    # entries 1..9 disagree with entry 0 (they are redundant and ignored)
    r.put(good)
    ring = bytearray(r.ring[: tpmif.RING_BYTES])
    for i in range(1, DATA_PAGES):
        _U16.pack_into(ring, i * 16 + _SIZE_OFFSET, 0xFFFF)
    r.ring[: tpmif.RING_BYTES] = ring
    t0 = time.monotonic()
    r.notify()
    report("size-mismatch", "other-entries-garbage", r.read_response() if r.wait_event() else None,
           t0)  # fmt: skip


@attack("size-beyond", "ring size beyond the pages granted")
def _size_beyond(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    good = command()
    for size in (tpmif.capacity(DATA_PAGES) + 1, 0xFFFF):
        send_case(r, "size-beyond", f"ring-{size}", good, size)
    # Only one data page named at connect: 4097 bytes no longer fit.
    r.restart()
    assert r.pages is not None
    state = r.connect(data_refs=[r.pages.refs[1]])
    emit("size-beyond", "one-data-page", "state", backend_state=state)
    if state == S.CONNECTED:
        big = _HEADER_HII.pack(0x8001, 4097, tpm.TPM_CC.GetRandom) + bytes(4087)
        send_case(r, "size-beyond", "4097-over-one-page", big[:4096], 4097)
        send_case(r, "size-beyond", "fits-one-page", good)


@attack("header-size", "header commandSize 0, 9, 4097, 0xFFFFFFFF")
def _header_size(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    for claimed in (0, 9, 4097, 0xFFFFFFFF):
        send_case(r, "header-size", f"{claimed}", command(claimed))
    # consistent ring and header, beyond what a TPM accepts: the vTPM's own answer
    big = _HEADER_HII.pack(0x8001, 4097, tpm.TPM_CC.GetRandom) + bytes(4087)
    send_case(r, "header-size", "4097-consistent", big)
    send_case(r, "header-size", "9-consistent", _HEADER_HII.pack(0x8001, 9, 0x17B)[:9])


@attack("bad-refs", "grant refs invalid, revoked or not for dom0, at connect and per request")
def _bad_refs(r: Rogue, a: argparse.Namespace) -> None:
    pages = r.grant()
    refs = list(pages.refs)
    # at connect: data refs
    refused_or_connected(r, "bad-refs", "data-ref-invalid", data_refs=[999_999])
    refused_or_connected(r, "bad-refs", "data-ref-mixed", data_refs=[refs[1], 999_999])
    refused_or_connected(r, "bad-refs", "no-data-ref", data_refs=[])
    refused_or_connected(r, "bad-refs", "ring-ref-invalid", ring_ref="999999")
    # a ref that exists but is granted to another domain, not to the backend
    other = r.hv.grants.share_pages(a.foreign_domid, 2)
    try:
        refused_or_connected(r, "bad-refs", "data-ref-not-for-dom0", data_refs=[other.refs[0]])
        refused_or_connected(r, "bad-refs", "ring-ref-not-for-dom0", ring_ref=str(other.refs[1]))
    finally:
        other.close()
    # revoked before connect
    revoked = r.hv.grants.share_pages(r.backend_id, 2)
    revoked_refs = list(revoked.refs)
    revoked.close()
    refused_or_connected(r, "bad-refs", "data-ref-revoked", data_refs=revoked_refs[:1])
    refused_or_connected(r, "bad-refs", "ring-ref-revoked", ring_ref=str(revoked_refs[1]))
    # the ring page named as a data page too: legal (it is ours), but odd
    refused_or_connected(r, "bad-refs", "ring-as-data-page", data_refs=[refs[0]])
    # per request: refs in the entries are ignored, the pages mapped at connect are used
    r.connect_ok()
    send_case(r, "bad-refs", "request-ref-invalid", command(), ref=999_999)
    send_case(r, "bad-refs", "request-ref-zero", command(), ref=0)
    send_case(r, "bad-refs", "request-ref-ring", command(), ref=refs[0])


@attack("addr", "garbage addr in every entry (the backend never uses it)")
def _addr(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    for addr in (0xFFFF_FFFF_FFFF_0000, 0xDEAD_BEEF_0000, 1):
        send_case(r, "addr", f"0x{addr:x}", command(), addr=addr, unused=0xFFFF)


@attack("race", "rewrite the request and entry 0's size while the backend reads it")
def _race(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    stop = threading.Event()
    flips = 0
    good = command()
    ring, page = r.ring, r.data[0]

    def flipper() -> None:
        nonlocal flips
        sizes = (len(good), 0xFFFF, 9, 4096, 0)
        heads = (
            good[:10],
            _HEADER_HII.pack(0x8001, 0xFFFFFFFF, 0x17B),
            _HEADER_HII.pack(0x8003, 12, 0x17B),
            _HEADER_HII.pack(0x8001, 4096, 0),
        )
        while not stop.is_set():
            _U16.pack_into(ring, _SIZE_OFFSET, sizes[flips % len(sizes)])
            page[:10] = heads[flips % len(heads)]
            flips += 1

    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    answered = missed = 0
    codes: dict[str, int] = {}
    deadline = time.monotonic() + a.seconds
    try:
        for _ in range(a.count):
            if time.monotonic() > deadline:
                break
            r.put(good)
            r.notify()
            if r.wait_event():
                answered += 1
                rc = r.read_response()
                key = f"0x{tpm.response_code(rc):x}" if len(rc) >= 10 else "short"
                codes[key] = codes.get(key, 0) + 1
            else:
                missed += 1
    finally:
        stop.set()
        thread.join()
    emit("race", "flip", "summary", answered=answered, missed=missed, flips=flips, codes=codes)
    send_case(r, "race", "after", command())


@attack("notify-empty", "notify with no request on the ring, then with a stale answer")
def _notify_empty(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    t0 = time.monotonic()
    r.notify()
    report("notify-empty", "fresh-ring", r.read_response() if r.wait_event() else None, t0)
    send_case(r, "notify-empty", "request", command())
    t0 = time.monotonic()
    r.notify()  # the ring now holds the backend's own answer
    report("notify-empty", "stale-answer", r.read_response() if r.wait_event() else None, t0)


@attack("flood", "notify --rate times a second for --seconds")
def _flood(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    r.put(command(n=8))
    sent = 0
    t0 = time.monotonic()
    end = t0 + a.seconds
    batch = 1000
    assert r.channel is not None
    notify, consume = r.channel.notify, r.channel.consume
    while (now := time.monotonic()) < end:
        for _ in range(batch):
            notify()
        sent += batch
        consume()
        ahead = t0 + sent / a.rate - now
        if ahead > 0:
            time.sleep(ahead)
    elapsed = time.monotonic() - t0
    emit("flood", "notify", "summary", notifies=sent, seconds=round(elapsed, 2),
         rate=round(sent / elapsed))  # fmt: skip
    time.sleep(0.2)
    r.drain()
    send_case(r, "flood", "after", command())


@attack("storm", "keep the backend's port pending for --seconds (event-channel storm)")
def _storm(r: Rogue, a: argparse.Namespace) -> None:
    """XSA-391 class: on Xen, notify in a tight loop, so that each of dom0's unmasks
    finds a new event. The sim queues notifies instead (``notify_many``): the rogue
    keeps that queue filled, waiting only while it is full. Then it starts over on a
    fresh channel, which must be served as usual."""
    r.connect_ok()
    r.put(command(n=8))
    channel = r.channel
    assert channel is not None
    many = getattr(channel, "notify_many", None)
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < a.seconds:
        if many is not None:
            sent += many(1 << 16)
            select.select([], [channel.fileno()], [], 0.01)
            continue
        for _ in range(256):
            channel.notify()
        sent += 256
    elapsed = time.monotonic() - t0
    emit("storm", "notify", "summary", notifies=sent, seconds=round(elapsed, 2),
         rate=round(sent / elapsed))  # fmt: skip
    r.restart()
    r.connect_ok()
    send_case(r, "storm", "after", command())


@attack("second-request", "a second request before the first is answered")
def _second_request(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    t0 = time.monotonic()
    r.put(command(n=8))
    r.notify()
    r.put(command(n=24))
    r.notify()
    answers: list[bytes] = []
    while r.wait_event(0.5 if answers else None):
        answers.append(r.read_response())
    for i, answer in enumerate(answers):
        report("second-request", f"answer-{i}", answer, t0)
    emit("second-request", "count", "summary", answers=len(answers))
    send_case(r, "second-request", "after", command())


@attack("leave", "leave mid-request: Closing, then exit with a request in flight")
def _leave(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    r.put(command())
    r.notify()
    r.set_state(S.CLOSING)
    emit("leave", "closing-mid-request", "state", backend_state=r.wait_backend([S.CLOSING]))
    r.set_state(S.CLOSED)
    emit("leave", "closed", "state", backend_state=r.wait_backend([S.CLOSED]))
    r.restart()
    r.connect_ok()
    r.put(command())
    r.notify()
    emit("leave", "exit-mid-request", "exiting")
    os._exit(0)  # no Closing, no unshare, no unbind: simxend and the backend clean up


@attack("state-and-notify", "Initialising and a notify while the backend is busy")
def _state_and_notify(r: Rogue, a: argparse.Namespace) -> None:
    """Make the backend see our state change and our event in one loop iteration: a
    write below our state node keeps it busy (its watch fires, the backend reads the
    state back), meanwhile we say Initialising and notify (delay sweeps 0..150 us)."""
    for i in range(a.count):
        r.connect_ok()
        r.put(command())
        r.xs.write(f"{r.node}/state/busy", str(i))
        r.set_state(S.INITIALISING)
        until = time.perf_counter() + (i % 16) * 10e-6
        while time.perf_counter() < until:
            pass
        r.notify()
        r.drop_channel()
        if r.wait_backend([S.INIT_WAIT]) != S.INIT_WAIT:
            break
    emit("state-and-notify", "cycles", "summary", cycles=a.count,
         backend_state=r.backend_state())  # fmt: skip
    r.connect_ok()
    send_case(r, "state-and-notify", "after", command())


@attack("handshake-order", "xenbus states out of order")
def _handshake_order(r: Rogue, a: argparse.Namespace) -> None:
    """Each out-of-order step is given ``--settle`` seconds to be seen by the backend
    before its state is read (and before the next step overwrites it)."""
    n = "handshake-order"
    for node in ("ring-ref", "event-channel"):
        with contextlib.suppress(XenStoreError):
            r.xs.rm(f"{r.node}/{node}")
    r.set_state(S.CONNECTED)  # Connected without anything published
    time.sleep(a.settle)
    emit(n, "connected-first", "state", backend_state=r.backend_state())
    r.set_state(S.INITIALISED)  # Initialised without ring-ref / event-channel
    emit(n, "initialised-empty", "state", backend_state=r.wait_backend([S.CLOSING, S.CLOSED]),
         error=r.backend_error())  # fmt: skip
    r.restart()
    for case, value in (("garbage", "banana"), ("reconfiguring", "7"), ("huge", "9" * 50)):
        r.set_state(value)
        time.sleep(a.settle)
        emit(n, f"state-{case}", "state", backend_state=r.backend_state())
        r.restart()
    r.connect_ok()
    r.xs.rm(f"{r.node}/state")  # the whole state node disappears while connected
    emit(n, "state-removed", "state", backend_state=r.wait_backend([S.CLOSED]))
    r.restart()
    r.set_state(S.CLOSED)
    r.wait_backend([S.CLOSED])
    r.publish()  # Initialised straight after Closed (no Initialising in between)
    time.sleep(a.settle)
    emit(n, "initialised-after-closed", "state", backend_state=r.backend_state())
    r.restart()
    r.connect_ok()
    r.xs.write(f"{r.node}/ring-ref", "1")  # rewritten after connect: ignored
    send_case(r, n, "after", command())


@attack("garbage-nodes", "garbage ring-ref and event-channel")
def _garbage_nodes(r: Rogue, a: argparse.Namespace) -> None:
    n = "garbage-nodes"
    r.grant()
    for value in GARBAGE_VALUES:
        refused_or_connected(r, n, f"ring-ref={value[:16]}", ring_ref=value)
    for value in (*GARBAGE_VALUES, "65535"):
        refused_or_connected(r, n, f"event-channel={value[:16]}", port=value)
    other = r.hv.events.bind_unbound_port(a.foreign_domid)  # a port not offered to dom0
    try:
        refused_or_connected(r, n, "event-channel-not-for-dom0", port=str(other.port))
    finally:
        other.close()
    r.connect_ok()
    send_case(r, n, "after", command())


@attack("reopen", "close and reopen --count times (new grants and port each time)")
def _reopen(r: Rogue, a: argparse.Namespace) -> None:
    t0 = time.monotonic()
    ok = 0
    for i in range(a.count):
        r.grant()
        r.connect_ok()
        answer = r.transact(command(n=8))
        if answer is not None and tpm.response_code(answer) == 0:
            ok += 1
        r.set_state(S.CLOSING)
        r.wait_backend([S.CLOSING, S.CLOSED])
        r.set_state(S.CLOSED)
        r.wait_backend([S.CLOSED])
        r.close()
        if i + 1 < a.count:
            r.set_state(S.INITIALISING)
            r.wait_backend([S.INIT_WAIT])
    emit("reopen", "cycles", "summary", cycles=a.count, answered=ok,
         seconds=round(time.monotonic() - t0, 2))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xenvtpm rogue",
        description="A hostile vTPM frontend: handshake, then one attack; one JSON line per "
        "observation. Attacks:\n"
        + "\n".join(f"  {name:<16} {text}" for name, (_, text) in ATTACKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("attack", choices=sorted(ATTACKS))
    p.add_argument("--devid", type=int, default=0)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument("--seconds", type=float, default=5.0, help="length of flood/race/storm")
    p.add_argument("--rate", type=float, default=100_000, help="notifies per second (flood)")
    p.add_argument("--count", type=int, default=1000, help="reopen cycles / race rounds")
    p.add_argument("--settle", type=float, default=0.2,
                   help="seconds for the backend to see each handshake-order step")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="50 reopen cycles, 1 s flood/race")
    p.add_argument("--foreign-domid", type=int, default=None,
                   help="domain to grant pages to in bad-refs (default: this domain)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.count = min(args.count, 50)
        args.seconds = min(args.seconds, 1.0)
    try:
        hv = open_hypervisor()
    except XenError as e:
        print(f"rogue: no hypervisor: {e}", file=sys.stderr)
        return 1
    if args.foreign_domid is None:
        args.foreign_domid = getattr(hv, "domid", 0)
    rogue = Rogue(hv, args.devid, args.timeout)
    try:
        if rogue.wait_backend([S.INIT_WAIT], 10.0) != S.INIT_WAIT:
            raise RogueError(f"backend not in InitWait (state {rogue.backend_state()})")
        ATTACKS[args.attack][0](rogue, args)
        emit(args.attack, "end", "done", backend_state=rogue.backend_state())
    except (RogueError, XenError) as e:
        emit(args.attack, "end", "error", message=str(e))
        return 1
    finally:
        rogue.close()
        hv.close()
    return 0


from xenvtpm import rogue_v2  # noqa: E402, F401  (registers the protocol v2 attacks)
