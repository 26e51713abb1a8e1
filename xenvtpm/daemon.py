"""What every xenvtpm daemon does around its real work: logging, signals, a clean exit.

A daemon that cannot start (no hypervisor, a socket in use) says why in one line and
exits 1 instead of printing a traceback; SIGTERM and SIGINT stop the loop, the daemon
closes what it holds, and the process exits 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

from xenvtpm.errors import XenVTPMError
from xenvtpm.loop import Loop
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


def run_service(name: str, level: str, build: Callable[[Hypervisor, Loop], Service]) -> int:
    """Open the hypervisor, build and start the service, and run until a signal."""
    configure_logging(name, level)
    log = logging.getLogger(f"xenvtpm.{name}")
    loop = Loop()
    loop.stop_on_signals()
    try:
        hv = open_hypervisor()
    except XenVTPMError as e:
        log.error("cannot start: %s", e)
        loop.close()
        return 1
    service = build(hv, loop)
    try:
        try:
            service.start()
        except (XenVTPMError, OSError) as e:
            log.error("cannot start: %s", e)
            return 1
        loop.run()
        log.info("stopping")
    finally:
        service.close()
        loop.close()
        hv.close()
    return 0
