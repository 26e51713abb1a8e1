"""``interface.XenStore`` over libxenstore (``xs_open``) through ctypes.

``xs_open(0)`` connects to xenstored's unix socket when there is one (dom0) and falls
back to ``/dev/xen/xenbus`` (a guest): the same calls work in both. Watches: libxenstore
queues events on its own reader thread and makes ``xs_fileno()`` readable;
``xs_check_watch`` takes one without blocking (NULL + EAGAIN when none is left).

Every result libxenstore allocates (``xs_read``, ``xs_directory``, ``xs_check_watch``,
``xs_get_permissions``, ``xs_get_domain_path``) is copied into Python objects and freed
at once, in one ``free()`` each (vectors and their strings are one allocation).

Spec: tools/include/xenstore.h; tools/libs/store/xs.c; docs/misc/xenstore.txt.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import threading
from collections.abc import Sequence
from typing import Self

from xenvtpm.errors import ChannelClosed, HypervisorUnavailable, XenStoreError
from xenvtpm.lifecycle import Closeable
from xenvtpm.xen.interface import MAX_WATCH_BATCH, Access, Perm, WatchEvent
from xenvtpm.xen.linux_libs import (
    XS_PERM_READ,
    XS_PERM_WRITE,
    XenLibs,
    XsPermissions,
    errno_name,
    last_error,
)

log = logging.getLogger(__name__)

_TO_BITS = {
    Access.NONE: 0,
    Access.READ: XS_PERM_READ,
    Access.WRITE: XS_PERM_WRITE,
    Access.BOTH: XS_PERM_READ | XS_PERM_WRITE,
}
_FROM_BITS = {bits: access for access, bits in _TO_BITS.items()}


def _path(path: str, op: str) -> bytes:
    """A path as C wants it; an embedded NUL would silently truncate it, so refuse it."""
    raw = path.encode()
    if b"\0" in raw:
        raise XenStoreError("EINVAL", op, path)
    return raw


class LinuxXenStore(Closeable):
    """One libxenstore connection (``struct xs_handle``), as the calling domain."""

    def __init__(self, libs: XenLibs, handle: int) -> None:
        self._libs = libs
        self._xs = libs.xs
        self._h: int | None = handle
        self._lock = threading.Lock()  # close() against calls from other threads
        self._fileno = -1

    @classmethod
    def open(cls, libs: XenLibs) -> Self:
        handle = libs.xs.xs_open(0)
        if not handle:
            err = last_error()
            raise HypervisorUnavailable(
                f"xs_open: cannot reach xenstore ({errno_name(err.errno)}: neither "
                "/run/xenstored/socket nor /dev/xen/xenbus answered)"
            ) from err
        return cls(libs, handle)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """``xs_close``: drops watches and the reader thread. Idempotent."""
        with self._lock:
            handle, self._h = self._h, None
        if handle is not None:
            self._xs.xs_close(handle)

    def _handle(self, op: str) -> int:
        handle = self._h
        if handle is None:
            raise ChannelClosed(f"xenstore {op}: connection is closed")
        return handle

    def _fail(self, op: str, path: str = "") -> XenStoreError:
        err = last_error()
        exc = XenStoreError(errno_name(err.errno), op, path)
        exc.__cause__ = err
        return exc

    def _take_string(self, ptr: int, length: int | None = None) -> bytes:
        try:
            return ctypes.string_at(ptr, length) if length is not None else ctypes.string_at(ptr)
        finally:
            self._libs.free(ptr)

    # -- nodes -----------------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        size = ctypes.c_uint(0)
        ptr = self._xs.xs_read(self._handle("read"), tx, _path(path, "read"), ctypes.byref(size))
        if not ptr:
            raise self._fail("read", path)
        return self._take_string(ptr, size.value)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        ok = self._xs.xs_write(self._handle("write"), tx, _path(path, "write"), raw, len(raw))
        if not ok:
            raise self._fail("write", path)

    def mkdir(self, path: str, tx: int = 0) -> None:
        if not self._xs.xs_mkdir(self._handle("mkdir"), tx, _path(path, "mkdir")):
            raise self._fail("mkdir", path)

    def rm(self, path: str, tx: int = 0) -> None:
        if not self._xs.xs_rm(self._handle("rm"), tx, _path(path, "rm")):
            raise self._fail("rm", path)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        num = ctypes.c_uint(0)
        h = self._handle("directory")
        ptr = self._xs.xs_directory(h, tx, _path(path, "directory"), ctypes.byref(num))
        if not ptr:
            raise self._fail("directory", path)
        try:
            vector = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_char_p))
            names = [(vector[i] or b"").decode() for i in range(num.value)]
        finally:
            self._libs.free(ptr)
        return [name for name in names if name]

    def get_perms(self, path: str, tx: int = 0) -> list[Perm]:
        num = ctypes.c_uint(0)
        h = self._handle("get_perms")
        ptr = self._xs.xs_get_permissions(h, tx, _path(path, "get_perms"), ctypes.byref(num))
        if not ptr:
            raise self._fail("get_perms", path)
        try:
            array = ctypes.cast(ptr, ctypes.POINTER(XsPermissions))
            raw = [(array[i].id, array[i].perms) for i in range(num.value)]
        finally:
            self._libs.free(ptr)
        return [Perm(domid, _FROM_BITS[bits & 0x3]) for domid, bits in raw]

    def set_perms(self, path: str, perms: Sequence[Perm], tx: int = 0) -> None:
        array = (XsPermissions * len(perms))(
            *(XsPermissions(p.domid, _TO_BITS[p.access]) for p in perms)
        )
        h = self._handle("set_perms")
        if not self._xs.xs_set_permissions(h, tx, _path(path, "set_perms"), array, len(perms)):
            raise self._fail("set_perms", path)

    def get_domain_path(self, domid: int) -> str:
        ptr = self._xs.xs_get_domain_path(self._handle("get_domain_path"), domid)
        if not ptr:
            raise self._fail("get_domain_path", str(domid))
        return self._take_string(ptr).decode()

    # -- transactions ----------------------------------------------------------------

    def transaction_start(self) -> int:
        tx = int(self._xs.xs_transaction_start(self._handle("transaction_start")))
        if tx == 0:  # XBT_NULL
            raise self._fail("transaction_start")
        return tx

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        if self._xs.xs_transaction_end(self._handle("transaction_end"), tx, not commit):
            return True
        exc = self._fail("transaction_end")
        if exc.errno_name == "EAGAIN":
            return False
        raise exc

    # -- watches ---------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        h = self._handle("watch")
        self.fileno()  # create libxenstore's watch pipe before the first event
        if not self._xs.xs_watch(h, _path(path, "watch"), _path(token, "watch")):
            raise self._fail("watch", path)

    def unwatch(self, path: str, token: str) -> None:
        h = self._handle("unwatch")
        if not self._xs.xs_unwatch(h, _path(path, "unwatch"), _path(token, "unwatch")):
            raise self._fail("unwatch", path)

    def fileno(self) -> int:
        """``xs_fileno``: readable while watch events wait. Stable for the handle's life."""
        if self._fileno < 0:
            fd = int(self._xs.xs_fileno(self._handle("fileno")))
            if fd < 0:
                raise self._fail("fileno")
            self._fileno = fd
        return self._fileno

    def read_watches(self) -> list[WatchEvent]:
        """``xs_check_watch`` until EAGAIN or ``MAX_WATCH_BATCH`` events; libxenstore
        keeps ``xs_fileno`` readable while more wait. Spec: xenstore.h, xs_check_watch."""
        h = self._handle("read_watches")
        events: list[WatchEvent] = []
        while len(events) < MAX_WATCH_BATCH:
            ptr = self._xs.xs_check_watch(h)
            if not ptr:
                if ctypes.get_errno() in (errno_mod.EAGAIN, 0):
                    break
                raise self._fail("read_watches")
            try:
                vector = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_char_p))
                path, token = vector[0] or b"", vector[1] or b""  # XS_WATCH_PATH, _TOKEN
            finally:
                self._libs.free(ptr)
            events.append(WatchEvent(path.decode(errors="replace"), token.decode()))
        return events
