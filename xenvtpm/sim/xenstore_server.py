"""An in-memory xenstored: the node tree, permissions, watches, transactions, quotas.

It does no I/O: ``handle(conn, packet)`` returns the packets to deliver (the reply to
the caller, then any watch events, each addressed to a connection id), so it unit-tests
without sockets and the daemon stays a thin event loop. Semantics follow C xenstored
(tools/xenstore/xenstored_core.c, _watch.c, _transaction.c); see docs/simulated-xen.md.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from xenvtpm.errors import MalformedMessage
from xenvtpm.sim.xenstore_wire import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XsPacket,
    XsType,
    decode_write,
    join_strings,
    one_string,
    parse_decimal,
    split_strings,
)
from xenvtpm.xen.interface import Access, Perm

log = logging.getLogger(__name__)

Delivery = tuple[int, XsPacket]  # (connection id, packet to send it)

NODE_QUOTA = 2048  # nodes owned per unprivileged domain (xenstored -N default)
WATCH_QUOTA = 128  # watches per connection (xenstored -W default)
TRANSACTION_QUOTA = 16  # open transactions per connection
TRANSACTION_NODE_QUOTA = 1024  # nodes one transaction may look at (xenstored -q nodes)

DOMID_MAX = 0x7FEF  # the last ordinary domain id; 0x7FF0 up are reserved (xen.h)

RELEASE_DOMAIN = "@releaseDomain"
INTRODUCE_DOMAIN = "@introduceDomain"
_SPECIAL_PERMS = (Perm(0, Access.NONE),)  # only dom0 sees special watch events
_VALID_PATH = re.compile(r"[A-Za-z0-9/_@\-]*")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def access_of(domid: int, perms: Sequence[Perm]) -> Access:
    """What ``domid`` may do with a node. Spec: xenstored_core.c, perm_for_conn."""
    if domid == 0 or perms[0].domid == domid:
        return Access.BOTH
    for p in perms[1:]:
        if p.domid == domid:
            return p.access
    return perms[0].access


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def is_below(path: str, top: str) -> bool:
    """``path`` is ``top`` or a descendant of it."""
    return path == top or top == "/" or path.startswith(top + "/")


@dataclass(frozen=True)
class Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...] = ()


@dataclass
class _View:
    """A whole tree. A transaction works on a copy that records what it looked at.

    Nodes are immutable and every change puts a new one in place, so "changed since the
    transaction saw it" is an identity test against ``seen``: the node found at the first
    lookup of each path (None if it was missing). That covers reads, listings (a child
    added or removed replaces the parent), permission checks, and the nodes a write
    creates or a removal takes away. Spec: xenstored_transaction.c (per-node generation
    counts, compared when the transaction ends).
    """

    nodes: dict[str, Node]
    owned: Counter[int]
    seen: dict[str, Node | None] | None = None  # a transaction's copy only
    written: set[str] = field(default_factory=set)  # paths a transaction's copy changed

    def transaction_copy(self) -> _View:
        return _View(dict(self.nodes), Counter(self.owned), {})

    def get(self, path: str) -> Node | None:
        node = self.nodes.get(path)
        if self.seen is not None:
            self.seen.setdefault(path, node)
        return node

    def at(self, path: str) -> Node:
        node = self.get(path)
        assert node is not None, path
        return node

    def put(self, path: str, node: Node) -> None:
        self.get(path)  # a change is a look first: what it replaced must not change
        self.nodes[path] = node
        if self.seen is not None:
            self.written.add(path)

    def pop(self, path: str) -> Node:
        node = self.at(path)
        del self.nodes[path]
        if self.seen is not None:
            self.written.add(path)
        return node


@dataclass(frozen=True)
class _Change:
    """One modification, for firing watches (now, or when its transaction commits)."""

    path: str
    perms: tuple[Perm, ...]  # perms deciding who may see it (old ones for a removal)
    removal: bool = False


@dataclass(frozen=True)
class _Watch:
    path: str  # absolute, or "@special"
    token: str
    relative_to: str | None  # "/local/domain/<id>/" when registered relative


@dataclass
class _Transaction:
    view: _View  # a copy with ``seen``
    changes: list[_Change] = field(default_factory=list)


@dataclass
class _Conn:
    domid: int
    watches: dict[tuple[str, str], _Watch] = field(default_factory=dict)  # (abs path, token)
    transactions: dict[int, _Transaction] = field(default_factory=dict)


class _Fail(Exception):
    """Internal: abort a request with an errno name (becomes an XS_ERROR reply)."""

    def __init__(self, errno_name: str) -> None:
        super().__init__(errno_name)
        self.errno_name = errno_name


class XenStoreServer:
    """The store plus per-connection state. Not thread-safe: one event loop drives it."""

    def __init__(
        self,
        *,
        node_quota: int = NODE_QUOTA,
        watch_quota: int = WATCH_QUOTA,
        transaction_quota: int = TRANSACTION_QUOTA,
        transaction_node_quota: int = TRANSACTION_NODE_QUOTA,
    ) -> None:
        self.node_quota = node_quota
        self.watch_quota = watch_quota
        self.transaction_quota = transaction_quota
        self.transaction_node_quota = transaction_node_quota
        root = (Perm(0, Access.NONE),)
        self._view = _View({"/": Node(b"", root)}, Counter())
        self._conns: dict[int, _Conn] = {}
        self._next_tx = 1
        self._domains: set[int] = {0}
        for path in ("/local/domain/0", "/tool/xenstored"):
            self._apply(self._view, 0, path, b"", create_only=True)
        self._apply(self._view, 0, "/local/domain/0/name", b"Domain-0")
        self._handlers: dict[XsType, Callable[[_Conn, XsPacket], tuple[bytes, list[_Change]]]] = {
            XsType.XS_READ: self._do_read,
            XsType.XS_WRITE: self._do_write,
            XsType.XS_MKDIR: self._do_mkdir,
            XsType.XS_RM: self._do_rm,
            XsType.XS_DIRECTORY: self._do_directory,
            XsType.XS_GET_PERMS: self._do_get_perms,
            XsType.XS_SET_PERMS: self._do_set_perms,
            XsType.XS_GET_DOMAIN_PATH: self._do_get_domain_path,
            XsType.XS_IS_DOMAIN_INTRODUCED: self._do_is_introduced,
        }

    # --- connections and domains (called by the daemon) --------------------------------

    def connect(self, conn: int, domid: int) -> None:
        self._conns[conn] = _Conn(domid)

    def disconnect(self, conn: int) -> None:
        """Forget a closed connection: its watches and open transactions vanish."""
        self._conns.pop(conn, None)

    def connection_count(self, domid: int | None = None) -> int:
        return sum(1 for c in self._conns.values() if domid is None or c.domid == domid)

    def introduce_domain(self, domid: int, name: str) -> list[Delivery]:
        """Create ``/local/domain/<id>`` owned by the domain; fire ``@introduceDomain``."""
        self._domains.add(domid)
        view = self._view
        changes = [self._apply(view, 0, domain_path(domid), b"", create_only=True)]
        view.put(
            domain_path(domid),
            replace(view.at(domain_path(domid)), perms=(Perm(domid, Access.NONE),)),
        )
        self._recount(view)
        changes.append(self._apply(view, 0, f"{domain_path(domid)}/name", name.encode()))
        return self._fire(changes) + self._fire_special(INTRODUCE_DOMAIN)

    def release_domain(self, domid: int) -> list[Delivery]:
        """Remove ``/local/domain/<id>`` and fire ``@releaseDomain`` (domain destroyed)."""
        self._domains.discard(domid)
        out: list[Delivery] = []
        if domain_path(domid) in self._view.nodes:
            out = self._fire([self._remove(self._view, domain_path(domid))])
        return out + self._fire_special(RELEASE_DOMAIN)

    # --- direct access for the daemon and tests (as domain 0, no watches fired) --------

    def read_node(self, path: str) -> Node | None:
        return self._view.nodes.get(path)

    def owned_nodes(self, domid: int) -> int:
        return self._view.owned[domid]

    # --- requests ----------------------------------------------------------------------

    def handle(self, conn_id: int, packet: XsPacket) -> list[Delivery]:
        """Serve one request; the reply (first) and any watch events to deliver."""
        conn = self._conns[conn_id]
        events: list[Delivery] = []
        try:
            payload, changes, events = self._dispatch(conn_id, conn, packet)
            reply = XsPacket(packet.type, packet.req_id, packet.tx_id, payload)
            if changes and packet.tx_id == 0:
                events = events + self._fire(changes)
        except _Fail as fail:
            reply = XsPacket.error(packet.req_id, packet.tx_id, fail.errno_name)
        except MalformedMessage as exc:
            log.debug("dom%d: bad %s payload: %s", conn.domid, packet.type.name, exc)
            reply = XsPacket.error(packet.req_id, packet.tx_id, "EINVAL")
        return [(conn_id, reply), *events]

    def _dispatch(
        self, conn_id: int, conn: _Conn, pkt: XsPacket
    ) -> tuple[bytes, list[_Change], list[Delivery]]:
        if pkt.type is XsType.XS_WATCH:
            return self._do_watch(conn_id, conn, pkt)
        if pkt.type is XsType.XS_UNWATCH:
            path, token = self._path_token(conn, pkt)
            if conn.watches.pop((path, token), None) is None:
                raise _Fail("ENOENT")
            return b"OK\x00", [], []
        if pkt.type is XsType.XS_RESET_WATCHES:
            conn.watches.clear()
            return b"OK\x00", [], []
        if pkt.type is XsType.XS_TRANSACTION_START:
            return self._do_transaction_start(conn), [], []
        if pkt.type is XsType.XS_TRANSACTION_END:
            return self._do_transaction_end(conn, pkt)
        handler = self._handlers.get(pkt.type)
        if handler is None:
            raise _Fail("EINVAL")  # XS_INTRODUCE & co: the toolstack goes through privcmd
        payload, changes = handler(conn, pkt)
        if pkt.tx_id and changes:
            conn.transactions[pkt.tx_id].changes.extend(changes)
            changes = []
        return payload, changes, []

    # --- path and permission helpers ---------------------------------------------------

    def _abs(self, conn: _Conn, path: str) -> str:
        """Canonical absolute path; relative ones are under the caller's domain path."""
        if not path.startswith("/"):
            if not path or len(path) > XENSTORE_REL_PATH_MAX:
                raise _Fail("EINVAL")
            path = f"{domain_path(conn.domid)}/{path}"
        if (
            len(path) > XENSTORE_ABS_PATH_MAX
            or "//" in path
            or (path.endswith("/") and path != "/")
            or "@" in path
            or not _VALID_PATH.fullmatch(path)
        ):
            raise _Fail("EINVAL")
        return path

    def _view_for(self, conn: _Conn, tx_id: int) -> _View:
        if tx_id == 0:
            return self._view
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise _Fail("ENOENT")
        assert tx.view.seen is not None
        if conn.domid != 0 and len(tx.view.seen) >= self.transaction_node_quota:
            raise _Fail("ENOSPC")  # xenstored_transaction.c, access_node: quota_trans_nodes
        return tx.view

    def _nearest(self, view: _View, path: str) -> tuple[str, Node]:
        """The nearest existing ancestor-or-self (only it counts as looked at)."""
        while path not in view.nodes:
            path = parent_of(path)
        return path, view.at(path)

    def _readable(self, conn: _Conn, view: _View, path: str) -> Node:
        """The node if the caller may read it; ENOENT/EACCES like xenstored's get_node."""
        node = view.get(path)
        if node is None:
            _, ancestor = self._nearest(view, path)
            raise _Fail("ENOENT" if access_of(conn.domid, ancestor.perms).can_read else "EACCES")
        if not access_of(conn.domid, node.perms).can_read:
            raise _Fail("EACCES")
        return node

    def _check_writable(self, conn: _Conn, view: _View, path: str) -> None:
        _, node = self._nearest(view, path)
        if not access_of(conn.domid, node.perms).can_write:
            raise _Fail("EACCES")

    def _one_path(self, conn: _Conn, pkt: XsPacket) -> str:
        return self._abs(conn, one_string(pkt.payload))

    # --- tree mutation -----------------------------------------------------------------

    def _apply(
        self, view: _View, domid: int, path: str, value: bytes, *, create_only: bool = False
    ) -> _Change:
        """Write (or with ``create_only``, mkdir) ``path``, creating missing ancestors.

        A created node inherits its parent's permissions, with an unprivileged creator
        as owner (xenstored_core.c, create_node). Quota: ENOSPC past ``node_quota``.
        """
        missing: list[str] = []
        probe = path
        while probe not in view.nodes:
            missing.append(probe)
            probe = parent_of(probe)
        if domid != 0 and missing and view.owned[domid] + len(missing) > self.node_quota:
            raise _Fail("ENOSPC")  # xenstored_core.c, create_node
        for new in reversed(missing):
            parent = view.at(parent_of(new))
            perms = parent.perms
            if domid != 0:
                perms = (Perm(domid, perms[0].access), *perms[1:])
            view.put(new, Node(b"", perms))
            view.owned[perms[0].domid] += 1
            name = new.rsplit("/", 1)[1]
            view.put(parent_of(new), replace(parent, children=(*parent.children, name)))
        node = view.at(path)
        if not create_only:
            view.put(path, replace(node, value=value))
        return _Change(path, node.perms)

    def _remove(self, view: _View, path: str) -> _Change:
        node = view.at(path)
        stack = [path]
        while stack:
            victim = stack.pop()
            gone = view.pop(victim)
            view.owned[gone.perms[0].domid] -= 1
            stack.extend(f"{victim.rstrip('/')}/{c}" for c in gone.children)
        parent = view.at(parent_of(path))
        name = path.rsplit("/", 1)[1]
        view.put(
            parent_of(path),
            replace(parent, children=tuple(c for c in parent.children if c != name)),
        )
        return _Change(path, node.perms, removal=True)

    @staticmethod
    def _recount(view: _View) -> None:
        view.owned = Counter(n.perms[0].domid for n in view.nodes.values())

    # --- operations --------------------------------------------------------------------

    def _do_read(self, conn: _Conn, pkt: XsPacket) -> tuple[bytes, list[_Change]]:
        view = self._view_for(conn, pkt.tx_id)
        return self._readable(conn, view, self._one_path(conn, pkt)).value, []

    def _do_write(self, conn: _Conn, pkt: XsPacket) -> tuple[bytes, list[_Change]]:
        raw_path, value = decode_write(pkt.payload)
        path = self._abs(conn, raw_path)
        if path == "/":
            raise _Fail("EINVAL")
        view = self._view_for(conn, pkt.tx_id)
        self._check_writable(conn, view, path)
        return b"OK\x00", [self._apply(view, conn.domid, path, value)]

    def _do_mkdir(self, conn: _Conn, pkt: XsPacket) -> tuple[bytes, list[_Change]]:
        path = self._one_path(conn, pkt)
        view = self._view_for(conn, pkt.tx_id)
        self._check_writable(conn, view, path)
        if view.get(path) is not None:
            return b"OK\x00", []  # xenstored_core.c, do_mkdir: an existing node is fine
        return b"OK\x00", [self._apply(view, conn.domid, path, b"", create_only=True)]

    def _do_rm(self, conn: _Conn, pkt: XsPacket) -> tuple[bytes, list[_Change]]:
        path = self._one_path(conn, pkt)
        if path == "/":
            raise _Fail("EINVAL")
        view = self._view_for(conn, pkt.tx_id)
        if view.get(path) is None:
            # xenstored_core.c, do_rm: a missing node whose parent exists is already gone.
            self._check_writable(conn, view, path)
            if view.get(parent_of(path)) is not None:
                return b"OK\x00", []
            raise _Fail("ENOENT")
        self._check_writable(conn, view, path)
        return b"OK\x00", [self._remove(view, path)]

    def _do_directory(self, conn: _Conn, pkt: XsPacket) -> tuple[bytes, list[_Change]]:
        view = self._view_for(conn, pkt.tx_id)
        payload = join_strings(*self._readable(conn, view, self._one_path(conn, pkt)).children)
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise _Fail("E2BIG")
        return payload, []

    def _do_get_perms(self, conn: _Conn, pkt: XsPacket) -> tuple[bytes, list[_Change]]:
        view = self._view_for(conn, pkt.tx_id)
        node = self._readable(conn, view, self._one_path(conn, pkt))
        return join_strings(*(p.to_wire() for p in node.perms)), []

    def _do_set_perms(self, conn: _Conn, pkt: XsPacket) -> tuple[bytes, list[_Change]]:
        parts = split_strings(pkt.payload)
        if len(parts) < 2:
            raise _Fail("EINVAL")
        path = self._abs(conn, parts[0])
        try:
            perms = tuple(Perm.from_wire(p) for p in parts[1:])
        except ValueError as exc:  # a letter outside "nrwb"
            raise _Fail("EINVAL") from exc
        view = self._view_for(conn, pkt.tx_id)
        node = view.get(path)
        if node is None:
            raise _Fail("ENOENT")
        if conn.domid != 0:
            # xenstored_core.c, do_set_perms: only the owner, and it may not give it away.
            if node.perms[0].domid != conn.domid:
                raise _Fail("EACCES")
            if perms[0].domid != conn.domid:
                raise _Fail("EPERM")
        view.put(path, replace(node, perms=perms))
        view.owned[node.perms[0].domid] -= 1
        view.owned[perms[0].domid] += 1
        return b"OK\x00", [_Change(path, perms)]

    def _do_get_domain_path(self, conn: _Conn, pkt: XsPacket) -> tuple[bytes, list[_Change]]:
        return join_strings(domain_path(self._domid_arg(pkt))), []

    def _do_is_introduced(self, conn: _Conn, pkt: XsPacket) -> tuple[bytes, list[_Change]]:
        return (b"T\x00" if self._domid_arg(pkt) in self._domains else b"F\x00"), []

    @staticmethod
    def _domid_arg(pkt: XsPacket) -> int:
        """A domain id, strictly decimal (MalformedMessage answers EINVAL)."""
        return parse_decimal(one_string(pkt.payload), DOMID_MAX)

    # --- watches -----------------------------------------------------------------------

    def _path_token(self, conn: _Conn, pkt: XsPacket) -> tuple[str, str]:
        parts = split_strings(pkt.payload)
        if len(parts) != 2:
            raise _Fail("EINVAL")
        path, token = parts
        if path.startswith("@"):
            if len(path) > XENSTORE_REL_PATH_MAX or not _VALID_PATH.fullmatch(path):
                raise _Fail("EINVAL")
            return path, token
        return self._abs(conn, path), token

    def _do_watch(
        self, conn_id: int, conn: _Conn, pkt: XsPacket
    ) -> tuple[bytes, list[_Change], list[Delivery]]:
        path, token = self._path_token(conn, pkt)
        raw = split_strings(pkt.payload)[0]
        if (path, token) in conn.watches:
            raise _Fail("EEXIST")
        if conn.domid != 0 and len(conn.watches) >= self.watch_quota:
            raise _Fail("E2BIG")  # xenstored_watch.c, do_watch
        relative = None if raw.startswith(("/", "@")) else domain_path(conn.domid) + "/"
        conn.watches[(path, token)] = _Watch(path, token, relative)
        # Fires once at once, even for a missing node (measured on Xen 4.17).
        return b"OK\x00", [], [(conn_id, XsPacket.watch_event(raw, token))]

    def _fire(self, changes: Sequence[_Change]) -> list[Delivery]:
        out: list[Delivery] = []
        for change in changes:
            for conn_id, conn in self._conns.items():
                if not access_of(conn.domid, change.perms).can_read:
                    continue
                for watch in conn.watches.values():
                    if watch.path.startswith("@"):
                        continue
                    if is_below(change.path, watch.path):
                        hit = change.path
                    elif change.removal and is_below(watch.path, change.path):
                        hit = watch.path  # a watched node inside a removed subtree
                    else:
                        continue
                    if watch.relative_to and hit.startswith(watch.relative_to):
                        hit = hit[len(watch.relative_to) :]
                    if len(hit.encode()) + len(watch.token.encode()) + 2 > XENSTORE_PAYLOAD_MAX:
                        # xenstored_watch.c: an over-long event is dropped, so that a
                        # watcher's long token cannot fail the writer's request.
                        log.debug("dom%d: watch event for %s too long, dropped", conn.domid, hit)
                        continue
                    out.append((conn_id, XsPacket.watch_event(hit, watch.token)))
        return out

    def _fire_special(self, name: str) -> list[Delivery]:
        return [
            (conn_id, XsPacket.watch_event(name, watch.token))
            for conn_id, conn in self._conns.items()
            if access_of(conn.domid, _SPECIAL_PERMS).can_read
            for watch in conn.watches.values()
            if watch.path == name
        ]

    # --- transactions ------------------------------------------------------------------

    def _do_transaction_start(self, conn: _Conn) -> bytes:
        if conn.domid != 0 and len(conn.transactions) >= self.transaction_quota:
            raise _Fail("ENOSPC")  # xenstored_transaction.c, do_transaction_start
        tx_id = self._next_tx
        self._next_tx = self._next_tx % 0xFFFFFFFF + 1  # never 0: that means "none"
        conn.transactions[tx_id] = _Transaction(self._view.transaction_copy())
        return join_strings(str(tx_id))

    def _do_transaction_end(
        self, conn: _Conn, pkt: XsPacket
    ) -> tuple[bytes, list[_Change], list[Delivery]]:
        arg = one_string(pkt.payload)
        if arg not in ("T", "F"):
            raise _Fail("EINVAL")
        tx = conn.transactions.pop(pkt.tx_id, None)
        if tx is None:
            raise _Fail("ENOENT")
        if arg == "F":
            return b"OK\x00", [], []
        self._commit(conn, tx.view)
        return b"OK\x00", [], self._fire(tx.changes)

    def _commit(self, conn: _Conn, tx: _View) -> None:
        """Apply a transaction's changes, or EAGAIN if a node it looked at changed since.

        Spec: xenstored_transaction.c, check_transaction (a node's generation differs:
        EAGAIN), then its changes are copied into the store. Quota counts are checked
        again: other commits may have used up the domain's quota meanwhile.
        """
        assert tx.seen is not None
        store = self._view
        if any(store.nodes.get(path) is not node for path, node in tx.seen.items()):
            raise _Fail("EAGAIN")  # someone else changed what we saw: caller retries
        delta: Counter[int] = Counter()
        for path in tx.written:
            old, new = store.nodes.get(path), tx.nodes.get(path)
            if old is not None:
                delta[old.perms[0].domid] -= 1
            if new is not None:
                delta[new.perms[0].domid] += 1
        mine = conn.domid
        if mine != 0 and delta[mine] > 0 and store.owned[mine] + delta[mine] > self.node_quota:
            raise _Fail("ENOSPC")
        for path in tx.written:
            new = tx.nodes.get(path)
            if new is None:
                store.nodes.pop(path, None)
            else:
                store.nodes[path] = new
        store.owned.update(delta)
