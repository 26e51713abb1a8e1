"""What xl itself writes for a ``vtpm=[...]`` device, and how it takes one away.

Read from Xen 4.17's libxl (test helper, not the driver): ``libxl__set_xenstore_vtpm``
(tools/libs/light/libxl_vtpm.c) adds ``handle``, ``uuid`` and ``resume = "False"`` to
the generic backend nodes of ``libxl__device_generic_add`` (``frontend``,
``frontend-id``, ``online``, ``state``), and ``handle`` to the frontend's; there is no
``instance``, and copies the backend's nodes, ``frontend`` and ``backend`` to
``/libxl/<domid>/device/vtpm/<devid>``, where it looks for devices (the next devid,
``xl vtpm-list``). libxl then waits LIBXL_INIT_TIMEOUT (10 s) for the backend's InitWait.
To remove a device, ``libxl__initiate_device_generic_remove`` writes ``online = 0``
and ``state = 5`` (Closing) into the backend directory in one transaction, waits
LIBXL_DESTROY_TIMEOUT (10 s) for the backend's Closed, then removes both directories.
"""

from __future__ import annotations

import contextlib
import time

from xenvtpm.errors import XenStoreError
from xenvtpm.tools.toolstack import VtpmDevice, write_device
from xenvtpm.xen.interface import XenStore

LIBXL_INIT_TIMEOUT = 10.0
LIBXL_DESTROY_TIMEOUT = 10.0


def libxl_devices(xs: XenStore, domid: int) -> list[str]:
    try:
        return xs.directory(f"/libxl/{domid}/device/vtpm")
    except XenStoreError:
        return []


def libxl_next_devid(xs: XenStore, domid: int) -> int:
    """libxl__device_nextid: one above the last devid under /libxl, else 0."""
    devids = libxl_devices(xs, domid)
    return int(devids[-1]) + 1 if devids else 0


def libxl_add(
    xs: XenStore, domid: int, uuid: str, devid: int | None = None, resume: str = "False"
) -> VtpmDevice:
    """The three directories as libxl writes them (toolstack.write_device, the same
    transaction and permissions), with libxl's nodes; the devid xl would take unless
    given."""
    dev = VtpmDevice(domid, 0, libxl_next_devid(xs, domid) if devid is None else devid)
    devid = dev.devid
    backend = {
        "frontend": dev.frontend_path,
        "frontend-id": str(domid),
        "online": "1",
        "state": "1",
        "handle": str(devid),
        "uuid": uuid,
        "resume": resume,
    }
    frontend = {"backend": dev.backend_path, "backend-id": "0", "state": "1", "handle": str(devid)}
    write_device(xs, dev, frontend, backend)
    return dev


def backend_state(xs: XenStore, dev: VtpmDevice) -> str:
    try:
        return xs.read(f"{dev.backend_path}/state").decode()
    except XenStoreError:
        return ""


def wait_backend_state(xs: XenStore, dev: VtpmDevice, state: str, timeout: float) -> bool:
    """Whether the backend says ``state`` within ``timeout``, as libxl's devstate wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend_state(xs, dev) == state:
            return True
        time.sleep(0.02)
    return False


def libxl_remove(xs: XenStore, dev: VtpmDevice) -> bool:
    """libxl's generic remove; whether the backend reached Closed within libxl's wait
    (the directories go either way, as libxl removes them after its timeout too)."""
    while True:
        tx = xs.transaction_start()
        xs.write(f"{dev.backend_path}/online", "0", tx=tx)
        if backend_state(xs, dev) != "6":
            xs.write(f"{dev.backend_path}/state", "5", tx=tx)
        if xs.transaction_end(tx, commit=True):
            break
    closed = wait_backend_state(xs, dev, "6", LIBXL_DESTROY_TIMEOUT)
    for path in (dev.backend_path, dev.frontend_path, dev.libxl_path):
        with contextlib.suppress(XenStoreError):
            xs.rm(path)
    return closed
