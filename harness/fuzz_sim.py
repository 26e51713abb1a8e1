"""Fuzz targets that drive the simulated hypervisor itself, as a guest reaches it.

Each input gets a fresh, in-process :class:`~xenvtpm.sim.simxend.SimXen` (no run
directory: its connections are socketpairs handed to ``attach``), with dom0 and one
guest domain created through its own hypercalls. The guest sends the input down its own
channel; the properties are those of a hypervisor that never dies of guest input:

- every request gets exactly one reply, well-formed in its channel's format;
- no request raised what no handler foresaw (``SimXen.internal_errors`` stays 0: the
  daemon would have answered EIO and lived, but it is a bug all the same);
- afterwards the same guest, and dom0, are still served.

Targets (registered in :mod:`harness.fuzz`):

    hypercall   messages on the guest's privcmd channel (SOCK_SEQPACKET JSON), split at
                NUL bytes (JSON never holds a raw NUL), so a sequence can set state up
    xs-domid    one xenstore request of a type that takes a domain id, over the guest's
                xenstore connection: byte 0 picks the type, the rest is the payload
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from xenvtpm.sim.hypercall import HC_MSG_MAX, SCM_MAX_FD, close_fds
from xenvtpm.sim.simxend import SimXen
from xenvtpm.sim.xenstore_wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    XsHeader,
    XsPacket,
    XsType,
    join_strings,
)

#: Xenstore requests whose payload names a domain (xs_wire.h; perms carry domain ids too).
DOMID_TYPES = (
    XsType.XS_GET_DOMAIN_PATH,
    XsType.XS_IS_DOMAIN_INTRODUCED,
    XsType.XS_INTRODUCE,
    XsType.XS_RELEASE,
    XsType.XS_RESUME,
    XsType.XS_SET_TARGET,
    XsType.XS_SET_PERMS,
)
_MAX_MESSAGES = 8


@dataclass
class _Guest:
    domid: int
    xs: socket.socket
    hc: socket.socket


def _call(daemon: SimXen, sock: socket.socket, message: bytes) -> tuple[dict[str, Any], int]:
    """One hypercall: send, let the daemon serve it, take exactly one reply (and its fds)."""
    sock.send(message)
    daemon.pump(0)
    data, fds, flags, _ = socket.recv_fds(sock, HC_MSG_MAX, SCM_MAX_FD)  # sock: non-blocking
    close_fds(fds)
    assert data, "no reply: the connection was dropped"
    assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), f"reply truncated ({flags:#x})"
    try:
        close_fds(socket.recv_fds(sock, HC_MSG_MAX, SCM_MAX_FD)[1])
    except BlockingIOError:
        pass
    else:
        raise AssertionError("two replies to one request")
    reply = json.loads(data)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if reply["ok"] is False:
        assert isinstance(reply.get("errno"), str) and reply["errno"].startswith("E"), reply
    return reply, len(fds)


@contextmanager
def _hypervisor() -> Iterator[tuple[SimXen, socket.socket, _Guest]]:
    """A fresh daemon, dom0's hypercall channel, and one guest's two channels."""
    daemon = SimXen("/nonexistent/fuzz-sim")  # never started: nothing is bound
    socks: list[socket.socket] = []
    try:
        dom0, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socks.append(dom0)
        dom0.setblocking(False)  # every reply is there once pump() returns: never wait
        daemon.attach(theirs, 0, xenstore=False)
        reply, _ = _call(daemon, dom0, b'{"op": "create_domain", "name": "fuzzed"}')
        domid = reply["domid"]
        dom0.send(json.dumps({"op": "connect_domain", "domid": domid}).encode())
        daemon.pump(0)
        _, (xs_fd, hc_fd), _, _ = socket.recv_fds(dom0, HC_MSG_MAX, 2)
        guest = _Guest(domid, socket.socket(fileno=xs_fd), socket.socket(fileno=hc_fd))
        socks += [guest.xs, guest.hc]
        guest.xs.setblocking(False)
        guest.hc.setblocking(False)
        yield daemon, dom0, guest
    finally:
        daemon.close()
        for sock in socks:
            sock.close()


def _still_served(daemon: SimXen, dom0: socket.socket, guest: _Guest) -> None:
    assert _call(daemon, guest.hc, b'{"op": "whoami"}')[0] == {"ok": True, "domid": guest.domid}
    assert _xs_call(daemon, guest, XsType.XS_READ, join_strings("name"), 0xF00D).payload == (
        b"fuzzed"
    )
    assert _call(daemon, dom0, b'{"op": "list_domains"}')[0]["ok"]
    assert daemon.internal_errors == 0, "a request raised what no handler foresaw"


def fuzz_hypercall(data: bytes) -> None:
    """Up to 8 NUL-separated messages from a guest on its hypercall channel."""
    with _hypervisor() as (daemon, dom0, guest):
        for message in [m for m in data.split(b"\0") if m][:_MAX_MESSAGES]:
            # An empty SEQPACKET message reads as end of file: it only ends the sender's own
            # connection, so it is left out rather than asserted on.
            _call(daemon, guest.hc, message)
            assert daemon.internal_errors == 0, "a request raised what no handler foresaw"
        _still_served(daemon, dom0, guest)


def _xs_call(daemon: SimXen, guest: _Guest, type_: XsType, payload: bytes, req: int) -> XsPacket:
    """One xenstore request over the guest's stream: exactly one reply, same req_id."""
    guest.xs.send(XsPacket(type_, req, 0, payload).to_bytes())  # < 4.2 KB: fits the buffer
    daemon.pump(0)
    raw = b""
    while True:
        try:
            chunk = guest.xs.recv(65536)
        except BlockingIOError:
            break
        assert chunk, "the guest's xenstore connection was dropped"
        raw += chunk
    reply = XsPacket.from_bytes(raw[: HEADER_SIZE + XsHeader.from_bytes(raw).length])
    assert len(reply.to_bytes()) == len(raw), "more than one packet in answer to one request"
    assert reply.req_id == req and reply.type in (type_, XsType.XS_ERROR), reply
    return reply


