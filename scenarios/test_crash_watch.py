"""The crash watch on Xen under QEMU (``harness/crash_watch.py``, issue 16 point 1).

A crash shows up as what it is, at once, with its console, instead of as a chain of
SSH timeouts minutes later; the next test starts on a restored machine:

- a guest crashed with ``echo c > /proc/sysrq-trigger`` (``on_crash="destroy"``: xl
  throws the domain away) fails the test running at the time with the guest console's
  excerpt, well within 90 s;
- a line in the WARNING format written to a guest's ``/dev/kmsg`` at debug level (so only
  ``dmesg`` has it, no console) is found by the kernel-log scan that a failed test's
  report gets (``target.kernel_log_problems``), once;
- the next scenario finds every guest served again.
"""

from __future__ import annotations

import os
import shlex
import time
from typing import Any

import pytest

from harness.crash_watch import CrashSeen
from harness.target import CrashWatch, Target
from harness.tpmwire import get_random

pytestmark = pytest.mark.needs("crash-watch")

SEEN_WITHIN_S = 90.0


@pytest.mark.crashes
def test_a_guest_crash_fails_the_running_test_at_once(
    target: Target, crash_watch: CrashWatch, guests: Any
) -> None:
    if target.name != "xen":  # the watch is the harness's, the same for every kind
        pytest.skip("one guest crash per nox -s xen: on --target xen (the restore costs minutes)")
    victim = guests[-1]
    t0 = time.monotonic()
    with pytest.raises(CrashSeen) as info:
        victim.run("echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger", timeout=120)
        time.sleep(SEEN_WITHIN_S * 2)  # the crash must interrupt this, not the timeout
    waited = time.monotonic() - t0
    crash = info.value.crash
    assert waited < SEEN_WITHIN_S, (waited, crash)
    assert crash.console == f"{victim.name} console", crash
    assert crash.pattern in ("kernel panic", "kernel oops", "kernel bug"), crash
    assert "sysrq" in crash.excerpt, crash.excerpt
    assert crash in crash_watch.crashes


def test_the_next_test_runs_on_a_restored_machine(target: Any, guests: Any) -> None:
    for guest in guests:
        with guest.transport() as t:
            response = t.transmit(get_random(8))
        assert response[6:10] == b"\0\0\0\0" and len(response) == 20, response.hex()


def test_a_warning_in_a_guests_kernel_log_is_reported_once(
    crash_watch: CrashWatch, guest: Any
) -> None:
    line = f"WARNING: CPU: 0 PID: 1 at xenvtpm/probe.c:1 probe_{os.urandom(4).hex()}+0x0/0x0"
    crash_watch.kernel_log_problems()  # whatever came before this test is not its own
    guest.run(f"echo {shlex.quote('<7>' + line)} > /dev/kmsg")
    problems = crash_watch.kernel_log_problems()  # what a failed test's report gets
    assert any(line in p and guest.name in p for p in problems), problems
    assert not any(line in p for p in crash_watch.kernel_log_problems())  # once
