"""The relay pool: one relay per guest device, reused by each transport, never once it
broke or was released. Real relays (``xenvtpm.tools.relay.serve``) on threads, over
socketpairs, in front of a fake TPM character device."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from harness.errors import DeviceRefused, TransportClosed, TransportTimeout
from harness.relay_pool import RelayPool
from harness.transport_ssh import RelayTransport
from xenvtpm.tools import relay

HANG = b"\x80\x01\x00\x00\x00\x0aHANG"  # the fake TPM holds this one until told


def get_random(n: int) -> bytes:
    return struct.pack(">HIIH", 0x8001, 12, 0x17B, n)


def answer_to(command: bytes) -> bytes:
    """A response that names its command (its last two bytes), so that a late answer
    to another command cannot pass for this one's."""
    return struct.pack(">HII", 0x8001, 12, 0) + command[-2:]


class FakeTpm:
    """A TPM character device: one write = one command, one read = its response; the
    HANG command is answered only once ``wake`` is set (a hung TPM, then its late answer)."""

    def __init__(self) -> None:
        self.host, self.device = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                command = self.device.recv(65536)
                if not command:
                    return
                if command == HANG:
                    self.wake.wait(10)
                self.device.send(answer_to(command))
            except OSError:
                return

    def refuse(self) -> None:
        """From now on every write to the device fails (EPIPE). A shutdown, not a close:
        closing a socket that the serving thread is blocked in ``recv`` on keeps it open
        until that ``recv`` returns, so a write could still be taken and answered by an
        end of file (an empty read), which is not a refusal."""
        self.device.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        assert not self.thread.is_alive()

    def close(self) -> None:
        self.wake.set()
        self.host.close()
        self.device.close()
        self.thread.join(5)


class Relays:
    """Starts real relays, each on a thread over a socketpair, like ``open_relay``."""

    def __init__(self, tpm: FakeTpm) -> None:
        self.tpm = tpm
        self.exits: list[int] = []  # each relay's exit status, as it exits
        self.ends: list[socket.socket] = []  # the relays' ends, to make one vanish
        self.threads: list[threading.Thread] = []

    def start(self) -> RelayTransport:
        ours, theirs = socket.socketpair()

        def relay_process() -> None:  # its exit closes its stdout
            try:
                self.exits.append(
                    relay.serve(
                        self.tpm.host.fileno(), "/dev/tpm0", theirs.fileno(), theirs.fileno()
                    )
                )
            except OSError:
                self.exits.append(-1)  # the harness went away (broken pipe)
            theirs.close()

        thread = threading.Thread(target=relay_process, daemon=True)
        thread.start()
        self.threads.append(thread)
        self.ends.append(theirs)
        return RelayTransport(ours, f"relay{len(self.threads)}", hello_timeout=5)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def relays() -> Iterator[Relays]:
    tpm = FakeTpm()
    made = Relays(tpm)
    try:
        yield made
    finally:
        tpm.close()
        made.join()


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_each_transport_reuses_the_one_relay(relays: Relays) -> None:
    pool = RelayPool()
    for n in range(1, 4):
        with pool.lease("guest0", "/dev/tpm0", relays.start) as t:
            assert t.transmit(get_random(n), timeout=5) == answer_to(get_random(n))
    assert (pool.started, pool.reused, relays.exits) == (1, 2, [])  # never ended
    pool.close()
    wait_for(lambda: relays.exits == [0])  # end of file: the relay exits cleanly


def test_a_closed_lease_carries_nothing_more(relays: Relays) -> None:
    pool = RelayPool()
    lease = pool.lease("guest0", "/dev/tpm0", relays.start)
    lease.close()
    lease.close()  # idempotent: the relay is not given back twice
    with pytest.raises(TransportClosed):
        lease.transmit(get_random(4))
    with pool.lease("guest0", "/dev/tpm0", relays.start) as again:
        assert again.transmit(get_random(4), timeout=5) == answer_to(get_random(4))
    assert pool.started == 1
    pool.close()


def test_a_relay_stuck_in_a_command_is_never_handed_out_again(relays: Relays) -> None:
    """The stuck command's late answer reaches nobody: the next transport is a new
    relay, and each of its commands gets its own answer."""
    pool = RelayPool()
    with pool.lease("guest0", "/dev/tpm0", relays.start) as t, pytest.raises(TransportTimeout):
        t.transmit(HANG, timeout=0.2)
    relays.tpm.wake.set()  # the late answer goes to the first relay, whose channel is gone
    # The fake device is one socket read by every relay: were the next relay already
    # reading, it could take the late answer, which a real device's one opener cannot.
    wait_for(lambda: relays.exits == [-1])  # the first relay took it and found no harness
    with pool.lease("guest0", "/dev/tpm0", relays.start) as t:
        for n in (11, 13, 17):
            assert t.transmit(get_random(n), timeout=5) == answer_to(get_random(n))
    assert pool.started == 2
    pool.close()


