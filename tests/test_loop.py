"""The daemons' event loop: readiness callbacks, timers, and stopping."""

from __future__ import annotations

import os
import threading

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
