"""The real Xen adapter: ``/dev/xen/*`` through Xen's own libraries, by ctypes.

Grants go through libxengnttab (``xengntshr_*`` on ``/dev/xen/gntalloc`` to share,
``xengnttab_*`` on ``/dev/xen/gntdev`` to map), event channels through libxenevtchn on
``/dev/xen/evtchn``, xenstore through libxenstore (``linux_xenstore.py``). Why those
libraries and not ioctls or the pure-Python xenstore client: ``linux_libs.py``.

Facts this follows (DESIGN.md 4, measured in dom0 and a PV domU under Xen 4.17):

* pages come back as one contiguous mapping; the views handed out are memoryviews over
  it, released before it is unmapped (a view kept past ``close`` would be a dangling
  pointer: callers copy what they keep, as ``tpmif.gather`` does);
* each event channel has its own xenevtchn handle, so ``fileno()`` is per port and
  ``xenevtchn_pending`` only ever returns that port;
* after ``xenevtchn_pending`` the port stays masked until ``xenevtchn_unmask``:
  ``consume()`` always unmasks, or every later notify would be lost, and takes at most
  ``MAX_CONSUME_ROUNDS`` events (a guest can keep its port pending for ever);
* ``bind_interdomain`` leaves one spurious event pending (the backend consumes it);
* ``xengntshr_unshare`` does not revoke a mapping the peer still holds.

Handles are opened lazily: a guest (frontend) never needs ``gntdev``, dom0 (backend)
never needs ``gntalloc``, and a missing kernel module then fails the one operation that
needs it, naming the module.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import select
from collections.abc import Sequence
from typing import TYPE_CHECKING

from xenvtpm.errors import EventChannelError, GrantError, HypervisorUnavailable
from xenvtpm.lifecycle import Closeable
from xenvtpm.xen.interface import (
    MAX_CONSUME_ROUNDS,
    PAGE_SIZE,
    EventChannel,
    Hypervisor,
    MappedPages,
    SharedPages,
)
from xenvtpm.xen.linux_libs import XenLibs, errno_name, last_error
from xenvtpm.xen.linux_xenstore import LinuxXenStore

log = logging.getLogger(__name__)

DEV_XEN = "/dev/xen"
MODULES = "modprobe xen-evtchn xen-gntdev xen-gntalloc"


def _why(what: str, err: OSError) -> str:
    return f"{what}: {errno_name(err.errno)} ({err.strerror})"


class _Mapping:
    """``count`` contiguous pages at ``addr``, handed out as per-page memoryviews."""

    def __init__(self, addr: int, count: int) -> None:
        self.addr = addr
        self.count = count
        raw = (ctypes.c_char * (count * PAGE_SIZE)).from_address(addr)
        self._whole = memoryview(raw).cast("B")
        self._views = tuple(self._whole[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(count))

    @property
    def pages(self) -> Sequence[memoryview]:
        return self._views

    def release(self) -> None:
        for view in self._views:
            view.release()
        self._views = ()
        self._whole.release()


class LinuxSharedPages(Closeable):
    """Pages this domain granted (``SharedPages``): ``xengntshr_share_pages``."""

    def __init__(self, table: LinuxGrantTable, handle: int, addr: int, refs: Sequence[int]):
        self._table = table
        self._handle = handle
        self._refs = tuple(refs)
        self._map = _Mapping(addr, len(refs))
        self._closed = False

    @property
    def refs(self) -> Sequence[int]:
        return self._refs

    @property
    def pages(self) -> Sequence[memoryview]:
        return self._map.pages

    def close(self) -> None:
        """Unmap and end the grants (``xengntshr_unshare``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._map.release()
        gnt = self._table.libs.gnt
        if gnt.xengntshr_unshare(self._handle, self._map.addr, self._map.count) != 0:
            log.warning("unshare of refs %s: %s", list(self._refs), last_error())
        self._table.forget(self)


class LinuxMappedPages(Closeable):
    """Another domain's pages mapped here (``MappedPages``): ``xengnttab_map_*``."""

    def __init__(self, table: LinuxGrantTable, handle: int, addr: int, count: int) -> None:
        self._table = table
        self._handle = handle
        self._map = _Mapping(addr, count)
        self._closed = False

    @property
    def pages(self) -> Sequence[memoryview]:
        return self._map.pages

    def close(self) -> None:
        """``xengnttab_unmap``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._map.release()
        gnt = self._table.libs.gnt
        if gnt.xengnttab_unmap(self._handle, self._map.addr, self._map.count) != 0:
            log.warning("unmap of %d pages: %s", self._map.count, last_error())
        self._table.forget(self)


class LinuxGrantTable:
    """``GrantTable``: one gntalloc and one gntdev handle, each opened on first use."""

    def __init__(self, libs: XenLibs) -> None:
        self.libs = libs
        self._shr: int | None = None
        self._tab: int | None = None
        self._live: set[LinuxSharedPages | LinuxMappedPages] = set()
        self._closed = False

    def _open(self, which: str) -> int:
        if self._closed:
            raise GrantError("grant table is closed")
        gnt = self.libs.gnt
        if which == "shr":
            if self._shr is None:
                self._shr = gnt.xengntshr_open(None, 0) or None
                if self._shr is None:
                    err = last_error()
                    raise GrantError(
                        _why("xengntshr_open (/dev/xen/gntalloc; modprobe xen-gntalloc)", err)
                    ) from err
            return self._shr
        if self._tab is None:
            self._tab = gnt.xengnttab_open(None, 0) or None
            if self._tab is None:
                err = last_error()
                raise GrantError(
                    _why("xengnttab_open (/dev/xen/gntdev; modprobe xen-gntdev)", err)
                ) from err
        return self._tab

    def share_pages(self, domid: int, count: int, writable: bool = True) -> LinuxSharedPages:
        if not 1 <= count <= 1024:
            raise GrantError(f"cannot share {count} pages")
        handle = self._open("shr")
        refs = (ctypes.c_uint32 * count)()
        addr = self.libs.gnt.xengntshr_share_pages(handle, domid, count, refs, int(writable))
        if not addr:
            err = last_error()
            raise GrantError(_why(f"sharing {count} pages with dom{domid}", err)) from err
        ctypes.memset(addr, 0, count * PAGE_SIZE)
        shared = LinuxSharedPages(self, handle, addr, list(refs))
        self._live.add(shared)
        return shared

    def map_grant_refs(
        self, domid: int, refs: Sequence[int], writable: bool = True
    ) -> LinuxMappedPages:
        count = len(refs)
        if not 1 <= count <= 1024:
            raise GrantError(f"cannot map {count} grant refs")
        handle = self._open("tab")
        array = (ctypes.c_uint32 * count)(*refs)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        gnt = self.libs.gnt
        addr = gnt.xengnttab_map_domain_grant_refs(handle, count, domid, array, prot)
        if not addr:
            err = last_error()
            raise GrantError(_why(f"mapping refs {list(refs)} of dom{domid}", err)) from err
        mapped = LinuxMappedPages(self, handle, addr, count)
        self._live.add(mapped)
        return mapped

    def forget(self, pages: LinuxSharedPages | LinuxMappedPages) -> None:
        self._live.discard(pages)

    @property
    def live(self) -> int:
        """Share/map objects not yet closed (the adapter's own leak accounting)."""
        return len(self._live)

    def close(self) -> None:
        """Close what is still shared or mapped, then both handles. Idempotent."""
        if self._closed:
            return
        for pages in list(self._live):
            log.warning("closing the grant table with %r still open", pages)
            pages.close()
        self._closed = True
        gnt = self.libs.gnt
        if self._shr is not None:
            gnt.xengntshr_close(self._shr)
            self._shr = None
        if self._tab is not None:
            gnt.xengnttab_close(self._tab)
            self._tab = None


class LinuxEventChannel(Closeable):
    """One bound port with its own xenevtchn handle (``EventChannel``)."""

    def __init__(self, libs: XenLibs, handle: int, port: int) -> None:
        self._ev = libs.evtchn
        self._h: int | None = handle
        self._port = port
        self._fd = int(self._ev.xenevtchn_fd(handle))
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._warned = False

    @property
    def port(self) -> int:
        return self._port

    def fileno(self) -> int:
        if self._h is None:
            raise EventChannelError(f"event channel port {self._port} is closed")
        return self._fd

    def notify(self) -> None:
        """``xenevtchn_notify``; a failure is logged once (the peer's close shows on its
        side as a xenbus state change, which is what the driver pair reacts to)."""
        if self._h is None:
            return
        if self._ev.xenevtchn_notify(self._h, self._port) != 0 and not self._warned:
            self._warned = True
            log.warning("notify on port %d: %s", self._port, last_error())

    def consume(self) -> bool:
        """``xenevtchn_pending`` + ``xenevtchn_unmask``, at most ``MAX_CONSUME_ROUNDS``
        rounds: a peer that notifies again after every unmask keeps the port pending for
        ever (XSA-391 class), and this runs on the backend's only thread. The fd then
        stays readable and the level-triggered loop calls again after the other fds.

        ``pending`` may block even on a non-blocking fd (xenevtchn.h), so each call is
        preceded by a zero-timeout poll. Always True: a real port never reports its
        peer's death here.
        """
        h = self._h
        if h is None:
            return True
        for _ in range(MAX_CONSUME_ROUNDS):
            if not self._poller.poll(0):
                break
            port = int(self._ev.xenevtchn_pending(h))
            if port < 0:
                err = last_error()
                raise EventChannelError(_why(f"pending on port {self._port}", err)) from err
            if self._ev.xenevtchn_unmask(h, port) != 0:
                err = last_error()
                raise EventChannelError(_why(f"unmask of port {port}", err)) from err
        return True

    def close(self) -> None:
        """``xenevtchn_unbind`` and close the handle. Idempotent."""
        h, self._h = self._h, None
        if h is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(self._fd)
        if self._ev.xenevtchn_unbind(h, self._port) != 0:
            log.debug("unbind of port %d: %s", self._port, last_error())
        self._ev.xenevtchn_close(h)


class LinuxEventChannels:
    """``EventChannels``: each bind opens a fresh ``/dev/xen/evtchn`` handle."""

    def __init__(self, libs: XenLibs) -> None:
        self.libs = libs

    def _bind(self, what: str, bind: str, *args: int) -> LinuxEventChannel:
        ev = self.libs.evtchn
        handle = ev.xenevtchn_open(None, 0)
        if not handle:
            err = last_error()
            raise EventChannelError(
                _why("xenevtchn_open (/dev/xen/evtchn; modprobe xen-evtchn)", err)
            ) from err
        port = int(getattr(ev, bind)(handle, *args))
        if port < 0:
            err = last_error()
            ev.xenevtchn_close(handle)
            raise EventChannelError(_why(what, err)) from err
        return LinuxEventChannel(self.libs, handle, port)

    def bind_unbound_port(self, remote_domid: int) -> LinuxEventChannel:
        return self._bind(
            f"unbound port for dom{remote_domid}", "xenevtchn_bind_unbound_port", remote_domid
        )

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> LinuxEventChannel:
        return self._bind(
            f"binding port {remote_port} of dom{remote_domid}",
            "xenevtchn_bind_interdomain",
            remote_domid,
            remote_port,
        )


class LinuxHypervisor(Closeable):
    """``interface.Hypervisor`` on a real Xen domain (dom0 or a PV/HVM guest)."""

    def __init__(self, libs: XenLibs, xs: LinuxXenStore) -> None:
        self._libs = libs
        self._xs = xs
        self._grants = LinuxGrantTable(libs)
        self._events = LinuxEventChannels(libs)
        self._closed = False

    @classmethod
    def open(cls, *, dev_xen: str = DEV_XEN, libs: XenLibs | None = None) -> LinuxHypervisor:
        """Connect as this domain; HypervisorUnavailable says why not (e.g. on a host)."""
        if not os.path.isdir(dev_xen):
            raise HypervisorUnavailable(
                f"not a Xen domain: {dev_xen} is missing (on Xen: {MODULES}; for the "
                "simulation set XENVTPM_SIM_FDS or XENVTPM_SIM_DIR)"
            )
        libs = libs or XenLibs.shared()
        return cls(libs, LinuxXenStore.open(libs))

    @property
    def xenstore(self) -> LinuxXenStore:
        return self._xs

    @property
    def grants(self) -> LinuxGrantTable:
        return self._grants

    @property
    def events(self) -> LinuxEventChannels:
        return self._events

    def close(self) -> None:
        """Grants first (they may hold mappings), then xenstore. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._grants.close()
        finally:
            self._xs.close()


if TYPE_CHECKING:  # mypy proves the adapter satisfies the interface's Protocols
    from xenvtpm.xen.interface import XenStore

    def _conforms(
        h: LinuxHypervisor,
        x: LinuxXenStore,
        s: LinuxSharedPages,
        m: LinuxMappedPages,
        e: LinuxEventChannel,
    ) -> tuple[Hypervisor, XenStore, SharedPages, MappedPages, EventChannel]:
        return h, x, s, m, e
