"""The simulated-Xen adapter: ``interface.Hypervisor`` over simxend's two channels.

A guest process inherits two connected descriptors (``XENVTPM_SIM_FDS=XS,HC``); a dom0
process connects to ``RUN/xenstored.sock`` and ``RUN/privcmd.sock``. Granted pages are
memfds mmapped here, event channels are socketpair ends used directly: after setup,
nothing passes through the daemon. Spec: docs/simulated-xen.md.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

from xenvtpm.errors import (
    ChannelClosed,
    EventChannelError,
    GrantError,
    HypervisorUnavailable,
)
from xenvtpm.lifecycle import Closeable
from xenvtpm.sim.hypercall import HcError, HcOp, HypercallClient, close_fds
from xenvtpm.sim.xenstore_client import XenStoreClient
from xenvtpm.xen.interface import (
    MAX_CONSUME_ROUNDS,
    PAGE_SIZE,
    EventChannel,
    Hypervisor,
    MappedPages,
    SharedPages,
)

log = logging.getLogger(__name__)

_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
SIM_FDS_ENV = "XENVTPM_SIM_FDS"  # same names as xenvtpm.xen (kept here: no import cycle)
SIM_DIR_ENV = "XENVTPM_SIM_DIR"
XENSTORED_SOCK = "xenstored.sock"
PRIVCMD_SOCK = "privcmd.sock"


class _Pages:
    """mmaps of page descriptors, exposed as memoryviews.

    ``mmap.close()`` raises BufferError while any view of the map is alive, so ``close``
    releases the views made here first; callers must release any view they derived
    (slices, ``memoryview(page)``) before closing, or the mapping lingers until those
    are garbage-collected (it is logged).
    """

    def __init__(self, fds: list[int], writable: bool) -> None:
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        self._maps: list[mmap.mmap] = []
        try:
            for fd in fds:
                self._maps.append(mmap.mmap(fd, PAGE_SIZE, access=access))
        except (OSError, ValueError) as exc:
            self._unmap_all()
            raise GrantError(f"cannot mmap a granted page: {exc}") from exc
        finally:
            close_fds(fds)  # mmap keeps its own reference to each page
        self._views: tuple[memoryview, ...] = tuple(memoryview(m) for m in self._maps)

    @property
    def pages(self) -> Sequence[memoryview]:
        return self._views

    def _unmap_all(self) -> None:
        for view in getattr(self, "_views", ()):
            view.release()
        self._views = ()
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                log.warning("a view of a granted page is still alive: page stays mapped")
        self._maps = []


class SimSharedPages(_Pages, Closeable):
    """Pages this domain granted (``SharedPages``); ``close`` unshares them."""

    def __init__(self, hc: HypercallClient, refs: list[int], fds: list[int]) -> None:
        super().__init__(fds, writable=True)
        self._hc = hc
        self._refs = tuple(refs)
        self._closed = False

    @property
    def refs(self) -> Sequence[int]:
        return self._refs

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._hc.call(HcOp.GNT_UNSHARE, refs=list(self._refs))
        except (HcError, ChannelClosed) as exc:
            log.warning("unshare of refs %s failed: %s", list(self._refs), exc)
        self._unmap_all()


class SimMappedPages(_Pages, Closeable):
    """Another domain's pages mapped here (``MappedPages``); ``close`` unmaps."""

    def __init__(self, hc: HypercallClient, handle: int, fds: list[int], writable: bool) -> None:
        super().__init__(fds, writable=writable)
        self._hc = hc
        self._handle = handle
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._unmap_all()
        try:
            self._hc.call(HcOp.GNT_UNMAP, handle=self._handle)
        except (HcError, ChannelClosed) as exc:
            log.warning("unmap of handle %d failed: %s", self._handle, exc)


class SimGrantTable:
    """``GrantTable`` over privcmd: gnt_share / gnt_map."""

    def __init__(self, hc: HypercallClient) -> None:
        self._hc = hc

    def share_pages(self, domid: int, count: int, writable: bool = True) -> SimSharedPages:
        try:
            fields, fds = self._hc.call(HcOp.GNT_SHARE, domid=domid, count=count, writable=writable)
        except HcError as exc:
            raise GrantError(f"sharing {count} pages with dom{domid}: {exc.errno_name}") from exc
        refs = fields.get("refs")
        if not isinstance(refs, list) or len(refs) != count or len(fds) != count:
            close_fds(fds)
            raise GrantError(f"gnt_share returned {refs!r} with {len(fds)} pages")
        return SimSharedPages(self._hc, refs, fds)

    def map_grant_refs(
        self, domid: int, refs: Sequence[int], writable: bool = True
    ) -> SimMappedPages:
        try:
            fields, fds = self._hc.call(
                HcOp.GNT_MAP, domid=domid, refs=list(refs), writable=writable
            )
        except HcError as exc:
            raise GrantError(f"mapping refs {list(refs)} of dom{domid}: {exc.errno_name}") from exc
        handle = fields.get("handle")
        if not isinstance(handle, int) or len(fds) != len(refs):
            close_fds(fds)
            raise GrantError(f"gnt_map returned handle {handle!r} with {len(fds)} pages")
        return SimMappedPages(self._hc, handle, fds, writable)


