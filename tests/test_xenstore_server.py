"""The in-memory xenstored, driven packet by packet without sockets."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from xenvtpm.errors import XenStoreError
from xenvtpm.sim.xenstore_server import XenStoreServer
from xenvtpm.sim.xenstore_wire import (
    XsPacket,
    XsType,
    check_reply,
    encode_write,
    join_strings,
    split_strings,
)
from xenvtpm.xen.interface import Access, Perm

DOM0, G1, G2 = 100, 101, 102  # connection ids: dom0, domain 1, domain 2


class Session:
    """Sends requests as one connection; collects watch events for everyone."""

    def __init__(self, server: XenStoreServer) -> None:
        self.server = server
        self.events: dict[int, list[tuple[str, str]]] = {}
        self.req = 0

    def send(self, conn: int, type_: XsType, payload: bytes, tx: int = 0) -> XsPacket:
        self.req += 1
        out = self.server.handle(conn, XsPacket(type_, self.req, tx, payload))
        (first_conn, reply), rest = out[0], out[1:]
        assert first_conn == conn and reply.req_id == self.req and reply.tx_id == tx
        for target, pkt in rest:
            assert pkt.type is XsType.XS_WATCH_EVENT
            path, token = split_strings(pkt.payload)
            self.events.setdefault(target, []).append((path, token))
        return reply

    def ok(self, conn: int, type_: XsType, payload: bytes, tx: int = 0) -> bytes:
        return check_reply(self.send(conn, type_, payload, tx), type_.name)

    def err(self, conn: int, type_: XsType, payload: bytes, tx: int = 0) -> str:
        reply = self.send(conn, type_, payload, tx)
        assert reply.type is XsType.XS_ERROR, reply
        return reply.payload.rstrip(b"\x00").decode()

    def write(self, conn: int, path: str, value: bytes, tx: int = 0) -> None:
        self.ok(conn, XsType.XS_WRITE, encode_write(path, value), tx)

    def read(self, conn: int, path: str, tx: int = 0) -> bytes:
        return self.ok(conn, XsType.XS_READ, join_strings(path), tx)

    def take(self, conn: int) -> list[tuple[str, str]]:
        return self.events.pop(conn, [])


@pytest.fixture
def s() -> Session:
    server = XenStoreServer(node_quota=20, watch_quota=3, transaction_quota=2)
    server.connect(DOM0, 0)
    server.introduce_domain(1, "g1")
    server.introduce_domain(2, "g2")
    server.connect(G1, 1)
    server.connect(G2, 2)
    return Session(server)


def test_read_write_directory_rm(s: Session) -> None:
    s.write(DOM0, "/a/b/c", b"v")
    assert s.read(DOM0, "/a/b/c") == b"v"
    assert s.read(DOM0, "/a/b") == b""  # intermediate nodes were created empty
    assert split_strings(s.ok(DOM0, XsType.XS_DIRECTORY, join_strings("/a/b"))) == ["c"]
    s.ok(DOM0, XsType.XS_MKDIR, join_strings("/a/d"))
    assert split_strings(s.ok(DOM0, XsType.XS_DIRECTORY, join_strings("/a"))) == ["b", "d"]
    s.ok(DOM0, XsType.XS_RM, join_strings("/a/b"))
    assert s.err(DOM0, XsType.XS_READ, join_strings("/a/b/c")) == "ENOENT"
    s.ok(DOM0, XsType.XS_RM, join_strings("/a/b"))  # already gone, parent exists: OK
    assert s.err(DOM0, XsType.XS_RM, join_strings("/nope/x")) == "ENOENT"
    assert s.err(DOM0, XsType.XS_RM, join_strings("/")) == "EINVAL"


def test_invalid_paths(s: Session) -> None:
    for bad in ("//x", "/x/", "/x y", "", "/a@b"):
        assert s.err(DOM0, XsType.XS_READ, join_strings(bad)) == "EINVAL", bad
    assert s.err(DOM0, XsType.XS_READ, b"/no-nul") == "EINVAL"


def test_relative_paths_and_ownership(s: Session) -> None:
    s.write(G1, "data/x", b"1")
    assert s.read(DOM0, "/local/domain/1/data/x") == b"1"
    perms = split_strings(s.ok(DOM0, XsType.XS_GET_PERMS, join_strings("/local/domain/1/data/x")))
    assert perms == ["n1"]
    assert s.ok(G1, XsType.XS_GET_DOMAIN_PATH, join_strings("1")) == b"/local/domain/1\x00"


def test_guest_cannot_touch_other_domains(s: Session) -> None:
    assert s.err(G1, XsType.XS_WRITE, encode_write("/local/domain/2/x", b"v")) == "EACCES"
    assert s.err(G1, XsType.XS_WRITE, encode_write("/local/domain/0/x", b"v")) == "EACCES"
    assert s.err(G1, XsType.XS_READ, join_strings("/local/domain/2/name")) == "EACCES"
    assert s.err(G1, XsType.XS_READ, join_strings("/local/domain/2/missing")) == "EACCES"
    assert s.err(G1, XsType.XS_RM, join_strings("/local/domain/2")) == "EACCES"
    assert s.err(G1, XsType.XS_MKDIR, join_strings("/tool/x")) == "EACCES"
    assert s.err(G1, XsType.XS_READ, join_strings("missing")) == "ENOENT"


def test_permission_list_semantics(s: Session) -> None:
    s.write(DOM0, "/be/x", b"v")
    s.ok(DOM0, XsType.XS_SET_PERMS, join_strings("/be/x", "n0", "r1", "b2"))
    assert s.read(G1, "/be/x") == b"v"
    assert s.err(G1, XsType.XS_WRITE, encode_write("/be/x", b"w")) == "EACCES"
    s.write(G2, "/be/x", b"w")
    assert s.read(G2, "/be/x") == b"w"
    # The first entry's letter is everyone else's access.
    s.ok(DOM0, XsType.XS_SET_PERMS, join_strings("/be/x", "r0"))
    assert s.read(G2, "/be/x") == b"w"
    assert s.err(G2, XsType.XS_WRITE, encode_write("/be/x", b"z")) == "EACCES"
    # A node created by an unprivileged domain inherits, with that domain as owner.
    s.ok(DOM0, XsType.XS_SET_PERMS, join_strings("/be", "n0", "b1"))
    s.write(G1, "/be/new", b"")
    perms = s.ok(DOM0, XsType.XS_GET_PERMS, join_strings("/be/new"))
    assert split_strings(perms) == ["n1", "b1"]


def test_only_owner_or_dom0_sets_perms(s: Session) -> None:
    s.write(DOM0, "/be/x", b"v")
    s.ok(DOM0, XsType.XS_SET_PERMS, join_strings("/be/x", "n0", "b1"))
    assert s.err(G1, XsType.XS_SET_PERMS, join_strings("/be/x", "b1")) == "EACCES"
    s.write(G1, "mine", b"")
    assert s.err(G1, XsType.XS_SET_PERMS, join_strings("mine", "n2")) == "EPERM"
    s.ok(G1, XsType.XS_SET_PERMS, join_strings("mine", "n1", "r2"))
    assert s.read(G2, "/local/domain/1/mine") == b""
    assert s.err(G1, XsType.XS_SET_PERMS, join_strings("mine", "x1")) == "EINVAL"


@pytest.mark.parametrize(
    "perm", ["r\u0665", "r\u00b2", "r" + "9" * 4000, "r65536", "r-1", "r+1", "r1_0", "r 1"]
)
def test_a_permission_takes_an_ascii_domain_id_only(s: Session, perm: str) -> None:
    s.write(G1, "mine", b"")
    assert s.err(G1, XsType.XS_SET_PERMS, join_strings("mine", "n1", perm)) == "EINVAL"
    assert s.ok(G1, XsType.XS_GET_PERMS, join_strings("mine")) == b"n1\x00"
    s.ok(G1, XsType.XS_SET_PERMS, join_strings("mine", "n1", "r65535"))


def test_watch_fires_on_registration_change_and_descendants(s: Session) -> None:
    s.ok(DOM0, XsType.XS_WATCH, join_strings("/w", "t"))
    assert s.take(DOM0) == [("/w", "t")]  # fires once at once, even for a missing node
    s.write(DOM0, "/w/a/b", b"1")
    s.write(DOM0, "/other", b"1")
    assert s.take(DOM0) == [("/w/a/b", "t")]
    s.ok(DOM0, XsType.XS_RM, join_strings("/w"))
    assert s.take(DOM0) == [("/w", "t")]
    assert s.err(DOM0, XsType.XS_WATCH, join_strings("/w", "t")) == "EEXIST"
    s.ok(DOM0, XsType.XS_UNWATCH, join_strings("/w", "t"))
    s.write(DOM0, "/w", b"")
    assert s.take(DOM0) == []
    assert s.err(DOM0, XsType.XS_UNWATCH, join_strings("/w", "t")) == "ENOENT"


def test_removal_fires_watches_inside_the_subtree(s: Session) -> None:
    s.write(DOM0, "/t/a/b", b"")
    s.ok(DOM0, XsType.XS_WATCH, join_strings("/t/a/b", "deep"))
    s.take(DOM0)
    s.ok(DOM0, XsType.XS_RM, join_strings("/t"))
    assert s.take(DOM0) == [("/t/a/b", "deep")]


def test_watch_events_only_to_readers_and_relative(s: Session) -> None:
    s.ok(G1, XsType.XS_WATCH, join_strings("/local/domain/2", "spy"))
    s.ok(G1, XsType.XS_WATCH, join_strings("dev", "rel"))
    assert s.take(G1) == [("/local/domain/2", "spy"), ("dev", "rel")]
    s.write(G2, "secret", b"x")
    assert s.take(G1) == []
    s.write(DOM0, "/local/domain/1/dev/state", b"1")
    assert s.take(G1) == [("dev/state", "rel")]


def test_an_over_long_watch_event_is_dropped_not_failing_the_write(s: Session) -> None:
    """A guest's long token must not turn dom0's write into an error (xenstored drops it)."""
    s.ok(G1, XsType.XS_WATCH, join_strings("/local/domain/1", "t" * 3000))
    s.ok(G1, XsType.XS_WATCH, join_strings("/local/domain/1", "short"))
    s.take(G1)
    deep = "/local/domain/1/" + "a" * 1500
    s.write(DOM0, deep, b"v")  # an XS_ERROR reply would fail here
    assert s.read(DOM0, deep) == b"v"
    assert s.take(G1) == [(deep, "short")]
    s.write(DOM0, "/local/domain/1/b", b"v")
    assert s.take(G1) == [("/local/domain/1/b", "t" * 3000), ("/local/domain/1/b", "short")]
    tx = start(s, DOM0)
    s.write(DOM0, deep + "/c", b"v", tx)
    s.ok(DOM0, XsType.XS_TRANSACTION_END, join_strings("T"), tx)  # not EINVAL once applied
    assert s.take(G1) == [(deep + "/c", "short")]


def test_special_watches(s: Session) -> None:
    s.ok(DOM0, XsType.XS_WATCH, join_strings("@introduceDomain", "i"))
    s.ok(DOM0, XsType.XS_WATCH, join_strings("@releaseDomain", "r"))
    s.ok(G1, XsType.XS_WATCH, join_strings("@releaseDomain", "g"))
    s.take(DOM0), s.take(G1)
    s.events.clear()
    for conn, pkt in s.server.introduce_domain(3, "g3"):
        s.events.setdefault(conn, []).append(tuple(split_strings(pkt.payload)))  # type: ignore[arg-type]
    assert s.take(DOM0) == [("@introduceDomain", "i")]
    assert s.server.read_node("/local/domain/3/name") is not None
    for conn, pkt in s.server.release_domain(3):
        s.events.setdefault(conn, []).append(tuple(split_strings(pkt.payload)))  # type: ignore[arg-type]
    assert s.take(DOM0) == [("@releaseDomain", "r")]
    assert s.take(G1) == []  # special events are for dom0 only
    assert s.server.read_node("/local/domain/3") is None
    assert s.ok(DOM0, XsType.XS_IS_DOMAIN_INTRODUCED, join_strings("3")) == b"F\x00"
    assert s.ok(DOM0, XsType.XS_IS_DOMAIN_INTRODUCED, join_strings("1")) == b"T\x00"


def test_transactions_isolate_and_commit(s: Session) -> None:
    tx = int(s.ok(DOM0, XsType.XS_TRANSACTION_START, b"\x00").rstrip(b"\x00"))
    s.ok(DOM0, XsType.XS_WATCH, join_strings("/tx", "t"))
    s.take(DOM0)
    s.write(DOM0, "/tx/a", b"1", tx)
    assert s.read(DOM0, "/tx/a", tx) == b"1"
    assert s.err(DOM0, XsType.XS_READ, join_strings("/tx/a")) == "ENOENT"
    assert s.take(DOM0) == []  # nothing fires before commit
    s.ok(DOM0, XsType.XS_TRANSACTION_END, join_strings("T"), tx)
    assert s.read(DOM0, "/tx/a") == b"1"
    assert s.take(DOM0) == [("/tx/a", "t")]


def start(s: Session, conn: int) -> int:
    return int(s.ok(conn, XsType.XS_TRANSACTION_START, b"\x00").rstrip(b"\x00"))


def test_transaction_conflict_is_eagain_and_abort_discards(s: Session) -> None:
    tx = start(s, DOM0)
    s.write(DOM0, "/c", b"tx", tx)
    s.write(DOM0, "/c", b"now")  # the node the transaction wrote, committed since
    assert s.err(DOM0, XsType.XS_TRANSACTION_END, join_strings("T"), tx) == "EAGAIN"
    s.ok(DOM0, XsType.XS_RM, join_strings("/c"))
    assert s.err(DOM0, XsType.XS_READ, join_strings("/c")) == "ENOENT"
    assert s.err(DOM0, XsType.XS_READ, join_strings("/c"), tx) == "ENOENT"  # tx is gone
    tx = start(s, DOM0)
    s.write(DOM0, "/c", b"tx", tx)
    s.ok(DOM0, XsType.XS_TRANSACTION_END, join_strings("F"), tx)
    assert s.err(DOM0, XsType.XS_READ, join_strings("/c")) == "ENOENT"


BE = "/local/domain/0/backend/vtpm/1/0"


def _read(s: Session, tx: int) -> None:
    s.read(DOM0, f"{BE}/x", tx)


def _missing(s: Session, tx: int) -> None:
    assert s.err(DOM0, XsType.XS_READ, join_strings(f"{BE}/new"), tx) == "ENOENT"


def _list(s: Session, tx: int) -> None:
    assert split_strings(s.ok(DOM0, XsType.XS_DIRECTORY, join_strings(BE), tx)) == ["x"]


def _perms(s: Session, tx: int) -> None:
    s.ok(DOM0, XsType.XS_GET_PERMS, join_strings(f"{BE}/x"), tx)


def _write(s: Session, tx: int) -> None:
    s.write(DOM0, f"{BE}/x", b"tx", tx)


def _create(s: Session, tx: int) -> None:
    s.write(DOM0, f"{BE}/mine", b"tx", tx)


def _remove(s: Session, tx: int) -> None:
    s.ok(DOM0, XsType.XS_RM, join_strings(BE), tx)


def _rm(s: Session, path: str) -> None:
    s.ok(DOM0, XsType.XS_RM, join_strings(path))


#: (what the transaction does, what dom0 commits meanwhile outside it): a real conflict.
CONFLICTS: dict[str, tuple[Callable[[Session, int], None], Callable[[Session], object]]] = {
    "read-then-written": (_read, lambda s: s.write(DOM0, f"{BE}/x", b"2")),
    "read-then-removed": (_read, lambda s: _rm(s, f"{BE}/x")),
    "missing-then-created": (_missing, lambda s: s.write(DOM0, f"{BE}/new", b"")),
    "listed-then-child-added": (_list, lambda s: s.write(DOM0, f"{BE}/y", b"")),
    "listed-then-child-removed": (_list, lambda s: _rm(s, f"{BE}/x")),
    "perms-then-changed": (
        _perms,
        lambda s: s.ok(DOM0, XsType.XS_SET_PERMS, join_strings(f"{BE}/x", "n0", "r1")),
    ),
    "written-by-both": (_write, lambda s: s.write(DOM0, f"{BE}/x", b"2")),
    "created-beside-a-new-sibling": (_create, lambda s: s.write(DOM0, f"{BE}/y", b"")),
    "removed-while-a-child-appears": (_remove, lambda s: s.write(DOM0, f"{BE}/x/deep", b"")),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_a_real_conflict_fails_the_commit_with_eagain(s: Session, case: str) -> None:
    inside, outside = CONFLICTS[case]
    s.write(DOM0, f"{BE}/x", b"1")
    tx = start(s, DOM0)
    inside(s, tx)
    outside(s)
    assert s.err(DOM0, XsType.XS_TRANSACTION_END, join_strings("T"), tx) == "EAGAIN"


@pytest.mark.parametrize("inside", [_read, _missing, _list, _perms, _write, _create, _remove])
def test_a_guest_writing_its_own_nodes_does_not_fail_dom0s_transaction(
    s: Session, inside: Callable[[Session, int], None]
) -> None:
    s.write(DOM0, f"{BE}/x", b"1")
    s.ok(DOM0, XsType.XS_WATCH, join_strings(BE, "be"))
    tx = start(s, DOM0)
    inside(s, tx)
    for i in range(5):  # the guest creates, rewrites and removes its own nodes
        s.write(G1, f"device/vtpm/0/n{i}", b"x")
        s.write(G1, "device/vtpm/0/state", str(i).encode())
        s.ok(G1, XsType.XS_RM, join_strings(f"device/vtpm/0/n{i}"))
    s.read(DOM0, f"{BE}/x")  # reads outside the transaction commit nothing either
    s.take(DOM0)
    s.ok(DOM0, XsType.XS_TRANSACTION_END, join_strings("T"), tx)
    if inside is _write:
        assert s.read(DOM0, f"{BE}/x") == b"tx"
        assert s.take(DOM0) == [(f"{BE}/x", "be")]  # watches fire on commit
    if inside is _create:
        assert s.read(DOM0, f"{BE}/mine") == b"tx"
    if inside is _remove:
        assert s.err(DOM0, XsType.XS_READ, join_strings(BE)) == "ENOENT"
    assert s.read(DOM0, "/local/domain/1/device/vtpm/0/state") == b"4"  # theirs stayed


def test_transactions_on_disjoint_nodes_both_commit(s: Session) -> None:
    s.write(G1, "a", b"0")
    s.write(G2, "b", b"0")
    t1, t2 = start(s, G1), start(s, G2)
    s.write(G1, "a", b"1", t1)
    s.write(G2, "b", b"2", t2)
    s.ok(G1, XsType.XS_TRANSACTION_END, join_strings("T"), t1)
    s.ok(G2, XsType.XS_TRANSACTION_END, join_strings("T"), t2)
    assert s.read(DOM0, "/local/domain/1/a") == b"1"
    assert s.read(DOM0, "/local/domain/2/b") == b"2"


def test_node_quota_holds_across_a_transaction_and_commits_beside_it(s: Session) -> None:
    s.write(G1, "in/x", b"")
    s.write(G1, "out/x", b"")
    free = 20 - s.server.owned_nodes(1)
    tx = start(s, G1)
    for i in range(free):
        s.write(G1, f"in/{i}", b"", tx)  # within quota as the transaction sees it
    for i in range(free):
        s.write(G1, f"out/{i}", b"")  # and outside it, meanwhile: no conflict
    assert s.err(G1, XsType.XS_TRANSACTION_END, join_strings("T"), tx) == "ENOSPC"
    assert s.server.owned_nodes(1) == 20
    assert s.err(G1, XsType.XS_READ, join_strings("in/0")) == "ENOENT"


def test_a_transaction_may_look_at_only_so_many_nodes() -> None:
    server = XenStoreServer(transaction_node_quota=8)
    server.connect(DOM0, 0)
    server.introduce_domain(1, "g1")
    server.connect(G1, 1)
    s = Session(server)
    for who in (G1, DOM0):
        tx = start(s, who)
        errors = [
            s.send(who, XsType.XS_READ, join_strings(f"/local/domain/1/n{i}"), tx)
            for i in range(12)
        ]
        codes = [e.payload for e in errors]
        if who == G1:  # each missing read looks at the node and its nearest ancestor
            assert codes == [b"ENOENT\x00"] * 7 + [b"ENOSPC\x00"] * 5
        else:  # dom0 is not limited
            assert codes == [b"ENOENT\x00"] * 12
        s.ok(who, XsType.XS_TRANSACTION_END, join_strings("T"), tx)


def test_quotas(s: Session) -> None:
    for _ in range(2):
        s.ok(G1, XsType.XS_TRANSACTION_START, b"\x00")
    assert s.err(G1, XsType.XS_TRANSACTION_START, b"\x00") == "ENOSPC"
    for i in range(3):
        s.ok(G1, XsType.XS_WATCH, join_strings(f"w{i}", "t"))
    assert s.err(G1, XsType.XS_WATCH, join_strings("w9", "t")) == "E2BIG"
    used = s.server.owned_nodes(1)
    for i in range(20 - used):
        s.write(G1, f"n{i}", b"")
    assert s.err(G1, XsType.XS_WRITE, encode_write("one-more", b"")) == "ENOSPC"
    s.ok(G1, XsType.XS_RM, join_strings("n0"))
    s.write(G1, "one-more", b"")


def test_disconnect_forgets_watches_and_transactions(s: Session) -> None:
    s.ok(G1, XsType.XS_WATCH, join_strings("x", "t"))
    s.server.disconnect(G1)
    s.server.connect(G1, 1)
    s.write(G1, "x", b"")
    assert s.take(G1) == [("x", "t")]  # the registration event only
    assert s.err(G1, XsType.XS_READ, join_strings("x"), tx=1) == "ENOENT"


def test_unsupported_ops_answer_einval(s: Session) -> None:
    assert s.err(DOM0, XsType.XS_INTRODUCE, join_strings("5", "0", "0")) == "EINVAL"
    assert s.err(DOM0, XsType.XS_WATCH_EVENT, b"") == "EINVAL"


def test_check_reply_raises(s: Session) -> None:
    with pytest.raises(XenStoreError) as info:
        check_reply(s.send(G1, XsType.XS_READ, join_strings("/local/domain/0")), "read")
    assert info.value.errno_name == "EACCES"
    assert Perm(1, Access.READ).to_wire() == "r1"
