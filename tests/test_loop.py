"""The daemons' event loop: readiness callbacks, timers, and stopping."""

from __future__ import annotations

import functools
import os
import selectors
import socket
import threading

import pytest

from xenvtpm.loop import Alarm, Loop


def test_callback_removed_by_an_earlier_one_in_the_same_batch_is_skipped() -> None:
    loop = Loop()
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()
    calls: list[str] = []

    def first() -> None:
        calls.append("first")
        os.read(r1, 1)
        loop.remove_reader(r2)  # tears the other one down, as a device teardown does

    def second() -> None:
        calls.append("second")

    loop.add_reader(r1, first)
    loop.add_reader(r2, second)
    os.write(w1, b"x")
    os.write(w2, b"x")
    loop.run_once(0.1)
    loop.run_once(0.1)
    assert calls in (["first"], ["second", "first"])  # never second after its removal
    loop.close()
    for fd in (r1, w1, r2, w2):
        os.close(fd)


def test_an_fd_ready_for_ever_does_not_starve_the_others() -> None:
    """Level-triggered, one callback per ready fd per iteration, then the due timers: a
    device whose event channel stays pending (a storm) gets one turn per iteration, as
    every other ready fd and timer does (docs/threat-model.md, event-channel storm)."""
    loop = Loop()
    (storm_r, storm_w), (other_r, other_w) = os.pipe(), os.pipe()
    os.write(storm_w, b"x")  # never read: readable for ever
    turns = {"storm": 0, "other": 0, "timer": 0}

    def turn(name: str) -> None:
        turns[name] += 1

    def other() -> None:
        os.read(other_r, 1)
        turn("other")

    loop.add_reader(storm_r, lambda: turn("storm"))
    loop.add_reader(other_r, other)
    for _ in range(100):
        os.write(other_w, b"x")
        loop.call_later(0, lambda: turn("timer"))
        loop.run_once(1)
    assert turns == {"storm": 100, "other": 100, "timer": 100}
    loop.close()
    for fd in (storm_r, storm_w, other_r, other_w):
        os.close(fd)


def test_timers_run_in_order_and_cancel() -> None:
    loop = Loop()
    calls: list[int] = []
    loop.call_later(0.02, lambda: calls.append(2))
    loop.call_later(0.01, lambda: calls.append(1))
    loop.call_later(0.0, lambda: calls.append(0)).cancel()
    loop.call_later(0.03, loop.stop)
    loop.run()
    assert calls == [1, 2]
    loop.close()


def test_stop_from_another_thread_wakes_a_blocked_loop() -> None:
    loop = Loop()
    threading.Timer(0.05, loop.stop).start()
    loop.run()  # would block forever without the self-pipe
    loop.close()


def test_cancelled_timers_do_not_pile_up() -> None:
    """One timeout armed and cancelled per command must not grow the heap forever."""
    loop = Loop()
    for _ in range(10_000):
        loop.call_later(180.0, lambda: None).cancel()
    assert loop.pending_timers() < 200
    loop.close()


def test_an_alarm_rearmed_per_command_keeps_one_timer_and_fires_once_due() -> None:
    """A per-command timeout (issue 20): arming stores a deadline; the loop holds one
    timer per alarm whatever the number of commands, and only a deadline that passed
    while armed fires."""
    loop = Loop()
    fired: list[str] = []
    alarm = Alarm(loop, 0.05, lambda: fired.append("late"))
    for _ in range(1000):
        alarm.arm()
        alarm.disarm()
    assert loop.pending_timers() == 1
    alarm.arm()
    loop.call_later(0.2, loop.stop)
    loop.run()
    assert fired == ["late"] and not alarm.armed
    alarm.close()
    assert loop.pending_timers() == 0
    loop.close()


def test_an_alarm_disarmed_in_time_never_fires() -> None:
    loop = Loop()
    fired: list[str] = []
    alarm = Alarm(loop, 0.05, lambda: fired.append("late"))
    alarm.arm()
    loop.call_later(0.03, alarm.disarm)
    loop.call_later(0.03, alarm.arm)  # re-armed: its deadline moves on, to 0.08
    loop.call_later(0.07, alarm.disarm)
    loop.call_later(0.15, loop.stop)
    loop.run()
    assert fired == []
    loop.close()


def test_a_handler_unregistered_or_modified_earlier_in_the_batch_is_skipped() -> None:
    """selectors' registration calls (the manager's, simxend's): one handler call per
    ready fd, with its mask, and none for readiness an earlier handler made stale."""
    loop = Loop()
    pipes = [os.pipe() for _ in range(3)]
    calls: list[tuple[str, int]] = []

    def first(mask: int) -> None:
        calls.append(("first", mask))
        os.read(pipes[0][0], 1)
        loop.unregister(pipes[1][0])  # a swtpm torn down by an earlier event
        loop.modify(pipes[2][0], selectors.EVENT_READ, lambda m: calls.append(("new", m)))

    loop.register(pipes[0][0], selectors.EVENT_READ, first)
    loop.register(pipes[1][0], selectors.EVENT_READ, lambda m: calls.append(("second", m)))
    loop.register(pipes[2][0], selectors.EVENT_READ, lambda m: calls.append(("third", m)))
    for _, w in pipes:
        os.write(w, b"x")
    loop.run_once(1.0)
    assert ("second", selectors.EVENT_READ) not in calls[calls.index(("first", 1)) :]
    assert ("third", selectors.EVENT_READ) not in calls[calls.index(("first", 1)) :]
    calls.clear()
    loop.run_once(1.0)  # the modified registration's turn comes in the next batch
    assert calls == [("new", selectors.EVENT_READ)]
    with pytest.raises(KeyError):
        loop.unregister(pipes[1][0])
    loop.close()
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_a_closed_socket_is_unregistered_by_identity() -> None:
    loop = Loop()
    a, b = socket.socketpair()
    loop.register(a, selectors.EVENT_READ, lambda m: None)
    a.close()  # fileno() is -1 now, as a swtpm socket closed before its teardown
    assert loop.unregister(a).fileobj is a
    with pytest.raises(KeyError):
        loop.unregister(a)
    loop.close()
    b.close()


def test_a_socket_waiting_to_write_gets_the_write_mask() -> None:
    loop = Loop()
    a, b = socket.socketpair()
    masks: list[int] = []
    loop.register(a, selectors.EVENT_READ, masks.append)
    loop.run_once(0.05)
    assert masks == []
    loop.modify(a, selectors.EVENT_READ | selectors.EVENT_WRITE)
    loop.run_once(1.0)
    assert masks == [selectors.EVENT_WRITE]
    loop.close()
    a.close()
    b.close()


def test_calls_from_other_threads_run_on_the_loop_thread_in_order() -> None:
    loop = Loop()
    ran: list[tuple[int, bool]] = []
    me = threading.get_ident()

    def record(i: int) -> None:
        ran.append((i, threading.get_ident() == me))

    def worker() -> None:
        for i in range(3):
            loop.call_soon_threadsafe(functools.partial(record, i))
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=worker).start()
    loop.run()
    assert ran == [(0, True), (1, True), (2, True)]
    loop.close()
    loop.call_soon_threadsafe(lambda: None)  # closed: dropped, no fd written


def test_a_stop_before_run_is_not_lost() -> None:
    """A signal during a service's start() still stops the daemon once it runs."""
    loop = Loop()
    loop.stop()
    loop.run()  # returns at once
    threading.Timer(0.05, loop.stop).start()
    loop.run()  # a stop is used up by the run it ended
    loop.close()
