"""The manager's poller: selectors' registration, one handler call per ready fd, and
no call for readiness that an earlier handler of the same batch made stale."""

from __future__ import annotations

import os
import selectors

from xenvtpm.manager.poller import Poller


def test_a_handler_unregistered_or_modified_earlier_in_the_batch_is_skipped() -> None:
    poller = Poller()
    pipes = [os.pipe() for _ in range(3)]
    calls: list[tuple[str, int]] = []

    def first(mask: int) -> None:
        calls.append(("first", mask))
        os.read(pipes[0][0], 1)
        poller.unregister(pipes[1][0])  # a swtpm torn down by an earlier event
        poller.modify(pipes[2][0], selectors.EVENT_READ, lambda m: calls.append(("new", m)))

    poller.register(pipes[0][0], selectors.EVENT_READ, first)
    poller.register(pipes[1][0], selectors.EVENT_READ, lambda m: calls.append(("second", m)))
    poller.register(pipes[2][0], selectors.EVENT_READ, lambda m: calls.append(("third", m)))
    for _, w in pipes:
        os.write(w, b"x")
    assert poller.dispatch(1.0) == 3
    assert ("second", selectors.EVENT_READ) not in calls[calls.index(("first", 1)) :]
    assert ("third", selectors.EVENT_READ) not in calls[calls.index(("first", 1)) :]
    calls.clear()
    poller.dispatch(1.0)  # the modified registration's turn comes in the next batch
    assert calls == [("new", selectors.EVENT_READ)]
    assert set(poller.get_map()) == {pipes[0][0], pipes[2][0]}
    poller.close()
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_a_closed_socket_is_unregistered_by_identity() -> None:
    import socket

    poller = Poller()
    a, b = socket.socketpair()
    poller.register(a, selectors.EVENT_READ, lambda m: None)
    a.close()  # fileno() is -1 now, as a swtpm socket closed before its teardown
    assert poller.unregister(a).fileobj is a
    assert poller.get_map() == {}
    poller.close()
    b.close()
