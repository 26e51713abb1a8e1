"""Time budgets as objects (STYLE.md 7, after labgrid ``util/timeout.py``).

A ``Deadline`` is created once at the top of an operation and passed down through nested
waits, so the whole operation, not each step, is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from harness.errors import DeadlineExpired

T = TypeVar("T")


class Deadline:
    """A point in ``time.monotonic()`` time; ``remaining`` never goes below zero."""

    def __init__(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"negative deadline {seconds}")
        self.seconds = float(seconds)
        self._end = time.monotonic() + self.seconds

    @property
    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def sub(self, seconds: float) -> Deadline:
        """A nested budget: at most ``seconds`` and never past this deadline."""
        return Deadline(min(seconds, self.remaining))

    def check(self, what: str) -> None:
        """Raise DeadlineExpired if the budget is spent."""
        if self.expired:
            raise DeadlineExpired(what, self.seconds)

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        what: str,
        interval: float = 0.02,
        max_interval: float = 0.2,
    ) -> T:
        """Poll ``predicate`` until it returns a truthy value, which is returned.

        The predicate may raise to abort (e.g. LaunchFailure when a process died).
        Polling backs off from ``interval`` to ``max_interval``.
        """
        while True:
            value = predicate()
            if value:
                return value
            if self.expired:
                raise DeadlineExpired(what, self.seconds)
            time.sleep(min(interval, self.remaining))
            interval = min(interval * 1.5, max_interval)

    def __repr__(self) -> str:
        return f"Deadline({self.seconds:.1f} s, {self.remaining:.2f} s left)"
