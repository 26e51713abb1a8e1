"""ManagedProcess and ProcessRecord against real processes (small Python scripts)."""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.deadline import Deadline
from harness.errors import LaunchFailure
from harness.process import ManagedProcess, ProcessRecord, family, proc_stat, tail


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "daemon.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def gone(pid: int) -> bool:
    st = proc_stat(pid)
    return st is None or not st.running


def test_start_ready_stop(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    argv = script(
        tmp_path,
        f"""
        import pathlib, time
        print("hello from daemon", flush=True)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)
    """,
    )
    with ManagedProcess("d", argv, tmp_path / "d.log", ready=ready.exists) as p:
        p.wait_ready(Deadline(10))
        running, pid = p.alive, p.pid  # names, so the check below is not narrowed away
        assert running and pid is not None
    assert not p.alive and gone(pid)
    assert "hello from daemon" in (tmp_path / "d.log").read_text()
    p.stop()  # idempotent


def test_early_exit_is_a_launch_failure_with_evidence(tmp_path: Path) -> None:
    argv = script(
        tmp_path,
        """
        import sys
        print("cannot bind /nope: permission denied", file=sys.stderr)
        sys.exit(3)
    """,
    )
    p = ManagedProcess("broken", argv, tmp_path / "b.log", ready=lambda: False).start()
    with pytest.raises(LaunchFailure) as info:
        p.wait_ready(Deadline(10))
    err = info.value
    assert err.returncode == 3 and "permission denied" in err.log_tail
    assert err.command == argv and err.log_path == tmp_path / "b.log"
    assert "exit code 3" in str(err)
    p.stop()


def test_not_ready_in_time(tmp_path: Path) -> None:
    argv = script(tmp_path, "import time; time.sleep(60)")
    p = ManagedProcess("slow", argv, tmp_path / "s.log", ready=lambda: False).start()
    try:
        with pytest.raises(LaunchFailure, match="not ready within"):
            p.wait_ready(Deadline(0.3))
        assert p.alive  # the caller decides: targets roll back
    finally:
        p.stop()
    assert not p.alive


def test_missing_executable(tmp_path: Path) -> None:
    p = ManagedProcess("ghost", ["/nonexistent/daemon"], tmp_path / "g.log")
    with pytest.raises(LaunchFailure, match="could not be executed"):
        p.start()


def test_stop_escalates_and_reaches_children(tmp_path: Path) -> None:
    """A daemon ignoring SIGTERM with a child that ignores it too: both are killed."""
    pidfile = tmp_path / "child.pid"
    argv = script(
        tmp_path,
        f"""
        import os, signal, subprocess, sys, time, pathlib
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        pathlib.Path({str(pidfile)!r}).write_text(str(child.pid))
        time.sleep(60)
    """,
    )
    p = ManagedProcess("stubborn", argv, tmp_path / "x.log", ready=pidfile.exists, stop_timeout=0.5)
    p.start().wait_ready(Deadline(10))
    child = int(pidfile.read_text())
    Deadline(5).wait_for(lambda: (proc_stat(child) or False) and True, "child to start")
    assert child in family(p.pid or 0)
    t0 = time.monotonic()
    p.stop()
    assert gone(child) and not p.alive
    assert time.monotonic() - t0 < 5


def test_stop_lets_the_leader_stop_its_children_first(tmp_path: Path) -> None:
    """SIGTERM goes to the leader alone first: a daemon stops its own children in order
    (the manager saves each swtpm's volatile state, then stops it). Signalling the whole
    family at once killed swtpm under a planned manager restart."""
    pidfile, seen = tmp_path / "child.pid", tmp_path / "seen"
    argv = script(
        tmp_path,
        f"""
        import os, signal, subprocess, sys, time, pathlib
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        pathlib.Path({str(pidfile)!r}).write_text(str(child.pid))
        def stop(*_):
            time.sleep(0.3)  # as long as saving swtpm's state may take
            pathlib.Path({str(seen)!r}).write_text(
                "alive" if child.poll() is None else "dead")
            child.terminate()
            child.wait()
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        time.sleep(60)
    """,
    )
    p = ManagedProcess("orderly", argv, tmp_path / "o.log", ready=pidfile.exists)
    p.start().wait_ready(Deadline(10))
    child = int(pidfile.read_text())
    time.sleep(0.2)  # the handler is installed
    p.stop()
    assert seen.read_text() == "alive"
    assert gone(child)


def test_stop_reaches_orphans_of_a_dead_leader(tmp_path: Path) -> None:
    """The leader dies first (e.g. a crashed manager): its swtpm-like child is still found."""
    pidfile = tmp_path / "child.pid"
    argv = script(
        tmp_path,
        f"""
        import subprocess, sys, pathlib
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        pathlib.Path({str(pidfile)!r}).write_text(str(child.pid))
    """,
    )
    p = ManagedProcess("crashy", argv, tmp_path / "c.log").start()
    Deadline(10).wait_for(lambda: not p.alive and pidfile.exists(), "leader to exit")
    child = int(pidfile.read_text())
    assert not gone(child)
    p.stop()
    Deadline(5).wait_for(lambda: gone(child), "orphan to be stopped")


def test_record_survives_the_object_and_guards_pid_reuse(tmp_path: Path) -> None:
    argv = script(tmp_path, "import time; time.sleep(60)")
    p = ManagedProcess("bg", argv, tmp_path / "bg.log").start()
    rec = ProcessRecord.from_json(p.detach().to_json())
    assert rec.alive()
    impostor = ProcessRecord(rec.name, rec.pid, rec.starttime + 1, rec.command, rec.log)
    assert not impostor.alive()
    impostor.stop()  # must not signal the real process
    assert rec.alive()
    rec.stop()
    Deadline(5).wait_for(lambda: not rec.alive(), "record to stop")
    with contextlib.suppress(ChildProcessError):  # reap our own child
        os.waitpid(rec.pid, 0)


def test_tail(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 2) == "line 98\nline 99"
    assert "cannot read" in tail(tmp_path / "missing.log")
