"""A minimal single-threaded event loop: file descriptors, timers, and a clean stop.

Every daemon runs on it: the frontend, the backend, the manager and simxend. They keep
every per-command step on one thread (DESIGN.md section 5: no thread hand-offs on the
hot path), so they need only readiness callbacks and timers. Signals and other threads
stop the loop, or hand it work (:meth:`Loop.call_soon_threadsafe`: the manager's swtpm
starter and fsync workers), through a self-pipe, which is safe from a signal handler.

Every command wakes each daemon twice, so an iteration is kept to one ``epoll_wait``
and a dict lookup per ready fd (no ``selectors`` key objects), and timers are looked at
only when one is due. A per-command timeout is an :class:`Alarm`: arming it stores a
deadline, and the heap holds one timer per alarm, re-armed when it fires early, instead
of one pushed and cancelled per command (issue 20).

Two ways to watch an fd share that dispatch: :meth:`Loop.add_reader` calls back with no
argument, and :meth:`Loop.register` (the manager's and simxend's sockets, which also
wait to write) with the ``selectors`` mask of what is ready. Readiness that an earlier
callback of the same batch made stale (its fd removed, or modified: a swtpm restarted,
a socket turned to writing) is skipped: its handling could crash or misroute.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from selectors import EVENT_READ, EVENT_WRITE
from typing import Protocol

log = logging.getLogger(__name__)

Callback = Callable[[], None]
Handler = Callable[[int], None]  # gets the selectors mask of what is ready


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FileObj = int | HasFileno


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


@dataclass(frozen=True, slots=True)
class Key:
    """One watched fd, as ``selectors.SelectorKey``; ``events`` 0: an
    :meth:`Loop.add_reader` callback, called without the mask."""

    fileobj: FileObj
    fd: int
    events: int
    data: Callable[..., None]


def _epoll_mask(events: int) -> int:
    return (select.EPOLLIN if events & EVENT_READ else 0) | (
        select.EPOLLOUT if events & EVENT_WRITE else 0
    )


class Loop:
    """Readiness callbacks on file descriptors, plus timers."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._keys: dict[int, Key] = {}
        self._stale: set[int] = set()  # removed or modified during the batch dispatched
        self._timers: list[Timer] = []
        self._cancelled = 0
        self._seq = itertools.count()
        self._soon: deque[Callback] = deque()
        self._wake_lock = threading.RLock()  # re-entrant: signal handlers wake too
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_r, self._on_wake)
        self._stopping = False
        self._closed = False

    # -- file descriptors --------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is readable."""
        if fd in self._keys:
            raise KeyError(f"{fd} is already registered")
        self._epoll.register(fd, select.EPOLLIN)
        self._keys[fd] = Key(fd, fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        if self._keys.pop(fd, None) is None:
            return
        self._stale.add(fd)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def register(self, fileobj: FileObj, events: int, handler: Handler) -> Key:
        """Call ``handler(mask)`` when ``fileobj`` is ready for any of ``events``
        (``selectors.EVENT_READ | EVENT_WRITE``), as ``selectors`` would."""
        fd = self._fd(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self._epoll.register(fd, _epoll_mask(events))
        key = self._keys[fd] = Key(fileobj, fd, events, handler)
        return key

    def modify(self, fileobj: FileObj, events: int, handler: Handler | None = None) -> Key:
        """Watch other events (and call ``handler``, if given); no-op if the same."""
        fd = self._fd(fileobj)
        old = self._keys[fd]
        if events == old.events and (handler is None or handler == old.data):
            return old
        if events != old.events:
            self._epoll.modify(fd, _epoll_mask(events))
        self._stale.add(fd)  # a readiness already reported was for the old registration
        key = self._keys[fd] = Key(old.fileobj, fd, events, handler or old.data)
        return key

    def unregister(self, fileobj: FileObj) -> Key:
        key = self._keys.pop(self._fd(fileobj))
        self._stale.add(key.fd)
        with contextlib.suppress(OSError):  # closed already: epoll dropped it itself
            self._epoll.unregister(key.fd)
        return key

    def _fd(self, fileobj: FileObj) -> int:
        """Its fd; a closed socket (fileno -1) is found by identity, as selectors does."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd >= 0:
            return fd
        for key in self._keys.values():
            if key.fileobj is fileobj:
                return key.fd
        raise KeyError(f"{fileobj!r} is not registered")

    # -- timers and calls from elsewhere -----------------------------------------------

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay, next(self._seq), callback, self)
        heapq.heappush(self._timers, timer)
        return timer

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run ``callback`` on the loop's thread, soon; safe from other threads and from
        signal handlers. Dropped once the loop is closed (no fd is written then: its
        number may already belong to another file)."""
        self._soon.append(callback)
        self._wake()

    def call_on_signal(self, signum: int, callback: Callback) -> None:
        """On ``signum``, run ``callback`` on the loop's thread (main thread only)."""
        signal.signal(signum, lambda *_: self.call_soon_threadsafe(callback))

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

    # -- running -----------------------------------------------------------------------

    def stop(self) -> None:
        """Make ``run()`` return (at once if it has not begun); safe from signal
        handlers and other threads."""
        self._stopping = True
        self._wake()

    def stop_on_signals(self, *signums: int) -> None:
        for signum in signums or (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def run(self) -> None:
        """Iterate until :meth:`stop`: :meth:`run_once` without a timeout of its own,
        written out with its lookups hoisted, since every command passes here twice."""
        poll, keys, stale, monotonic = (
            self._epoll.poll,
            self._keys,
            self._stale,
            time.monotonic,
        )
        epollin, epollout = select.EPOLLIN, select.EPOLLOUT
        try:
            while not self._stopping:
                due = self._next_due() if self._timers else None
                ready = poll(-1 if due is None else max(0.0, due - monotonic()))
                stale.clear()
                for fd, event in ready:
                    key = keys.get(fd)
                    if key is None or fd in stale:
                        continue
                    if key.events:
                        key.data(
                            (
                                (EVENT_WRITE if event & ~epollin else 0)
                                | (EVENT_READ if event & ~epollout else 0)
                            )
                            & key.events
                        )
                    else:
                        key.data()
                if due is not None and monotonic() >= due:
                    self._run_due_timers()
        finally:
            self._stopping = False

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
        keys, stale = self._keys, self._stale
        stale.clear()  # only changes during this batch make its readiness stale
        for fd, event in ready:
            # An earlier callback of this batch may have removed (or replaced) this one:
            # a device torn down by a xenstore event must not see its stale channel event.
            key = keys.get(fd)
            if key is None or fd in stale:
                continue
            if key.events:
                mask = (EVENT_WRITE if event & ~select.EPOLLIN else 0) | (
                    EVENT_READ if event & ~select.EPOLLOUT else 0
                )
                key.data(mask & key.events)
            else:
                key.data()
        if due is not None and time.monotonic() >= due:
            self._run_due_timers()

    def close(self) -> None:
        with self._wake_lock:  # a late worker must never write to a reused fd
            if self._closed:
                return
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._epoll.close()
        self._keys.clear()
        self._soon.clear()

    def _wake(self) -> None:
        with self._wake_lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                    os.write(self._wake_w, b"x")

    def _on_wake(self) -> None:
        """Empty the pipe first: a call queued after that writes to it again."""
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        soon = self._soon
        for _ in range(len(soon)):  # not those they queue: they wait for the next turn
            soon.popleft()()

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

    @property
    def deadline(self) -> float | None:
        """When it fires (``time.monotonic()``), if armed."""
        return self._deadline

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
