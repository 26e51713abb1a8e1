"""Xenbus states: numbers from xenbus.h, and the moves each side may make."""

from __future__ import annotations

import logging
import time

import pytest

from xenvtpm.errors import StateError, XenStoreError
from xenvtpm.xen.interface import Perm
from xenvtpm.xenbus import BACKEND_MOVES, FRONTEND_MOVES, StateNode, XenbusState, parse_state


class FakeStore:
    """Records writes; just enough of XenStore for StateNode."""

    def __init__(self, conflicts: int = 0) -> None:
        self.nodes: dict[str, bytes] = {}
        self.pending: dict[str, bytes] = {}
        self.conflicts = conflicts  # transactions to fail with EAGAIN first
        self.commits = 0  # commits asked for, refused ones included

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        (self.pending if tx else self.nodes)[path] = data

    def transaction_start(self) -> int:
        self.pending = {}
        return 1

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        self.commits += commit
        if commit and self.conflicts:
            self.conflicts -= 1
            return False
        if commit:
            self.nodes.update(self.pending)
        return True

    def set_perms(self, path: str, perms: list[Perm], tx: int = 0) -> None:
        pass


def test_state_numbers_match_xenbus_h() -> None:
    assert [s.value for s in XenbusState] == list(range(9))
    assert XenbusState.CONNECTED.value == 4 and XenbusState.CLOSED.value == 6


@pytest.mark.parametrize(("raw", "state"), [(b"4", 4), (b"6\x00", 6), (b"x", 0), (b"99", 0)])
def test_parse_state_never_raises(raw: bytes, state: int) -> None:
    assert parse_state(raw) == state


def test_frontend_handshake_and_illegal_move() -> None:
    store = FakeStore()
    node = StateNode(store, "device/vtpm/0", FRONTEND_MOVES)  # type: ignore[arg-type]
    for state in (XenbusState.INITIALISING, XenbusState.INITIALISED, XenbusState.CONNECTED):
        node.switch(state)
        assert store.nodes["device/vtpm/0/state"] == str(int(state)).encode()
    with pytest.raises(StateError) as e:
        node.switch(XenbusState.INIT_WAIT)  # a backend state: never the frontend's
    assert e.value.actual == "CONNECTED"
    assert store.nodes["device/vtpm/0/state"] == b"4"  # nothing written on refusal


def test_backend_never_claims_initialised() -> None:
    assert all(XenbusState.INITIALISED not in moves for moves in BACKEND_MOVES.values())


def test_publish_writes_keys_and_state_together_and_retries_eagain() -> None:
    store = FakeStore(conflicts=2)
    node = StateNode(store, "device/vtpm/0", FRONTEND_MOVES)  # type: ignore[arg-type]
    node.switch(XenbusState.INITIALISING)
    node.publish(XenbusState.INITIALISED, {"ring-ref": "8", "event-channel": "3"})
    assert store.nodes == {
        "device/vtpm/0/state": b"3",
        "device/vtpm/0/ring-ref": b"8",
        "device/vtpm/0/event-channel": b"3",
    }
    assert node.state == XenbusState.INITIALISED


def test_publish_gives_up_when_every_commit_answers_eagain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A transaction that can never commit (xenstored answers EAGAIN to every attempt)
    must not hold the backend's only thread: a bounded number of retries with a short
    backoff, well under a second in all, then an error logged and a XenStoreError
    (EAGAIN) raised; nothing is published and the state stays where it was."""
    store = FakeStore(conflicts=100_000)  # for ever, as far as publish can tell
    node = StateNode(store, "backend/vtpm/1/0", BACKEND_MOVES)  # type: ignore[arg-type]
    start = time.monotonic()
    with caplog.at_level(logging.ERROR), pytest.raises(XenStoreError) as info:
        node.publish(XenbusState.INIT_WAIT, {"feature-protocol-v2": "1"})
    assert time.monotonic() - start < 0.5
    assert (info.value.errno_name, info.value.path) == ("EAGAIN", "backend/vtpm/1/0")
    assert 2 <= store.commits <= 10, store.commits
    assert node.state == XenbusState.UNKNOWN and store.nodes == {}
    assert "backend/vtpm/1/0" in caplog.text and "EAGAIN" in caplog.text
