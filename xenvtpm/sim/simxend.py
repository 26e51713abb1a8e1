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
import itertools
import logging
import os
import resource
import selectors
import socket
import sys
from collections.abc import Callable

from xenvtpm.daemon import default_log_level, serve
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
from xenvtpm.sim.resources import (
    DOMID_FIRST_RESERVED,
    FD_RESERVE,
    Conn,
    Domain,
    DomainResources,
    Fail,
    Grant,
    Handled,
    Port,
)
from xenvtpm.sim.xenstore_server import Delivery, XenStoreServer
from xenvtpm.sim.xenstore_wire import HEADER_SIZE, XsHeader, XsPacket

log = logging.getLogger("xenvtpm.sim.simxend")  # not __name__: that is "__main__" under -m

XENSTORED_SOCK = "xenstored.sock"
PRIVCMD_SOCK = "privcmd.sock"
READY_FILE = "ready"
OUTBUF_LIMIT = 1 << 20  # a xenstore client this far behind on reading is dropped
FD_LIMIT_WANTED = 65536  # main() raises the soft RLIMIT_NOFILE this far (within the hard one)


class SimXen(DomainResources):
    """The daemon's state and event loop; ``start()``, ``run()``, ``close()``.

    Given a ``loop`` (a daemon's, :func:`xenvtpm.daemon.serve`), it serves on it;
    else it makes its own, which :meth:`pump` and :meth:`run` turn.
    """

    def __init__(self, run_dir: str, loop: Loop | None = None) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.xs = XenStoreServer()
        self._loop = Loop() if loop is None else loop
        self._own_loop = loop is None
        self._conns: dict[int, Conn] = {}
        self._domains: dict[int, Domain] = {0: Domain(0, "Domain-0")}
        self._grants: dict[tuple[int, int], Grant] = {}
        self._ports: dict[tuple[int, int], Port] = {}
        self._ids = itertools.count(1)
        self._next_domid = 1
        self._listeners: list[socket.socket] = []
        self._started = False
        self.internal_errors = 0  # requests that raised what no handler foresaw: bugs
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_budget = (1 << 20 if soft == resource.RLIM_INFINITY else soft) - FD_RESERVE
        self._closed = False
        self._handlers: dict[HcOp, Callable[[Conn, HcRequest], Handled]] = {
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

    def _add_conn(self, sock: socket.socket, domid: int, *, xenstore: bool) -> Conn:
        sock.setblocking(False)
        conn = Conn(next(self._ids), domid, sock, xenstore)
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

    def _xs_io(self, conn: Conn, mask: int) -> None:
        # a connection dropped earlier in the batch (destroy_domain) is not called: Loop
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and conn.id in self._conns:
            self._xs_readable(conn)

    def _xs_readable(self, conn: Conn) -> None:
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
        touched: dict[int, Conn] = {}
        for conn_id, packet in deliveries:
            conn = self._conns.get(conn_id)
            if conn is not None:
                conn.outbuf += packet.to_bytes()
                touched[conn_id] = conn
        for conn in touched.values():
            self._flush(conn)

    def _flush(self, conn: Conn) -> None:
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

    def _hc_readable(self, conn: Conn) -> None:
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
                raise Fail("EINVAL", "request too long")
            request = HcRequest.from_bytes(data)
            reply, send, after = self._handlers[request.op](conn, request)
        except Fail as fail:
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

    # information and toolstack

    def _stats(self, conn: Conn, request: HcRequest) -> Handled:
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

    def _create_domain(self, conn: Conn, request: HcRequest) -> Handled:
        self._require_dom0(conn, request)
        name = request.str_arg("name")
        if not name or len(name) > 64 or not name.isprintable() or "/" in name:
            raise Fail("EINVAL", f"bad domain name {name!r}")
        if any(d.name == name for d in self._domains.values()):
            raise Fail("EEXIST", f"a domain is already called {name!r}")
        if self._next_domid >= DOMID_FIRST_RESERVED:
            raise Fail("ENOSPC", "out of domain ids")
        domid = self._next_domid
        self._next_domid += 1
        self._domains[domid] = Domain(domid, name)
        log.info("created dom%d (%s)", domid, name)
        self._deliver(self.xs.introduce_domain(domid, name))
        return HcReply.success(domid=domid), [], []

    def _connect_domain(self, conn: Conn, request: HcRequest) -> Handled:
        self._require_dom0(conn, request)
        domid = self._domain_arg(request)
        if domid not in self._domains:
            raise Fail("ESRCH", f"no domain {domid}")
        xs_ours, xs_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        hc_ours, hc_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._add_conn(xs_ours, domid, xenstore=True)
        self._add_conn(hc_ours, domid, xenstore=False)
        fds = [xs_theirs.detach(), hc_theirs.detach()]
        return HcReply.success(), fds, fds

    def _destroy_domain(self, conn: Conn, request: HcRequest) -> Handled:
        self._require_dom0(conn, request)
        domid = self._domain_arg(request)
        if domid == 0:
            raise Fail("EINVAL", "domain 0 cannot be destroyed")
        dom = self._domains.get(domid)
        if dom is None:
            raise Fail("ESRCH", f"no domain {domid}")
        for conn_id in list(dom.conns):
            self._drop(conn_id)
        del self._domains[domid]
        log.info("destroyed dom%d (%s)", domid, dom.name)
        self._deliver(self.xs.release_domain(domid))
        return HcReply.success(), [], []

    def _list_domains(self, conn: Conn, request: HcRequest) -> Handled:
        self._require_dom0(conn, request)
        doms = [{"domid": d.domid, "name": d.name} for d in self._domains.values()]
        return HcReply.success(domains=doms), [], []


def _raise_fd_limit() -> None:
    """Like xenstored's unit file (LimitNOFILE): room for many guests' pages and ports."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class _Announced:
    """The daemon as a process: once it serves, "simxend: ready" on stderr, the line its
    launchers wait for."""

    def __init__(self, daemon: SimXen) -> None:
        self.daemon = daemon

    def start(self) -> None:
        self.daemon.start()
        print("simxend: ready", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.daemon.close()


def main(argv: list[str] | None = None) -> int:
    """``simxend --dir RUN``: serve until SIGTERM/SIGINT; 0 on a clean stop.

    It runs as every daemon does (:func:`xenvtpm.daemon.serve`): ``XENVTPM_LOG_LEVEL``
    sets its level, unless ``--debug`` does."""
    parser = argparse.ArgumentParser(prog="simxend", description="simulated Xen hypervisor")
    parser.add_argument("--dir", required=True, help="run directory (created, mode 0700)")
    parser.add_argument("--debug", action="store_true", help="log every connection")
    args = parser.parse_args(argv)
    _raise_fd_limit()
    level = "DEBUG" if args.debug else default_log_level()
    return serve("simxend", level, lambda loop: _Announced(SimXen(args.dir, loop)))


if __name__ == "__main__":
    sys.exit(main())
