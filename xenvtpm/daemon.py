"""What every xenvtpm daemon does around its real work: logging, signals, a clean exit.

All four daemons (frontend, backend, manager, simxend) run through :func:`serve`, so
``XENVTPM_LOG_LEVEL`` and the log format are the same in each.

A daemon that cannot start (no hypervisor, a socket in use) says why in one line and
exits 1 instead of printing a traceback; SIGTERM and SIGINT stop the loop, the daemon
closes what it holds, and the process exits 0. Under systemd (``Type=notify``), it says
READY=1 once started and STOPPING=1 when its loop ends (xenvtpm.notify).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

from xenvtpm.errors import XenVTPMError
from xenvtpm.loop import Loop
from xenvtpm.notify import Notifier
from xenvtpm.xen import open_hypervisor
from xenvtpm.xen.interface import Hypervisor

LOG_LEVEL_ENV = "XENVTPM_LOG_LEVEL"


class Service(Protocol):
    def start(self) -> None: ...
    def close(self) -> None: ...


def default_log_level() -> str:
    return os.environ.get(LOG_LEVEL_ENV, "INFO")


def configure_logging(name: str, level: str) -> None:
    """One line per record on stderr, tagged with the daemon's name."""
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {name} %(name)s: %(message)s")


def serve(name: str, level: str, build: Callable[[Loop], Service]) -> int:
    """Build the service on a new loop, start it, and run until a signal.

    SIGTERM and SIGINT stop the loop; ``build`` may hand them to the service instead (the
    manager's planned stop drains first, then stops the loop itself). For a daemon that
    needs no hypervisor: the manager, and simxend, which is one.
    """
    configure_logging(name, level)
    log = logging.getLogger(f"xenvtpm.{name}")
    notifier = Notifier.from_environment()
    loop = Loop()
    loop.stop_on_signals()
    try:
        service = build(loop)
    except XenVTPMError as e:
        log.error("cannot start: %s", e)
        loop.close()
        return 1
    try:
        try:
            service.start()
        except (XenVTPMError, OSError) as e:
            log.error("cannot start: %s", e)
            return 1
        notifier.ready(f"{name} serving")
        loop.run()
        notifier.stopping()
        log.info("stopping")
    finally:
        service.close()
        loop.close()
    return 0


def run_service(name: str, level: str, build: Callable[[Hypervisor, Loop], Service]) -> int:
    """:func:`serve` a service of the hypervisor, which is opened first, closed last."""
    return serve(name, level, lambda loop: _OnHypervisor(build, loop))


class _OnHypervisor:
    """A service and the hypervisor it is built on: closing one closes both."""

    def __init__(self, build: Callable[[Hypervisor, Loop], Service], loop: Loop) -> None:
        self._hv = open_hypervisor()
        try:
            self._service = build(self._hv, loop)
        except BaseException:
            self._hv.close()
            raise

    def start(self) -> None:
        self._service.start()

    def close(self) -> None:
        try:
            self._service.close()
        finally:
            self._hv.close()
