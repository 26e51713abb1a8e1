"""A target's health check: every host at once, one shell command each.

The fixtures check the target after every scenario (``conftest.py``), so its cost is
paid a few hundred times a run: over SSH into TCG guests a round trip is a sizeable
fraction of a second, and one host after another it was one round trip per host, plus
one per guest on stock guests. Here each host gets all of its checks in one command,
and the hosts are asked in parallel: the check costs one round trip of the slowest host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

CHECK_TIMEOUT = 30.0
EVIDENCE_LINES = 20  # of a failed check's output, into the test's report


class Shell(Protocol):
    """What a check needs of a host (``harness.ssh.SshHost`` has it)."""

    def run(
        self, command: str, timeout: float = 60.0, *, check: bool = False, stdin: bytes = b""
    ) -> tuple[int, str, str]: ...


@dataclass(frozen=True)
class Check:
    """One condition on one host: ``test`` is a shell command that exits 0 while all is
    well; ``problem`` is what the check reports when it does not."""

    host: str
    test: str
    problem: str


def script(checks: Sequence[Check]) -> str:
    """One shell command running every check; for each that failed, a line ``@@<index>``
    then the last lines of its output (its evidence: the new dmesg lines, say), each
    after a ``|``, so no output can pass for another check's failure."""
    return "; ".join(
        f'o=$( {{ {check.test}; }} 2>&1 ) || {{ echo "@@{i}"; printf "%s\\n" "$o" | tail -n '
        f"{EVIDENCE_LINES} | sed 's/^/|/'; }}"
        for i, check in enumerate(checks)
    )


def _parse(out: str, todo: Sequence[Check]) -> dict[Check, str]:
    failed: dict[Check, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        index = line[2:]
        if line.startswith("@@") and index.isdigit() and int(index) < len(todo):
            current = failed.setdefault(todo[int(index)], [])
        elif current is not None and line.startswith("|"):
            current.append(line[1:])
    return {check: "\n".join(lines).strip() for check, lines in failed.items()}


def failures(
    hosts: Mapping[str, Shell], checks: Sequence[Check], timeout: float = CHECK_TIMEOUT
) -> list[tuple[Check, str]]:
    """The checks that fail now, in the order given, each with its output. Checks of
    hosts not in ``hosts`` (not connected) are skipped; a host that cannot be asked
    raises its SSH error."""
    by_host: dict[str, list[Check]] = {}
    for check in checks:
        if check.host in hosts:
            by_host.setdefault(check.host, []).append(check)

    def ask(name: str) -> dict[Check, str]:
        todo = by_host[name]
        _, out, _ = hosts[name].run(script(todo), timeout=timeout)
        return _parse(out, todo)

    if not by_host:
        return []
    found: dict[Check, str] = {}
    with ThreadPoolExecutor(len(by_host)) as pool:
        for result in pool.map(ask, by_host):
            found.update(result)
    return [(check, found[check]) for check in checks if check in found]


def failed_checks(
    hosts: Mapping[str, Shell], checks: Sequence[Check], timeout: float = CHECK_TIMEOUT
) -> list[Check]:
    """The checks that fail now, in the order given (see :func:`failures`)."""
    return [check for check, _ in failures(hosts, checks, timeout)]
