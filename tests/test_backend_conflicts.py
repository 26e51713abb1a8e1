"""The driver pair when xenstored keeps refusing one device's transactions.

The backend (or a frontend) runs in this process, on its own thread, over the
simulated Xen's real xenstored, with its xenstore client wrapped so that every
transaction writing under one path answers EAGAIN, as a conflict that never clears
would. The other parts are the real daemons (tests/simenv.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from simenv import Guest, SimEnv, wait_for
from test_driver_pair import get_random

from xenvtpm.backend.backend import Backend
from xenvtpm.frontend.endpoint import SocketEndpoint
from xenvtpm.frontend.frontend import CAPACITY, Frontend
from xenvtpm.loop import Loop
from xenvtpm.sim.adapter import SimHypervisor
from xenvtpm.tools.toolstack import attach_vtpm
from xenvtpm.xenbus import PUBLISH_BACKOFF_S


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
    """``Hypervisor`` as one domain (dom0 here, unless said) sees it, with the xenstore
    above."""

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
    backend = Backend(dom0, loop, env.manager_socket, timeout=10.0)
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


def test_connected_refused_leaves_nothing_mapped_and_connects_when_the_frontend_restarts(
    env: SimEnv,
) -> None:
    """The frontend said Initialised, the backend mapped its ring and bound its port,
    and then xenstored refuses Connected: the backend lets go of the pages and the port
    (InitWait still), and connects afresh when the frontend starts over."""
    assert env.control is not None and env.dom0 is not None
    control, xenstore = env.control, env.dom0.xenstore  # not None inside the lambdas too
    dom0 = Dom0(SimHypervisor.connect_dom0(str(env.run_dir)))
    parts = run_backend(env, dom0)
    try:
        domid = env.control.create_domain("late")
        backend_state = f"/local/domain/0/backend/vtpm/{domid}/0/state"
        attach_vtpm(env.dom0.xenstore, domid, 1, "late")
        wait_for(lambda: xenstore.read(backend_state) == b"2", 10, "InitWait")
        dom0.xenstore.stuck.add(f"backend/vtpm/{domid}/")
        path = str(env.workdir / "late.tpm")
        env.start_frontend("late", domid, path)
        wait_for(lambda: dom0.xenstore.refused > 0, 10, "Connected to be refused")
        wait_for(lambda: control.stats(0)["mappings"] == 0, 5, "the ring to be unmapped")
        assert env.control.stats(0)["ports"] == 0
        assert env.dom0.xenstore.read(backend_state) == b"2"
        dom0.xenstore.stuck.clear()
        env.daemon("frontend-late").stop()  # Closing, Closed
        guest = Guest("late", domid, 1, path, env.start_frontend("late", domid, path))
        env.wait_connected(guest)
        assert env.dom0.xenstore.read(backend_state) == b"4"
        get_random(guest)
        assert parts[2].is_alive()
    finally:
        stop_backend(parts)
        dom0.close()


def test_a_frontend_whose_initialised_is_refused_tries_again(env: SimEnv) -> None:
    """Our frontend publishes ring-ref, event-channel and Initialised in one transaction;
    while xenstored refuses it, the frontend unbinds the port it allocated and tries
    again a second later, and connects once xenstored accepts."""
    assert env.control is not None and env.dom0 is not None
    control = env.control  # not None inside the lambda too
    env.start_backend()
    domid = env.control.create_domain("shy")
    attach_vtpm(env.dom0.xenstore, domid, 1, "shy")
    guest = Dom0(SimHypervisor.from_fds(*env.control.connect_domain(domid)))
    guest.xenstore.stuck.add("device/vtpm/0/event-channel")
    path = str(env.workdir / "shy.tpm")
    loop = Loop()
    frontend = Frontend(guest, loop, SocketEndpoint(path, CAPACITY))
    frontend.start()
    thread = threading.Thread(target=loop.run, name="frontend", daemon=True)
    thread.start()
    try:
        attempts = len(PUBLISH_BACKOFF_S) + 1
        wait_for(lambda: guest.xenstore.refused > attempts, 10, "Initialised refused, twice")
        # each refused try lets go of its port; the next binds one a second later
        wait_for(lambda: control.stats(domid)["ports"] == 0, 1, "the port to be unbound")
        guest.xenstore.stuck.clear()
        front = Guest("shy", domid, 1, path, env.daemon("backend"))  # no frontend daemon
        wait_for(lambda: env.frontend_state(front) == "4", 10, "Connected")
        get_random(front)
        assert env.control.stats(domid)["ports"] == 1
    finally:
        loop.stop()
        thread.join(10)
        if not thread.is_alive():
            frontend.close()
            loop.close()
        guest.close()
