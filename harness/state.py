"""Where ``harness up`` records the environment it left running, for later commands.

The record lives in ``$XENVTPM_RUN`` (default ``~/.cache/xenvtpm/run/``):

    env.json    target, guests (the JSON ``up`` printed), processes to stop, in order
    env/        the run directory: sockets, state, logs/ (kept after ``down`` for reading)
    lock        flock'ed by every command that changes the record

Each process is recorded with its start time so that ``down`` never signals a process
that merely reuses a recorded pid (``ProcessRecord.alive``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import RunStateError
from harness.process import ProcessRecord

RUN_ENV = "XENVTPM_RUN"
RECORD = "env.json"


def state_dir() -> Path:
    explicit = os.environ.get(RUN_ENV)
    return Path(explicit) if explicit else Path.home() / ".cache" / "xenvtpm" / "run"


@dataclass
class RunRecord:
    target: str
    run_dir: str
    description: dict[str, Any]
    processes: list[ProcessRecord]
    started: float = field(default_factory=time.time)
    started_by: int = field(default_factory=os.getpid)

    def alive(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.alive()]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "run_dir": self.run_dir,
            "description": self.description,
            "processes": [p.to_json() for p in self.processes],
            "started": self.started,
            "started_by": self.started_by,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        return cls(
            target=str(data["target"]),
            run_dir=str(data["run_dir"]),
            description=dict(data["description"]),
            processes=[ProcessRecord.from_json(p) for p in data["processes"]],
            started=float(data.get("started", 0.0)),
            started_by=int(data.get("started_by", 0)),
        )


class RunState:
    """The record file and its lock, under ``root`` (default ``state_dir()``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir()
        self.record_path = self.root / RECORD
        self.run_dir = self.root / "env"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the record; a second concurrent command fails at once."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.root / "lock").open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise RunStateError(
                        f"another harness command is using {self.root}; wait for it to finish"
                    ) from e
                raise
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def load(self) -> RunRecord | None:
        try:
            data = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise RunStateError(f"cannot read {self.record_path}: {e}") from e
        try:
            return RunRecord.from_json(data)
        except (KeyError, TypeError, ValueError) as e:
            raise RunStateError(f"{self.record_path} is malformed: {e}") from e

    def save(self, record: RunRecord) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
        tmp.replace(self.record_path)

    def clear(self) -> None:
        self.record_path.unlink(missing_ok=True)
