"""Whether an instance's volatile TPM state may continue across a swtpm start.

A TPM keeps PCRs, sessions and loaded objects only in volatile memory. A guest that
finds them reset while it runs can replay "good" measurements (sealing and attestation
then mean nothing), so every start of an instance's swtpm is one of:

- **fresh**: nobody is using this instance in this host boot; a new TPM is right;
- **restored**: a planned stop of the manager saved the volatile state
  (swtpm ``CMD_STORE_VOLATILE`` writes ``tpm2-00.volatilestate``); swtpm loads it when
  it starts, and the file is deleted at once, so it is restored exactly once;
- **lost**: a domain is bound to the instance in this host boot but its volatile state
  is gone (swtpm killed or hung, the manager killed). The instance fails closed, as a
  TPM in failure mode, until the domain reboots or an operator resets it.

The record (``vtpm-run.json`` in the instance's state directory) says which domain the
instance serves and whether its state was saved, scoped to the host boot
(``/proc/sys/kernel/random/boot_id``): after dom0 reboots, domain ids start again and
domain 5 may be another guest, so nothing of the last boot is restored or held against
it. It is written on the manager's thread at a bind, a failure or a planned stop, never
per command; it needs no fsync, because within one host boot the page cache is the
truth, and across boots the record is void.

Spec: swtpm's ``--tpmstate dir=`` layout (``tpm2-00.permall``, ``tpm2-00.volatilestate``);
TPM 2.0 Part 1, "Failure Mode".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

log = logging.getLogger(__name__)

RECORD_NAME = "vtpm-run.json"
VOLATILE_STATE = "tpm2-00.volatilestate"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


class Continuity(Enum):
    FRESH = "fresh"
    RESTORED = "restored"
    LOST = "lost"


@dataclass(frozen=True)
class RunRecord:
    """What the manager last knew of an instance in this host boot."""

    boot_id: str
    domid: int | None  # the domain bound to it (None: never bound)
    saved: bool = False  # a planned stop stored its volatile state
    failed: bool = False  # in failure mode: its state was lost under a running domain


def read_boot_id(path: str | os.PathLike[str] = BOOT_ID_FILE) -> str:
    return Path(path).read_text().strip()


class InstanceContinuity:
    """The record and the saved volatile state of one instance's state directory."""

    def __init__(self, state_dir: Path, boot_id: str) -> None:
        self.state_dir = state_dir
        self.boot_id = boot_id
        self.path = state_dir / RECORD_NAME
        self.volatile = state_dir / VOLATILE_STATE

    def load(self) -> RunRecord | None:
        """This boot's record, or None (none, unreadable, or of another host boot)."""
        try:
            data = json.loads(self.path.read_text())
            record = RunRecord(
                boot_id=str(data["boot_id"]),
                domid=None if data["domid"] is None else int(data["domid"]),
                saved=bool(data.get("saved", False)),
                failed=bool(data.get("failed", False)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s unreadable (%s): treated as absent", self.path, exc)
            return None
        return record if record.boot_id == self.boot_id else None

    def write(self, domid: int | None, *, saved: bool = False, failed: bool = False) -> None:
        record = RunRecord(self.boot_id, domid, saved, failed)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(self.path)

    def before_start(self) -> tuple[Continuity, RunRecord | None]:
        """Decide how the next swtpm start continues, and leave the directory so that
        swtpm does exactly that: a volatile state it must not load is deleted first
        (swtpm loads any ``tpm2-00.volatilestate`` it finds)."""
        record = self.load()
        if record is not None and record.saved and not record.failed and self.volatile.exists():
            return Continuity.RESTORED, record
        self.discard_volatile()
        if record is not None and record.domid is not None:
            return Continuity.LOST, replace(record, failed=True, saved=False)
        return Continuity.FRESH, None

    def after_restore(self, record: RunRecord) -> None:
        """swtpm has loaded the saved state: delete it, so it is never loaded again."""
        self.discard_volatile()
        self.write(record.domid)

    def discard_volatile(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.volatile.unlink()
