"""SSH host keys of a real Xen host (``--target ssh://``): checked, refused, recorded.

Why: certify logs in as root to dom0 and, through dom0, to each guest, deploys the
driver there and certifies what answers. A login to another machine (a spoofed address,
a guest posing as another) would certify that machine instead. So OpenSSH's strict
rules apply, with ``accept-new`` only on the user's word:

    key in known_hosts                  used; recorded as ``known_hosts``
    host not in known_hosts             refused (UnknownHostKey: type, SHA256), unless
                                        ``--accept-new-host-keys``: used for this run and
                                        recorded as ``accepted-new``
    host in known_hosts, another key    always refused (ChangedHostKey: both SHA256s)
    key marked ``@revoked``             always refused (RevokedHostKey)

Known keys come from the user's ``~/.ssh/known_hosts`` and the ``--known-hosts`` files
they name (never written to). Every key used is kept in ``seen``; the target writes
them to ``versions.json`` (and the report) and as known_hosts lines the user can pin.

The harness's own QEMU machines do not use this (``SshHost(host_keys=None)``): see
``harness.ssh``.

Spec: OpenSSH ssh_config(5) StrictHostKeyChecking; fingerprints as ``ssh-keygen -l``
(SHA256 of the key blob, base64 without padding).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from harness.errors import HarnessError

ACCEPT_NEW_OPTION = "--accept-new-host-keys"
USER_KNOWN_HOSTS = "~/.ssh/known_hosts"
KNOWN = "known_hosts"
ACCEPTED = "accepted-new"


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """The name a known_hosts line has for ``host:port`` (OpenSSH's and paramiko's)."""
    return host if port == 22 else f"[{host}]:{port}"


def resolve_known_hosts(explicit: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """``~/.ssh/known_hosts`` if it exists, then every file the user named (each must
    exist: a typo would otherwise refuse every key with a confusing message)."""
    files = []
    default = Path(USER_KNOWN_HOSTS).expanduser()
    if default.is_file():
        files.append(default)
    for name in explicit:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"known_hosts file {path} does not exist")
        if path not in files:
            files.append(path)
    return files


@dataclass(frozen=True)
class SeenKey:
    """A host key a login used: who (``login``: dom0 or the guest's name), where
    (``host``: its known_hosts name), what (type, fingerprint, base64 blob) and why it
    was trusted (``trust``: KNOWN or ACCEPTED)."""

    login: str
    host: str
    type: str
    fingerprint: str
    trust: str
    key: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def known_hosts_line(self) -> str:
        return f"{self.host} {self.type} {self.key}"


class HostKeyRefused(HarnessError):
    """A login stopped at the host key (retrying cannot help)."""

    def __init__(self, login: str, host: str, message: str) -> None:
        super().__init__(message)
        self.login = login
        self.host = host


class UnknownHostKey(HostKeyRefused):
    """The host is in no known_hosts file and new keys were not to be accepted."""

    def __init__(self, login: str, host: str, key: paramiko.PKey, files: Sequence[Path]) -> None:
        where = ", ".join(str(f) for f in files) or f"{USER_KNOWN_HOSTS} (there is none)"
        super().__init__(
            login,
            host,
            f"{login} ({host}) offered a host key that is not known: {key.get_name()} "
            f"{fingerprint(key)} (looked in {where}). Compare it with the host's own "
            "(`ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` there, over a channel you "
            "trust such as its console), then add it to known_hosts, or pass "
            f"{ACCEPT_NEW_OPTION} to trust it for this run (the report records it)",
        )
        self.key = key


class ChangedHostKey(HostKeyRefused):
    """known_hosts has another key for this host: never accepted."""

    def __init__(self, login: str, host: str, known: paramiko.PKey, offered: paramiko.PKey) -> None:
        super().__init__(
            login,
            host,
            f"the host key of {login} ({host}) has CHANGED: known_hosts has "
            f"{known.get_name()} {fingerprint(known)}, the host offered "
            f"{offered.get_name()} {fingerprint(offered)}. Someone may be in the middle; "
            "if the host was reinstalled, check the new key out of band, then remove the "
            f"old one (`ssh-keygen -R '{host}'`). {ACCEPT_NEW_OPTION} never accepts a "
            "changed key",
        )
        self.known = known
        self.offered = offered


class RevokedHostKey(HostKeyRefused):
    """The key is marked ``@revoked`` in a known_hosts file: never accepted."""

    def __init__(self, login: str, host: str, key: paramiko.PKey) -> None:
        super().__init__(
            login,
            host,
            f"{login} ({host}) offered a host key marked @revoked in known_hosts: "
            f"{key.get_name()} {fingerprint(key)}. {ACCEPT_NEW_OPTION} never accepts a "
            "revoked key",
        )
        self.key = key


class HostKeyCheck:
    """The host-key rules of one run against a real host, shared by all its logins.

    ``prepare`` arms a paramiko client before it connects (known keys loaded, our
    policy for a missing one); ``changed`` turns paramiko's BadHostKeyException into
    ChangedHostKey; ``connected`` records the key a finished login used. A key accepted
    new is remembered for the rest of the run, so a reconnection offering another key
    for the same host is a changed key, not a second new one.
    """

    def __init__(
        self,
        files: Sequence[Path],
        accept_new: bool = False,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.files = list(files)
        self.accept_new = accept_new
        self.seen: list[SeenKey] = []
        # Read once: the files may change during a run.
        self._known = paramiko.HostKeys()
        self._revoked: list[paramiko.PKey] = []
        for path in self.files:
            self._load(path)
        self._accepted: dict[str, paramiko.PKey] = {}
        self._say = say

    def _load(self, path: Path) -> None:
        """One known_hosts file, as OpenSSH reads it: ``@revoked`` keys are refused
        for every host, ``@cert-authority`` lines are skipped (host certificates are
        not used here), and so is any line that does not parse. (paramiko's own
        loader gives up on the whole file at a marker line.)"""
        for number, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
            line = text.strip()
            marker, _, rest = line.partition(" ")
            if not line or line.startswith("#") or marker == "@cert-authority":
                continue
            revoked = marker == "@revoked"
            try:
                entry = HostKeyEntry.from_line(rest.strip() if revoked else line, number)
            except (InvalidHostKey, paramiko.SSHException, ValueError):
                entry = None
            if entry is None:
                continue
            if revoked:
                self._revoked.append(entry.key)
                continue
            for name in entry.hostnames:
                self._known.add(name, entry.key.get_name(), entry.key)

    def _refuse_revoked(self, login: str, host: str, key: paramiko.PKey) -> None:
        if any(fingerprint(r) == fingerprint(key) for r in self._revoked):
            raise RevokedHostKey(login, host, key)

    def prepare(self, client: paramiko.SSHClient, login: str) -> None:
        keys = client.get_host_keys()
        for name in self._known:
            for key_type, key in self._known[name].items():
                keys.add(name, key_type, key)
        for host, key in self._accepted.items():
            keys.add(host, key.get_name(), key)
        client.set_missing_host_key_policy(_Policy(self, login))

    def missing(self, login: str, host: str, key: paramiko.PKey) -> None:
        """A host no known_hosts file names: refuse, or accept and remember it."""
        self._refuse_revoked(login, host, key)
        if not self.accept_new:
            raise UnknownHostKey(login, host, key, self.files)
        self._accepted[host] = key
        if self._say is not None:
            self._say(
                f"{login}: accepted new host key {key.get_name()} {fingerprint(key)} for "
                f"{host} ({ACCEPT_NEW_OPTION})"
            )

    def changed(self, login: str, host: str, error: paramiko.BadHostKeyException) -> ChangedHostKey:
        return ChangedHostKey(login, host, error.expected_key, error.key)

    def connected(self, login: str, host: str, key: paramiko.PKey) -> None:
        """Record the key of a login that got through (once per login and key); a key
        known_hosts both lists and revokes is refused here, before any command."""
        self._refuse_revoked(login, host, key)
        accepted = self._accepted.get(host)
        new = accepted is not None and fingerprint(accepted) == fingerprint(key)
        trust = ACCEPTED if new else KNOWN
        seen = SeenKey(login, host, key.get_name(), fingerprint(key), trust, key.get_base64())
        if seen not in self.seen:
            self.seen.append(seen)

    def describe(self) -> dict[str, Any]:
        return {
            "known_hosts": [str(f) for f in self.files],
            "accept_new": self.accept_new,
            "seen": [k.to_dict() for k in self.seen],
        }


class _Policy:
    """paramiko asks this for a host in no known_hosts file (its MissingHostKeyPolicy
    interface: ``missing_host_key`` raises to refuse)."""

    def __init__(self, check: HostKeyCheck, login: str) -> None:
        self.check = check
        self.login = login

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        self.check.missing(self.login, hostname, key)
