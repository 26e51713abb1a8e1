"""The hypervisor interface (``interface.py``), the Linux adapter (``linux.py``) and the
choice between it and the simulated one (``xenvtpm/sim/adapter.py``).

``open_hypervisor()`` picks the adapter from the environment, so the driver pair runs
unchanged on either: a process started in a simulated domain inherits
``XENVTPM_SIM_FDS``; a process in the simulated dom0 is given ``XENVTPM_SIM_DIR``;
otherwise it is on real Xen.
"""

from __future__ import annotations

import os

from xenvtpm.xen.interface import Hypervisor

SIM_FDS_ENV = "XENVTPM_SIM_FDS"
SIM_DIR_ENV = "XENVTPM_SIM_DIR"


def open_hypervisor(sim_dir: str | None = None) -> Hypervisor:
    """Connect to the hypervisor this process runs on (simulated or real)."""
    fds = os.environ.get(SIM_FDS_ENV)
    sim_dir = sim_dir or os.environ.get(SIM_DIR_ENV)
    if fds or sim_dir:
        from xenvtpm.sim import adapter as sim

        if fds:
            xs_fd, hc_fd = (int(x) for x in fds.split(","))
            return sim.SimHypervisor.from_fds(xs_fd, hc_fd)
        assert sim_dir is not None
        return sim.SimHypervisor.connect_dom0(sim_dir)
    from xenvtpm.xen import linux

    return linux.LinuxHypervisor.open()
