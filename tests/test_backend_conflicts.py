"""The backend when xenstored keeps refusing one device's transactions.

The backend runs in this process, on its own thread, over the simulated Xen's real
xenstored, with dom0's xenstore client wrapped so that every transaction writing under
one device's backend directory answers EAGAIN, as a conflict that never clears would.
The manager, swtpm and the frontends are the real daemons (tests/simenv.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from simenv import SimEnv, wait_for
from test_driver_pair import get_random

from xenvtpm.backend import Backend
from xenvtpm.loop import Loop
from xenvtpm.toolstack import attach_vtpm
from xenvtpm.xen.sim import SimHypervisor


class StuckTransactions:
    """dom0's xenstore, except that a commit of a transaction that wrote under one of
    ``stuck`` answers EAGAIN (the transaction is aborted at xenstored)."""

    def __init__(self, xs: Any) -> None:
        self._xs = xs
        self.stuck: set[str] = set()
        self.refused = 0
        self._written: dict[int, list[str]] = {}

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        if tx:
            self._written.setdefault(tx, []).append(path)
        self._xs.write(path, value, tx)

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        written = self._written.pop(tx, [])
        if commit and any(p.startswith(s) for p in written for s in self.stuck):
            self._xs.transaction_end(tx, commit=False)
            self.refused += 1
            return False
        return bool(self._xs.transaction_end(tx, commit))

    def __getattr__(self, name: str) -> Any:  # every other XenStore call, unchanged
        return getattr(self._xs, name)


class Dom0:
    """``Hypervisor`` as dom0 sees it, with the xenstore above."""

    def __init__(self, hv: SimHypervisor) -> None:
        self._hv = hv
        self.xenstore = StuckTransactions(hv.xenstore)

    @property
    def grants(self) -> Any:
        return self._hv.grants

    @property
    def events(self) -> Any:
        return self._hv.events

    def close(self) -> None:
        self._hv.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[SimEnv]:
    env = SimEnv(tmp_path)
    try:
        env.start_hypervisor()
        env.start_manager()
        yield env
    finally:
        env.close()


def run_backend(env: SimEnv, dom0: Dom0) -> tuple[Backend, Loop, threading.Thread]:
    loop = Loop()
    backend = Backend(dom0, loop, env.manager_socket, timeout=10.0)  # type: ignore[arg-type]
    backend.start()
    thread = threading.Thread(target=loop.run, name="backend", daemon=True)
    thread.start()
    return backend, loop, thread


def stop_backend(parts: Sequence[Any]) -> None:
    backend, loop, thread = parts
    loop.stop()
    thread.join(10)
    if not thread.is_alive():  # a thread stuck in a callback still uses the backend
        backend.close()
        loop.close()


def test_a_device_whose_state_never_commits_does_not_stop_the_others(
    env: SimEnv, caplog: pytest.LogCaptureFixture
) -> None:
    assert env.control is not None and env.dom0 is not None
    dom0 = Dom0(SimHypervisor.connect_dom0(str(env.run_dir)))
    parts = run_backend(env, dom0)
    try:
        with caplog.at_level(logging.ERROR, logger="xenvtpm"):
            stuck = env.control.create_domain("stuck")
            dom0.xenstore.stuck.add(f"backend/vtpm/{stuck}/")
            attach_vtpm(env.dom0.xenstore, stuck, 1, "stuck")
            wait_for(lambda: dom0.xenstore.refused > 0, 10, "the stuck device's first publish")
            good = env.add_guest("good", instance=2)  # connected within 15 s, or raises
            get_random(good)
            # The stuck device is retried on its frontend's next change, and gives up again.
            env.dom0.xenstore.write(f"/local/domain/{stuck}/device/vtpm/0/state", "1")
            refused = dom0.xenstore.refused
            wait_for(lambda: dom0.xenstore.refused > refused, 10, "a retry of InitWait")
            get_random(good)
        assert parts[2].is_alive()
        state = env.dom0.xenstore.read(f"/local/domain/0/backend/vtpm/{stuck}/0/state")
        assert state == b"1"  # what the toolstack wrote: InitWait was never published
        assert f"backend/vtpm/{stuck}/0" in caplog.text and "EAGAIN" in caplog.text
    finally:
        stop_backend(parts)
        dom0.close()
