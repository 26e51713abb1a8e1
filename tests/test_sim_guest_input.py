"""The simulated hypervisor never dies of what a guest sends on its own channels.

Each input goes, raw, down a guest's own xenstore or hypercall connection of a real
simxend process. The guest must get an error answer in the usual format (``XS_ERROR``
``EINVAL``, or ``{"ok": false, "errno": "EINVAL"}``), and then simxend must still serve
that connection, another guest and dom0.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from simxen import start_simxend, stop

from xenvtpm.errors import XenStoreError
from xenvtpm.sim.adapter import SimControl
from xenvtpm.sim.hypercall import HC_MSG_MAX, SCM_MAX_FD, HcError, HcRequest, close_fds
from xenvtpm.sim.simxend import SimXen
from xenvtpm.sim.xenstore_client import XenStoreClient
from xenvtpm.sim.xenstore_server import Delivery, XenStoreServer
from xenvtpm.sim.xenstore_wire import HEADER_SIZE, XsHeader, XsPacket, XsType, join_strings


@dataclass
class RawGuest:
    """A guest's two channels as bare sockets: it may send anything at all."""

    domid: int
    xs: socket.socket
    hc: socket.socket

    def xs_call(self, type_: XsType, payload: bytes, req_id: int = 7) -> XsPacket:
        self.xs.sendall(XsPacket(type_, req_id, 0, payload).to_bytes())
        head = self._recv_exactly(HEADER_SIZE)
        body = self._recv_exactly(XsHeader.from_bytes(head).length)
        return XsPacket.from_bytes(head + body)

    def _recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.xs.recv(n - len(data))
            assert chunk, "simxend closed the guest's xenstore connection"
            data += chunk
        return data

    def hc_call(self, request: bytes) -> dict[str, Any]:
        self.hc.send(request)
        data, fds, flags, _ = socket.recv_fds(self.hc, HC_MSG_MAX, SCM_MAX_FD)
        close_fds(fds)
        assert data, "simxend closed the guest's hypercall connection"
        assert not flags & socket.MSG_TRUNC, f"a reply over {HC_MSG_MAX} bytes: {data[:80]!r}"
        reply = json.loads(data)
        assert isinstance(reply, dict)
        return reply

    def close(self) -> None:
        self.xs.close()
        self.hc.close()


@dataclass
class Sim:
    run: Path
    ctl: SimControl
    guest: RawGuest
    other: RawGuest

    def assert_serving(self) -> None:
        """The attacker's own channels, another guest's and dom0's all still answer."""
        for g in (self.guest, self.other):
            path = join_strings(f"/local/domain/{g.domid}/name")
            assert g.xs_call(XsType.XS_READ, path).type is XsType.XS_READ
            assert g.hc_call(b'{"op": "whoami"}') == {"ok": True, "domid": g.domid}
        assert self.guest.domid in self.ctl.list_domains()


def _guest(ctl: SimControl, name: str) -> RawGuest:
    domid = ctl.create_domain(name)
    xs_fd, hc_fd = ctl.connect_domain(domid)
    xs, hc = socket.socket(fileno=xs_fd), socket.socket(fileno=hc_fd)
    xs.settimeout(5)
    hc.settimeout(5)
    return RawGuest(domid, xs, hc)


@contextlib.contextmanager
def running_sim(run: Path, fd_limit: int | None = None) -> Iterator[Sim]:
    """A simxend of its own, with two raw guests; it must stop cleanly afterwards."""
    proc = start_simxend(run, fd_limit)
    try:
        with SimControl(str(run), timeout=5) as ctl:
            guest, other = _guest(ctl, "attacker"), _guest(ctl, "bystander")
            try:
                yield Sim(run, ctl, guest, other)
            finally:
                guest.close()
                other.close()
    finally:
        assert stop(proc) == 0, "simxend died: it did not stop cleanly on SIGTERM"


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    """One simxend per test: one that dies takes no other test with it."""
    with running_sim(tmp_path / "run") as sim:
        yield sim


# --- xenstore: a domain id argument ----------------------------------------------------

SUPERSCRIPT_TWO = "\u00b2\0".encode()  # str.isdigit() says yes, int() says no


@pytest.mark.parametrize(
    "type_", [XsType.XS_GET_DOMAIN_PATH, XsType.XS_IS_DOMAIN_INTRODUCED], ids=lambda t: t.name
)
def test_a_non_ascii_digit_as_domain_id_is_einval(sim: Sim, type_: XsType) -> None:
    reply = sim.guest.xs_call(type_, SUPERSCRIPT_TWO)
    assert reply == XsPacket(XsType.XS_ERROR, 7, 0, b"EINVAL\0")
    sim.assert_serving()


BAD_DOMAIN_IDS = {
    "arabic-indic-five": "\u0665\0".encode(),
    "4000-digits": b"9" * 4000 + b"\0",
    "reserved-32752": b"32752\0",
    "negative": b"-1\0",
    "hex": b"0x1\0",
    "not-utf8": b"\xff\xfe\0",
    "no-nul": b"1",
    "two-strings": b"1\x002\0",
    "empty": b"",
}


@pytest.mark.parametrize("payload", BAD_DOMAIN_IDS.values(), ids=BAD_DOMAIN_IDS.keys())
def test_every_bad_domain_id_is_einval_on_one_connection(sim: Sim, payload: bytes) -> None:
    for type_ in (XsType.XS_GET_DOMAIN_PATH, XsType.XS_IS_DOMAIN_INTRODUCED):
        assert sim.guest.xs_call(type_, payload) == XsPacket(XsType.XS_ERROR, 7, 0, b"EINVAL\0")
    path = sim.guest.xs_call(XsType.XS_GET_DOMAIN_PATH, f"{sim.guest.domid}\0".encode())
    assert path.payload == f"/local/domain/{sim.guest.domid}\0".encode()
    sim.assert_serving()