class SimEventChannel(Closeable):
    """One port: a socketpair end shared with the remote port (``EventChannel``).

    Each byte on the socket is one notify. Xen keeps one pending bit per port, so a
    guest floods dom0 only by notifying again after each of dom0's unmasks; the sim
    cannot interleave a guest with dom0's rounds, so it lets the guest queue its
    notifies instead (up to the socket buffer): each round of ``consume`` takes one, as
    each ``xenevtchn_pending`` + ``xenevtchn_unmask`` of the real adapter takes one
    event. A guest that keeps the buffer filled (``notify_many``) keeps its port
    pending after every round, as a real guest notifying in a tight loop does.
    """

    def __init__(self, hc: HypercallClient, port: int, sock: socket.socket) -> None:
        self._hc = hc
        self._port = port
        self._sock = sock
        self._sock.setblocking(False)
        self._events = bytearray(MAX_CONSUME_ROUNDS)  # consume() reads into it: no copy
        self._dead = False
        self._closed = False

    @property
    def port(self) -> int:
        return self._port

    def fileno(self) -> int:
        if self._closed:
            raise EventChannelError(f"event channel port {self._port} is closed")
        return self._sock.fileno()

    def notify(self) -> None:
        """One byte, never blocking: a full buffer means an event is already pending."""
        if self._closed or self._dead:
            return
        try:
            self._sock.send(b"\x01", _SEND_FLAGS)
        except BlockingIOError:
            pass
        except OSError:
            self._dead = True  # the peer is gone: consume() reports it

    def notify_many(self, count: int) -> int:
        """``count`` notifies at once, never blocking; how many the buffer took.

        What a guest notifying in a tight loop does to the remote port: one event after
        each of its unmasks. Only on a bound port of this connection, as Xen's
        EVTCHNOP_send (a closed port raises; before the remote binds, simxend drops
        them at the bind, as Xen drops a notify on an unbound port).
        """
        if self._closed:
            raise EventChannelError(f"event channel port {self._port} is closed")
        if self._dead or count <= 0:
            return 0
        try:
            return self._sock.send(b"\x01" * count, _SEND_FLAGS)
        except BlockingIOError:
            return 0
        except OSError:
            self._dead = True
            return 0

    def consume(self) -> bool:
        """Take at most ``MAX_CONSUME_ROUNDS`` events, as the real adapter's rounds of
        ``xenevtchn_pending`` + ``xenevtchn_unmask`` do: here one recv takes them all."""
        if self._closed or self._dead:
            return False
        try:
            taken = self._sock.recv_into(self._events)
        except BlockingIOError:
            return True
        except OSError:
            taken = 0
        if not taken:
            self._dead = True
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._hc.call(HcOp.EVTCHN_UNBIND, port=self._port)
        except (HcError, ChannelClosed) as exc:
            log.debug("unbind of port %d failed: %s", self._port, exc)
        self._sock.close()


class SimEventChannels:
    """``EventChannels`` over privcmd."""

    def __init__(self, hc: HypercallClient) -> None:
        self._hc = hc

    def _channel(self, op: HcOp, what: str, **args: Any) -> SimEventChannel:
        try:
            fields, fds = self._hc.call(op, **args)
        except HcError as exc:
            raise EventChannelError(f"{what}: {exc.errno_name}: {exc}") from exc
        port = fields.get("port")
        if not isinstance(port, int) or len(fds) != 1:
            close_fds(fds)
            raise EventChannelError(f"{op} returned port {port!r} with {len(fds)} fds")
        return SimEventChannel(self._hc, port, socket.socket(fileno=fds[0]))

    def bind_unbound_port(self, remote_domid: int) -> SimEventChannel:
        return self._channel(
            HcOp.EVTCHN_ALLOC_UNBOUND,
            f"unbound port for dom{remote_domid}",
            remote_domid=remote_domid,
        )

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> SimEventChannel:
        return self._channel(
            HcOp.EVTCHN_BIND_INTERDOMAIN,
            f"binding port {remote_port} of dom{remote_domid}",
            remote_domid=remote_domid,
            remote_port=remote_port,
        )


