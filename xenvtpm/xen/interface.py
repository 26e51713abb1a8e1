"""The one narrow hypervisor interface the driver pair uses.

It covers exactly three things, each shaped after Xen's own user-space libraries so that
the real adapter (``linux.py``) is a thin ctypes layer and the simulated one (``sim.py``)
keeps the same semantics:

* xenstore            -- libxenstore: ``xs_read``, ``xs_write``, ``xs_mkdir``, ``xs_rm``,
                          ``xs_directory``, ``xs_set_permissions``, ``xs_watch``,
                          ``xs_fileno`` + ``xs_read_watch``, ``xs_transaction_start/end``.
* grant tables        -- libxengnttab: ``xengntshr_share_pages`` (grant pages to a
                          domain), ``xengnttab_map_domain_grant_refs`` (map them).
* event channels      -- libxenevtchn: ``bind_unbound_port``, ``bind_interdomain``,
                          ``notify``, ``fd`` + ``pending``/``unmask``, ``unbind``.

Paths not starting with ``/`` are relative to the caller's own ``/local/domain/<id>``,
as in xenstored. Every object holding a resource has an idempotent ``close()`` and is a
context manager.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

PAGE_SIZE = 4096
DOMID_SELF = 0x7FF0  # xen/include/public/xen.h
DOMID_T_MAX = 0xFFFF  # xen/include/public/xen.h: typedef uint16_t domid_t
NR_RESERVED_GRANT_REFS = 8  # xen/include/public/grant_table.h: GNTTAB_NR_RESERVED_ENTRIES
#: Events one ``EventChannel.consume`` takes at most. A guest that notifies again after
#: every unmask keeps its port pending for ever (XSA-391 class); a bounded consume lets
#: the loop, level-triggered, serve every other ready fd before it comes back.
MAX_CONSUME_ROUNDS = 8
#: Watch events one ``XenStore.read_watches`` returns at most, for the same reason: a
#: guest writing its own nodes in a loop queues them as fast as it likes.
MAX_WATCH_BATCH = 1024


class Access(enum.Enum):
    """One xenstore permission letter. Spec: xen/include/public/io/xs_wire.h, xs_perm_type."""

    NONE = "n"
    READ = "r"
    WRITE = "w"
    BOTH = "b"

    @property
    def can_read(self) -> bool:
        return self in (Access.READ, Access.BOTH)

    @property
    def can_write(self) -> bool:
        return self in (Access.WRITE, Access.BOTH)


@dataclass(frozen=True)
class Perm:
    """One entry of a node's permission list, e.g. ``r1`` = domain 1 may read.

    The first entry of a list names the owner and the access of every other domain.
    """

    domid: int
    access: Access

    def to_wire(self) -> str:
        return f"{self.access.value}{self.domid}"

    @classmethod
    def from_wire(cls, text: str) -> Perm:
        """``r5``: a letter, then a domain id in ASCII digits within ``domid_t``.

        str.isdigit() alone would pass "\u0665" (int() makes it 5) and "\u00b2" (int()
        raises), and any length: a guest's string reaches here through XS_SET_PERMS.
        """
        digits = text[1:]
        if (
            not 1 <= len(digits) <= len(str(DOMID_T_MAX))
            or not (digits.isascii() and digits.isdigit())
            or int(digits) > DOMID_T_MAX
        ):
            from xenvtpm.errors import MalformedMessage

            raise MalformedMessage(f"bad xenstore permission {text[:32]!r}")
        return cls(int(digits), Access(text[0]))


@dataclass(frozen=True)
class WatchEvent:
    """A watch fired: ``path`` changed (or the watch was just registered)."""

    path: str
    token: str


class XenStore(Protocol):
    """A connection to xenstore, as the calling domain. Spec: xenstore.h (libxenstore)."""

    def read(self, path: str, tx: int = 0) -> bytes: ...
    def write(self, path: str, value: bytes | str, tx: int = 0) -> None: ...
    def mkdir(self, path: str, tx: int = 0) -> None: ...
    def rm(self, path: str, tx: int = 0) -> None: ...
    def directory(self, path: str, tx: int = 0) -> list[str]: ...
    def get_perms(self, path: str, tx: int = 0) -> list[Perm]: ...
    def set_perms(self, path: str, perms: Sequence[Perm], tx: int = 0) -> None: ...
    def get_domain_path(self, domid: int) -> str: ...
    def transaction_start(self) -> int: ...

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        """End a transaction; False when it must be retried (xenstored's EAGAIN)."""
        ...

    def watch(self, path: str, token: str) -> None:
        """Watch ``path`` and everything below it; fires once at once, like xenstored."""
        ...

    def unwatch(self, path: str, token: str) -> None: ...

    def fileno(self) -> int:
        """A descriptor that polls readable while watch events are waiting (xs_fileno)."""
        ...

    def read_watches(self) -> list[WatchEvent]:
        """The watch events waiting now, oldest first, at most ``MAX_WATCH_BATCH``,
        without blocking (xs_check_watch); ``fileno()`` stays readable while more wait."""
        ...

    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class SharedPages(Protocol):
    """Pages this domain granted to another. Spec: xengntshr_share_pages."""

    @property
    def refs(self) -> Sequence[int]: ...

    @property
    def pages(self) -> Sequence[memoryview]:
        """One writable PAGE_SIZE view per granted page, in ``refs`` order."""
        ...

    def close(self) -> None:
        """Revoke the grants and unmap (xengntshr_unshare). Idempotent."""
        ...


class MappedPages(Protocol):
    """Another domain's granted pages, mapped here. Spec: xengnttab_map_domain_grant_refs."""

    @property
    def pages(self) -> Sequence[memoryview]: ...

    def close(self) -> None:
        """Unmap (xengnttab_unmap). Idempotent. Views into ``pages`` must be released."""
        ...


class GrantTable(Protocol):
    def share_pages(self, domid: int, count: int, writable: bool = True) -> SharedPages:
        """Allocate ``count`` zeroed pages and grant them to ``domid``."""
        ...

    def map_grant_refs(self, domid: int, refs: Sequence[int], writable: bool = True) -> MappedPages:
        """Map pages that ``domid`` granted to us; GrantError if any ref is not ours."""
        ...


class EventChannel(Protocol):
    """One bound event channel port. Spec: xenevtchn.h."""

    @property
    def port(self) -> int:
        """The local port number (what goes into xenstore ``event-channel``)."""
        ...

    def fileno(self) -> int:
        """Polls readable when an event is pending (or the channel died: see ``consume``)."""
        ...

    def notify(self) -> None:
        """Signal the remote end. Never blocks. Xen coalesces repeated notifies into one
        pending bit; the sim queues them (one event each, up to its socket buffer): an
        event means "look again", never a count."""
        ...

    def consume(self) -> bool:
        """Clear and unmask pending events without blocking (xenevtchn_pending+unmask),
        at most ``MAX_CONSUME_ROUNDS`` of them: the port may still be pending afterwards
        (a peer that keeps notifying), so call it from a level-triggered loop.

        Returns False once the channel can never fire again (the simulation sees its peer
        close); the real adapter always returns True.
        """
        ...

    def close(self) -> None:
        """Unbind. Idempotent."""
        ...


class EventChannels(Protocol):
    def bind_unbound_port(self, remote_domid: int) -> EventChannel:
        """Allocate a port that ``remote_domid`` may bind to."""
        ...

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> EventChannel:
        """Bind to the unbound port ``remote_port`` that ``remote_domid`` allocated for us."""
        ...


@runtime_checkable
class Hypervisor(Protocol):
    """Everything the driver pair needs from Xen, as one domain sees it."""

    @property
    def xenstore(self) -> XenStore: ...

    @property
    def grants(self) -> GrantTable: ...

    @property
    def events(self) -> EventChannels: ...

    def close(self) -> None: ...
