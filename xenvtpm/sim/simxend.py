"""simxend: the simulated hypervisor daemon (xenstored + grant tables + event channels).

One single-threaded loop (:class:`xenvtpm.loop.Loop`, every daemon's) serves
``RUN/xenstored.sock`` (xenstore wire protocol, every connection is domain 0),
``RUN/privcmd.sock`` (JSON hypercalls as domain 0, plus the toolstack) and the
socketpairs handed to guests by ``connect_domain``. It sets channels up and then stays
out of the data path: pages are memfds mapped by both ends and event channels are
socketpairs the two ends use directly. Spec: docs/simulated-xen.md.

Run: ``python -m xenvtpm.sim.simxend --dir RUN``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import resource
import selectors
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from xenvtpm.errors import MalformedMessage
from xenvtpm.loop import Loop
from xenvtpm.sim.hypercall import (
    HC_MSG_MAX,
    SCM_MAX_FD,
    HcOp,
    HcReply,
    HcRequest,
    close_fds,
)
from xenvtpm.sim.xenstore_server import Delivery, XenStoreServer
from xenvtpm.sim.xenstore_wire import HEADER_SIZE, XsHeader, XsPacket
from xenvtpm.xen.interface import NR_RESERVED_GRANT_REFS, PAGE_SIZE

log = logging.getLogger("xenvtpm.sim.simxend")  # not __name__: that is "__main__" under -m

XENSTORED_SOCK = "xenstored.sock"
PRIVCMD_SOCK = "privcmd.sock"
READY_FILE = "ready"
DOMID_FIRST_RESERVED = 0x7FF0  # xen/include/public/xen.h
MAX_GRANTS_PER_DOMAIN = 4096
MAX_PORTS_PER_DOMAIN = 4096
OUTBUF_LIMIT = 1 << 20  # a xenstore client this far behind on reading is dropped
FD_RESERVE = 320  # descriptors never given to guests: dom0's connections, 253 read-only maps
FD_SHARE = 4  # one domain may hold a quarter of what guests may hold, all together
FD_LIMIT_WANTED = 65536  # main() raises the soft RLIMIT_NOFILE this far (within the hard one)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class _Fail(Exception):
    """A hypercall fails with an errno name; becomes ``{"ok": false, ...}``."""

    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name


@dataclass
class _Grant:
    granter: int
    ref: int
    grantee: int
    writable: bool
    fd: int  # the memfd; the daemon keeps it to hand to the mapper
    conn: int


@dataclass
class _Mapping:
    mapper: int
    granter: int
    refs: list[int]


@dataclass
class _Port:
    domid: int
    port: int
    remote_domid: int
    conn: int
    end: socket.socket  # the daemon's copy of this port's end: lets it revoke the channel
    waiting: socket.socket | None  # unbound: the end the binder will get
    peer: tuple[int, int] | None = None


@dataclass
class _Domain:
    domid: int
    name: str
    next_ref: int = NR_RESERVED_GRANT_REFS  # refs start at 8 and are per granting domain
    conns: set[int] = field(default_factory=set)
    fds: int = 0  # descriptors the daemon holds for its grants and event channels


@dataclass
class _Conn:
    id: int
    domid: int
    sock: socket.socket
    xenstore: bool
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    shares: set[tuple[int, int]] = field(default_factory=set)
    mappings: dict[int, _Mapping] = field(default_factory=dict)
    ports: set[tuple[int, int]] = field(default_factory=set)
    next_handle: int = 1


_Handled = tuple[HcReply, list[int], list[int]]  # reply, fds to send, fds to close after


class SimXen:
    """The daemon's state and event loop; ``start()``, ``run()``, ``close()``.

    Given a ``loop`` (a daemon's, :func:`xenvtpm.daemon.run_service`), it serves on it;
    else it makes its own, which :meth:`pump` and :meth:`run` turn.
    """

    def __init__(self, run_dir: str, loop: Loop | None = None) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.xs = XenStoreServer()
        self._loop = Loop() if loop is None else loop
        self._own_loop = loop is None
        self._conns: dict[int, _Conn] = {}
        self._domains: dict[int, _Domain] = {0: _Domain(0, "Domain-0")}
        self._grants: dict[tuple[int, int], _Grant] = {}
        self._ports: dict[tuple[int, int], _Port] = {}
        self._ids = itertools.count(1)
        self._next_domid = 1
        self._listeners: list[socket.socket] = []
        self._started = False
        self.internal_errors = 0  # requests that raised what no handler foresaw: bugs
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_budget = (1 << 20 if soft == resource.RLIM_INFINITY else soft) - FD_RESERVE
        self._closed = False
        self._handlers: dict[HcOp, Callable[[_Conn, HcRequest], _Handled]] = {
            HcOp.WHOAMI: lambda c, r: (HcReply.success(domid=c.domid), [], []),
            HcOp.GNT_SHARE: self._gnt_share,
            HcOp.GNT_UNSHARE: self._gnt_unshare,
            HcOp.GNT_MAP: self._gnt_map,
            HcOp.GNT_UNMAP: self._gnt_unmap,
            HcOp.EVTCHN_ALLOC_UNBOUND: self._evtchn_alloc_unbound,
            HcOp.EVTCHN_BIND_INTERDOMAIN: self._evtchn_bind_interdomain,
            HcOp.EVTCHN_UNBIND: self._evtchn_unbind,
            HcOp.STATS: self._stats,
            HcOp.CREATE_DOMAIN: self._create_domain,
            HcOp.CONNECT_DOMAIN: self._connect_domain,
            HcOp.DESTROY_DOMAIN: self._destroy_domain,
            HcOp.LIST_DOMAINS: self._list_domains,
        }

    # --- lifecycle -----------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def start(self) -> None:
        """Create RUN (0700), listen on both sockets, write the ready marker. Idempotent."""
        if self._started:
            return
        self._started = True
        try:
            os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
            os.chmod(self.run_dir, 0o700)
            self._listen(XENSTORED_SOCK, socket.SOCK_STREAM, xenstore=True)
            self._listen(PRIVCMD_SOCK, socket.SOCK_SEQPACKET, xenstore=False)
            with open(self.path(READY_FILE), "w") as f:
                f.write(f"{os.getpid()}\n")
        except BaseException:
            self.close()
            raise
        log.info("listening in %s", self.run_dir)

    def _listen(self, name: str, kind: int, *, xenstore: bool) -> None:
        path = self.path(name)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, kind)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a dead daemon
            else:
                raise OSError(errno.EADDRINUSE, f"a simxend already serves {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._listeners.append(sock)
        # Bind under a temporary name and rename once listening, so that a launcher
        # polling for the socket never finds one that refuses connections.
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(tmp)
        sock.listen(64)
        os.rename(tmp, path)
        self._loop.register(sock, selectors.EVENT_READ, lambda _m: self._accept(sock, xenstore))

    def request_stop(self) -> None:
        """Async-signal-safe and thread-safe: make ``run()`` return (the loop's)."""
        self._loop.stop()

    def run(self) -> None:
        self.start()
        self._loop.run()

    def pump(self, timeout: float | None = None) -> None:
        """Serve what is ready (waiting up to ``timeout``): one turn of ``run()``'s loop."""
        self._loop.run_once(timeout)

    def attach(self, sock: socket.socket, domid: int, *, xenstore: bool) -> None:
        """Serve a connected socket as a connection of ``domid``, as ``accept`` and
        ``connect_domain`` do: lets an in-process user (the fuzzer) skip the run dir."""
        if domid not in self._domains:
            raise ValueError(f"no domain {domid}")
        self._add_conn(sock, domid, xenstore=xenstore)

    def close(self) -> None:
        """Drop every connection (releasing its resources), unlink the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for conn_id in list(self._conns):
            self._drop(conn_id)
        for sock in self._listeners:
            with contextlib.suppress(KeyError):
                self._loop.unregister(sock)
            sock.close()
        for name in (XENSTORED_SOCK, PRIVCMD_SOCK, READY_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(name))
        if self._own_loop:
            self._loop.close()

    # --- connections ---------------------------------------------------------------------

    def _accept(self, listener: socket.socket, xenstore: bool) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError as exc:  # EMFILE: dom0's own connections used up FD_RESERVE
            log.warning("cannot accept a connection: %s", exc)
            return
        self._add_conn(sock, 0, xenstore=xenstore)

    def _add_conn(self, sock: socket.socket, domid: int, *, xenstore: bool) -> _Conn:
        sock.setblocking(False)
        conn = _Conn(next(self._ids), domid, sock, xenstore)
        self._conns[conn.id] = conn
        self._domains[domid].conns.add(conn.id)
        if xenstore:
            self.xs.connect(conn.id, domid)
            self._loop.register(sock, selectors.EVENT_READ, lambda m: self._xs_io(conn, m))
        else:
            self._loop.register(sock, selectors.EVENT_READ, lambda _m: self._hc_readable(conn))
        log.getChild(f"dom{domid}").debug(
            "%s connection %d", "xenstore" if xenstore else "hypercall", conn.id
        )
        return conn

    def _drop(self, conn_id: int) -> None:
        """Close a connection and release what it owns, as Linux does on close()."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        log.getChild(f"dom{conn.domid}").debug("connection %d closed", conn.id)
        dom = self._domains.get(conn.domid)
        if dom is not None:
            dom.conns.discard(conn.id)
        if conn.xenstore:
            self.xs.disconnect(conn.id)
        for key in list(conn.shares):
            self._release_grant(key)
        conn.mappings.clear()
        for key in list(conn.ports):
            self._release_port(key)
        self._loop.unregister(conn.sock)
        conn.sock.close()

    # --- xenstore --------------------------------------------------------------------------

    def _xs_io(self, conn: _Conn, mask: int) -> None:
        # a connection dropped earlier in the batch (destroy_domain) is not called: Loop
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and conn.id in self._conns:
            self._xs_readable(conn)

    def _xs_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn.id)
            return
        conn.inbuf += data
        while len(conn.inbuf) >= HEADER_SIZE and conn.id in self._conns:
            try:
                header = XsHeader.from_bytes(conn.inbuf)
            except MalformedMessage as exc:
                log.warning("dom%d: unparseable xenstore message, dropping: %s", conn.domid, exc)
                self._drop(conn.id)
                return
            end = HEADER_SIZE + header.length
            if len(conn.inbuf) < end:
                break
            packet = XsPacket.from_bytes(memoryview(conn.inbuf)[:end])
            del conn.inbuf[:end]
            try:
                deliveries = self.xs.handle(conn.id, packet)
            except Exception:  # a bug: it must not end every domain's hypervisor
                self.internal_errors += 1
                log.exception("dom%d: %s failed", conn.domid, packet.type.name)
                deliveries = [(conn.id, XsPacket.error(packet.req_id, packet.tx_id, "EIO"))]
            self._deliver(deliveries)

    def _deliver(self, deliveries: list[Delivery]) -> None:
        touched: dict[int, _Conn] = {}
        for conn_id, packet in deliveries:
            conn = self._conns.get(conn_id)
            if conn is not None:
                conn.outbuf += packet.to_bytes()
                touched[conn_id] = conn
        for conn in touched.values():
            self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(conn.id)
            return
        if len(conn.outbuf) > OUTBUF_LIMIT:
            log.warning("dom%d: xenstore client not reading, dropping it", conn.domid)
            self._drop(conn.id)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self._loop.modify(conn.sock, want)  # a no-op when unchanged

    # --- hypercalls --------------------------------------------------------------------------

    def _hc_readable(self, conn: _Conn) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(conn.sock, HC_MSG_MAX, SCM_MAX_FD)
        except BlockingIOError:
            return
        except OSError:
            data, fds, flags = b"", [], 0
        close_fds(fds)  # a request never carries descriptors
        if not data:
            self._drop(conn.id)
            return
        send: list[int] = []
        after: list[int] = []
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise _Fail("EINVAL", "request too long")
            request = HcRequest.from_bytes(data)
            reply, send, after = self._handlers[request.op](conn, request)
        except _Fail as fail:
            reply = HcReply.failure(fail.errno_name, str(fail))
        except MalformedMessage as exc:
            reply = HcReply.failure("EINVAL", str(exc))
        except OSError as exc:
            log.warning("dom%d: hypercall failed: %s", conn.domid, exc)
            reply = HcReply.failure(errno.errorcode.get(exc.errno or 0, "EIO"), str(exc))
        except Exception:  # a bug: it must not end every domain's hypervisor
            self.internal_errors += 1
            log.exception("dom%d: hypercall failed", conn.domid)
            reply = HcReply.failure("EIO", "internal error")
        try:
            socket.send_fds(conn.sock, [reply.to_bytes()], send)
        except OSError as exc:  # includes a full buffer: one request at a time, remember
            log.warning("dom%d: hypercall reply failed (%s), dropping", conn.domid, exc)
            self._drop(conn.id)
        finally:
            close_fds(after)

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
                raise _Fail("ENOSPC", "the hypervisor holds too many descriptors")
        dom.fds += count

    def _unhold_fds(self, domid: int, count: int) -> None:
        if (dom := self._domains.get(domid)) is not None:
            dom.fds -= count

    def _require_dom0(self, conn: _Conn, request: HcRequest) -> None:
        if conn.domid != 0:
            raise _Fail("EPERM", f"{request.op} is for domain 0 only")

    def _domain_arg(self, request: HcRequest, name: str = "domid") -> int:
        domid = request.int_arg(name)
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise _Fail("EINVAL", f"bad domain id {domid}")
        return domid

    # grants

    def _gnt_share(self, conn: _Conn, request: HcRequest) -> _Handled:
        grantee = self._domain_arg(request)
        count = request.int_arg("count")
        writable = request.bool_arg("writable", default=True)
        dom = self._domains[conn.domid]
        if not 1 <= count <= SCM_MAX_FD:
            raise _Fail("EINVAL", f"cannot share {count} pages at once")
        if sum(1 for g in self._grants.values() if g.granter == dom.domid) + count > (
            MAX_GRANTS_PER_DOMAIN
        ):
            raise _Fail("ENOSPC", "grant table full")
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
            self._grants[(dom.domid, ref)] = _Grant(dom.domid, ref, grantee, writable, fd, conn.id)
            conn.shares.add((dom.domid, ref))
        return HcReply.success(refs=refs), fds, []

    def _gnt_unshare(self, conn: _Conn, request: HcRequest) -> _Handled:
        keys = [(conn.domid, ref) for ref in request.int_list_arg("refs")]
        if len(set(keys)) != len(keys) or not all(k in conn.shares for k in keys):
            raise _Fail("EINVAL", "not a grant of this connection, or named twice")
        for key in keys:
            self._release_grant(key)
        return HcReply.success(), [], []

    def _release_grant(self, key: tuple[int, int]) -> None:
        grant = self._grants.pop(key)
        if grant.conn in self._conns:
            self._conns[grant.conn].shares.discard(key)
        os.close(grant.fd)  # a live mapping keeps its own descriptor: it stays valid
        self._unhold_fds(grant.granter, 1)

    def _gnt_map(self, conn: _Conn, request: HcRequest) -> _Handled:
        granter = self._domain_arg(request)
        refs = request.int_list_arg("refs")
        writable = request.bool_arg("writable", default=True)
        if not 1 <= len(refs) <= SCM_MAX_FD:
            raise _Fail("EINVAL", f"cannot map {len(refs)} pages at once")
        grants = [self._grants.get((granter, ref)) for ref in refs]
        for ref, grant in zip(refs, grants, strict=True):
            if grant is None or grant.grantee != conn.domid or (writable and not grant.writable):
                raise _Fail("EINVAL", f"ref {ref} of dom{granter} is not granted to us")
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
        conn.mappings[handle] = _Mapping(conn.domid, granter, refs)
        return HcReply.success(handle=handle), send, after

    def _gnt_unmap(self, conn: _Conn, request: HcRequest) -> _Handled:
        if conn.mappings.pop(request.int_arg("handle"), None) is None:
            raise _Fail("EINVAL", "no such mapping handle")
        return HcReply.success(), [], []

    # event channels

    def _free_port(self, domid: int) -> int:
        used = {port for (d, port) in self._ports if d == domid}
        if len(used) >= MAX_PORTS_PER_DOMAIN:
            raise _Fail("ENOSPC", "no free event channel port")
        return next(p for p in itertools.count(1) if p not in used)  # port 0 is reserved

    def _evtchn_alloc_unbound(self, conn: _Conn, request: HcRequest) -> _Handled:
        remote = self._domain_arg(request, "remote_domid")
        port = self._free_port(conn.domid)
        self._hold_fds(conn.domid, 2)  # our copy of the guest's end, and the binder's end
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            self._unhold_fds(conn.domid, 2)
            raise
        self._ports[(conn.domid, port)] = _Port(conn.domid, port, remote, conn.id, mine, theirs)
        conn.ports.add((conn.domid, port))
        return HcReply.success(port=port), [mine.fileno()], []

    def _evtchn_bind_interdomain(self, conn: _Conn, request: HcRequest) -> _Handled:
        remote = self._domain_arg(request, "remote_domid")
        remote_port = request.int_arg("remote_port")
        other = self._ports.get((remote, remote_port))
        if other is None or other.waiting is None or other.remote_domid != conn.domid:
            raise _Fail("EINVAL", f"port {remote_port} of dom{remote} is not unbound for us")
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
        self._ports[(conn.domid, port)] = _Port(
            conn.domid, port, remote, conn.id, end, None, (remote, remote_port)
        )
        conn.ports.add((conn.domid, port))
        # Xen's evtchn_bind_interdomain marks the new port pending: mirror that event.
        with contextlib.suppress(OSError):
            other.end.send(b"\x01", socket.MSG_DONTWAIT)
        return HcReply.success(port=port), [end.fileno()], []

    def _evtchn_unbind(self, conn: _Conn, request: HcRequest) -> _Handled:
        key = (conn.domid, request.int_arg("port"))
        if key not in conn.ports:
            raise _Fail("EINVAL", "not a port of this connection")
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

    # information and toolstack

    def _stats(self, conn: _Conn, request: HcRequest) -> _Handled:
        domid = request.args.get("domid")
        if domid is not None:
            domid = self._domain_arg(request)

        def mine(d: int) -> bool:
            return domid is None or d == domid

        conns = [c for c in self._conns.values() if mine(c.domid)]
        return (
            HcReply.success(
                grants=sum(1 for g in self._grants.values() if mine(g.granter)),
                mappings=sum(len(c.mappings) for c in conns),
                mapped_pages=sum(len(m.refs) for c in conns for m in c.mappings.values()),
                ports=sum(1 for p in self._ports.values() if mine(p.domid)),
                connections=len(conns),
                domains=sum(1 for d in self._domains if mine(d)),
            ),
            [],
            [],
        )

    def _create_domain(self, conn: _Conn, request: HcRequest) -> _Handled:
        self._require_dom0(conn, request)
        name = request.str_arg("name")
        if not name or len(name) > 64 or not name.isprintable() or "/" in name:
            raise _Fail("EINVAL", f"bad domain name {name!r}")
        if any(d.name == name for d in self._domains.values()):
            raise _Fail("EEXIST", f"a domain is already called {name!r}")
        if self._next_domid >= DOMID_FIRST_RESERVED:
            raise _Fail("ENOSPC", "out of domain ids")
        domid = self._next_domid
        self._next_domid += 1
        self._domains[domid] = _Domain(domid, name)
        log.info("created dom%d (%s)", domid, name)
        self._deliver(self.xs.introduce_domain(domid, name))
        return HcReply.success(domid=domid), [], []

    def _connect_domain(self, conn: _Conn, request: HcRequest) -> _Handled:
        self._require_dom0(conn, request)
        domid = self._domain_arg(request)
        if domid not in self._domains:
            raise _Fail("ESRCH", f"no domain {domid}")
        xs_ours, xs_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        hc_ours, hc_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._add_conn(xs_ours, domid, xenstore=True)
        self._add_conn(hc_ours, domid, xenstore=False)
        fds = [xs_theirs.detach(), hc_theirs.detach()]
        return HcReply.success(), fds, fds

    def _destroy_domain(self, conn: _Conn, request: HcRequest) -> _Handled:
        self._require_dom0(conn, request)
        domid = self._domain_arg(request)
        if domid == 0:
            raise _Fail("EINVAL", "domain 0 cannot be destroyed")
        dom = self._domains.get(domid)
        if dom is None:
            raise _Fail("ESRCH", f"no domain {domid}")
        for conn_id in list(dom.conns):
            self._drop(conn_id)
        del self._domains[domid]
        log.info("destroyed dom%d (%s)", domid, dom.name)
        self._deliver(self.xs.release_domain(domid))
        return HcReply.success(), [], []

    def _list_domains(self, conn: _Conn, request: HcRequest) -> _Handled:
        self._require_dom0(conn, request)
        doms = [{"domid": d.domid, "name": d.name} for d in self._domains.values()]
        return HcReply.success(domains=doms), [], []


def _raise_fd_limit() -> None:
    """Like xenstored's unit file (LimitNOFILE): room for many guests' pages and ports."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> int:
    """``simxend --dir RUN``: serve until SIGTERM/SIGINT; 0 on a clean stop."""
    parser = argparse.ArgumentParser(prog="simxend", description="simulated Xen hypervisor")
    parser.add_argument("--dir", required=True, help="run directory (created, mode 0700)")
    parser.add_argument("--debug", action="store_true", help="log every connection")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        stream=sys.stderr,
        format="simxend %(levelname)s %(name)s: %(message)s",
    )
    _raise_fd_limit()
    daemon = SimXen(args.dir)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        daemon.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon.start()
        print("simxend: ready", file=sys.stderr, flush=True)
        daemon.run()
    except OSError as exc:
        log.error("cannot serve %s: %s", args.dir, exc)
        return 1
    finally:
        daemon.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
