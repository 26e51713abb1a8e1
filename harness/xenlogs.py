"""Logs of a Xen machine under QEMU, copied into ``artifacts/xen/`` over SSH.

dom0: dmesg, journal, ``xl dmesg``, ``xl list -l``, ``/var/log/xen`` (xl logs, hotplug
log, every guest's console as xenconsoled wrote it) and the driver daemons' logs;
each guest: its journal and daemon logs. Used when the xen target closes, when a guest
fails to start, and by ``harness down`` for a machine ``harness up`` left running.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.deadline import Deadline
from harness.errors import HarnessError
from harness.ssh import SshHost
from harness.targets.xen_driver import TRACE_DIR

REMOTE_LOG_DIR = "/var/log/xenvtpm"  # where the driver daemons log in every domain


JOURNAL_CURSOR = "journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'"


def journal_command(cursor: str | None = None) -> str:
    """This boot's journal, or only what follows ``cursor`` (from ``JOURNAL_CURSOR``: a
    cursor, unlike ``--since``, survives the clock jump of a restored machine)."""
    after = f" --after-cursor={shlex.quote(cursor)}" if cursor else ""
    return f"journalctl -b --no-pager{after}"


def collect_logs(
    dom0: SshHost,
    guests: dict[str, SshHost],
    artifacts: Path,
    cursors: Mapping[str, str] | None = None,
) -> None:
    """Copy the logs of a running machine into ``artifacts`` (best effort, bounded).

    ``cursors`` (by host name: dom0 and guest names) limits each journal to this run: on
    a long-running host the whole boot's journal is neither small nor ours.
    """
    cursors = cursors or {}
    commands = {
        "dom0-dmesg.log": "dmesg",
        "dom0-journal.log": journal_command(cursors.get("dom0")),
        "xen-dmesg.log": "xl dmesg",
        "xl-list.log": "xl list -l",
    }
    artifacts.mkdir(parents=True, exist_ok=True)
    for filename, command in commands.items():
        with contextlib.suppress(HarnessError):
            _, out, err = dom0.run(command, timeout=30)
            (artifacts / filename).write_text(out + err)
    trees = (
        ("/var/log/xen", "var-log-xen"),
        (REMOTE_LOG_DIR, "dom0-daemons"),
        (TRACE_DIR, "dom0-trace"),  # the backend's traffic trace of every instance
    )
    for remote, local in trees:
        with contextlib.suppress(HarnessError, OSError):
            _fetch_tree(dom0, remote, artifacts / local)
    for name, host in guests.items():
        if not host.connected:
            continue
        with contextlib.suppress(HarnessError):
            _, out, err = host.run(journal_command(cursors.get(name)), timeout=30)
            (artifacts / f"{name}-journal.log").write_text(out + err)
        with contextlib.suppress(HarnessError, OSError):
            _fetch_tree(host, REMOTE_LOG_DIR, artifacts / f"{name}-daemons")


def collect_from_description(description: dict[str, Any], deadline: Deadline) -> Path:
    """``harness down``: log in to what ``harness up`` left running and collect its logs."""
    ssh = description["ssh"]
    key = Path(ssh["key"])
    artifacts = Path(description["artifacts"])
    with SshHost("dom0", "127.0.0.1", int(ssh["port"]), key) as dom0:
        dom0.connect(deadline)
        guests = {}
        for g in description.get("guests", []):
            host = SshHost(g["name"], g["ip"], 22, key, via=dom0)
            with contextlib.suppress(HarnessError):
                host.connect(deadline.sub(15))
            guests[g["name"]] = host
        try:
            collect_logs(dom0, guests, artifacts)
        finally:
            for host in guests.values():
                host.close()
    return artifacts


def _fetch_tree(host: SshHost, remote: str, local: Path) -> None:
    """Copy the regular files under ``remote`` (one level of subdirectories) to ``local``."""
    rc, out, _ = host.run(f"find {shlex.quote(remote)} -maxdepth 2 -type f", timeout=20)
    if rc != 0:
        return
    for path in out.split():
        rel = Path(path).relative_to(remote)
        host.get(path, local / rel)
