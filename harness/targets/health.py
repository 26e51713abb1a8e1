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
    """One shell command running every check, printing the index of each that failed."""
    return "; ".join(
        f"{{ {check.test}; }} >/dev/null 2>&1 || echo {i}" for i, check in enumerate(checks)
    )


def failed_checks(
    hosts: Mapping[str, Shell], checks: Sequence[Check], timeout: float = CHECK_TIMEOUT
) -> list[Check]:
    """The checks that fail now, in the order given. Checks of hosts not in ``hosts``
    (not connected) are skipped; a host that cannot be asked raises its SSH error."""
    by_host: dict[str, list[Check]] = {}
    for check in checks:
        if check.host in hosts:
            by_host.setdefault(check.host, []).append(check)

    def ask(name: str) -> set[Check]:
        todo = by_host[name]
        _, out, _ = hosts[name].run(script(todo), timeout=timeout)
        failed = {int(word) for word in out.split() if word.isdigit()}
        return {todo[i] for i in failed if i < len(todo)}

    if not by_host:
        return []
    with ThreadPoolExecutor(len(by_host)) as pool:
        failed = set().union(*pool.map(ask, by_host))
    return [check for check in checks if check in failed]