def test_a_refused_command_keeps_the_relay(relays: Relays) -> None:
    """An error frame (the kernel's EINVAL, ETIME) is an answer: the relay goes on."""
    pool = RelayPool()
    relays.tpm.refuse()  # every write now fails (EPIPE), as a refused one would
    with pool.lease("guest0", "/dev/tpm0", relays.start) as t, pytest.raises(DeviceRefused):
        t.transmit(get_random(4), timeout=5)
    with pool.lease("guest0", "/dev/tpm0", relays.start) as t, pytest.raises(DeviceRefused):
        t.transmit(get_random(4), timeout=5)
    assert (pool.started, pool.reused) == (1, 1)
    pool.close()


def test_a_relay_gone_while_idle_is_replaced(relays: Relays) -> None:
    pool = RelayPool()
    with pool.lease("guest0", "/dev/tpm0", relays.start) as t:
        t.transmit(get_random(4), timeout=5)
    relays.ends[0].shutdown(socket.SHUT_WR)  # its login died: end of file on the channel
    with pool.lease("guest0", "/dev/tpm0", relays.start) as t:
        assert t.transmit(get_random(5), timeout=5) == answer_to(get_random(5))
    assert pool.started == 2
    pool.close()


def test_release_ends_idle_relays_at_once_and_leased_ones_when_given_back(
    relays: Relays,
) -> None:
    """Before the device must be free (a frontend restart, the kernel's selftests): the
    idle relay has exited when ``release`` returns; one in use ends when its user closes
    it, instead of going back to the pool."""
    pool = RelayPool()
    with pool.lease("guest0", "/dev/tpm0", relays.start):
        pass
    pool.release("guest1")  # another guest's: this one stays
    assert relays.exits == []
    pool.release("guest0")
    assert relays.exits == [0]  # exited already: the device is free
    held = pool.lease("guest0", "/dev/tpm0", relays.start)
    pool.release()
    held.transmit(get_random(6), timeout=5)  # a lease in use keeps working
    held.close()
    assert relays.exits == [0, 0]
    with pool.lease("guest0", "/dev/tpm0", relays.start):
        pass
    assert pool.started == 3
    pool.close()


def test_two_leases_at_once_are_two_relays(relays: Relays) -> None:
    """A second transport while the first is open is a second opener, as before (on a
    guest's /dev/tpm0 the kernel refuses it; here the fake device allows it). Only one
    of them is kept."""
    pool = RelayPool()
    first = pool.lease("guest0", "/dev/tpm0", relays.start)
    second = pool.lease("guest0", "/dev/tpm0", relays.start)
    first.close()
    second.close()
    assert pool.started == 2
    wait_for(lambda: relays.exits == [0])
    pool.close()


def create_primary_command() -> bytes:
    """A command that leaves a transient object in its resource manager space (its
    body does not matter to the pool: the fake device answers anything)."""
    return struct.pack(">HII", 0x8002, 12, 0x131) + b"\0\0"


def test_shared_relays_are_reused_while_their_spaces_stay_empty(relays: Relays) -> None:
    """Clients of a resource manager at once, each on a relay of its own; relays whose
    clients only sent commands that leave no object or session behind serve the next
    clients; one whose client ran CreatePrimary ends with it (its space flushed)."""
    pool = RelayPool()
    clients = [pool.lease("guest0", "/dev/tpmrm0", relays.start, shared=True) for _ in range(3)]
    for n, client in enumerate(clients):
        assert client.transmit(get_random(n), timeout=5) == answer_to(get_random(n))
    clients[2].transmit(create_primary_command(), timeout=5)
    for client in clients:
        client.close()
    assert relays.exits == [0]  # the third one's, at once
    again = [pool.lease("guest0", "/dev/tpmrm0", relays.start, shared=True) for _ in range(3)]
    for client in again:
        client.close()
    assert (pool.started, pool.reused) == (4, 2)
    pool.close()


def test_a_command_too_short_for_a_code_leaves_the_space_empty(relays: Relays) -> None:
    pool = RelayPool()
    with pool.lease("guest0", "/dev/tpmrm0", relays.start, shared=True) as t:
        t.transmit(b"\x80\x01\x00", timeout=5)
    with pool.lease("guest0", "/dev/tpmrm0", relays.start, shared=True):
        pass
    assert pool.started == 1
    pool.close()
