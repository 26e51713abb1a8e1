"""The simulated hypercall channel (privcmd): one JSON object per SOCK_SEQPACKET message.

Requests are ``{"op": ..., <args>}``; replies ``{"ok": true, ...}`` or ``{"ok": false,
"errno": "EINVAL", "message": ...}``, with any descriptors (grant pages, event channel
ends, domain connections) attached by SCM_RIGHTS. One request at a time per connection,
so the client is a lock around send-then-receive. Spec: docs/simulated-xen.md.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Self

from xenvtpm.errors import ChannelClosed, MalformedMessage, XenError
from xenvtpm.lifecycle import Closeable

log = logging.getLogger(__name__)

HC_MSG_MAX = 65536  # one request or reply, in bytes
SCM_MAX_FD = 253  # linux/include/net/scm.h: descriptors per SCM_RIGHTS message
DEFAULT_TIMEOUT = 10.0
INT_DIGITS_MAX = 20  # every integer argument fits in 64 bits
MESSAGE_MAX = 256  # characters of an error message: its JSON stays far below HC_MSG_MAX


class HcOp(enum.StrEnum):
    """Hypercall operations. Spec: docs/simulated-xen.md, "Hypercalls"."""

    WHOAMI = "whoami"
    GNT_SHARE = "gnt_share"
    GNT_UNSHARE = "gnt_unshare"
    GNT_MAP = "gnt_map"
    GNT_UNMAP = "gnt_unmap"
    EVTCHN_ALLOC_UNBOUND = "evtchn_alloc_unbound"
    EVTCHN_BIND_INTERDOMAIN = "evtchn_bind_interdomain"
    EVTCHN_UNBIND = "evtchn_unbind"
    STATS = "stats"
    CREATE_DOMAIN = "create_domain"
    CONNECT_DOMAIN = "connect_domain"
    DESTROY_DOMAIN = "destroy_domain"
    LIST_DOMAINS = "list_domains"


def _parse_int(text: str) -> int:
    """A JSON integer, refused before int() when longer than any argument can be."""
    if len(text.lstrip("-")) > INT_DIGITS_MAX:
        raise MalformedMessage(f"hypercall integer of {len(text)} digits")
    return int(text)


def _load(data: bytes) -> dict[str, Any]:
    """One message, or MalformedMessage: a guest's bytes must never raise anything else.

    json.loads raises RecursionError on deep nesting, and ValueError for an integer over
    Python's digit limit; both are refused here, the second before int() even runs.
    """
    try:
        obj = json.loads(data, parse_int=_parse_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"hypercall message is not JSON: {data[:64]!r}") from exc
    except RecursionError as exc:
        raise MalformedMessage("hypercall message nested too deep") from exc
    if not isinstance(obj, dict):
        raise MalformedMessage("hypercall message is not a JSON object")
    return obj


@dataclass(frozen=True)
class HcRequest:
    op: HcOp
    args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bytes(cls, data: bytes) -> HcRequest:
        obj = _load(data)
        op = obj.pop("op", None)
        try:
            return cls(HcOp(op), obj)
        except ValueError as exc:
            named = op[:64] if isinstance(op, str) else type(op).__name__  # no repr of a tree
            raise MalformedMessage(f"unknown hypercall {named!r}") from exc

    def to_bytes(self) -> bytes:
        return json.dumps({"op": self.op.value, **self.args}).encode()

    def int_arg(self, name: str, *, default: int | None = None) -> int:
        """An integer argument; MalformedMessage if missing or not an int."""
        value = self.args.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise MalformedMessage(f"{self.op}: argument {name!r} must be an integer")
        return value

    def int_list_arg(self, name: str) -> list[int]:
        value = self.args.get(name)
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise MalformedMessage(f"{self.op}: argument {name!r} must be a list of integers")
        return value

    def bool_arg(self, name: str, *, default: bool) -> bool:
        value = self.args.get(name, default)
        if not isinstance(value, bool):
            raise MalformedMessage(f"{self.op}: argument {name!r} must be a boolean")
        return value

    def str_arg(self, name: str) -> str:
        value = self.args.get(name)
        if not isinstance(value, str):
            raise MalformedMessage(f"{self.op}: argument {name!r} must be a string")
        return value


@dataclass(frozen=True)
class HcReply:
    ok: bool
    fields: dict[str, Any] = field(default_factory=dict)
    errno: str = ""
    message: str = ""

    @classmethod
    def success(cls, **fields: Any) -> HcReply:
        return cls(True, fields)

    @classmethod
    def failure(cls, errno_name: str, message: str) -> HcReply:
        """An error; the message is cut short, as it may quote what a guest sent."""
        return cls(False, errno=errno_name, message=message[:MESSAGE_MAX])

    @classmethod
    def from_bytes(cls, data: bytes) -> HcReply:
        obj = _load(data)
        ok = obj.pop("ok", None)
        if ok is True:
            return cls(True, obj)
        if ok is False:
            return cls(False, errno=str(obj.get("errno", "EIO")), message=str(obj.get("message")))
        raise MalformedMessage("hypercall reply has no boolean 'ok'")

    def to_bytes(self) -> bytes:
        if self.ok:
            return json.dumps({"ok": True, **self.fields}).encode()
        return json.dumps({"ok": False, "errno": self.errno, "message": self.message}).encode()


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            log.debug("closing fd %d failed", fd, exc_info=True)


class HcError(XenError):
    """A hypercall answered an error; ``errno_name`` is e.g. ``"EINVAL"``.

    Adapters re-raise it as GrantError or EventChannelError (``from`` it) so callers
    keep the exception types of ``interface.py``.
    """

    def __init__(self, op: str, errno_name: str, message: str) -> None:
        super().__init__(f"hypercall {op}: {errno_name}: {message}")
        self.op = op
        self.errno_name = errno_name


class HypercallClient(Closeable):
    """Synchronous privcmd client over a connected SOCK_SEQPACKET socket; thread-safe."""

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._sock = sock
        self._sock.settimeout(timeout)
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._closed = False

    @classmethod
    def open_unix(cls, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> Self:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock, timeout=timeout)

    @classmethod
    def from_fd(cls, fd: int, *, timeout: float = DEFAULT_TIMEOUT) -> Self:
        return cls(socket.socket(fileno=fd), timeout=timeout)

    def call(self, op: HcOp, **args: Any) -> tuple[dict[str, Any], list[int]]:
        """Send one request; the reply's fields and the descriptors it carried (ours now).

        Raises HcError for an error reply and ChannelClosed when the daemon is gone or
        the channel broke (a timeout leaves it out of step, so it is then unusable).
        """
        request = HcRequest(op, args).to_bytes()
        with self._lock:
            if self._closed or self._broken:
                raise ChannelClosed(
                    f"hypercall {op}: channel unusable ({self._broken or 'closed'})"
                )
            try:
                self._sock.send(request)
                data, fds, flags, _ = socket.recv_fds(self._sock, HC_MSG_MAX, SCM_MAX_FD)
            except OSError as exc:
                self._broken = f"{op}: {exc!r}"
                raise ChannelClosed(f"hypercall {op} failed: {exc!r}") from exc
            if not data:
                close_fds(fds)
                self._broken = "daemon closed the connection"
                raise ChannelClosed(f"hypercall {op}: hypervisor connection closed")
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise MalformedMessage(f"hypercall {op}: reply truncated (flags {flags:#x})")
            reply = HcReply.from_bytes(data)
        except MalformedMessage:
            close_fds(fds)
            raise
        if not reply.ok:
            close_fds(fds)
            raise HcError(op, reply.errno, reply.message)
        return reply.fields, fds

    def close(self) -> None:
        """Close the connection; the daemon releases what it holds for us. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._sock.close()
