"""The target health check: one shell command per host, every host at once."""

from __future__ import annotations

import subprocess
import threading

import pytest

from harness.targets.health import Check, failed_checks, failures, script


class LocalShell:
    """A host whose shell is this machine's ``sh``; counts the commands it ran."""

    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.commands: list[str] = []
        self.barrier = barrier

    def run(
        self, command: str, timeout: float = 60.0, *, check: bool = False, stdin: bytes = b""
    ) -> tuple[int, str, str]:
        self.commands.append(command)
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # passes only while the other host is asked too
        done = subprocess.run(
            ["sh", "-c", command], capture_output=True, text=True, timeout=timeout
        )
        return done.returncode, done.stdout, done.stderr


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_each_host_is_asked_once_and_failures_come_back_in_order() -> None:
    dom0, guest0 = LocalShell(), LocalShell()
    checks = [
        Check("dom0", "kill -0 1", "init is gone"),
        Check("guest0", "test -c /dev/null", "no /dev/null"),
        Check("dom0", f"kill -0 {dead_pid()}", "backend in dom0 exited"),
        Check("guest0", "test -c /nonexistent", "guest0: /nonexistent is gone"),
    ]
    failed = failed_checks({"dom0": dom0, "guest0": guest0}, checks)
    assert [c.problem for c in failed] == ["backend in dom0 exited", "guest0: /nonexistent is gone"]
    assert (len(dom0.commands), len(guest0.commands)) == (1, 1)


def test_hosts_are_asked_in_parallel() -> None:
    """Two hosts whose commands can only finish together (a barrier of two)."""
    barrier = threading.Barrier(2)
    hosts = {"dom0": LocalShell(barrier), "guest0": LocalShell(barrier)}
    checks = [Check("dom0", "true", "a"), Check("guest0", "false", "b")]
    assert failed_checks(hosts, checks) == [checks[1]]


def test_checks_of_hosts_not_connected_are_skipped() -> None:
    dom0 = LocalShell()
    checks = [Check("dom0", "true", "a"), Check("guest1", "false", "b")]
    assert failed_checks({"dom0": dom0}, checks) == []
    assert failed_checks({}, checks) == []


def test_a_check_that_prints_cannot_pass_for_another() -> None:
    """A check's output is only evidence (after a ``|``), never a failure marker."""
    checks = [Check("h", "echo 1; echo @@1; true", "a"), Check("h", "echo @@0; true", "b")]
    assert failed_checks({"h": LocalShell()}, checks) == []
    checks.append(Check("h", "echo @@0; false", "c"))
    assert failures({"h": LocalShell()}, checks) == [(checks[2], "@@0")]


def test_a_failed_check_brings_its_last_lines_as_evidence() -> None:
    """The evidence of a failed check (say, the new dmesg lines), at most 20 lines."""
    checks = [Check("h", "seq 1 30; false", "a"), Check("h", "echo fine", "b")]
    ((check, evidence),) = failures({"h": LocalShell()}, checks)
    assert check is checks[0]
    assert evidence.splitlines() == [str(i) for i in range(11, 31)]
    assert "o=$(" in script(checks)


def test_a_host_that_cannot_be_asked_raises() -> None:
    class Gone:
        def run(
            self, command: str, timeout: float = 60.0, *, check: bool = False, stdin: bytes = b""
        ) -> tuple[int, str, str]:
            raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        failed_checks({"dom0": Gone()}, [Check("dom0", "true", "a")])
