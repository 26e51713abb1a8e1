"""The xenstore client on its own: timeouts, peer death, replies demultiplexed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
from simxen import readable

from xenvtpm.errors import ChannelClosed, XenStoreError
from xenvtpm.sim.adapter import SimHypervisor
from xenvtpm.sim.xenstore_client import XenStoreClient


def test_client_timeout_and_peer_death() -> None:
    ours, theirs = socket.socketpair()
    client = XenStoreClient(ours, timeout=0.2)
    client.start()
    try:
        with pytest.raises(XenStoreError) as info:
            client.read("/x")
        assert info.value.errno_name == "ETIMEDOUT"
        pending: list[BaseException] = []
        t = threading.Thread(target=lambda: pending.append(_catch(lambda: client.read("/y"))))
        client.timeout = 5
        t.start()
        time.sleep(0.1)
        theirs.close()  # the daemon dies while a request waits
        t.join(5)
        assert isinstance(pending[0], ChannelClosed)
        assert readable(client.fileno())  # pollers wake up...
        with pytest.raises(ChannelClosed):
            client.read_watches()  # ...and learn the connection is gone
        with pytest.raises(ChannelClosed):
            client.read("/z")
    finally:
        client.close()
        client.close()


def _catch(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("no exception")


def test_client_demuxes_concurrent_callers(dom0: SimHypervisor) -> None:
    xs = dom0.xenstore
    for i in range(8):
        xs.write(f"/conc/{i}", str(i))
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(50):
            if xs.read(f"/conc/{i}") != str(i).encode():
                errors.append(f"worker {i} got another's reply")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    xs.rm("/conc")
    with pytest.raises(XenStoreError) as info:
        xs.write("/big", b"x" * 5000)
    assert info.value.errno_name == "E2BIG"
