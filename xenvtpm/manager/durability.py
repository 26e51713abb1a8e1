"""Acknowledged TPM state is on disk before the answer goes back (issue 14, point 6).

Once a guest has the answer to NV_Write, NV_Increment, EvictControl... it may act on
it (count a boot, release a secret), so that state must survive a power cut, not only a
kill. swtpm 0.7.1 writes ``tpm2-00.permall`` to a temporary file and renames it over
the old one, without fsync (``--tpmstate ...,fsync=on`` arrived in later swtpm), so
dom0's page cache alone holds it until writeback.

The manager therefore looks at the state file after every answer (one ``stat``: a few
microseconds, no file opened) and, when it changed, holds the answer while a worker
thread fsyncs the file and its directory (the rename), so that a guest writing NV in a
loop never holds the manager's thread on the disk. Commands that change nothing
persistent (GetRandom, PCR_Extend, ...) cost only the ``stat``.

Nothing is taken as durable at a swtpm start: swtpm_setup (manufacturing) and swtpm
itself write the state without fsync, and the first answers (the EK, a key made under
the new seeds) already depend on it. So the first answer after every start waits for
one sync too, which also fsyncs the state root, where the instance's own directory
entry lives.

Spec: swtpm src/swtpm/swtpm_nvstore_dir.c (write, then rename); fsync(2) on a directory
makes a rename durable.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from queue import SimpleQueue

log = logging.getLogger(__name__)

PERMANENT_STATE = "tpm2-00.permall"

Signature = tuple[int, int, int]  # inode, size, mtime in ns


class StateFileWatch:
    """The permanent state file of one instance, and its last durable version."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / PERMANENT_STATE
        self._durable: Signature | None = None  # nothing yet: see the module docstring
        self.syncs = 0

    def _signature(self) -> Signature | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> Signature | None:
        """The file's new signature if it changed since it was last made durable."""
        sig = self._signature()
        return sig if sig is not None and sig != self._durable else None

    def sync(self) -> None:
        """fsync the state file and its directory, and the first time the state root
        too. Blocking: call off the loop thread.

        A failure is logged, not raised: the state is in the page cache, and the answer
        must still go back (the guest's command did execute).
        """
        paths = [(self.path, 0), (self.state_dir, os.O_DIRECTORY)]
        if self._durable is None:  # the loop thread sets it only between syncs
            paths.append((self.state_dir.parent, os.O_DIRECTORY))
        try:
            for path, flags in paths:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.error("fsync of %s failed: %s", self.path, exc)

    def synced(self, sig: Signature) -> None:
        """``sig`` is on disk (loop thread)."""
        self._durable = sig
        self.syncs += 1


class Syncer:
    """One worker thread that runs :meth:`StateFileWatch.sync` for the manager's loop.

    Jobs carry the instance and its swtpm generation so that the loop can drop a
    result that a swtpm restart made stale. Started on the first job.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._jobs: SimpleQueue[tuple[int, int, StateFileWatch, Signature] | None]
        self._jobs = SimpleQueue()
        self._done: SimpleQueue[tuple[int, int, Signature]] = SimpleQueue()
        self._thread: threading.Thread | None = None

    def sync(self, instance: int, generation: int, watch: StateFileWatch, sig: Signature) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fsync", daemon=True)
            self._thread.start()
        self._jobs.put((instance, generation, watch, sig))

    def results(self) -> list[tuple[int, int, Signature]]:
        out = []
        while not self._done.empty():
            out.append(self._done.get())
        return out

    def close(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            instance, generation, watch, sig = job
            watch.sync()
            self._done.put((instance, generation, sig))
            self._wake()
