"""Crash watch: every console of a Xen machine, from boot to teardown.

Without it a Xen panic, a dom0 or guest Oops or a dead QEMU showed up only as a chain
of SSH timeouts, minutes later, and ``on_crash="destroy"`` even threw the crashed guest
away. Here a thread follows the serial console (Xen and dom0: the ``console.log`` that
QEMU's chardev writes, whoever is attached), the guests' consoles (xenconsoled's
``/var/log/xen/console/guest-NAME.log`` in dom0, through one ``tail -F`` over SSH) and
QEMU's process, and reports each :class:`Crash` to a callback at once. The pytest
fixtures then fail the running test (:class:`CrashAlarm` raises in the main thread, as
pytest-timeout's signal method does) and restart the target for the next one.

The same patterns, as one ERE (:func:`shell_pattern`), scan dom0's and the guests'
``dmesg`` and ``xl dmesg`` after a failed test (at every log level; after every test it
cost 2.4 s per test under TCG), and ``harness status`` scans everything since
``harness up``. Patterns are named (STYLE.md 8); each is a line that Linux or Xen
prints only when something went wrong.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shlex
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from harness.errors import HarnessError

# name -> regex (bytes, ERE-compatible: no \d, so the shell's grep -E takes them as well)
CRASH_PATTERNS: dict[str, bytes] = {
    "xen panic": rb"Panic on CPU [0-9]+",
    "xen fatal trap": rb"FATAL TRAP",
    "xen bug": rb"Xen BUG at",
    "dom0 crashed": rb"Dom0 crashed",
    "kernel panic": rb"Kernel panic - not syncing",
    "kernel bug": rb"BUG: [a-zA-Z]",
    "kernel oops": rb"Oops: [0-9a-fx]+",
    "kernel warning": rb"WARNING: CPU: [0-9]+ PID: [0-9]+",
    "general protection fault": rb"general protection fault",
    "soft lockup": rb"soft lockup - CPU#",
    "hung task": rb"blocked for more than [0-9]+ seconds",
}
_NAMES = list(CRASH_PATTERNS)
_ANY = re.compile(b"|".join(b"(%s)" % p for p in CRASH_PATTERNS.values()))
CONTEXT_LINES = 12  # lines before the match in a crash's excerpt
MAX_LINE = 4096  # a console line longer than this is cut (a runaway without newlines)


def shell_pattern() -> str:
    """Every pattern as one ``grep -E`` expression."""
    return "|".join(p.decode() for p in CRASH_PATTERNS.values())


@dataclass(frozen=True)
class Crash:
    """One crash line on one console, with the lines before it."""

    console: str
    pattern: str
    line: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.console}: {self.pattern}: {self.line}"

    def report(self) -> str:
        """For a test's failure: which console, what, and the excerpt."""
        return (
            f"crash on {self}\n--- {self.console}, up to the first crash line ---\n{self.excerpt}"
        )


class CrashSeen(HarnessError):
    """Raised in the running test when a crash is seen (see :class:`CrashAlarm`)."""

    def __init__(self, crash: Crash) -> None:
        self.crash = crash
        super().__init__(crash.report())


def match(line: bytes) -> str | None:
    """The name of the first crash pattern ``line`` matches, or None."""
    m = _ANY.search(line)
    return None if m is None else _NAMES[(m.lastindex or 1) - 1]


def scan(
    console: str,
    lines: Iterable[bytes],
    before: collections.deque[bytes] | None = None,
) -> list[Crash]:
    """Every crash in ``lines`` of ``console``, each with the lines before it; ``before``
    carries those lines from one call to the next (the watch's growing logs)."""
    if before is None:
        before = collections.deque(maxlen=CONTEXT_LINES)
    crashes: list[Crash] = []
    for line in lines:
        line = line.rstrip(b"\r\n")[:MAX_LINE]
        name = match(line)
        if name is not None:
            crashes.append(_crash(console, name, line, [*before, line]))
        before.append(line)
    return crashes


def _crash(console: str, name: str, line: bytes, context: Sequence[bytes]) -> Crash:
    text = b"\n".join(context).decode(errors="replace")
    return Crash(console, name, line.decode(errors="replace").strip(), text)


class LineSource(Protocol):
    """New console bytes since the last read, without blocking."""

    name: str

    def read(self) -> bytes: ...

    def close(self) -> None: ...


