"""The backend's manager link against a stand-in manager: bounds and FIFO matching.

The stand-in is a listening ``SOCK_SEQPACKET`` socket driven by the test itself, so the
test sees exactly which packets the link sent and answers them when it likes. The link
runs on a real :class:`~xenvtpm.loop.Loop`, stepped with ``run_once``.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xenvtpm import tpm
from xenvtpm.backend.manager_link import ManagerLink
from xenvtpm.loop import Loop

RETRY = tpm.error_response(tpm.TPM_RC.RETRY)
PER_INSTANCE = 4  # requests of one instance the link lets be outstanding (docs/threat-model.md)
BACKLOG = 4096  # requests the link keeps while the manager is away


def command(n: int) -> bytes:
    return tpm.get_random_command(n)


def answer(n: int) -> bytes:
    return struct.pack(">HIIH", 0x8001, 12 + n, 0, n) + bytes(n)


class Answers:
    """Each callback's replies, in the order they came."""

    def __init__(self) -> None:
        self.got: dict[str, list[bytes]] = {}

    def callback(self, name: str) -> Callable[[memoryview], None]:
        self.got[name] = []
        return lambda reply: self.got[name].append(bytes(reply))


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop()
    try:
        yield loop
    finally:
        loop.close()


def step(loop: Loop, times: int = 5) -> None:
    for _ in range(times):
        loop.run_once(0.01)


def received(server: socket.socket) -> list[tuple[int, bytes]]:
    """Every packet the link has sent so far, as (instance, command)."""
    server.setblocking(False)
    out: list[tuple[int, bytes]] = []
    while True:
        try:
            packet = server.recv(8192)
        except BlockingIOError:
            return out
        out.append((struct.unpack_from(">I", packet)[0], packet[4:]))


def test_link_answers_retry_itself_above_its_per_instance_bound(tmp_path: Path, loop: Loop) -> None:
    """The manager matches replies to requests FIFO per instance, so the link never
    answers out of turn: a request over the bound is answered TPM_RC_RETRY (Linux's TPM
    core retries it) without being sent, from the loop, and the FIFO stays intact."""
    path = str(tmp_path / "vtpm.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    link = ManagerLink(path, loop, lambda: None)
    link.start()
    server, _ = listener.accept()
    answers = Answers()
    try:
        for i in range(PER_INSTANCE + 2):
            link.request(7, command(i + 1), answers.callback(f"7.{i}"))
        link.request(8, command(9), answers.callback("8.0"))
        assert all(got == [] for got in answers.got.values())  # never inside request()
        step(loop)
        sent = received(server)
        assert sent == [(7, command(i + 1)) for i in range(PER_INSTANCE)] + [(8, command(9))]
        assert answers.got[f"7.{PER_INSTANCE}"] == [RETRY]
        assert answers.got[f"7.{PER_INSTANCE + 1}"] == [RETRY]
        server.send(struct.pack(">I", 7) + answer(1))
        step(loop)
        assert answers.got["7.0"] == [answer(1)]  # the first request's, in FIFO order
        link.request(7, command(20), answers.callback("7.again"))  # room for one again
        step(loop)
        assert received(server) == [(7, command(20))]
        assert answers.got["7.again"] == []
    finally:
        link.close()
        server.close()
        listener.close()


def test_link_backlog_is_bounded_while_the_manager_is_away(tmp_path: Path, loop: Loop) -> None:
    link = ManagerLink(str(tmp_path / "nobody.sock"), loop, lambda: None)
    link.start()
    answers = Answers()
    try:
        for i in range(PER_INSTANCE + 1):
            link.request(1, command(8), answers.callback(f"1.{i}"))
        for instance in range(2, 2 + BACKLOG):
            link.request(instance, command(8), answers.callback(str(instance)))
        step(loop)
        assert answers.got[f"1.{PER_INSTANCE}"] == [RETRY]
        retried = [name for name, got in answers.got.items() if got == [RETRY]]
        # instance 1's fifth, then the last PER_INSTANCE others: the backlog was full
        assert len(retried) == 1 + PER_INSTANCE, retried[:10]
        assert all(got in ([], [RETRY]) for got in answers.got.values())
    finally:
        link.close()


def test_cancel_tells_the_manager_and_keeps_the_fifo(tmp_path: Path, loop: Loop) -> None:
    """A cancel goes to the manager without taking a place in the FIFO; the cancelled
    request is still answered (when the manager answers it), so its caller learns
    when it has left the path."""
    path = str(tmp_path / "vtpm.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    link = ManagerLink(path, loop, lambda: None)
    link.start()
    server, _ = listener.accept()
    answers = Answers()
    try:
        first = link.request(7, command(1), answers.callback("first"))
        link.request(7, command(2), answers.callback("second"))
        step(loop)
        link.cancel(first)
        step(loop)
        assert received(server) == [(7, command(1)), (7, command(2)), (7, tpm.cancel_command())]
        assert answers.got == {"first": [], "second": []}
        assert link.outstanding(7) == 2
        server.send(struct.pack(">I", 7) + answer(1))
        server.send(struct.pack(">I", 7) + tpm.error_response(tpm.TPM_RC.CANCELED))
        step(loop)
        assert answers.got == {
            "first": [answer(1)],
            "second": [tpm.error_response(tpm.TPM_RC.CANCELED)],
        }
        link.cancel(first)  # answered already: nothing is sent
        step(loop)
        assert received(server) == []
    finally:
        link.close()
        server.close()
        listener.close()


def test_cancel_drops_a_request_still_in_the_backlog(tmp_path: Path, loop: Loop) -> None:
    link = ManagerLink(str(tmp_path / "nobody.sock"), loop, lambda: None)
    link.start()
    answers = Answers()
    try:
        ticket = link.request(3, command(8), answers.callback("t"))
        assert link.outstanding(3) == 1
        link.cancel(ticket)
        step(loop)
        assert answers.got["t"] == [tpm.error_response(tpm.TPM_RC.CANCELED)]
        assert link.outstanding(3) == 0
    finally:
        link.close()
