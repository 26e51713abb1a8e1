"""What domains hold through simxend's hypercalls: grant references and mappings,
event-channel ports, and the descriptors that back them.

Each shared page is a sealed memfd and each port one end of a socketpair, so the daemon
holds descriptors for its guests; :meth:`DomainResources._hold_fds` refuses (ENOSPC) a
domain that would take more than its share before the daemon runs out. What a
connection holds is released when it closes, as Linux's gntalloc, gntdev and evtchn
drivers do. Spec: docs/simulated-xen.md; xen/include/public/grant_table.h and
event_channel.h for the operations mirrored.

A base of :class:`xenvtpm.sim.simxend.SimXen`, which owns the connections and the
loop; it only adds, and declares what it needs of them (mypy checks both sides). Split
out so that each module holds one concept.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import socket
from dataclasses import dataclass, field

from xenvtpm.sim.hypercall import SCM_MAX_FD, HcReply, HcRequest, close_fds
from xenvtpm.xen.interface import NR_RESERVED_GRANT_REFS, PAGE_SIZE

DOMID_FIRST_RESERVED = 0x7FF0  # xen/include/public/xen.h
MAX_GRANTS_PER_DOMAIN = 4096
MAX_PORTS_PER_DOMAIN = 4096
FD_RESERVE = 320  # descriptors never given to guests: dom0's connections, 253 read-only maps
FD_SHARE = 4  # one domain may hold a quarter of what guests may hold, all together
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class Fail(Exception):
    """A hypercall fails with an errno name; becomes ``{"ok": false, ...}``."""

    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name


@dataclass
class Grant:
    granter: int
    ref: int
    grantee: int
    writable: bool
    fd: int  # the memfd; the daemon keeps it to hand to the mapper
    conn: int


@dataclass
class Mapping:
    mapper: int
    granter: int
    refs: list[int]


@dataclass
class Port:
    domid: int
    port: int
    remote_domid: int
    conn: int
    end: socket.socket  # the daemon's copy of this port's end: lets it revoke the channel
    waiting: socket.socket | None  # unbound: the end the binder will get
    peer: tuple[int, int] | None = None


@dataclass
class Domain:
    domid: int
    name: str
    next_ref: int = NR_RESERVED_GRANT_REFS  # refs start at 8 and are per granting domain
    conns: set[int] = field(default_factory=set)
    fds: int = 0  # descriptors the daemon holds for its grants and event channels


@dataclass
class Conn:
    id: int
    domid: int
    sock: socket.socket
    xenstore: bool
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    shares: set[tuple[int, int]] = field(default_factory=set)
    mappings: dict[int, Mapping] = field(default_factory=dict)
    ports: set[tuple[int, int]] = field(default_factory=set)
    next_handle: int = 1


Handled = tuple[HcReply, list[int], list[int]]  # reply, fds to send, fds to close after


class DomainResources:
    """Grant and event-channel hypercalls, and the bookkeeping of what each domain holds."""

    _conns: dict[int, Conn]
    _domains: dict[int, Domain]
    _grants: dict[tuple[int, int], Grant]
    _ports: dict[tuple[int, int], Port]
    _fd_budget: int

    def _hold_fds(self, domid: int, count: int) -> None:
        """Count descriptors kept for a domain; ENOSPC before the daemon runs out of them.

        Every page and port a guest asks for costs the daemon a descriptor or two, and
        the per-domain limits add up past RLIMIT_NOFILE: without this, guests could
        leave none for dom0's next connection.
        """
        dom = self._domains[domid]
        if domid != 0:
            held = sum(d.fds for d in self._domains.values()) + len(self._conns)
            if dom.fds + count > self._fd_budget // FD_SHARE or held + count > self._fd_budget:
                raise Fail("ENOSPC", "the hypervisor holds too many descriptors")
        dom.fds += count

    def _unhold_fds(self, domid: int, count: int) -> None:
        if (dom := self._domains.get(domid)) is not None:
            dom.fds -= count

    def _require_dom0(self, conn: Conn, request: HcRequest) -> None:
        if conn.domid != 0:
            raise Fail("EPERM", f"{request.op} is for domain 0 only")

    def _domain_arg(self, request: HcRequest, name: str = "domid") -> int:
        domid = request.int_arg(name)
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise Fail("EINVAL", f"bad domain id {domid}")
        return domid

    # grants

    def _gnt_share(self, conn: Conn, request: HcRequest) -> Handled:
        grantee = self._domain_arg(request)
        count = request.int_arg("count")
        writable = request.bool_arg("writable", default=True)
        dom = self._domains[conn.domid]
        if not 1 <= count <= SCM_MAX_FD:
            raise Fail("EINVAL", f"cannot share {count} pages at once")
        if sum(1 for g in self._grants.values() if g.granter == dom.domid) + count > (
            MAX_GRANTS_PER_DOMAIN
        ):
            raise Fail("ENOSPC", "grant table full")
        self._hold_fds(dom.domid, count)
        fds: list[int] = []
        try:
            for i in range(count):
                fd = os.memfd_create(
                    f"xen-gnt-d{dom.domid}-r{dom.next_ref + i}",
                    os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC,
                )
                fds.append(fd)
                os.ftruncate(fd, PAGE_SIZE)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)  # no truncation: no SIGBUS
        except OSError:
            close_fds(fds)
            self._unhold_fds(dom.domid, count)
            raise
        refs = list(range(dom.next_ref, dom.next_ref + count))
        dom.next_ref += count
        for ref, fd in zip(refs, fds, strict=True):
            self._grants[(dom.domid, ref)] = Grant(dom.domid, ref, grantee, writable, fd, conn.id)
            conn.shares.add((dom.domid, ref))
        return HcReply.success(refs=refs), fds, []

    def _gnt_unshare(self, conn: Conn, request: HcRequest) -> Handled:
        keys = [(conn.domid, ref) for ref in request.int_list_arg("refs")]
        if len(set(keys)) != len(keys) or not all(k in conn.shares for k in keys):
            raise Fail("EINVAL", "not a grant of this connection, or named twice")
        for key in keys:
            self._release_grant(key)
        return HcReply.success(), [], []

    def _release_grant(self, key: tuple[int, int]) -> None:
        grant = self._grants.pop(key)
        if grant.conn in self._conns:
            self._conns[grant.conn].shares.discard(key)
        os.close(grant.fd)  # a live mapping keeps its own descriptor: it stays valid
        self._unhold_fds(grant.granter, 1)

    def _gnt_map(self, conn: Conn, request: HcRequest) -> Handled:
        granter = self._domain_arg(request)
        refs = request.int_list_arg("refs")
        writable = request.bool_arg("writable", default=True)
        if not 1 <= len(refs) <= SCM_MAX_FD:
            raise Fail("EINVAL", f"cannot map {len(refs)} pages at once")
        grants = [self._grants.get((granter, ref)) for ref in refs]
        for ref, grant in zip(refs, grants, strict=True):
            if grant is None or grant.grantee != conn.domid or (writable and not grant.writable):
                raise Fail("EINVAL", f"ref {ref} of dom{granter} is not granted to us")
        send: list[int] = []
        after: list[int] = []
        for grant in grants:
            assert grant is not None
            if writable:
                send.append(grant.fd)
            else:
                fd = os.open(f"/proc/self/fd/{grant.fd}", os.O_RDONLY | os.O_CLOEXEC)
                send.append(fd)
                after.append(fd)
        handle = conn.next_handle
        conn.next_handle += 1
        conn.mappings[handle] = Mapping(conn.domid, granter, refs)
        return HcReply.success(handle=handle), send, after

    def _gnt_unmap(self, conn: Conn, request: HcRequest) -> Handled:
        if conn.mappings.pop(request.int_arg("handle"), None) is None:
            raise Fail("EINVAL", "no such mapping handle")
        return HcReply.success(), [], []

    # event channels

    def _free_port(self, domid: int) -> int:
        used = {port for (d, port) in self._ports if d == domid}
        if len(used) >= MAX_PORTS_PER_DOMAIN:
            raise Fail("ENOSPC", "no free event channel port")
        return next(p for p in itertools.count(1) if p not in used)  # port 0 is reserved

    def _evtchn_alloc_unbound(self, conn: Conn, request: HcRequest) -> Handled:
        remote = self._domain_arg(request, "remote_domid")
        port = self._free_port(conn.domid)
        self._hold_fds(conn.domid, 2)  # our copy of the guest's end, and the binder's end
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            self._unhold_fds(conn.domid, 2)
            raise
        self._ports[(conn.domid, port)] = Port(conn.domid, port, remote, conn.id, mine, theirs)
        conn.ports.add((conn.domid, port))
        return HcReply.success(port=port), [mine.fileno()], []

    def _evtchn_bind_interdomain(self, conn: Conn, request: HcRequest) -> Handled:
        remote = self._domain_arg(request, "remote_domid")
        remote_port = request.int_arg("remote_port")
        other = self._ports.get((remote, remote_port))
        if other is None or other.waiting is None or other.remote_domid != conn.domid:
            raise Fail("EINVAL", f"port {remote_port} of dom{remote} is not unbound for us")
        port = self._free_port(conn.domid)
        end, other.waiting = other.waiting, None
        # Xen drops a notify on an unbound port: what the guest sent before this bind
        # is no event. 16 reads of 64 KiB exceed any unix socket buffer.
        with contextlib.suppress(OSError):  # BlockingIOError: nothing (more) to drop
            for _ in range(16):
                end.recv(1 << 16, socket.MSG_DONTWAIT)
        other.peer = (conn.domid, port)
        self._unhold_fds(remote, 1)  # the binder's end is the binder's now
        self._domains[conn.domid].fds += 1
        self._ports[(conn.domid, port)] = Port(
            conn.domid, port, remote, conn.id, end, None, (remote, remote_port)
        )
        conn.ports.add((conn.domid, port))
        # Xen's evtchn_bind_interdomain marks the new port pending: mirror that event.
        with contextlib.suppress(OSError):
            other.end.send(b"\x01", socket.MSG_DONTWAIT)
        return HcReply.success(port=port), [end.fileno()], []

    def _evtchn_unbind(self, conn: Conn, request: HcRequest) -> Handled:
        key = (conn.domid, request.int_arg("port"))
        if key not in conn.ports:
            raise Fail("EINVAL", "not a port of this connection")
        self._release_port(key)
        return HcReply.success(), [], []

    def _release_port(self, key: tuple[int, int]) -> None:
        """Unbind: shut the socket down so the peer reads end-of-file at once."""
        port = self._ports.pop(key)
        if port.conn in self._conns:
            self._conns[port.conn].ports.discard(key)
        self._unhold_fds(port.domid, 1 if port.waiting is None else 2)
        for sock in (port.end, port.waiting):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