# --- hypercalls: the JSON parser ---------------------------------------------------------


def _einval(reply: dict[str, Any]) -> None:
    assert reply["ok"] is False and reply["errno"] == "EINVAL", reply


def test_json_nested_3000_deep_is_einval(sim: Sim) -> None:
    _einval(sim.guest.hc_call(b"[" * 3000 + b"]" * 3000))
    _einval(sim.guest.hc_call(b'{"op": "whoami", "x": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001))
    sim.assert_serving()


def test_a_5000_digit_integer_is_einval(sim: Sim) -> None:
    _einval(sim.guest.hc_call(b'{"op": "gnt_unmap", "handle": ' + b"9" * 5000 + b"}"))
    sim.assert_serving()


# --- hypercalls: arguments ---------------------------------------------------------------


def test_unsharing_a_grant_twice_in_one_call_is_einval(sim: Sim) -> None:
    sim.guest.hc.send(b'{"op": "gnt_share", "domid": 0, "count": 1}')
    data, fds, _flags, _ = socket.recv_fds(sim.guest.hc, HC_MSG_MAX, SCM_MAX_FD)
    close_fds(fds)
    (ref,) = json.loads(data)["refs"]
    _einval(sim.guest.hc_call(json.dumps({"op": "gnt_unshare", "refs": [ref, ref]}).encode()))
    assert sim.ctl.stats(sim.guest.domid)["grants"] == 1  # refused as a whole
    assert sim.guest.hc_call(json.dumps({"op": "gnt_unshare", "refs": [ref]}).encode())["ok"]
    sim.assert_serving()


@pytest.mark.parametrize(
    "char", ["\U0001f600", "\U000e0001", "\\ud800"], ids=["emoji", "tag", "lone-surrogate"]
)
def test_an_error_reply_does_not_echo_a_huge_argument(sim: Sim, char: str) -> None:
    """An unknown op is echoed in the message: 64 KiB of it must not overflow the reply."""
    request = ('{"op": "' + char * (60000 // len(char.encode())) + '"}').encode()
    _einval(sim.guest.hc_call(request))
    sim.assert_serving()


# --- descriptors: the daemon holds one per granted page and two per unbound port ------------


def _take_all(guest: RawGuest, request: dict[str, Any], most: int = 5000) -> set[str]:
    """Repeat ``request`` until it fails; the errno names it failed with."""
    for _ in range(most):
        reply = guest.hc_call(json.dumps(request).encode())
        if not reply["ok"]:
            return {reply["errno"]}
    return set()


def test_a_guest_cannot_use_up_the_hypervisors_descriptors(tmp_path: Path) -> None:
    """Unbound ports and grants until refused; dom0 and others must still get theirs."""
    with running_sim(tmp_path / "run", fd_limit=1024) as sim:
        _exhaust_then_check(sim)


def _exhaust_then_check(sim: Sim) -> None:
    port = {"op": "evtchn_alloc_unbound", "remote_domid": 0}
    page = {"op": "gnt_share", "domid": 0, "count": 1}
    refused = _take_all(sim.guest, port) | _take_all(sim.guest, page)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dom0:  # a new dom0 connection
        dom0.settimeout(5)
        dom0.connect(str(sim.run / "xenstored.sock"))
        dom0.sendall(XsPacket(XsType.XS_READ, 1, 0, b"/local/domain/0/name\0").to_bytes())
        assert dom0.recv(100)[HEADER_SIZE:] == b"Domain-0"
    newcomer = _guest(sim.ctl, "newcomer")  # the toolstack can still start a domain
    try:
        for guest in (sim.other, newcomer):
            assert guest.hc_call(json.dumps(port).encode())["ok"]
            assert guest.hc_call(json.dumps(page).encode())["ok"]
    finally:
        newcomer.close()
    assert refused == {"ENOSPC"}, "refused by the hypervisor's quota, not by running out"
    sim.assert_serving()


# --- a bug nobody foresaw ---------------------------------------------------------------------


class _PlantedBug(XenStoreServer):
    """The real store with one planted bug: reading ``/bug`` raises, as a missed case would."""

    def handle(self, conn_id: int, packet: XsPacket) -> list[Delivery]:
        if packet.type is XsType.XS_READ and packet.payload == b"/bug\0":
            raise KeyError("planted")
        return super().handle(conn_id, packet)


class _PlantedHypercallBug(SimXen):
    """The real daemon whose ``stats`` raises: the hypercall side of the same check."""

    def _stats(self, conn: Any, request: HcRequest) -> Any:
        raise KeyError("planted")


def test_an_unforeseen_bug_answers_eio_is_counted_and_serving_goes_on(tmp_path: Path) -> None:
    daemon = _PlantedHypercallBug(str(tmp_path / "run"))
    daemon.xs = _PlantedBug()
    daemon.start()
    loop = threading.Thread(target=daemon.run)
    loop.start()
    try:
        with XenStoreClient.open_unix(str(tmp_path / "run" / "xenstored.sock"), timeout=3) as xs:
            with pytest.raises(XenStoreError) as info:
                xs.read("/bug")
            assert info.value.errno_name == "EIO"
            assert xs.read("/local/domain/0/name") == b"Domain-0"
        with SimControl(str(tmp_path / "run"), timeout=5) as ctl:
            with pytest.raises(HcError) as hc_info:
                ctl.stats()
            assert hc_info.value.errno_name == "EIO"
            assert ctl.list_domains() == {0: "Domain-0"}
        assert daemon.internal_errors == 2  # tests and fuzzers look here
    finally:
        daemon.request_stop()
        loop.join(10)
        daemon.close()
