"""The rogue's attacks on the 2006 ring (``python3 -m xenvtpm rogue ATTACK``).

Each attack breaks one rule of the driver's protocol on purpose and reports what the
backend did as JSON lines (:func:`xenvtpm.tools.rogue.emit`); the harness compares them with
docs/threat-model.md. Registered into :data:`xenvtpm.tools.rogue.ATTACKS` on import; the
protocol v2 attacks are in :mod:`xenvtpm.tools.rogue_v2`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import threading
import time

from xenvtpm import tpm, tpmif
from xenvtpm.errors import XenStoreError
from xenvtpm.tools.rogue import (
    DATA_PAGES,
    ENTRY0_SIZE_OFFSET,
    GARBAGE_VALUES,
    HEADER_HII,
    U16_NATIVE,
    Rogue,
    S,
    attack,
    command,
    emit,
    refused_or_connected,
    report,
    send_case,
)


@attack("hello", "a correct GetRandom(16): the baseline")
def _hello(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    send_case(r, "hello", "get-random", command())


@attack("size-mismatch", "ring size disagrees with the header's commandSize")
def _size_mismatch(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    good = command()
    for case, size in (
        ("ring-larger", len(good) + 8),
        ("ring-smaller", len(good) - 1),
        ("ring-one-page", 4096),
        ("ring-zero", 0),
        ("ring-9", 9),
    ):
        send_case(r, "size-mismatch", case, good, size)
    # entries 1..9 disagree with entry 0 (they are redundant and ignored)
    r.put(good)
    ring = bytearray(r.ring[: tpmif.RING_BYTES])
    for i in range(1, DATA_PAGES):
        U16_NATIVE.pack_into(ring, i * 16 + ENTRY0_SIZE_OFFSET, 0xFFFF)
    r.ring[: tpmif.RING_BYTES] = ring
    t0 = time.monotonic()
    r.notify()
    report(
        "size-mismatch", "other-entries-garbage", r.read_response() if r.wait_event() else None, t0
    )


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
        big = HEADER_HII.pack(0x8001, 4097, tpm.TPM_CC.GetRandom) + bytes(4087)
        send_case(r, "size-beyond", "4097-over-one-page", big[:4096], 4097)
        send_case(r, "size-beyond", "fits-one-page", good)


@attack("header-size", "header commandSize 0, 9, 4097, 0xFFFFFFFF")
def _header_size(r: Rogue, a: argparse.Namespace) -> None:
    r.connect_ok()
    for claimed in (0, 9, 4097, 0xFFFFFFFF):
        send_case(r, "header-size", f"{claimed}", command(claimed))
    # consistent ring and header, beyond what a TPM accepts: the vTPM's own answer
    big = HEADER_HII.pack(0x8001, 4097, tpm.TPM_CC.GetRandom) + bytes(4087)
    send_case(r, "header-size", "4097-consistent", big)
    send_case(r, "header-size", "9-consistent", HEADER_HII.pack(0x8001, 9, 0x17B)[:9])


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
            HEADER_HII.pack(0x8001, 0xFFFFFFFF, 0x17B),
            HEADER_HII.pack(0x8003, 12, 0x17B),
            HEADER_HII.pack(0x8001, 4096, 0),
        )
        while not stop.is_set():
            U16_NATIVE.pack_into(ring, ENTRY0_SIZE_OFFSET, sizes[flips % len(sizes)])
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
    emit(
        "flood",
        "notify",
        "summary",
        notifies=sent,
        seconds=round(elapsed, 2),
        rate=round(sent / elapsed),
    )
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
    emit(
        "storm",
        "notify",
        "summary",
        notifies=sent,
        seconds=round(elapsed, 2),
        rate=round(sent / elapsed),
    )
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
    emit("state-and-notify", "cycles", "summary", cycles=a.count, backend_state=r.backend_state())
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
    emit(
        n,
        "initialised-empty",
        "state",
        backend_state=r.wait_backend([S.CLOSING, S.CLOSED]),
        error=r.backend_error(),
    )
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
    emit(
        "reopen",
        "cycles",
        "summary",
        cycles=a.count,
        answered=ok,
        seconds=round(time.monotonic() - t0, 2),
    )
