"""The serial console: watch boot stages with pexpect, fail at once on a crash.

Xen hangs rather than exits after a dom0 crash, so every wait has a success pattern,
the failure patterns below and a ``Deadline`` (STYLE.md 7, like QEMU's
``wait_for_console_pattern``). Patterns are named bytes regexes (STYLE.md 8), never
indices. The raw console is logged by QEMU itself (chardev ``logfile=``) to the run's
``console.log``, so the evidence a failure carries is that file's tail.

``interact`` bridges a terminal to the console socket for ``harness console dom0``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import socket
import sys
import termios
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pexpect
import pexpect.fdpexpect

from harness.deadline import Deadline
from harness.errors import HarnessError, TargetNotReady
from harness.process import tail

log = logging.getLogger(__name__)

# Seen on this machine kind (DESIGN.md section 4): each ends the boot, so fail at once.
FAILURE_PATTERNS: dict[str, bytes] = {
    "xen panic": rb"Panic on CPU \d+",
    "dom0 crashed": rb"Dom0 crashed",
    "kernel panic": rb"Kernel panic - not syncing[^\r\n]*",
    "emergency shell": rb"You are in emergency mode|Give root password for maintenance",
    "initramfs shell": rb"\(initramfs\) ",
}


@dataclass(frozen=True)
class Stage:
    """One step of a boot: the pattern that ends it and its own time budget (s)."""

    name: str
    pattern: bytes
    timeout: float


# Xen 4.17 + Debian 12 dom0 under TCG: 23-33 s from QEMU start to a login on an idle
# host, 130 s seen while other test runs shared the 2 cores; budgets allow for the latter.
DOM0_STAGES: tuple[Stage, ...] = (
    Stage("xen hypervisor", rb"Xen version 4\.17", 30),
    Stage("dom0 kernel", rb"Linux version \d+\.\d+", 90),
    Stage("dom0 userspace", rb"systemd\[1\]: |Welcome to ", 180),
    Stage("dom0 login", rb"dom0 login: |root@dom0:", 180),
)


class ConsoleFailure(HarnessError):
    """A failure pattern appeared on a console (a panic, a crash, an emergency shell)."""

    def __init__(self, console: str, pattern: str, seen: bytes, log_path: Path | None) -> None:
        self.console = console
        self.pattern = pattern
        self.seen = seen
        self.log_path = log_path
        super().__init__(
            f"{console}: {pattern}: {seen.decode(errors='replace').strip()!r}"
            f"\nconsole log: {log_path}\nconsole tail:\n{tail(log_path, 40)}"
        )


class SerialConsole:
    """A connection to QEMU's console socket, read with pexpect (bytes, no encoding)."""

    def __init__(self, socket_path: Path, log_path: Path | None, name: str = "console") -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.name = name
        self._sock: socket.socket | None = None
        self._spawn: pexpect.fdpexpect.fdspawn | None = None

    def start(self) -> Self:
        if self._spawn is not None:
            return self
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except OSError as e:
            sock.close()
            raise TargetNotReady(self.name, f"cannot connect to {self.socket_path}: {e}") from e
        self._sock = sock
        self._spawn = pexpect.fdpexpect.fdspawn(sock.fileno(), timeout=1)
        return self

    def close(self) -> None:
        # fdspawn.close() closes the fd; the socket object must not close it again.
        if self._spawn is not None:
            with contextlib.suppress(OSError):
                self._spawn.close()
            self._spawn = None
        if self._sock is not None:
            self._sock.detach()
            self._sock = None

    def expect(
        self,
        pattern: bytes,
        deadline: Deadline,
        what: str,
        failures: dict[str, bytes] | None = None,
    ) -> re.Match[bytes]:
        """Wait for ``pattern``; ConsoleFailure on a failure pattern, TargetNotReady on
        timeout or EOF (both with the console log's tail)."""
        spawn = self.start()._spawn
        assert spawn is not None
        fails = FAILURE_PATTERNS if failures is None else failures
        names = list(fails)
        patterns: list[object] = [re.compile(pattern)]
        patterns += [re.compile(fails[n]) for n in names]
        patterns += [pexpect.TIMEOUT, pexpect.EOF]
        try:
            index = spawn.expect(patterns, timeout=max(deadline.remaining, 0.1))
        except OSError:  # ECONNRESET: QEMU died with our input unread, an EOF all the same
            index = len(patterns) - 1
        if index == 0:
            match: re.Match[bytes] = spawn.match
            return match
        if 1 <= index <= len(names):
            raise ConsoleFailure(self.name, names[index - 1], spawn.match.group(0), self.log_path)
        reason = "timed out" if patterns[index] is pexpect.TIMEOUT else "console closed"
        raise TargetNotReady(
            what,
            f"{reason} after {deadline.seconds:.0f} s waiting for {pattern.decode()!r} "
            f"on {self.name}\nconsole tail:\n{tail(self.log_path, 30)}",
            {"console": self.log_path} if self.log_path else {},
        )

    def poll_failures(self) -> None:
        """ConsoleFailure if a failure pattern arrived since the last read; no waiting."""
        with contextlib.suppress(TargetNotReady):  # nothing new, or the console closed
            self.expect(rb"(?!)", Deadline(0.05), "console poll")

    def walk(
        self,
        stages: Sequence[Stage],
        deadline: Deadline,
        say: Callable[[str], None] = lambda m: None,
        clock: Callable[[], float] | None = None,
    ) -> dict[str, float]:
        """Each stage in order, each within its own timeout and the overall deadline.

        Returns seconds from the start of the walk to each stage's pattern.
        """
        import time

        now = clock or time.monotonic
        t0 = now()
        seen: dict[str, float] = {}
        for stage in stages:
            self.expect(stage.pattern, deadline.sub(stage.timeout), stage.name)
            seen[stage.name] = round(now() - t0, 1)
            say(f"{stage.name}: up at {seen[stage.name]:.1f} s")
        return seen

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


ESCAPE = b"\x1d"  # Ctrl-]


def interact(socket_path: Path, banner: str = "") -> None:
    """Bridge this terminal to a console socket until Ctrl-] (or the socket closes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(socket_path))
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    print(banner or f"connected to {socket_path}; Ctrl-] quits", file=sys.stderr, flush=True)
    try:
        if saved is not None:
            tty.setraw(fd)
        sock.sendall(b"\r")
        while True:
            ready, _, _ = select.select([fd, sock], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if fd in ready:
                data = os.read(fd, 1024)
                if not data or ESCAPE in data:
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sock.close()
        print("\r\n[console closed]", file=sys.stderr)
