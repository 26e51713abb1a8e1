"""``harness.crash_watch`` on fake consoles: what counts as a crash, the excerpt it
carries, the thread that follows growing logs and channels, and the alarm that fails
the running test at once. The Xen side (a guest crashed with sysrq) is
``scenarios/test_crash_watch.py``."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness.crash_watch import (
    GUEST_LOGS_COMMAND,
    SEEN_FILE,
    ChannelSource,
    Crash,
    CrashAlarm,
    CrashSeen,
    CrashWatch,
    FileSource,
    crashes_in_logs,
    match,
    new_crash_lines_check,
    parse_guest_logs,
    scan,
    shell_pattern,
)

# Lines as Xen 4.17 and Linux 6.1 print them (the kernel's own log prefixes included).
CRASH_LINES = {
    "(XEN) Panic on CPU 0:": "xen panic",
    "(XEN) FATAL TRAP: vector = 14 (page fault)": "xen fatal trap",
    "(XEN) Xen BUG at common/sched/core.c:1234": "xen bug",
    "(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds.": "dom0 crashed",
    "[   42.1] Kernel panic - not syncing: sysrq triggered crash": "kernel panic",
    "[   42.0] BUG: kernel NULL pointer dereference, address: 0000000000000000": "kernel bug",
    "[   42.0] Oops: 0002 [#1] PREEMPT SMP NOPTI": "kernel oops",
    "[    9.9] WARNING: CPU: 1 PID: 77 at drivers/char/tpm/tpm-chip.c:99 f+0x1/0x2": (
        "kernel warning"
    ),
    "[   12.0] general protection fault, probably for non-canonical address": (
        "general protection fault"
    ),
    "[   50.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [python3:123]": "kernel bug",
    "[  242.0] INFO: task python3:123 blocked for more than 120 seconds.": "hung task",
}
BENIGN_LINES = [
    "(XEN) Xen version 4.17.3-pre (Debian 4.17.2+76-ge1f9cb16e2-1~deb12u1)",
    "[    0.000000] Linux version 6.1.0-50-amd64 (debian-kernel@lists.debian.org)",
    "[    3.1] systemd[1]: Started systemd-journald.service - Journal Service.",
    "[   20.5] tpm tpm0: A TPM error (256) occurred attempting the self test",
    "[   20.6] xen-tpmfront: BUG_ON would be here in older kernels",
    "guest0 login: root (automatic login)",
]


@pytest.mark.parametrize("line", list(CRASH_LINES))
def test_each_kind_of_crash_is_named(line: str) -> None:
    assert match(line.encode()) == CRASH_LINES[line]


@pytest.mark.parametrize("line", BENIGN_LINES)
def test_a_normal_boot_and_tpm_errors_are_no_crash(line: str) -> None:
    assert match(line.encode()) is None


def test_the_shell_pattern_matches_exactly_the_same_lines() -> None:
    """dmesg and xl dmesg are scanned in the host with grep -E: the same verdicts."""
    text = "\n".join([*CRASH_LINES, *BENIGN_LINES]) + "\n"
    out = subprocess.run(
        ["grep", "-E", shell_pattern()], input=text, capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == list(CRASH_LINES)


def test_scan_gives_the_lines_before_the_crash() -> None:
    lines = [f"line {i}".encode() for i in range(20)] + [b"Kernel panic - not syncing: x"]
    (crash,) = scan("guest0 console", lines)
    assert crash.console == "guest0 console" and crash.pattern == "kernel panic"
    assert crash.excerpt.splitlines()[-1] == "Kernel panic - not syncing: x"
    assert crash.excerpt.splitlines()[0] == "line 8"  # CONTEXT_LINES (12) before it
    assert "guest0 console: kernel panic: Kernel panic" in crash.report()


def test_the_watch_follows_a_growing_log_and_reports_each_crash_once(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    seen: list[Crash] = []
    watch = CrashWatch([FileSource("serial", log)], seen.append)
    watch.poll()  # no file yet: nothing
    log.write_bytes(b"(XEN) Xen version 4.17\r\n[ 1.0] Oops: 00")
    watch.poll()
    assert seen == []  # half a line is not judged yet
    with log.open("ab") as f:
        f.write(b"02 [#1] SMP\r\nmore\n")
    watch.poll()
    watch.poll()
    assert [(c.console, c.pattern, c.line) for c in seen] == [
        ("serial", "kernel oops", "[ 1.0] Oops: 0002 [#1] SMP")
    ]
    assert seen[0].excerpt.startswith("(XEN) Xen version 4.17")
    log.write_bytes(b"(XEN) Panic on CPU 1:\n")  # a new boot truncated the log
    watch.poll()
    assert [c.pattern for c in seen] == ["kernel oops", "xen panic"]


def test_a_dead_machine_is_reported_once() -> None:
    seen: list[Crash] = []
    watch = CrashWatch([], seen.append, alive=lambda: "qemu 123 exited -9")
    watch.poll()
    watch.poll()
    assert [(c.console, c.pattern, c.line) for c in seen] == [
        ("qemu", "machine died", "qemu 123 exited -9")
    ]


class FakeChannel:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def recv_ready(self) -> bool:
        return bool(self.chunks)

    def recv(self, nbytes: int) -> bytes:
        return self.chunks.pop(0)

    def close(self) -> None:
        self.closed = True


def test_a_guest_console_over_ssh_is_watched_and_closed(tmp_path: Path) -> None:
    channel = FakeChannel(
        [
            b"[ 5.0] sysrq: Trigger a crash\n[ 5.0] Kernel panic - not ",
            b"syncing: sysrq triggered crash\n",
        ]
    )
    seen: list[Crash] = []
    watch = CrashWatch([ChannelSource("guest1 console", channel)], seen.append, interval=0.01)
    watch.start()
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    watch.close()
    assert [(c.console, c.pattern) for c in seen] == [("guest1 console", "kernel panic")]
    assert "sysrq: Trigger a crash" in seen[0].excerpt and channel.closed


def test_the_alarm_fails_the_blocked_test_at_once() -> None:
    alarm = CrashAlarm()
    crash = Crash("guest0 console", "kernel panic", "Kernel panic - not syncing", "x")
    alarm.arm()
    try:
        threading.Timer(0.2, alarm.fire, [crash]).start()
        t0 = time.monotonic()
        with pytest.raises(CrashSeen) as info:
            time.sleep(30)  # a test waiting on a guest that will never answer
        assert time.monotonic() - t0 < 5
        assert info.value.crash is crash
    finally:
        alarm.disarm()


def test_a_disarmed_alarm_raises_nothing() -> None:
    alarm = CrashAlarm()
    alarm.arm()
    alarm.disarm()
    alarm.fire(Crash("serial", "xen panic", "Panic on CPU 0", "x"))
    time.sleep(0.1)  # no CrashSeen (nor SIGUSR2's default action: death)


def test_new_crash_lines_fail_once_with_the_lines(tmp_path: Path) -> None:
    """The after-test scan of a host's kernel logs (dmesg, xl dmesg), on a fake log:
    what was there first is the baseline; each new crash line fails one check."""
    log = tmp_path / "dmesg"
    log.write_text("[ 1.0] WARNING: CPU: 0 PID: 1 at boot.c:1 old+0x1/0x2\n")
    command = new_crash_lines_check(f"cat {log}").replace(SEEN_FILE, str(tmp_path / "seen"))
    command = command.replace(f"mkdir -p {Path(SEEN_FILE).parent}", "true")

    def check() -> tuple[int, str]:
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
        return done.returncode, done.stdout

    assert check() == (0, "")  # the old WARNING is the baseline
    with log.open("a") as f:
        f.write("[ 9.0] tpm tpm0: A TPM error (256)\n[ 9.1] Oops: 0002 [#1] SMP\n")
    assert check() == (1, "[ 9.1] Oops: 0002 [#1] SMP\n")
    assert check() == (0, "")  # reported once


def test_status_finds_every_crash_since_up(tmp_path: Path) -> None:
    """``harness status``: the serial console's log on the host, each guest's console
    from dom0 (one command, files named), each crash with its console."""
    serial = tmp_path / "console.log"
    serial.write_bytes(b"(XEN) Xen version 4.17\r\n[ 3.0] dom0 login: root\r\n")
    output = (
        b"@@@ /var/log/xen/console/guest-guest0.log\n[ 1.0] guest0 login:\n"
        b"@@@ /var/log/xen/console/guest-guest1.log\n[ 1.0] sysrq: Trigger a crash\n"
        b"[ 1.0] Kernel panic - not syncing: sysrq triggered crash\n"
    )
    logs = parse_guest_logs(output)
    assert sorted(logs) == ["guest0", "guest1"]
    crashes = crashes_in_logs(serial, logs)
    assert [(c.console, c.pattern) for c in crashes] == [("guest1 console", "kernel panic")]
    fake = GUEST_LOGS_COMMAND.replace("/var/log/xen/console", str(tmp_path))
    (tmp_path / "guest-guest1.log").write_bytes(b"[ 1.0] Oops: 0002 [#1] SMP\n")
    out = subprocess.run(["sh", "-c", fake], capture_output=True, check=True).stdout
    assert out.replace(str(tmp_path).encode(), b"/var/log/xen/console") == (
        b"@@@ /var/log/xen/console/guest-guest1.log\n[ 1.0] Oops: 0002 [#1] SMP\n"
    )
