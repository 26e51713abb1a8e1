"""systemd's readiness protocol (sd_notify), in the standard library.

A ``Type=notify`` unit starts the next unit only once the daemon says ``READY=1``: the
backend after the manager listens, ``xendomains`` after the backend watches xenstore.
The datagram goes to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace). The variable is taken out of the environment when read, so that the
manager's swtpm children never speak for the manager.

Spec: sd_notify(3); docs/services.md.
"""

from __future__ import annotations

import logging
import os
import socket

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"

log = logging.getLogger(__name__)


class Notifier:
    """Where this daemon's state goes: systemd's socket, or nowhere outside systemd."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.pop(NOTIFY_SOCKET_ENV, None) or None)

    def send(self, *fields: str) -> bool:
        """Send ``FIELD=value`` lines; False when there is no socket or it failed (the
        daemon works on: a lost notice is systemd's timeout to report, not a crash)."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(target)
                s.sendall("\n".join(fields).encode())
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", self.address, e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")
