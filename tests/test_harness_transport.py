"""Transports against real unix-socket servers that behave like the sim frontend and swtpm."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.errors import TransportClosed, TransportError, TransportTimeout
from harness.transport import RawTransport, SeqpacketTransport, SwtpmTransport

GET_RANDOM_4 = bytes.fromhex("80010000000c0000017b0004")


def answer(cmd: bytes) -> bytes:
    """TPM-shaped reply: 0x142 for a wrong size (as the backend does), else echo the code."""
    if len(cmd) < 10 or struct.unpack_from(">I", cmd, 2)[0] != len(cmd):
        return struct.pack(">HII", 0x8001, 10, 0x142)
    body = cmd[6:10]
    return struct.pack(">HII", 0x8001, 10 + len(body), 0) + body


class Server:
    """A unix socket server on a thread; ``handle(conn)`` serves one connection."""

    def __init__(self, path: Path, kind: int, handle: Callable[[socket.socket], None]) -> None:
        self.path, self.handle = path, handle
        self.sock = socket.socket(socket.AF_UNIX, kind)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.accepts = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepts += 1
            with conn:
                self.handle(conn)

    def close(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def seqpacket_handler(conn: socket.socket) -> None:
    while True:
        try:
            msg = conn.recv(65536)
        except OSError:
            return
        if msg == b"" and peer_gone(conn):
            return  # else a zero-length record: an empty write, answered like any command
        if msg == b"STOP":
            return
        if msg == b"HANG":
            continue
        with contextlib.suppress(OSError):
            conn.send(answer(msg))


def peer_gone(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLHUP | select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP) for _, ev in poller.poll(0))


def swtpm_handler(conn: socket.socket) -> None:
    """Like swtpm: one read is one command; answer, and serve until the client closes."""
    while True:
        msg = conn.recv(4096)
        if not msg:
            return
        if msg == b"DIE\x00\x00\x00\x00\x00\x00\x00":
            return
        with contextlib.suppress(OSError):
            conn.sendall(answer(msg))


@pytest.fixture
def seqpacket(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "guest.tpm", socket.SOCK_SEQPACKET, seqpacket_handler)
    yield s
    s.close()


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "swtpm.sock", socket.SOCK_STREAM, swtpm_handler)
    yield s
    s.close()


def test_seqpacket_round_trip_and_protocol(seqpacket: Server) -> None:
    with SeqpacketTransport(seqpacket.path) as t:
        assert isinstance(t, RawTransport)
        assert t.transmit(GET_RANDOM_4) == bytes.fromhex("80010000000e000000000000017b")
        assert t.transmit(b"\x80\x01\x00\x00\x00\x0b") == bytes.fromhex("80010000000a00000142")
        assert t.transmit(GET_RANDOM_4)[6:10] == b"\0\0\0\0"  # channel still works
    with pytest.raises(TransportClosed):
        t.transmit(GET_RANDOM_4)
    assert seqpacket.accepts == 1  # one connection held for the transport's life


def test_seqpacket_empty_write_is_sent(seqpacket: Server) -> None:
    with SeqpacketTransport(seqpacket.path) as t:
        assert t.transmit(b"") == bytes.fromhex("80010000000a00000142")


def test_seqpacket_peer_close(seqpacket: Server) -> None:
    with SeqpacketTransport(seqpacket.path) as t, pytest.raises(TransportClosed):
        t.transmit(b"STOP")


def test_seqpacket_timeout_closes_the_transport(seqpacket: Server) -> None:
    t = SeqpacketTransport(seqpacket.path)
    with pytest.raises(TransportTimeout):
        t.transmit(b"HANG", timeout=0.1)
    with pytest.raises(TransportClosed):  # a late answer must never be taken for the next
        t.transmit(GET_RANDOM_4)


def test_connect_to_nothing(tmp_path: Path) -> None:
    with pytest.raises(TransportClosed):
        SeqpacketTransport(tmp_path / "absent.sock", connect_timeout=0.1)


def test_swtpm_connects_per_command(swtpm: Server) -> None:
    with SwtpmTransport(swtpm.path) as t:
        for _ in range(3):
            assert t.transmit(GET_RANDOM_4)[6:10] == b"\0\0\0\0"
    assert swtpm.accepts == 3


def test_swtpm_two_transports_interleave(swtpm: Server) -> None:
    """swtpm serves one connection at a time: held connections would deadlock here."""
    with SwtpmTransport(swtpm.path) as a, SwtpmTransport(swtpm.path) as b:
        for _ in range(3):
            assert a.transmit(GET_RANDOM_4, timeout=2)[6:10] == b"\0\0\0\0"
            assert b.transmit(GET_RANDOM_4, timeout=2)[6:10] == b"\0\0\0\0"


def test_swtpm_empty_write_is_refused(swtpm: Server) -> None:
    with SwtpmTransport(swtpm.path) as t, pytest.raises(TransportError, match="empty write"):
        t.transmit(b"")


def test_swtpm_dies_mid_command(swtpm: Server) -> None:
    with SwtpmTransport(swtpm.path) as t, pytest.raises(TransportClosed):
        t.transmit(b"DIE\x00\x00\x00\x00\x00\x00\x00")


def test_swtpm_waits_for_a_restarting_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    servers: list[Server] = []
    timer = threading.Timer(
        0.2, lambda: servers.append(Server(path, socket.SOCK_STREAM, swtpm_handler))
    )
    timer.start()
    try:
        with SwtpmTransport(path) as t:
            assert t.transmit(GET_RANDOM_4, timeout=5)[6:10] == b"\0\0\0\0"
    finally:
        timer.join()
        for s in servers:
            s.close()
