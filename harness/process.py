"""Managed subprocesses: start with a log file, wait until ready, stop soft then hard.

Every daemon the harness starts (simxend, manager, backend, frontends, swtpm) runs in
its own session (``start_new_session``), so that

* it can outlive the CLI that started it (``harness up`` returns at once; otherwise
  ``die_with_parent`` makes the kernel SIGTERM it when its parent dies), and
* stopping it can reach everything it started, even children it orphaned: ``stop``
  signals the leader, every process still in its session and every descendant found in
  ``/proc`` before the first signal.

A process is identified by (pid, start time in clock ticks) so that a recorded pid that
was reused by an unrelated process is never signalled (``ProcessRecord.alive``).
Lifecycle per STYLE.md 4: ``start``/``stop`` are idempotent, a failed start rolls back,
the object is a context manager and nothing relies on ``__del__``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from harness.deadline import Deadline
from harness.errors import DeadlineExpired, LaunchFailure

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the harness uses. Spec: proc(5)."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    starttime: int

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def proc_stat(pid: int) -> ProcStat | None:
    """Parse ``/proc/<pid>/stat``; None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may itself contain spaces and parentheses.
    lpar, rpar = raw.index("("), raw.rindex(")")
    rest = raw[rpar + 2 :].split()
    return ProcStat(
        pid=int(raw[:lpar]),
        comm=raw[lpar + 1 : rpar],
        state=rest[0],
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        session=int(rest[3]),
        starttime=int(rest[19]),
    )


def all_procs() -> list[ProcStat]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None:
                out.append(st)
    return out


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def family(pid: int, starttime: int | None = None) -> list[int]:
    """``pid``, its live descendants and every live member of its session, leader first.

    Session members started before the leader are ignored: that session id belongs to
    an older, unrelated process whose pid was reused.
    """
    procs = [p for p in all_procs() if p.running]
    leader = next((p for p in procs if p.pid == pid), None)
    if leader is None or (starttime is not None and leader.starttime != starttime):
        return []
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    found: list[int] = [pid]
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            if child not in found:
                found.append(child)
                queue.append(child)
    for p in procs:
        if p.session == pid and p.starttime >= leader.starttime and p.pid not in found:
            found.append(p.pid)
    return found


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], deadline: Deadline, reap: Callable[[], object]) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running at the deadline."""
    while True:
        reap()
        left = [pid for pid in pids if (st := proc_stat(pid)) is not None and st.running]
        if not left or deadline.expired:
            return left
        time.sleep(min(0.02, deadline.remaining))


def stop_family(
    pid: int,
    starttime: int | None,
    timeout: float = DEFAULT_STOP_TIMEOUT,
    reap: Callable[[], object] = lambda: None,
    soft: signal.Signals = signal.SIGTERM,
) -> None:
    """SIGTERM the process, then everything it left, wait, then SIGKILL what is left.

    The leader is signalled alone first: a daemon stops its own children in order (the
    manager saves each swtpm's volatile state before stopping it), which a signal to
    the whole family at once would pre-empt. What it leaves gets the soft signal next.
    """
    pids = family(pid, starttime)
    if not pids:
        reap()
        return
    deadline = Deadline(timeout)
    _signal_all(pids[:1], soft)
    _wait_gone(pids[:1], deadline, reap)
    rest = sorted(set(family(pid, starttime)) | set(pids[1:]) | set(_orphans_of(pids)))
    rest = [p for p in rest if (st := proc_stat(p)) is not None and st.running]
    _signal_all(rest, soft)
    left = _wait_gone(rest, Deadline(max(0.2, deadline.remaining)), reap)
    # Children forked during the soft phase (e.g. a manager respawning swtpm) too.
    left = sorted(set(left) | set(family(pid, starttime)[1:]) | set(_orphans_of(pids)))
    if left:
        log.warning("pids %s ignored %s for %.1f s: SIGKILL", left, soft.name, timeout)
        _signal_all(left, signal.SIGKILL)
        still = _wait_gone(left, Deadline(timeout), reap)
        if still:
            log.error("pids %s survived SIGKILL", still)


def _orphans_of(pids: Sequence[int]) -> list[int]:
    """Processes whose session is one of ``pids`` (they outlive a dead leader)."""
    wanted = set(pids)
    return [p.pid for p in all_procs() if p.running and p.session in wanted]


def parent_death_signal() -> None:  # pragma: no cover - runs in the child
    """SIGTERM this child when its parent dies (PR_SET_PDEATHSIG), even by SIGKILL.

    A test run that is killed must not leave daemons behind; ``harness up`` turns this
    off (``die_with_parent=False``) because its daemons must outlive it.
    """
    import ctypes

    pr_set_pdeathsig = 1  # linux/prctl.h
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def tail(path: Path | None, lines: int = 30, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log file (or a note saying it is missing)."""
    if path is None:
        return "(no log)"
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class ProcessRecord:
    """What a running managed process leaves behind for another program (the CLI)."""

    name: str
    pid: int
    starttime: int
    command: list[str]
    log: str
    extra: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st.running and st.starttime == self.starttime

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        stop_family(self.pid, self.starttime, timeout)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            starttime=int(data["starttime"]),
            command=[str(a) for a in data["command"]],
            log=str(data["log"]),
            extra=dict(data.get("extra", {})),
        )


