"""Every error xenvtpm raises, under one base class.

XenVTPMError
    MalformedMessage        bytes from a peer that do not parse (TPM header, ring, xenstore)
    StateError              a xenbus state machine asked to do what its state forbids
    XenError                a hypervisor operation failed
        XenStoreError           xenstore answered an error (``errno_name`` is e.g. "EACCES")
            TransactionConflict     a transaction still answered EAGAIN after every retry
        GrantError              sharing or mapping a grant failed
        EventChannelError       allocating, binding or signalling an event channel failed
        HypervisorUnavailable   no hypervisor (real or simulated) could be reached
    VTPMError               the vTPM side failed
        InstanceStartError      swtpm or swtpm_setup could not start an instance
    ChannelClosed           a peer went away while we waited for it
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence


class XenVTPMError(Exception):
    """Base of every error raised by xenvtpm."""


class MalformedMessage(XenVTPMError):
    """Bytes received from a peer that do not form a valid message."""


class StateError(XenVTPMError):
    """An operation needs a state the object is not in."""

    def __init__(self, actual: object, required: object) -> None:
        super().__init__(f"state is {actual}, operation requires {required}")
        self.actual = actual
        self.required = required


class XenError(XenVTPMError):
    """A hypervisor operation failed."""


class XenStoreError(XenError):
    """Xenstore answered an error; ``errno_name`` is the wire string (``EACCES``...)."""

    def __init__(self, errno_name: str, op: str, path: str = "") -> None:
        super().__init__(f"xenstore {op} {path!r}: {errno_name}".replace(" ''", ""))
        self.errno_name = errno_name
        self.op = op
        self.path = path

    @property
    def errno(self) -> int:
        return int(getattr(_errno, self.errno_name, _errno.EIO))


class TransactionConflict(XenStoreError):
    """A xenstore transaction answered EAGAIN at every attempt its caller allows."""

    def __init__(self, path: str, attempts: int, seconds: float) -> None:
        super().__init__("EAGAIN", "transaction", path)
        self.attempts = attempts
        self.seconds = seconds

    def __str__(self) -> str:
        ms = self.seconds * 1000
        return f"{super().__str__()} at all {self.attempts} attempts in {ms:.0f} ms"


class GrantError(XenError):
    """Sharing, mapping or unmapping a grant failed."""


class EventChannelError(XenError):
    """An event channel could not be allocated, bound or signalled."""


class HypervisorUnavailable(XenError):
    """Neither a real nor a simulated hypervisor could be reached."""


class VTPMError(XenVTPMError):
    """The vTPM side (manager or swtpm) failed."""


class InstanceStartError(VTPMError):
    """swtpm_setup or swtpm failed to start an instance; carries the evidence."""

    def __init__(
        self, instance: int, command: Sequence[str], returncode: int | None, log_tail: str
    ) -> None:
        super().__init__(
            f"vTPM instance {instance}: {' '.join(command)} failed "
            f"(exit {returncode}); log tail:\n{log_tail}"
        )
        self.instance = instance
        self.command = list(command)
        self.returncode = returncode
        self.log_tail = log_tail


class ChannelClosed(XenVTPMError):
    """The peer of a channel closed it while we were using it."""
