"""A minimal single-threaded event loop: file descriptors, timers, and a clean stop.

The daemons keep every per-command step on one thread (DESIGN.md section 5: no thread
hand-offs on the hot path), so they need only readiness callbacks and timers. Signals
and other threads stop the loop through a self-pipe, which is safe from a signal
handler.

Every command wakes each daemon twice, so an iteration is kept to one ``epoll_wait``
and a dict lookup per ready fd (no ``selectors`` key objects), and timers are looked at
only when one is due. A per-command timeout is an :class:`Alarm`: arming it stores a
deadline, and the heap holds one timer per alarm, re-armed when it fires early, instead
of one pushed and cancelled per command (issue 20).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Callback = Callable[[], None]


@dataclass(order=True)
class Timer:
    """A pending call; ``cancel()`` makes it a no-op."""

    when: float
    seq: int
    callback: Callback | None = field(compare=False)
    loop: Loop | None = field(default=None, compare=False, repr=False)

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            if self.loop is not None:
                self.loop._timer_cancelled()


class Loop:
    """Readiness callbacks on file descriptors, plus timers."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._stale: set[int] = set()  # removed during the batch being dispatched
        self._timers: list[Timer] = []
        self._cancelled = 0
        self._seq = itertools.count()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_r, self._drain_wake)
        self._running = False
        self._closed = False

    def add_reader(self, fd: int, callback: Callback) -> None:
        if fd in self._callbacks:
            raise KeyError(f"{fd} is already registered")
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is None:
            return
        self._stale.add(fd)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay, next(self._seq), callback, self)
        heapq.heappush(self._timers, timer)
        return timer

    def _timer_cancelled(self) -> None:
        """A timer armed and cancelled per event must not pile up in the heap until
        its time came: compact it when most of it is cancelled."""
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._timers):
            self._timers = [t for t in self._timers if t.callback is not None]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def pending_timers(self) -> int:
        """Timers in the heap, cancelled ones included (for leak checks)."""
        return len(self._timers)

    def stop(self) -> None:
        """Ask ``run()`` to return; safe from signal handlers and other threads."""
        self._running = False
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def stop_on_signals(self, *signums: int) -> None:
        for signum in signums or (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def run(self) -> None:
        """Iterate until :meth:`stop`: :meth:`run_once` without a timeout of its own,
        written out with its lookups hoisted, since every command passes here twice."""
        self._running = True
        poll, callbacks, stale, monotonic = (
            self._epoll.poll,
            self._callbacks,
            self._stale,
            time.monotonic,
        )
        while self._running:
            due = self._next_due() if self._timers else None
            ready = poll(-1 if due is None else max(0.0, due - monotonic()))
            stale.clear()
            for fd, _ in ready:
                callback = callbacks.get(fd)
                if callback is not None and fd not in stale:
                    callback()
            if due is not None and monotonic() >= due:
                self._run_due_timers()

    def run_once(self, timeout: float | None = 0.0) -> None:
        """One iteration: wait up to ``timeout`` (None: until an fd or timer is due),
        call back every ready fd once, then run the due timers."""
        due = self._next_due()
        if due is not None:
            wait = max(0.0, due - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        try:
            ready = self._epoll.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            ready = []
        callbacks, stale = self._callbacks, self._stale
        stale.clear()  # only removals during this batch make its readiness stale
        for fd, _ in ready:
            # An earlier callback of this batch may have removed (or replaced) this one:
            # a device torn down by a xenstore event must not see its stale channel event.
            callback = callbacks.get(fd)
            if callback is not None and fd not in stale:
                callback()
        if due is not None and time.monotonic() >= due:
            self._run_due_timers()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._epoll.close()
        self._callbacks.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _next_due(self) -> float | None:
        """When the first live timer is due (None: no timer)."""
        timers = self._timers
        while timers and timers[0].callback is None:
            heapq.heappop(timers)
            self._cancelled = max(0, self._cancelled - 1)
        return timers[0].when if timers else None

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0].when <= now:
            timer = heapq.heappop(self._timers)
            callback, timer.callback = timer.callback, None
            if callback is not None:
                callback()


class Alarm:
    """A timeout re-armed for every command, without a heap entry per command.

    ``arm()`` only records a deadline; one timer in the loop stands for it, and when
    that timer fires before the recorded deadline (the alarm was re-armed since), it
    is set again for the deadline. A disarmed alarm's timer fires once, finds nothing
    and is not set again, so an idle daemon sleeps.
    """

    __slots__ = ("_callback", "_deadline", "_delay", "_loop", "_timer")

    def __init__(self, loop: Loop, delay: float, callback: Callback) -> None:
        self._loop = loop
        self._delay = delay
        self._callback = callback
        self._deadline: float | None = None
        self._timer: Timer | None = None

    @property
    def armed(self) -> bool:
        return self._deadline is not None

    def arm(self) -> None:
        """Fire ``delay`` seconds from now, unless disarmed or re-armed before."""
        deadline = time.monotonic() + self._delay
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.callback is None or timer.when > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_later(self._delay, self._fire)

    def disarm(self) -> None:
        self._deadline = None

    def close(self) -> None:
        """Disarm and drop the loop's timer."""
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left > 0:
            self._timer = self._loop.call_later(left, self._fire)
            return
        self._deadline = None
        self._callback()
