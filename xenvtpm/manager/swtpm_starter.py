"""(Re)starting swtpm off the manager's loop thread.

Manufacturing a TPM takes about a second (20-30 s in a TCG dom0) and even a plain start
waits for swtpm to answer, so each start runs in a worker thread; other instances keep
being served meanwhile. The worker also decides, from the instance's state directory,
how the start continues (fresh, restored, or lost: :mod:`xenvtpm.manager.continuity`), because
that is file I/O too. Results come back through a queue, and the owner's ``wake``
callback makes the loop collect them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import NamedTuple

from xenvtpm.manager.continuity import Continuity, InstanceContinuity, RunRecord
from xenvtpm.manager.swtpm import Swtpm


class Started(NamedTuple):
    """One worker's result. ``swtpm`` is None when the start failed (``error``)."""

    instance: int
    generation: int
    swtpm: Swtpm | None
    error: BaseException | None
    continuity: Continuity
    record: RunRecord | None  # the last manager's record it continued from, if any


class SwtpmStarter:
    """Worker threads that stop an old swtpm and start its successor."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._results: SimpleQueue[Started] = SimpleQueue()
        self._threads: set[threading.Thread] = set()  # the loop thread's only

    def start(
        self,
        instance: int,
        generation: int,
        continuity_files: InstanceContinuity,
        new: Swtpm,
        old: Swtpm | None,
        continuity: Continuity | None,
    ) -> None:
        """Stop ``old``, start ``new``. ``continuity`` None: decided by the record (the
        first start in this process); otherwise given (never a restore)."""
        self._threads = {t for t in self._threads if t.is_alive()}
        t = threading.Thread(
            target=self._work,
            args=(instance, generation, continuity_files, new, old, continuity),
            name=f"swtpm-start-{instance}",
            daemon=True,
        )
        self._threads.add(t)
        t.start()

    def results(self) -> list[Started]:
        out = []
        while not self._results.empty():
            out.append(self._results.get())
        return out

    def close(self, timeout: float) -> None:
        """Join the workers (they see their swtpm closing and roll back quickly), then
        close what they started too late to be used."""
        for t in list(self._threads):
            t.join(timeout)
        for late in self.results():
            if late.swtpm is not None:
                late.swtpm.close()

    def _work(
        self,
        instance: int,
        generation: int,
        files: InstanceContinuity,
        new: Swtpm,
        old: Swtpm | None,
        continuity: Continuity | None,
    ) -> None:
        err: BaseException | None = None
        record: RunRecord | None = None
        how = Continuity.FRESH
        try:
            if old is not None:
                old.close()
            if continuity is None:
                how, record = files.before_start()
            else:
                how = continuity
                files.discard_volatile()  # never restored twice
            new.start()
            if how is Continuity.RESTORED and record is not None:
                files.after_restore(record)
        except BaseException as exc:  # reported to the loop, which logs it
            err = exc
        finally:
            self._results.put(Started(instance, generation, None if err else new, err, how, record))
            self._wake()
