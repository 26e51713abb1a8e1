"""The manager's readiness poller: ``selectors``' registration calls over one epoll, and
a dispatch that costs a dict lookup per ready fd.

``selectors.EpollSelector.select`` builds a key tuple per ready fd, and telling a stale
key from a live one through ``get_map()`` runs four Python frames per fd; the manager
passes there twice per command (issue 20). :meth:`Poller.dispatch` calls each ready
fd's handler with its ``selectors`` mask, skipping an fd that an earlier handler of the
same batch unregistered or modified (its readiness is stale: a swtpm restarted, a
socket turned to writing), as the manager did through ``get_map()``.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable
from dataclasses import dataclass
from selectors import EVENT_READ, EVENT_WRITE
from typing import Any, Protocol

Handler = Callable[[int], None]


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FileObj = int | HasFileno


@dataclass(frozen=True, slots=True)
class Key:
    """One registration, as ``selectors.SelectorKey``."""

    fileobj: FileObj
    fd: int
    events: int
    data: Handler


def _epoll_mask(events: int) -> int:
    return (select.EPOLLIN if events & EVENT_READ else 0) | (
        select.EPOLLOUT if events & EVENT_WRITE else 0
    )


class Poller:
    """register / modify / unregister / get_map as ``selectors``; :meth:`dispatch`."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._keys: dict[int, Key] = {}
        self._stale: set[int] = set()

    def _fd(self, fileobj: FileObj) -> int:
        """Its fd; a closed socket (fileno -1) is found by identity, as selectors does."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd >= 0:
            return fd
        for key in self._keys.values():
            if key.fileobj is fileobj:
                return key.fd
        raise KeyError(f"{fileobj!r} is not registered")

    def register(self, fileobj: FileObj, events: int, data: Handler) -> Key:
        fd = self._fd(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self._epoll.register(fd, _epoll_mask(events))
        key = self._keys[fd] = Key(fileobj, fd, events, data)
        return key

    def modify(self, fileobj: FileObj, events: int, data: Handler) -> Key:
        fd = self._fd(fileobj)
        old = self._keys[fd]
        if events != old.events:
            self._epoll.modify(fd, _epoll_mask(events))
        self._stale.add(fd)  # a readiness already reported was for the old registration
        key = self._keys[fd] = Key(old.fileobj, fd, events, data)
        return key

    def unregister(self, fileobj: FileObj) -> Key:
        key = self._keys.pop(self._fd(fileobj))
        self._stale.add(key.fd)
        with contextlib.suppress(OSError):  # closed already: epoll dropped it itself
            self._epoll.unregister(key.fd)
        return key

    def get_map(self) -> dict[int, Key]:
        return self._keys

    def dispatch(self, timeout: float | None) -> int:
        """Wait up to ``timeout`` (None: for ever), then call each ready fd's handler
        once with its ``selectors`` mask; how many fds were ready."""
        ready = self._epoll.poll(-1 if timeout is None else timeout)
        keys, stale = self._keys, self._stale
        stale.clear()  # only changes during this batch make its readiness stale
        for fd, event in ready:
            key = keys.get(fd)
            if key is None or fd in stale:
                continue
            mask = (EVENT_WRITE if event & ~select.EPOLLIN else 0) | (
                EVENT_READ if event & ~select.EPOLLOUT else 0
            )
            key.data(mask & key.events)
        return len(ready)

    def close(self) -> None:
        self._keys.clear()
        self._epoll.close()

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
