"""The manager's routing state: backend connections, requests and vTPM instances.

All of it belongs to the manager's loop thread (:mod:`xenvtpm.manager.manager`); nothing here
does I/O.
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from xenvtpm.loop import Alarm, Loop
from xenvtpm.manager.continuity import InstanceContinuity
from xenvtpm.manager.durability import Signature, StateFileWatch
from xenvtpm.manager.swtpm import Swtpm, SwtpmConfig
from xenvtpm.manager.swtpm_control import ControlChannel
from xenvtpm.tpm import MAX_RESPONSE_SIZE

log = logging.getLogger("xenvtpm.manager")

PREFIX_I = struct.Struct(">I")  # instance id, network byte order (seed)


class InstanceState(Enum):
    STOPPED = "stopped"  # no swtpm; the next packet starts one
    STARTING = "starting"  # a worker is (re)starting swtpm
    RUNNING = "running"


class Kind(Enum):
    FORWARD = 1  # a TPM command for swtpm
    REPLY = 2  # answered by the manager itself, in FIFO order (payload is the answer)
    BIND = 3  # XENVTPM_CC_BIND
    RESET = 4  # XENVTPM_CC_RESET (an operator's)


class Conn:
    """One backend connection: the socket and the replies it could not take yet."""

    __slots__ = ("closed", "fd", "handler", "out", "sock")

    def __init__(self, sock: socket.socket, handler: Callable[[Conn, int], None]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.out: deque[bytes] = deque()
        self.closed = False
        self.handler = functools.partial(handler, self)


class Request:
    __slots__ = ("cancelled", "conn", "domid", "kind", "payload", "resumed")

    def __init__(
        self, conn: Conn, kind: Kind, payload: bytes, domid: int = 0, resumed: bool = False
    ) -> None:
        self.conn = conn
        self.kind = kind
        self.payload = payload
        self.domid = domid
        self.resumed = resumed  # BIND: the domain resumes a saved one (keep the TPM)
        self.cancelled = False  # FORWARD in flight: swtpm was asked to cancel it


@dataclass(frozen=True)
class InstanceStatus:
    """What :meth:`Manager.status` reports per instance (for leak counting and logs)."""

    instance: int
    state: str
    pid: int | None
    queued: int
    in_flight: bool
    bound_domid: int | None
    failed: bool = False
    peak: int = 0  # most guest commands (BINDs, RESETs not counted) held at once


class Instance:
    """Routing state of one vTPM instance."""

    def __init__(
        self,
        instance: int,
        config: SwtpmConfig,
        boot_id: str,
        handler: Callable[[Instance, int], None],
        control_handler: Callable[[Instance, int], None],
        loop: Loop,
        command_timeout: float,
        timed_out: Callable[[Instance], None],
    ) -> None:
        self.id = instance
        self.handler = functools.partial(handler, self)
        self.control_handler = functools.partial(control_handler, self)
        # armed while a command is in swtpm: no response in command_timeout restarts it
        self.alarm = Alarm(loop, command_timeout, functools.partial(timed_out, self))
        self.prefix = PREFIX_I.pack(instance)
        self.config = config
        self.log = log.getChild(f"instance{instance}")
        self.state = InstanceState.STOPPED
        self.swtpm: Swtpm | None = None
        self.control: ControlChannel | None = None
        self.continuity = InstanceContinuity(config.state_root / str(instance), boot_id)
        self.generation = 0  # tags worker results; a stale result is discarded
        self.queue: deque[Request] = deque()
        self.inflight: Request | None = None
        self.tx_rest = b""  # unsent tail of the in-flight command (rare)
        self.rx = bytearray(MAX_RESPONSE_SIZE)
        self.rxview = memoryview(self.rx)
        self.rx_len = 0
        self.bound_domid: int | None = None
        self.dirty = False  # holds volatile state worth keeping (commands ran, or restored)
        self.failed = False  # failure mode: volatile state lost under a running domain
        self.watch: StateFileWatch | None = None  # None: no fsync (--no-fsync)
        self.syncing: tuple[bytes, Signature] | None = None  # an answer waiting for fsync
        self.peak = 0  # most guest commands held at once (status, leak and abuse checks)

    def count_peak(self) -> None:
        """Note how many guest commands (not BINDs or RESETs) this instance holds now."""
        control = (Kind.BIND, Kind.RESET)
        held = sum(1 for r in self.queue if r.kind not in control)
        if self.inflight is not None and self.inflight.kind not in control:
            held += 1
        self.peak = max(self.peak, held)

    def status(self) -> InstanceStatus:
        running = self.swtpm is not None and self.state is not InstanceState.STOPPED
        return InstanceStatus(
            self.id,
            self.state.value,
            self.swtpm.pid if running and self.swtpm is not None else None,
            len(self.queue),
            self.inflight is not None,
            self.bound_domid,
            self.failed,
            self.peak,
        )

    def record(self, *, saved: bool = False) -> None:
        """Write what the next manager must know of this instance (continuity.py)."""
        try:
            self.continuity.write(self.bound_domid, saved=saved, failed=self.failed)
        except OSError as exc:
            self.log.error("cannot write %s: %s", self.continuity.path, exc)
