"""Simulated event channels end to end: notifies both ways, never blocking, dropped on
an unbound port, a port kept pending by its guest.
"""

from __future__ import annotations

import fcntl
import struct
import termios
import time

import pytest
from simxen import readable

from xenvtpm.errors import EventChannelError
from xenvtpm.sim.adapter import SimHypervisor
from xenvtpm.xen.interface import MAX_CONSUME_ROUNDS


def test_event_channel_both_ways(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, g2 = guests
    front = g1.events.bind_unbound_port(0)
    with pytest.raises(EventChannelError):
        g2.events.bind_interdomain(g1.domid, front.port)  # allocated for dom0, not g2
    back = dom0.events.bind_interdomain(g1.domid, front.port)
    with pytest.raises(EventChannelError):
        dom0.events.bind_interdomain(g1.domid, front.port)  # already bound
    try:
        assert front.port >= 1 and back.port >= 1
        assert readable(back.fileno()) and back.consume()  # Xen leaves one pending at bind
        assert not readable(back.fileno(), 0.05)
        front.notify()
        front.notify()  # coalesces
        assert readable(back.fileno()) and back.consume()
        assert not readable(back.fileno(), 0.05)
        back.notify()
        assert readable(front.fileno()) and front.consume()
        assert not readable(front.fileno(), 0.05)
        assert front.consume() is True  # nothing pending, channel alive
    finally:
        front.close()
    assert readable(back.fileno())
    assert back.consume() is False  # the peer unbound
    back.notify()  # a dead peer never raises on the hot path
    assert back.consume() is False
    back.close()
    back.close()


def test_notify_never_blocks(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    front = g1.events.bind_unbound_port(0)
    with front, dom0.events.bind_interdomain(g1.domid, front.port) as back:
        start = time.monotonic()
        for _ in range(300_000):  # far more than a socket buffer holds
            front.notify()
        assert time.monotonic() - start < 5
        pending = queued(back.fileno())
        assert 0 < pending < 300_000
        for _ in range(-(-pending // MAX_CONSUME_ROUNDS)):  # a bounded number of rounds each
            assert back.consume() is True
        assert not readable(back.fileno(), 0.05)


def queued(fd: int) -> int:
    """Events pending on a simulated port: the bytes waiting on its socket (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


def test_notifies_on_an_unbound_port_are_dropped(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    """Xen drops a notify on a port nobody bound yet (evtchn_send, ECS_UNBOUND): the
    binder finds only the one event that bind_interdomain leaves pending."""
    g1, _ = guests
    front = g1.events.bind_unbound_port(0)
    front.notify()
    assert front.notify_many(1000) == 1000
    with front, dom0.events.bind_interdomain(g1.domid, front.port) as back:
        assert queued(back.fileno()) == 1
        assert front.notify_many(5) == 5
        assert queued(back.fileno()) == 6


def test_a_guest_can_keep_its_port_pending(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    """``notify_many`` queues one event per notify, up to the socket buffer, without
    blocking: what a guest notifying after each of dom0's unmasks amounts to. A closed
    port refuses it (as EVTCHNOP_send an unbound port); a peer that left takes none."""
    g1, _ = guests
    front = g1.events.bind_unbound_port(0)
    back = dom0.events.bind_interdomain(g1.domid, front.port)
    assert back.consume()
    taken = 0
    while n := front.notify_many(1 << 16):
        taken += n
    assert taken > 10_000 and queued(back.fileno()) == taken
    assert front.notify_many(1) == 0  # full: already pending
    assert back.consume() is True  # a bounded number of events, and still pending
    assert queued(back.fileno()) == taken - MAX_CONSUME_ROUNDS
    back.close()
    assert front.notify_many(1) == 0  # nobody listens any more
    front.close()
    with pytest.raises(EventChannelError):
        front.notify_many(1)
