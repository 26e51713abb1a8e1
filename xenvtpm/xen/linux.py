"""The real Xen adapter: /dev/xen/* through Xen's own libraries (ctypes).

Not written yet: it belongs to the Xen-under-QEMU work (issue 4). Until then, opening
it says so clearly instead of failing somewhere deep inside ctypes.
"""

from __future__ import annotations

from xenvtpm.errors import HypervisorUnavailable
from xenvtpm.xen.interface import Hypervisor


class LinuxHypervisor:
    @classmethod
    def open(cls) -> Hypervisor:
        raise HypervisorUnavailable(
            "no simulated Xen in the environment (XENVTPM_SIM_FDS / XENVTPM_SIM_DIR) and "
            "the real /dev/xen adapter is not implemented yet"
        )
