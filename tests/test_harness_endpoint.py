"""The host-side endpoint of a Xen guest's TPM (``harness.endpoint``): sim's contract,
one command in and one response out, over real relays (``xenvtpm.tools.relay.serve``) on
threads in front of a fake TPM character device, as in the relay pool's tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_harness_relay_pool import HANG, FakeTpm, Relays, answer_to, get_random, wait_for

from harness.endpoint import Endpoint
from harness.errors import DeviceRefused
from harness.transport_ssh import RelayTransport


class Served:
    def __init__(self, path: Path, relays: Relays) -> None:
        self.relays = relays
        self.opened = 0
        self.refuse_open = False
        self.endpoint = Endpoint(path, self.open_relay, timeout=0.5)
        self.thread = threading.Thread(target=self.endpoint.serve_forever, daemon=True)
        self.thread.start()

    def open_relay(self) -> RelayTransport:
        if self.refuse_open:
            raise DeviceRefused("guest0: opening the device", "EBUSY")
        self.opened += 1
        return self.relays.start()

    def client(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        s.connect(str(self.endpoint.path))
        return s


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    tpm = FakeTpm()
    relays = Relays(tpm)
    made = Served(tmp_path / "guest0.tpm", relays)
    try:
        yield made
    finally:
        made.endpoint.close()
        made.thread.join(5)
        assert not made.thread.is_alive()
        tpm.close()
        relays.join()


def test_one_command_in_one_response_out_and_a_relay_per_client(served: Served) -> None:
    for n in (1, 2):
        with served.client() as c:
            for m in (3, 5):
                c.send(get_random(n * m))
                assert c.recv(4096) == answer_to(get_random(n * m))
    assert served.opened == 2
    wait_for(lambda: served.relays.exits == [0, 0])  # each ended with its client: the
    # guest's device is free between clients


def test_a_refused_command_ends_that_client(served: Served) -> None:
    with served.client() as c:
        c.send(get_random(4))
        assert c.recv(4096) == answer_to(get_random(4))
        served.relays.tpm.refuse()  # the device now refuses every write (EPIPE)
        c.send(get_random(5))
        assert c.recv(4096) == b""  # end of file: the endpoint's log says why
    with served.client() as c:
        c.send(get_random(6))
        assert c.recv(4096) == b""
    assert served.opened == 2


def test_a_relay_stuck_in_a_command_is_replaced(served: Served) -> None:
    with served.client() as c:
        c.send(HANG)
        assert c.recv(4096) == b""  # no answer within the endpoint's timeout
    served.relays.tpm.wake.set()  # its late answer must reach no client
    wait_for(lambda: served.relays.exits == [-1])  # the old relay took it (one fake socket)
    with served.client() as c:
        c.send(get_random(7))
        assert c.recv(4096) == answer_to(get_random(7))
    assert served.opened == 2


def test_a_device_that_cannot_be_opened_ends_the_client_and_is_tried_again(
    served: Served,
) -> None:
    served.refuse_open = True  # e.g. EBUSY: someone in the guest holds /dev/tpm0
    with served.client() as c:
        c.send(get_random(8))
        assert c.recv(4096) == b""
    served.refuse_open = False
    with served.client() as c:
        c.send(get_random(9))
        assert c.recv(4096) == answer_to(get_random(9))
