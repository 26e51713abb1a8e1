"""A minimal single-threaded event loop: file descriptors, timers, and a clean stop.

The daemons keep every per-command step on one thread (DESIGN.md section 5: no thread
hand-offs on the hot path), so they need only readiness callbacks and timers. Signals
and other threads stop the loop through a self-pipe, which is safe from a signal
handler.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
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
        self._selector = selectors.DefaultSelector()
        self._timers: list[Timer] = []
        self._cancelled = 0
        self._seq = itertools.count()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._running = False
        self._closed = False

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay, next(self._seq), callback, self)
        heapq.heappush(self._timers, timer)
        return timer

    def _timer_cancelled(self) -> None:
        """Every command arms and cancels a timeout far in the future: without this,
        cancelled timers would pile up in the heap until their time came."""
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
        self._running = True
        while self._running:
            self._dispatch(self._selector.select(self._next_timeout()))
            self._run_due_timers()

    def run_once(self, timeout: float = 0.0) -> None:
        """One iteration; for tests that drive the loop step by step."""
        self._dispatch(self._selector.select(timeout))
        self._run_due_timers()

    def _dispatch(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        registered = self._selector.get_map()
        for key, _ in ready:
            # An earlier callback of this batch may have removed (or replaced) this one:
            # a device torn down by a xenstore event must not see its stale channel event.
            if registered.get(key.fd) is key:
                key.data()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _next_timeout(self) -> float | None:
        while self._timers and self._timers[0].callback is None:
            heapq.heappop(self._timers)
            self._cancelled = max(0, self._cancelled - 1)
        if not self._timers:
            return None
        return max(0.0, self._timers[0].when - time.monotonic())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0].when <= now:
            timer = heapq.heappop(self._timers)
            callback, timer.callback = timer.callback, None
            if callback is not None:
                callback()
