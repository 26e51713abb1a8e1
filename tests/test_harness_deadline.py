from __future__ import annotations

import time

import pytest

from harness.deadline import Deadline
from harness.errors import DeadlineExpired


def test_remaining_counts_down_and_never_negative() -> None:
    d = Deadline(0.05)
    assert 0 < d.remaining <= 0.05 and not d.expired
    time.sleep(0.06)
    assert d.remaining == 0.0 and d.expired


def test_sub_never_exceeds_parent() -> None:
    parent = Deadline(0.1)
    assert parent.sub(10).remaining <= 0.1
    assert parent.sub(0.01).remaining <= 0.01


def test_wait_for_returns_the_value() -> None:
    calls = iter([None, 0, "ready"])
    assert Deadline(1).wait_for(lambda: next(calls), "thing", interval=0.001) == "ready"


def test_wait_for_times_out_naming_what() -> None:
    with pytest.raises(DeadlineExpired, match="the moon"):
        Deadline(0.05).wait_for(lambda: False, "the moon")


def test_wait_for_lets_the_predicate_abort() -> None:
    def boom() -> bool:
        raise RuntimeError("process died")

    with pytest.raises(RuntimeError, match="died"):
        Deadline(1).wait_for(boom, "x")


def test_check_and_negative() -> None:
    with pytest.raises(ValueError):
        Deadline(-1)
    with pytest.raises(DeadlineExpired):
        Deadline(0).check("nothing")
