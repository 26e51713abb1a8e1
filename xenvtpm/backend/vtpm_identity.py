"""Which vTPM instance a device is: the toolstack's ``instance``, or xl's ``uuid``.

The seed's toolstack writes ``instance`` into the backend directory; xl (libxl_vtpm.c)
writes a ``uuid`` and no instance. A uuid names a vTPM for as long as its guest's
configuration does, across ``xl destroy`` and ``xl create`` and backend restarts, so its
instance number is kept on disk, next to the manager's state: a guest given another
number would get another guest's TPM, or lose its own.

Numbers for uuids start at :data:`UUID_INSTANCE_BASE`, above what toolstacks that
write ``instance`` use, and are never given twice, even after a uuid is forgotten.
Spec: DESIGN.md section 2; docs/xl.md.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

UUID_INSTANCE_BASE = 0x10000
DEFAULT_UUID_MAP = "/var/lib/xenvtpm/vtpm-uuids.json"
_MAX_INSTANCE = 0xFFFFFFFF
# libxl's LIBXL_UUID_FMT: lower-case hex in the 8-4-4-4-12 form (upper case accepted)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def canonical_uuid(raw: str) -> str:
    """The uuid in libxl's form; ValueError for anything else (it names a file entry,
    so nothing but hex digits and dashes gets through)."""
    uuid = raw.strip("\0").lower()
    if not _UUID.match(uuid):
        raise ValueError(f"not a uuid in 8-4-4-4-12 hex form: {raw[:40]!r}")
    return uuid


class UuidInstances:
    """The uuid -> instance map in one JSON file, loaded at first use and rewritten
    durably (temporary file, fsync, rename, fsync of the directory) for each new uuid,
    before the device that asked is served."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._map: dict[str, int] | None = None

    def instance_for(self, raw_uuid: str) -> int:
        """The uuid's instance, given now (and saved) if it has none; ValueError for a
        malformed uuid or a damaged map, OSError if the map cannot be saved."""
        uuid = canonical_uuid(raw_uuid)
        known = self._load()
        if uuid in known:
            return known[uuid]
        instance = max(known.values(), default=UUID_INSTANCE_BASE - 1) + 1
        if instance > _MAX_INSTANCE:
            raise ValueError("no instance number left for a new uuid")
        self._save({**known, uuid: instance})
        known[uuid] = instance
        return instance

    def _load(self) -> dict[str, int]:
        if self._map is not None:
            return self._map
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            self._map = {}
            return self._map
        try:
            entries = json.loads(text)["uuids"]
            loaded = {canonical_uuid(u): int(i) for u, i in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.path}: damaged uuid map, fix or restore it: {e}") from e
        if len(set(loaded.values())) != len(loaded):
            raise ValueError(f"{self.path}: an instance is given twice")
        if any(not UUID_INSTANCE_BASE <= i <= _MAX_INSTANCE for i in loaded.values()):
            raise ValueError(f"{self.path}: an instance outside the uuid range")
        self._map = loaded
        return loaded

    def _save(self, entries: dict[str, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as out:
            json.dump({"uuids": entries}, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
