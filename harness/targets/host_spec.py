"""What a user names for ``--target ssh://...`` (the host, its guests, the SSH key) and
what dom0 says about its guests (``xl info``, the vifs' MACs, the neighbour table),
parsed and checked before anything connects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SSH_KEY_ENV = "XENVTPM_SSH_KEY"
USAGE = "--target ssh://USER@HOST[:PORT] --host-guest NAME[=ADDRESS] [--host-guest ...]"


@dataclass(frozen=True)
class HostSpec:
    """``ssh://USER@HOST[:PORT]`` (the scheme and user are optional; user root)."""

    user: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> HostSpec:
        rest = url.removeprefix("ssh://").rstrip("/")
        user, _, hostport = rest.rpartition("@")
        m = re.fullmatch(
            r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<h>[^:/@]+)(?::(?P<p>\d+))?", hostport
        )
        if m is None or not hostport:
            raise ValueError(f"not an SSH address {url!r}: expected ssh://USER@HOST[:PORT]")
        host = m["v6"] or m["h"]
        port = int(m["p6"] or m["p"] or 22)
        return cls(user or "root", host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")


@dataclass(frozen=True)
class GuestSpec:
    """``--host-guest NAME[=ADDRESS]``: an xl domain name and its SSH address, if given."""

    name: str
    address: str | None = None

    @classmethod
    def parse(cls, text: str) -> GuestSpec:
        name, sep, address = text.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or (sep and not address):
            raise ValueError(f"--host-guest {text!r}: expected NAME[=ADDRESS] (an xl domain name)")
        return cls(name, address or None)


def parse_guests(texts: Sequence[str]) -> list[GuestSpec]:
    specs = [GuestSpec.parse(t) for t in texts]
    if not specs:
        raise ValueError(
            f"name the guests to test on the host: {USAGE} "
            "(running Linux guests with python3 and tpm_vtpm_proxy; `xl list` in dom0)"
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--host-guest names a guest twice: {', '.join(names)}")
    return specs


def resolve_key(explicit: str | os.PathLike[str] | None) -> Path | None:
    """``--ssh-key``, else ``$XENVTPM_SSH_KEY``, else None (default keys and agent)."""
    chosen = explicit or os.environ.get(SSH_KEY_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise ValueError(f"SSH key {path} does not exist")
    return path


def parse_xl_info(text: str) -> dict[str, str]:
    """``xl info``'s ``key : value`` lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_macs(text: str) -> list[str]:
    """The MAC addresses in ``text`` (a vif backend's ``mac`` node, ``xl network-list``),
    lower case."""
    return [m.lower() for m in re.findall(r"\b(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\b", text)]


def neighbour_addresses(neighbours: str, macs: Sequence[str]) -> list[str]:
    """The addresses ``ip neigh show`` in dom0 gives for ``macs`` (not FAILED), each
    once: IPv4 first, then IPv6."""
    found: list[str] = []
    for line in neighbours.splitlines():
        words = line.split()
        mac = words[words.index("lladdr") + 1].lower() if "lladdr" in words[:-1] else None
        if mac in macs and "FAILED" not in words and words[0] not in found:
            found.append(words[0])
    return [a for a in found if ":" not in a] + [a for a in found if ":" in a]


def address_from_neighbours(neighbours: str, macs: Sequence[str]) -> str | None:
    """The IPv4 address ``ip neigh show`` in dom0 gives for one of ``macs`` (else IPv6)."""
    return next(iter(neighbour_addresses(neighbours, macs)), None)
