"""The simulated xenstored end to end: permissions, watches, transactions, malformed
messages, over a real simxend process.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
from simxen import Xen, events, quiet, readable, wait_for

from xenvtpm.errors import ChannelClosed, XenStoreError
from xenvtpm.sim.adapter import SimHypervisor
from xenvtpm.sim.xenstore_client import XenStoreClient
from xenvtpm.sim.xenstore_wire import XsPacket, XsType
from xenvtpm.xen.interface import Access, Perm, WatchEvent


def test_xenstore_basic_ops_and_perms(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, g2 = guests
    xs = dom0.xenstore
    assert dom0.domid == 0 and g1.domid != g2.domid
    base = f"/local/domain/0/backend/test/{g1.domid}"
    xs.write(f"{base}/state", "1")
    xs.mkdir(f"{base}/empty")
    assert xs.read(f"{base}/state") == b"1"
    assert sorted(xs.directory(base)) == ["empty", "state"]
    xs.set_perms(base, [Perm(0, Access.NONE), Perm(g1.domid, Access.READ)])
    xs.set_perms(f"{base}/state", [Perm(0, Access.NONE), Perm(g1.domid, Access.READ)])
    assert xs.get_perms(f"{base}/state") == [Perm(0, Access.NONE), Perm(g1.domid, Access.READ)]
    assert g1.xenstore.read(f"{base}/state") == b"1"
    with pytest.raises(XenStoreError) as info:
        g2.xenstore.read(f"{base}/state")
    assert info.value.errno_name == "EACCES"
    with pytest.raises(XenStoreError) as info:
        g1.xenstore.write(f"{base}/state", "4")
    assert info.value.errno_name == "EACCES"
    xs.rm(base)
    with pytest.raises(XenStoreError) as info:
        xs.read(f"{base}/state")
    assert info.value.errno_name == "ENOENT"
    assert xs.get_domain_path(g1.domid) == f"/local/domain/{g1.domid}"


def test_guest_cannot_write_other_domains(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, g2 = guests
    for path in (f"/local/domain/{g2.domid}/x", "/local/domain/0/x", "/x"):
        with pytest.raises(XenStoreError) as info:
            g1.xenstore.write(path, "evil")
        assert info.value.errno_name == "EACCES", path
        assert info.value.errno == 13


def test_relative_paths_and_relative_watch(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    g1, _ = guests
    g1.xenstore.watch("device", "dev")
    assert events(g1.xenstore, 1) == [WatchEvent("device", "dev")]
    g1.xenstore.write("device/vtpm/0/state", "1")
    assert dom0.xenstore.read(f"/local/domain/{g1.domid}/device/vtpm/0/state") == b"1"
    assert events(g1.xenstore, 1) == [WatchEvent("device/vtpm/0/state", "dev")]
    dom0.xenstore.write(f"/local/domain/{g1.domid}/device/vtpm/0/backend", "x")
    assert events(g1.xenstore, 1) == [WatchEvent("device/vtpm/0/backend", "dev")]


def test_watch_fires_on_registration_change_and_removal(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    g1, g2 = guests
    xs = dom0.xenstore
    path = f"/local/domain/{g1.domid}/w"
    xs.watch(path, "t1")
    g2.xenstore.watch(path, "spy")  # g2 may register, but may not read g1's nodes
    assert events(xs, 1) == [WatchEvent(path, "t1")]  # fires at once, node missing
    assert events(g2.xenstore, 1) == [WatchEvent(path, "spy")]
    g1.xenstore.write("w/a", "1")
    assert events(xs, 1) == [WatchEvent(f"{path}/a", "t1")]
    g1.xenstore.rm("w")
    assert events(xs, 1) == [WatchEvent(path, "t1")]
    assert quiet(g2.xenstore) == []
    xs.unwatch(path, "t1")
    g1.xenstore.write("w", "again")
    assert quiet(xs) == []


def test_read_watches_takes_a_bounded_batch(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    """A guest writing its own nodes in a loop queues watch events for dom0 as fast as
    it likes; one ``read_watches()`` on the backend's only thread takes at most 1,024 of
    them (as the libxenstore adapter does), oldest first, and ``fileno()`` stays readable
    while more wait, so the loop serves the other fds in between."""
    g1, _ = guests
    xs = dom0.xenstore
    path = f"/local/domain/{g1.domid}/storm"
    xs.watch(path, "w")
    assert events(xs, 1) == [WatchEvent(path, "w")]
    for i in range(2500):
        g1.xenstore.write("storm/n", str(i))
    xs.read(path)  # the events of every write above came before this reply
    batches: list[list[WatchEvent]] = []
    while readable(xs.fileno(), 0.2):
        batches.append(xs.read_watches())
        assert len(batches) < 10
    assert [len(b) for b in batches] == [1024, 1024, 452]
    assert [e for b in batches for e in b] == [WatchEvent(f"{path}/n", "w")] * 2500


def test_transactions_commit_and_conflict(dom0: SimHypervisor, xen: Xen) -> None:
    xs = dom0.xenstore
    with XenStoreClient.open_unix(os.path.join(xen.run, "xenstored.sock")) as other:
        tx = xs.transaction_start()
        xs.write("/txtest/a", "1", tx)
        assert xs.read("/txtest/a", tx) == b"1"
        with pytest.raises(XenStoreError):
            other.read("/txtest/a")
        assert xs.transaction_end(tx) is True
        assert other.read("/txtest/a") == b"1"

        tx = xs.transaction_start()
        xs.write("/txtest/a", "2", tx)
        other.write("/txtest/a", "meanwhile")
        assert xs.transaction_end(tx) is False  # EAGAIN: must retry
        assert other.read("/txtest/a") == b"meanwhile"

        attempts = []

        def body(t: int) -> str:
            attempts.append(t)
            if len(attempts) == 1:
                other.write("/txtest/a", "conflict")
            xs.write("/txtest/a", "3", t)
            return "done"

        assert xs.transact(body) == "done"
        assert len(attempts) == 2 and other.read("/txtest/a") == b"3"
        xs.rm("/txtest")


def test_guest_writing_its_own_nodes_in_a_loop_does_not_fail_dom0_transactions(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    """A guest cannot freeze dom0's commits by writing its own subtree (C xenstored)."""
    g1, _ = guests
    be = f"/local/domain/0/backend/txloop/{g1.domid}"
    dom0.xenstore.write(f"{be}/state", "1")
    written = 0
    stop_flag = threading.Event()

    def guest_loop() -> None:
        nonlocal written
        while not stop_flag.is_set():
            g1.xenstore.write(f"device/vtpm/0/n{written % 50}", str(written))
            written += 1

    loop = threading.Thread(target=guest_loop)
    loop.start()
    results = []
    try:
        for i in range(20):
            tx = dom0.xenstore.transaction_start()
            assert dom0.xenstore.read(f"{be}/state", tx) == b"1"
            dom0.xenstore.write(f"{be}/n", str(i), tx)

            def wrote_again(seen: int = written) -> bool:
                return written > seen

            wait_for(wrote_again, "a guest write inside the transaction")
            results.append(dom0.xenstore.transaction_end(tx))
    finally:
        stop_flag.set()
        loop.join()
    assert results == [True] * 20, f"{results.count(False)} of 20 commits got EAGAIN"
    assert dom0.xenstore.read(f"{be}/n") == b"19"
    dom0.xenstore.rm("/local/domain/0/backend/txloop")