ReadyCheck = Callable[[], bool]


class ManagedProcess:
    """One daemon: its command, log file and readiness check.

    ``ready`` is polled by ``wait_ready``; it may raise to report a definite failure.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        cwd: Path | None = None,
        ready: ReadyCheck | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        die_with_parent: bool = True,
    ) -> None:
        self.name = name
        self.die_with_parent = die_with_parent
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.pass_fds = tuple(pass_fds)
        self.cwd = cwd
        self.ready = ready
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._starttime: int | None = None
        self.log = log.getChild(name)

    # -- state -------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def failure(self, reason: str = "exited before it was ready") -> LaunchFailure:
        return LaunchFailure(
            self.name, self.argv, self.returncode, tail(self.log_path), self.log_path, reason
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Self:
        """Start the process (no-op if running). Does not wait for readiness."""
        if self.alive:
            return self
        self._proc = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logf:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            logf.write(f"=== {stamp} harness: start {' '.join(self.argv)}\n".encode())
            logf.flush()
            try:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    pass_fds=self.pass_fds,
                    start_new_session=True,
                    preexec_fn=parent_death_signal if self.die_with_parent else None,
                )
            except OSError as e:
                raise LaunchFailure(
                    self.name, self.argv, None, str(e), self.log_path, "could not be executed"
                ) from e
        st = proc_stat(self._proc.pid)
        self._starttime = st.starttime if st is not None else None
        self.log.debug("started pid %d: %s", self._proc.pid, " ".join(self.argv))
        return self

    def wait_ready(self, deadline: Deadline, ready: ReadyCheck | None = None) -> None:
        """Poll the readiness check; LaunchFailure if the process dies or time runs out.

        On failure the process is left as it is: the caller (a target's ``start``) rolls
        back everything it started.
        """
        check = ready or self.ready

        def probe() -> bool:
            if not self.alive:
                raise self.failure()
            return check() if check is not None else True

        try:
            deadline.wait_for(probe, f"{self.name} to become ready")
        except DeadlineExpired as e:
            raise self.failure(f"not ready within {deadline.seconds:.1f} s") from e

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, wait, SIGKILL; also reaches processes it started. Idempotent."""
        proc = self._proc
        if proc is None:
            return

        def reap() -> None:
            proc.poll()

        try:
            if proc.poll() is None:
                stop_family(
                    proc.pid,
                    self._starttime,
                    self.stop_timeout if timeout is None else timeout,
                    reap=reap,
                )
            else:
                # The leader is gone; its session may still hold children.
                for pid in _orphans_of([proc.pid]):
                    stop_family(pid, None, self.stop_timeout if timeout is None else timeout)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
            self.log.debug("stopped, exit code %s", proc.returncode)

    def kill(self) -> None:
        """SIGKILL the process alone (not its children): a crash, for fault scenarios."""
        if self.alive and self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()

    def detach(self) -> ProcessRecord:
        """Forget the process without stopping it; return what is needed to stop it later."""
        rec = self.record()
        self._proc = None
        return rec

    def record(self) -> ProcessRecord:
        if self._proc is None or self._starttime is None:
            raise LaunchFailure(self.name, self.argv, None, "", self.log_path, "was not started")
        return ProcessRecord(
            self.name, self._proc.pid, self._starttime, self.argv, str(self.log_path)
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, alive={self.alive})"
