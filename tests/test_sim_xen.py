"""The simulated Xen end to end: a real simxend process, domains, grants, event channels."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from resource import RLIMIT_NOFILE

import pytest

from harness.paths import REPO_ROOT
from xenvtpm.errors import ChannelClosed, EventChannelError, GrantError, XenStoreError
from xenvtpm.sim.adapter import SimControl, SimHypervisor
from xenvtpm.sim.hypercall import HcError, HcOp, HypercallClient, close_fds
from xenvtpm.sim.xenstore_client import XenStoreClient
from xenvtpm.sim.xenstore_wire import XsPacket, XsType
from xenvtpm.xen.interface import MAX_CONSUME_ROUNDS, Access, Perm, WatchEvent


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def events(xs: XenStoreClient, count: int, timeout: float = 2.0) -> list[WatchEvent]:
    """Poll ``xs.fileno()`` like a real user until ``count`` events arrived."""
    got: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        if select.select([xs.fileno()], [], [], deadline - time.monotonic())[0]:
            got += xs.read_watches()
    return got


def quiet(xs: XenStoreClient) -> list[WatchEvent]:
    """Events that arrive within a short grace period (expected: none)."""
    time.sleep(0.05)
    return xs.read_watches()


@dataclass
class Xen:
    run: str
    proc: subprocess.Popen[bytes]
    ctl: SimControl


def start_simxend(run: Path, fd_limit: int | None = None) -> subprocess.Popen[bytes]:
    """simxend as its own process; ``fd_limit`` sets its RLIMIT_NOFILE (soft and hard)."""
    limit = None if fd_limit is None else (fd_limit, fd_limit)
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenvtpm.sim.simxend", "--dir", str(run)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stderr=subprocess.PIPE,
        preexec_fn=None if limit is None else lambda: resource.setrlimit(RLIMIT_NOFILE, limit),
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # blocks until "simxend: ready" (or death)
    while line and b"ready" not in line:
        line = proc.stderr.readline()
    assert b"simxend: ready" in line, f"simxend did not start (exit {proc.poll()})"
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
    return proc


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def xen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xen]:
    run = tmp_path_factory.mktemp("simxen") / "run"
    proc = start_simxend(run)
    try:
        with SimControl(str(run)) as ctl:
            yield Xen(str(run), proc, ctl)
    finally:
        assert stop(proc) == 0


@pytest.fixture
def dom0(xen: Xen) -> Iterator[SimHypervisor]:
    with SimHypervisor.connect_dom0(xen.run) as hv:
        yield hv


@pytest.fixture
def guests(xen: Xen, request: pytest.FixtureRequest) -> Iterator[list[SimHypervisor]]:
    """Two fresh domains, each with one in-process connection; destroyed afterwards."""
    name = request.node.name[:40]
    domids = [xen.ctl.create_domain(f"{name}-{i}") for i in range(2)]
    hvs = [SimHypervisor.from_fds(*xen.ctl.connect_domain(d)) for d in domids]
    try:
        yield hvs
    finally:
        for hv in hvs:
            hv.close()
        for d in domids:
            if d in xen.ctl.list_domains():
                xen.ctl.destroy_domain(d)


# --- daemon -----------------------------------------------------------------------------


def test_daemon_run_dir_and_clean_stop(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start_simxend(run)
    try:
        assert (run.stat().st_mode & 0o777) == 0o700
        assert {"xenstored.sock", "privcmd.sock", "ready"} <= set(os.listdir(run))
        assert int((run / "ready").read_text()) == proc.pid
        second = subprocess.run(
            [sys.executable, "-m", "xenvtpm.sim.simxend", "--dir", str(run)],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            timeout=10,
        )
        assert second.returncode == 1  # refuses to steal a live daemon's sockets
    finally:
        assert stop(proc) == 0
    assert os.listdir(run) == []


# --- xenstore -------------------------------------------------------------------------------


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
            seen = written
            wait_for(lambda seen=seen: written > seen, "a guest write inside the transaction")
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


# --- grants -------------------------------------------------------------------------------


def test_grants_share_map_and_write_back(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, g2 = guests
    with g1.grants.share_pages(0, 2) as shared:
        assert list(shared.refs) == [8, 9]  # GNTTAB_NR_RESERVED_ENTRIES
        assert all(len(p) == 4096 and p[0] == 0 for p in shared.pages)
        shared.pages[0][:5] = b"hello"
        shared.pages[1][4090:] = b"world!"
        with dom0.grants.map_grant_refs(g1.domid, shared.refs) as mapped:
            assert bytes(mapped.pages[0][:5]) == b"hello"
            assert bytes(mapped.pages[1][4090:]) == b"world!"
            mapped.pages[0][:5] = b"HELLO"
            assert bytes(shared.pages[0][:5]) == b"HELLO"
        with pytest.raises(GrantError):
            g2.grants.map_grant_refs(g1.domid, shared.refs)  # not granted to g2
        with pytest.raises(GrantError):
            dom0.grants.map_grant_refs(g1.domid, [7])  # reserved / never granted
        with g2.grants.share_pages(g1.domid, 1) as for_g1:
            assert list(for_g1.refs) == [8]  # refs are per granting domain
            with pytest.raises(GrantError):
                dom0.grants.map_grant_refs(g2.domid, for_g1.refs)  # meant for g1
            with g1.grants.map_grant_refs(g2.domid, for_g1.refs) as ok:
                assert len(ok.pages) == 1


def test_read_only_grant(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    with g1.grants.share_pages(0, 1, writable=False) as shared:
        shared.pages[0][0] = 0x5A
        with pytest.raises(GrantError):
            dom0.grants.map_grant_refs(g1.domid, shared.refs, writable=True)
        with dom0.grants.map_grant_refs(g1.domid, shared.refs, writable=False) as ro:
            assert ro.pages[0].readonly and ro.pages[0][0] == 0x5A
            with pytest.raises(TypeError):
                ro.pages[0][0] = 1


def test_grant_pages_are_sealed(xen: Xen, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    hc = HypercallClient.from_fd(xen.ctl.connect_domain(g1.domid)[1])
    try:
        _, fds = hc.call(HcOp.GNT_SHARE, domid=0, count=1, writable=True)
        try:
            (fd,) = fds
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            assert seals & want == want
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)  # a guest cannot make its mapper SIGBUS
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 8192)
            with pytest.raises(PermissionError):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            assert os.fstat(fd).st_size == 4096
        finally:
            close_fds(fds)
        with pytest.raises(HcError) as info:
            hc.call(HcOp.GNT_UNSHARE, refs=[12345])
        assert info.value.errno_name == "EINVAL"
    finally:
        hc.close()


def test_unshare_does_not_revoke_live_mapping(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    g1, _ = guests
    shared = g1.grants.share_pages(0, 1)
    refs = list(shared.refs)
    shared.pages[0][:3] = b"abc"
    mapped = dom0.grants.map_grant_refs(g1.domid, refs)
    shared.close()
    try:
        assert bytes(mapped.pages[0][:3]) == b"abc"  # measured on Xen: still mapped
        mapped.pages[0][:3] = b"xyz"
        with pytest.raises(GrantError):
            dom0.grants.map_grant_refs(g1.domid, refs)  # but no new mapping
    finally:
        mapped.close()


# --- event channels ---------------------------------------------------------------------


def readable(fd: int, timeout: float = 1.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_event_channel_both_ways(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, g2 = guests
    front = g1.events.bind_unbound_port(0)
    with pytest.raises(EventChannelError):
        g2.events.bind_interdomain(g1.domid, front.port)  # allocated for dom0, not g2
    back = dom0.events.bind_interdomain(g1.domid, front.port)
    with pytest.raises(EventChannelError):
        dom0.events.bind_interdomain(g1.domid, front.port)  # already bound
    try:
        assert front.port >= 1 and back.port >= 1
        assert readable(back.fileno()) and back.consume()  # Xen leaves one pending at bind
        assert not readable(back.fileno(), 0.05)
        front.notify()
        front.notify()  # coalesces
        assert readable(back.fileno()) and back.consume()
        assert not readable(back.fileno(), 0.05)
        back.notify()
        assert readable(front.fileno()) and front.consume()
        assert not readable(front.fileno(), 0.05)
        assert front.consume() is True  # nothing pending, channel alive
    finally:
        front.close()
    assert readable(back.fileno())
    assert back.consume() is False  # the peer unbound
    back.notify()  # a dead peer never raises on the hot path
    assert back.consume() is False
    back.close()
    back.close()


def test_notify_never_blocks(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    front = g1.events.bind_unbound_port(0)
    with front, dom0.events.bind_interdomain(g1.domid, front.port) as back:
        start = time.monotonic()
        for _ in range(300_000):  # far more than a socket buffer holds
            front.notify()
        assert time.monotonic() - start < 5
        pending = queued(back.fileno())
        assert 0 < pending < 300_000
        for _ in range(-(-pending // MAX_CONSUME_ROUNDS)):  # a bounded number of rounds each
            assert back.consume() is True
        assert not readable(back.fileno(), 0.05)


def queued(fd: int) -> int:
    """Events pending on a simulated port: the bytes waiting on its socket (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


def test_notifies_on_an_unbound_port_are_dropped(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    """Xen drops a notify on a port nobody bound yet (evtchn_send, ECS_UNBOUND): the
    binder finds only the one event that bind_interdomain leaves pending."""
    g1, _ = guests
    front = g1.events.bind_unbound_port(0)
    front.notify()
    assert front.notify_many(1000) == 1000
    with front, dom0.events.bind_interdomain(g1.domid, front.port) as back:
        assert queued(back.fileno()) == 1
        assert front.notify_many(5) == 5
        assert queued(back.fileno()) == 6


def test_a_guest_can_keep_its_port_pending(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    """``notify_many`` queues one event per notify, up to the socket buffer, without
    blocking: what a guest notifying after each of dom0's unmasks amounts to. A closed
    port refuses it (as EVTCHNOP_send an unbound port); a peer that left takes none."""
    g1, _ = guests
    front = g1.events.bind_unbound_port(0)
    back = dom0.events.bind_interdomain(g1.domid, front.port)
    assert back.consume()
    taken = 0
    while n := front.notify_many(1 << 16):
        taken += n
    assert taken > 10_000 and queued(back.fileno()) == taken
    assert front.notify_many(1) == 0  # full: already pending
    assert back.consume() is True  # a bounded number of events, and still pending
    assert queued(back.fileno()) == taken - MAX_CONSUME_ROUNDS
    back.close()
    assert front.notify_many(1) == 0  # nobody listens any more
    front.close()
    with pytest.raises(EventChannelError):
        front.notify_many(1)


# --- resources, stats and process death ---------------------------------------------------


def test_stats_return_to_zero(xen: Xen, dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    assert xen.ctl.stats(g1.domid) == {
        "grants": 0,
        "mappings": 0,
        "mapped_pages": 0,
        "ports": 0,
        "connections": 2,
        "domains": 1,
    }
    base0 = xen.ctl.stats(0)
    shared = g1.grants.share_pages(0, 3)
    mapped = dom0.grants.map_grant_refs(g1.domid, shared.refs)
    port = g1.events.bind_unbound_port(0)
    bound = dom0.events.bind_interdomain(g1.domid, port.port)
    s1 = xen.ctl.stats(g1.domid)
    assert (s1["grants"], s1["ports"]) == (3, 1)
    s0 = xen.ctl.stats(0)
    assert s0["mappings"] == base0["mappings"] + 1
    assert s0["mapped_pages"] == base0["mapped_pages"] + 3
    assert s0["ports"] == base0["ports"] + 1
    for obj in (mapped, shared, port, bound):
        obj.close()
    assert xen.ctl.stats(g1.domid)["grants"] == 0 and xen.ctl.stats(g1.domid)["ports"] == 0
    assert xen.ctl.stats(0) == base0
    g1.close()
    wait_for(lambda: xen.ctl.stats(g1.domid)["connections"] == 0, "g1's connections to close")


GUEST_SCRIPT = """
import os, time
from xenvtpm.xen import open_hypervisor
hv = open_hypervisor()
shared = hv.grants.share_pages(0, 2)
shared.pages[0][:4] = b"live"
port = hv.events.bind_unbound_port(0)
hv.xenstore.write("data/out", "%s %s" % (",".join(map(str, shared.refs)), port.port))
time.sleep(60)
"""


def test_killed_process_releases_its_resources(xen: Xen, dom0: SimHypervisor) -> None:
    domid = xen.ctl.create_domain("killed")
    proc = xen.ctl.spawn(
        domid,
        [sys.executable, "-c", GUEST_SCRIPT],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        out = f"/local/domain/{domid}/data/out"

        def published() -> bool:
            try:
                dom0.xenstore.read(out)
            except XenStoreError:
                return False
            return True

        wait_for(published, "the guest process to publish its grants", timeout=10)
        refs_text, port_text = dom0.xenstore.read(out).decode().split()
        refs = [int(r) for r in refs_text.split(",")]
        assert xen.ctl.stats(domid)["grants"] == 2 and xen.ctl.stats(domid)["ports"] == 1
        mapped = dom0.grants.map_grant_refs(domid, refs)
        channel = dom0.events.bind_interdomain(domid, int(port_text))
        assert channel.consume() is True
        proc.kill()
        proc.wait()
        wait_for(lambda: xen.ctl.stats(domid)["grants"] == 0, "grants released")
        stats = xen.ctl.stats(domid)
        assert stats["ports"] == 0 and stats["connections"] == 0
        assert readable(channel.fileno()) and channel.consume() is False
        assert bytes(mapped.pages[0][:4]) == b"live"  # our mapping stays valid
        with pytest.raises(GrantError):
            dom0.grants.map_grant_refs(domid, refs)
        mapped.close()
        channel.close()
    finally:
        proc.kill()
        proc.wait()
        xen.ctl.destroy_domain(domid)


def test_destroy_domain_releases_everything(xen: Xen, dom0: SimHypervisor) -> None:
    domid = xen.ctl.create_domain("destroyed")
    guest = SimHypervisor.from_fds(*xen.ctl.connect_domain(domid))
    try:
        shared = guest.grants.share_pages(0, 1)
        port = guest.events.bind_unbound_port(0)
        bound = dom0.events.bind_interdomain(domid, port.port)
        bound.consume()
        mapped = dom0.grants.map_grant_refs(domid, shared.refs)
        xen.ctl.destroy_domain(domid)
        assert xen.ctl.stats(domid) == dict.fromkeys(
            ("grants", "mappings", "mapped_pages", "ports", "connections", "domains"), 0
        )
        assert readable(bound.fileno()) and bound.consume() is False  # the channel is revoked
        mapped.pages[0][0] = 1  # dom0's mapping lives until dom0 unmaps it
        mapped.close()
        bound.close()
        with pytest.raises(HcError) as info:
            xen.ctl.destroy_domain(domid)
        assert info.value.errno_name == "ESRCH"
    finally:
        guest.close()


def test_toolstack_is_dom0_only_and_bad_requests(xen: Xen, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    hc = HypercallClient.from_fd(xen.ctl.connect_domain(g1.domid)[1])
    try:
        assert hc.call(HcOp.WHOAMI)[0] == {"domid": g1.domid}
        for op, args in (
            (HcOp.CREATE_DOMAIN, {"name": "x"}),
            (HcOp.DESTROY_DOMAIN, {"domid": 0}),
            (HcOp.CONNECT_DOMAIN, {"domid": 0}),
        ):
            with pytest.raises(HcError) as info:
                hc.call(op, **args)
            assert info.value.errno_name == "EPERM"
        with pytest.raises(HcError) as info:
            hc.call(HcOp.GNT_SHARE, domid=0, count="two")
        assert info.value.errno_name == "EINVAL"
    finally:
        hc.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.settimeout(5)
        raw.connect(os.path.join(xen.run, "privcmd.sock"))
        for junk in (b"not json", b"[1]", b'{"op": "reboot"}'):
            raw.send(junk)
            assert json.loads(raw.recv(4096))["errno"] == "EINVAL"
    with pytest.raises(HcError) as info:
        xen.ctl.create_domain(xen.ctl.list_domains()[g1.domid])
    assert info.value.errno_name == "EEXIST"


# --- the client on its own ------------------------------------------------------------------


def test_client_timeout_and_peer_death() -> None:
    ours, theirs = socket.socketpair()
    client = XenStoreClient(ours, timeout=0.2)
    client.start()
    try:
        with pytest.raises(XenStoreError) as info:
            client.read("/x")
        assert info.value.errno_name == "ETIMEDOUT"
        pending: list[BaseException] = []
        t = threading.Thread(target=lambda: pending.append(_catch(lambda: client.read("/y"))))
        client.timeout = 5
        t.start()
        time.sleep(0.1)
        theirs.close()  # the daemon dies while a request waits
        t.join(5)
        assert isinstance(pending[0], ChannelClosed)
        assert readable(client.fileno())  # pollers wake up...
        with pytest.raises(ChannelClosed):
            client.read_watches()  # ...and learn the connection is gone
        with pytest.raises(ChannelClosed):
            client.read("/z")
    finally:
        client.close()
        client.close()


def _catch(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("no exception")


def test_client_demuxes_concurrent_callers(dom0: SimHypervisor) -> None:
    xs = dom0.xenstore
    for i in range(8):
        xs.write(f"/conc/{i}", str(i))
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(50):
            if xs.read(f"/conc/{i}") != str(i).encode():
                errors.append(f"worker {i} got another's reply")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    xs.rm("/conc")
    with pytest.raises(XenStoreError) as info:
        xs.write("/big", b"x" * 5000)
    assert info.value.errno_name == "E2BIG"