def test_release_domain_fires_on_destroy(dom0: SimHypervisor, xen: Xen) -> None:
    domid = xen.ctl.create_domain("doomed")
    guest = SimHypervisor.from_fds(*xen.ctl.connect_domain(domid))
    try:
        dom0.xenstore.watch("@releaseDomain", "rel")
        assert events(dom0.xenstore, 1) == [WatchEvent("@releaseDomain", "rel")]
        guest.xenstore.write("data", "x")
        assert f"{domid}" in dom0.xenstore.directory("/local/domain")
        xen.ctl.destroy_domain(domid)
        assert events(dom0.xenstore, 1) == [WatchEvent("@releaseDomain", "rel")]
        assert str(domid) not in dom0.xenstore.directory("/local/domain")
        assert domid not in xen.ctl.list_domains()
        with pytest.raises(ChannelClosed):
            guest.xenstore.read("data")
        with pytest.raises(ChannelClosed):
            guest.grants.share_pages(0, 1)
        assert xen.ctl.stats(domid)["connections"] == 0
    finally:
        guest.close()


def test_malformed_xenstore_message_drops_connection(xen: Xen) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(os.path.join(xen.run, "xenstored.sock"))
        s.sendall((2).to_bytes(4, "little") * 3 + (5000).to_bytes(4, "little"))
        assert s.recv(100) == b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # the daemon lives on
        s.settimeout(5)
        s.connect(os.path.join(xen.run, "xenstored.sock"))
        s.sendall(XsPacket(XsType.XS_READ, 42, 0, b"/local/domain/0/name\x00").to_bytes())
        reply = s.recv(100)
        assert XsPacket.from_bytes(reply) == XsPacket(XsType.XS_READ, 42, 0, b"Domain-0")