class FileSource:
    """A growing file: QEMU's ``console.log`` (Xen's and dom0's serial console)."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self._offset = 0

    def read(self) -> bytes:
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self._offset:
                    self._offset = 0  # truncated: a new boot's log
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return b""
        self._offset += len(data)
        return data

    def close(self) -> None:
        pass


class Channel(Protocol):
    """What :class:`ChannelSource` needs of a paramiko channel."""

    def recv_ready(self) -> bool: ...

    def recv(self, nbytes: int) -> bytes: ...

    def close(self) -> None: ...


class ChannelSource:
    """The output of a command that runs for the whole watch (dom0's ``tail -F`` of one
    guest's console log), on its own SSH channel."""

    def __init__(self, name: str, channel: Channel) -> None:
        self.name = name
        self._channel = channel

    def read(self) -> bytes:
        data = b""
        while self._channel.recv_ready():
            chunk = self._channel.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self._channel.close()


class CrashWatch:
    """A thread that reads every source and checks ``alive`` each ``interval`` and
    reports each crash to ``on_crash`` once (a crash of the machine itself, when
    ``alive`` returns why it is dead, once)."""

    def __init__(
        self,
        sources: Sequence[LineSource],
        on_crash: Callable[[Crash], None],
        alive: Callable[[], str | None] | None = None,
        interval: float = 0.5,
    ) -> None:
        self.sources = list(sources)
        self._on_crash = on_crash
        self._alive = alive
        self._interval = interval
        self._partial: dict[str, bytes] = {}
        self._before: dict[str, collections.deque[bytes]] = {}
        self._dead = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crash-watch", daemon=True)

    def start(self) -> CrashWatch:
        self._thread.start()
        return self

    def poll(self) -> None:
        """One round: every source, then the machine (the thread calls this)."""
        for source in self.sources:
            with contextlib.suppress(OSError):
                self._feed(source.name, source.read())
        if self._alive is not None and not self._dead:
            why = self._alive()
            if why is not None:
                self._dead = True
                self._report(Crash("qemu", "machine died", why, why))

    def _feed(self, console: str, data: bytes) -> None:
        if not data:
            return
        *lines, rest = (self._partial.pop(console, b"") + data).split(b"\n")
        self._partial[console] = rest[-MAX_LINE:]
        before = self._before.setdefault(console, collections.deque(maxlen=CONTEXT_LINES))
        for crash in scan(console, lines, before=before):
            self._report(crash)

    def _report(self, crash: Crash) -> None:
        self._on_crash(crash)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def close(self) -> None:
        """Stop watching (before a planned stop of the machine: that is no crash)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)
        for source in self.sources:
            with contextlib.suppress(Exception):
                source.close()


class CrashAlarm:
    """Turns a crash seen by the watch thread into :class:`CrashSeen` raised in the main
    thread, while a test runs (``armed``): a signal interrupts whatever the test blocks
    on (a socket read, a sleep), so it fails at once instead of timing out."""

    SIGNAL = signal.SIGUSR2

    def __init__(self) -> None:
        self._main = threading.main_thread().ident
        self._pending: Crash | None = None
        self._armed = False
        self._previous: object = None
        self._installed = False

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        self._pending = None
        if not self._installed:
            self._previous = signal.signal(self.SIGNAL, self._raise)
            self._installed = True
        self._armed = True

    def disarm(self) -> None:
        self._armed = False
        if self._installed:
            self._installed = False
            signal.signal(self.SIGNAL, self._previous)  # type: ignore[arg-type]

    def fire(self, crash: Crash) -> None:
        """From any thread: the first crash of a test interrupts it."""
        if self._armed and self._pending is None and self._main is not None:
            self._pending = crash
            signal.pthread_kill(self._main, self.SIGNAL)

    def _raise(self, signum: int, frame: object) -> None:
        crash = self._pending
        if self._armed and crash is not None:
            self._armed = False  # once per test
            raise CrashSeen(crash)


GUEST_CONSOLE_LOG = "/var/log/xen/console/guest-{name}.log"  # xenconsoled --log=guest


def guest_console_command(name: str) -> str:
    """dom0's command that follows one guest's console (from now on, through reboots)."""
    return f"exec tail -F -n 0 {GUEST_CONSOLE_LOG.format(name=name)} 2>/dev/null"


DOM0_KERNEL_LOGS = "dmesg; xl dmesg; cat /var/log/xen/console/guest-*.log"
GUEST_KERNEL_LOGS = "dmesg"
SEEN_FILE = "/run/xenvtpm/crash-lines-seen"  # in each host: how many it has reported


def new_crash_lines_check(logs: str) -> str:
    """A host's shell test that exits 0 unless ``logs`` have crash lines it has not
    reported yet, and prints those. The first run on a host counts what is there as
    seen (a real host's old WARNINGs are not this run's)."""
    return (
        f"mkdir -p {os.path.dirname(SEEN_FILE)}; "
        f"new=$( {{ {logs}; }} 2>/dev/null | grep -E {shlex.quote(shell_pattern())} ); "
        'n=$(printf "%s" "$new" | grep -c .); '
        f's=$(cat {SEEN_FILE} 2>/dev/null || echo "$n"); echo "$n" > {SEEN_FILE}; '
        '[ "$n" -le "$s" ] || { printf "%s\\n" "$new" | tail -n $((n - s)); false; }'
    )


# ``harness status``: every guest console in dom0, each after a line naming its file.
GUEST_LOGS_COMMAND = (
    'for f in /var/log/xen/console/guest-*.log; do [ -f "$f" ] && echo "@@@ $f" && cat "$f"; '
    "done; true"
)


def parse_guest_logs(output: bytes) -> dict[str, list[bytes]]:
    """``GUEST_LOGS_COMMAND``'s output: guest name -> its console's lines."""
    logs: dict[str, list[bytes]] = {}
    current: list[bytes] | None = None
    for line in output.splitlines():
        if line.startswith(b"@@@ /var/log/xen/console/guest-") and line.endswith(b".log"):
            name = line.rsplit(b"/guest-", 1)[1].removesuffix(b".log").decode(errors="replace")
            current = logs.setdefault(name, [])
        elif current is not None:
            current.append(line)
    return logs


def crashes_in_logs(serial_log: Path | None, guest_logs: Mapping[str, list[bytes]]) -> list[Crash]:
    """Every crash in a machine's whole logs (``harness status``, since ``harness up``)."""
    crashes: list[Crash] = []
    if serial_log is not None and serial_log.exists():
        crashes += scan("serial console (Xen, dom0)", serial_log.read_bytes().splitlines())
    for name, lines in sorted(guest_logs.items()):
        crashes += scan(f"{name} console", lines)
    return crashes
