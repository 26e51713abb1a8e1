"""Make the test helpers in this folder importable as plain modules, and the fixtures
of the simulated-Xen tests (test_sim_xen_*.py): one simxend per test module, dom0 and
two fresh guests per test.

The ``guests`` here (two simulated domains) shadows the root conftest's (a target's
guests), which no test in this folder uses.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from manager_env import RunningManager, managed, swtpm_pids
from simxen import Xen, start_simxend, stop

from xenvtpm.sim.adapter import SimControl, SimHypervisor


@pytest.fixture(scope="module")
def xen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xen]:
    run = tmp_path_factory.mktemp("simxen") / "run"
    proc = start_simxend(run)
    try:
        with SimControl(str(run)) as ctl:
            yield Xen(str(run), proc, ctl)
    finally:
        assert stop(proc) == 0


@pytest.fixture
def dom0(xen: Xen) -> Iterator[SimHypervisor]:
    with SimHypervisor.connect_dom0(xen.run) as hv:
        yield hv


@pytest.fixture
def guests(xen: Xen, request: pytest.FixtureRequest) -> Iterator[list[SimHypervisor]]:
    """Two fresh domains, each with one in-process connection; destroyed afterwards."""
    name = request.node.name[:40]
    domids = [xen.ctl.create_domain(f"{name}-{i}") for i in range(2)]
    hvs = [SimHypervisor.from_fds(*xen.ctl.connect_domain(d)) for d in domids]
    try:
        yield hvs
    finally:
        for hv in hvs:
            hv.close()
        for d in domids:
            if d in xen.ctl.list_domains():
                xen.ctl.destroy_domain(d)


# -- the manager's tests (test_manager*.py) ----------------------------------------
@pytest.fixture
def tmp_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="xvm-", dir="/tmp"))
    try:
        yield root
    finally:
        for pid in swtpm_pids(root):  # never leave anything running, even on failure
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mgr() -> Iterator[RunningManager]:
    """One manager shared by the module; instances are reused where sensible."""
    root = Path(tempfile.mkdtemp(prefix="xvm-", dir="/tmp"))
    try:
        yield from managed(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