def fuzz_xs_domid(data: bytes) -> None:
    """Byte 0 picks a domid-taking request type; the rest is its payload, cut at 4096."""
    type_ = DOMID_TYPES[data[0] % len(DOMID_TYPES)] if data else DOMID_TYPES[0]
    payload = data[1 : 1 + XENSTORE_PAYLOAD_MAX]
    with _hypervisor() as (daemon, dom0, guest):
        reply = _xs_call(daemon, guest, type_, payload, 7)
        if reply.type is XsType.XS_GET_DOMAIN_PATH:
            assert reply.payload.startswith(b"/local/domain/") and reply.payload.endswith(b"\0")
        if reply.type is XsType.XS_IS_DOMAIN_INTRODUCED:
            assert reply.payload in (b"T\0", b"F\0")
        _still_served(daemon, dom0, guest)


def seeds_hypercall() -> list[bytes]:
    """Valid requests, the sequence that once hit a double release, and the three inputs
    that once killed simxend (they are in tests/fuzz_corpus/hypercall/ too)."""
    return [
        b'{"op": "whoami"}',
        b'{"op": "gnt_share", "domid": 0, "count": 2, "writable": true}\0'
        b'{"op": "gnt_unshare", "refs": [8, 9]}',
        b'{"op": "gnt_share", "domid": 0, "count": 1}\0{"op": "gnt_unshare", "refs": [8, 8]}',
        b'{"op": "evtchn_alloc_unbound", "remote_domid": 0}\0{"op": "evtchn_unbind", "port": 1}',
        b'{"op": "gnt_map", "domid": 0, "refs": [8], "writable": false}',
        b'{"op": "stats", "domid": 1}\0{"op": "create_domain", "name": "x"}',
        b"[" * 3000 + b"]" * 3000,
        b'{"op": "gnt_unmap", "handle": ' + b"9" * 5000 + b"}",
        b'{"op": "evtchn_bind_interdomain", "remote_domid": 0, "remote_port": 1e400}',
    ]


def seeds_xs_domid() -> list[bytes]:
    """One seed per type, plus the non-ASCII digit that once killed simxend."""
    index = {t: bytes([i]) for i, t in enumerate(DOMID_TYPES)}
    return [
        index[XsType.XS_GET_DOMAIN_PATH] + b"1\0",
        index[XsType.XS_IS_DOMAIN_INTRODUCED] + b"0\0",
        index[XsType.XS_GET_DOMAIN_PATH] + "\u00b2\0".encode(),
        index[XsType.XS_IS_DOMAIN_INTRODUCED] + "\u00b2\0".encode(),
        index[XsType.XS_INTRODUCE] + b"5\0" + b"123\0" + b"4\0",
        index[XsType.XS_SET_TARGET] + b"5\0" + b"0\0",
        index[XsType.XS_SET_PERMS] + b"name\0n1\0r0\0",
        index[XsType.XS_SET_PERMS] + "name\0n1\0r\u0665\0".encode(),
    ]
