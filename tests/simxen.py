"""Shared by the simulated-Xen tests: simxend as a process of its own, and the polls
its users make. The fixtures over it (``xen``, ``dom0``, ``guests``) are in conftest.py.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from resource import RLIMIT_NOFILE

from harness.paths import REPO_ROOT
from xenvtpm.sim.adapter import SimControl
from xenvtpm.sim.xenstore_client import XenStoreClient
from xenvtpm.xen.interface import WatchEvent


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def events(xs: XenStoreClient, count: int, timeout: float = 2.0) -> list[WatchEvent]:
    """Poll ``xs.fileno()`` like a real user until ``count`` events arrived."""
    got: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        if select.select([xs.fileno()], [], [], deadline - time.monotonic())[0]:
            got += xs.read_watches()
    return got


def quiet(xs: XenStoreClient) -> list[WatchEvent]:
    """Events that arrive within a short grace period (expected: none)."""
    time.sleep(0.05)
    return xs.read_watches()


@dataclass
class Xen:
    run: str
    proc: subprocess.Popen[bytes]
    ctl: SimControl


def start_simxend(run: Path, fd_limit: int | None = None) -> subprocess.Popen[bytes]:
    """simxend as its own process; ``fd_limit`` sets its RLIMIT_NOFILE (soft and hard)."""
    limit = None if fd_limit is None else (fd_limit, fd_limit)
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenvtpm.sim.simxend", "--dir", str(run)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stderr=subprocess.PIPE,
        preexec_fn=None if limit is None else lambda: resource.setrlimit(RLIMIT_NOFILE, limit),
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # blocks until "simxend: ready" (or death)
    while line and b"ready" not in line:
        line = proc.stderr.readline()
    assert b"simxend: ready" in line, f"simxend did not start (exit {proc.poll()})"
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
    return proc


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def readable(fd: int, timeout: float = 1.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])