class SimHypervisor(Closeable):
    """``interface.Hypervisor`` as one simulated domain sees it."""

    def __init__(self, xs: XenStoreClient, hc: HypercallClient, domid: int) -> None:
        self._xs = xs
        self._hc = hc
        self._domid = domid
        self._grants = SimGrantTable(hc)
        self._events = SimEventChannels(hc)
        self._closed = False

    @classmethod
    def _open(cls, xs: XenStoreClient, hc: HypercallClient) -> Self:
        try:
            domid = hc.call(HcOp.WHOAMI)[0].get("domid")
            if not isinstance(domid, int):
                raise HypervisorUnavailable(f"whoami answered {domid!r}")
            xs.start()
        except BaseException:
            xs.close()
            hc.close()
            raise
        return cls(xs, hc, domid)

    @classmethod
    def from_fds(cls, xs_fd: int, hc_fd: int) -> Self:
        """A guest: adopt the two descriptors the toolstack passed (``XENVTPM_SIM_FDS``)."""
        try:
            xs = XenStoreClient(socket.socket(fileno=xs_fd))
            hc = HypercallClient(socket.socket(fileno=hc_fd))
        except OSError as exc:
            raise HypervisorUnavailable(f"bad simulated-Xen fds {xs_fd},{hc_fd}: {exc}") from exc
        return cls._open(xs, hc)

    @classmethod
    def connect_dom0(cls, run_dir: str) -> Self:
        """A dom0 process: connect to simxend's sockets in ``run_dir``."""
        try:
            xs = XenStoreClient.open_unix(os.path.join(run_dir, XENSTORED_SOCK))
        except OSError as exc:
            raise HypervisorUnavailable(f"no simxend in {run_dir}: {exc}") from exc
        try:
            hc = HypercallClient.open_unix(os.path.join(run_dir, PRIVCMD_SOCK))
        except OSError as exc:
            xs.close()
            raise HypervisorUnavailable(f"no simxend in {run_dir}: {exc}") from exc
        return cls._open(xs, hc)

    @property
    def domid(self) -> int:
        return self._domid

    @property
    def xenstore(self) -> XenStoreClient:
        return self._xs

    @property
    def grants(self) -> SimGrantTable:
        return self._grants

    @property
    def events(self) -> SimEventChannels:
        return self._events

    def stats(self, domid: int | None = None) -> dict[str, int]:
        """Resource counts the daemon holds (for leak checks)."""
        args = {} if domid is None else {"domid": domid}
        return dict(self._hc.call(HcOp.STATS, **args)[0])

    def close(self) -> None:
        """Close both channels: the daemon releases this connection's resources."""
        if self._closed:
            return
        self._closed = True
        self._xs.close()
        self._hc.close()


class SimControl(Closeable):
    """The toolstack: domain lifecycle over ``RUN/privcmd.sock`` (domain 0 only)."""

    def __init__(self, run_dir: str, *, timeout: float = 10.0) -> None:
        self.run_dir = run_dir
        try:
            self._hc = HypercallClient.open_unix(
                os.path.join(run_dir, PRIVCMD_SOCK), timeout=timeout
            )
        except OSError as exc:
            raise HypervisorUnavailable(f"no simxend in {run_dir}: {exc}") from exc

    def create_domain(self, name: str) -> int:
        domid = self._hc.call(HcOp.CREATE_DOMAIN, name=name)[0]["domid"]
        assert isinstance(domid, int)
        return domid

    def connect_domain(self, domid: int) -> tuple[int, int]:
        """Two fresh descriptors (xenstore, hypercalls) bound to ``domid``; caller owns them."""
        fds = self._hc.call(HcOp.CONNECT_DOMAIN, domid=domid)[1]
        if len(fds) != 2:
            close_fds(fds)
            raise ChannelClosed(f"connect_domain returned {len(fds)} descriptors")
        return fds[0], fds[1]

    def destroy_domain(self, domid: int) -> None:
        self._hc.call(HcOp.DESTROY_DOMAIN, domid=domid)

    def list_domains(self) -> dict[int, str]:
        """``{domid: name}`` of every live domain, domain 0 included."""
        doms = self._hc.call(HcOp.LIST_DOMAINS)[0]["domains"]
        return {int(d["domid"]): str(d["name"]) for d in doms}

    def stats(self, domid: int | None = None) -> dict[str, int]:
        """Counts of grants, mappings, mapped_pages, ports, connections (one domain or all)."""
        args = {} if domid is None else {"domid": domid}
        return dict(self._hc.call(HcOp.STATS, **args)[0])

    def spawn(
        self,
        domid: int,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        **popen: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as a process of ``domid``: it inherits a fresh connection pair."""
        xs_fd, hc_fd = self.connect_domain(domid)
        child_env = dict(os.environ if env is None else env)
        child_env.pop(SIM_DIR_ENV, None)
        child_env[SIM_FDS_ENV] = f"{xs_fd},{hc_fd}"
        try:
            return subprocess.Popen(list(argv), env=child_env, pass_fds=(xs_fd, hc_fd), **popen)
        finally:
            close_fds([xs_fd, hc_fd])

    def close(self) -> None:
        self._hc.close()


if TYPE_CHECKING:  # mypy proves the adapter satisfies the interface's Protocols

    def _conforms(
        h: SimHypervisor, s: SimSharedPages, m: SimMappedPages, e: SimEventChannel
    ) -> tuple[Hypervisor, SharedPages, MappedPages, EventChannel]:
        return h, s, m, e
