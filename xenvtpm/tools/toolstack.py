"""The toolstack's part of a vTPM device: the two xenstore directories of the seed.

This is what xl's device code (libxl__device_generic_add) and hotplug scripts did for
a ``vtpm=[...]`` guest: it runs in the backend's domain (dom0), never in a guest, and it
alone chooses the instance, so a guest can never pick another guest's vTPM.

Spec: seed interface.tex, "backend/vtpm" and "device/vtpm"; DESIGN.md section 2.
"""

from __future__ import annotations

import argparse
import logging
import uuid
from dataclasses import dataclass

from xenvtpm.errors import XenStoreError
from xenvtpm.xen import open_hypervisor
from xenvtpm.xen.interface import Access, Perm, XenStore
from xenvtpm.xenbus import RESUME_KEY, XenbusState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VtpmDevice:
    """Where one vTPM device lives in xenstore."""

    frontend_domid: int
    backend_domid: int = 0
    devid: int = 0

    @property
    def frontend_path(self) -> str:
        return f"/local/domain/{self.frontend_domid}/device/vtpm/{self.devid}"

    @property
    def backend_path(self) -> str:
        return f"/local/domain/{self.backend_domid}/backend/vtpm/{self.frontend_domid}/{self.devid}"

    @property
    def libxl_path(self) -> str:
        """Where libxl keeps its copy of the device, and looks for devices."""
        return f"/libxl/{self.frontend_domid}/device/vtpm/{self.devid}"


#: Names the uuid that an ``instance`` device shows xl (``xl vtpm-list``), stable per
#: instance; the backend serves the ``instance`` and never looks this uuid up.
INSTANCE_UUID_NAMESPACE = uuid.UUID("5b6c2a0e-3f47-4c1e-9a8d-7e2f0c1b9d44")


def instance_uuid(instance: int) -> str:
    return str(uuid.uuid5(INSTANCE_UUID_NAMESPACE, f"xenvtpm-instance-{instance}"))


def write_device(
    xs: XenStore, dev: VtpmDevice, frontend: dict[str, str], backend: dict[str, str]
) -> None:
    """Both directories and libxl's copy of the backend's nodes in one transaction, with
    libxl's permissions (libxl__device_generic_add): the guest owns its frontend node
    and dom0 may read it; dom0 owns the backend node and the guest may only read it."""
    fe_perms = [Perm(dev.frontend_domid, Access.NONE), Perm(dev.backend_domid, Access.READ)]
    be_perms = [Perm(dev.backend_domid, Access.NONE), Perm(dev.frontend_domid, Access.READ)]
    while True:
        tx = xs.transaction_start()
        try:
            for base, nodes, perms in (
                (dev.frontend_path, frontend, fe_perms),
                (dev.backend_path, backend, be_perms),
            ):
                xs.mkdir(base, tx=tx)
                xs.set_perms(base, perms, tx=tx)
                for key, value in nodes.items():
                    xs.write(f"{base}/{key}", value, tx=tx)
                    xs.set_perms(f"{base}/{key}", perms, tx=tx)
            for key, value in {**backend, "backend": dev.backend_path}.items():
                xs.write(f"{dev.libxl_path}/{key}", value, tx=tx)
        except BaseException:
            xs.transaction_end(tx, commit=False)
            raise
        if xs.transaction_end(tx, commit=True):
            return


def attach_vtpm(
    xs: XenStore,
    frontend_domid: int,
    instance: int,
    name: str,
    backend_domid: int = 0,
    devid: int = 0,
    pref_instance: int | None = None,
    resumed: bool = False,
) -> VtpmDevice:
    """Write both device directories in one transaction, with xl's permissions.

    ``resumed``: the domain resumes a saved one (``xl restore``), so the backend binds
    the instance without power-cycling it (``resume = True``, xenvtpm.xenbus.RESUME_KEY).

    The guest owns its ``device/vtpm/<id>`` node and the backend may read it; the
    backend owns ``backend/vtpm/<domid>/<id>`` and the guest may only read it. As libxl
    does, the backend's nodes are copied to ``/libxl/<domid>/device/vtpm/<id>`` (dom0's
    only), so xl counts the device: its next devid, ``xl vtpm-list`` (docs/xl.md).
    """
    dev = VtpmDevice(frontend_domid, backend_domid, devid)
    frontend = {
        "backend-id": str(backend_domid),
        "backend": dev.backend_path,
        "state": str(int(XenbusState.INITIALISING)),
    }
    backend = {
        "frontend-id": str(frontend_domid),
        "frontend": dev.frontend_path,
        "instance": str(instance),
        "pref_instance": str(instance if pref_instance is None else pref_instance),
        "domain": name,
        "uuid": instance_uuid(instance),
        "handle": str(devid),
        "online": "1",
        "state": str(int(XenbusState.INITIALISING)),
        RESUME_KEY: "True" if resumed else "False",  # libxl's spelling
    }
    write_device(xs, dev, frontend, backend)
    log.info("attached vTPM instance %d to domain %d (%s)", instance, frontend_domid, name)
    return dev


def detach_vtpm(xs: XenStore, frontend_domid: int, backend_domid: int = 0, devid: int = 0) -> None:
    """Remove both directories; the backend tears the device down when they go."""
    dev = VtpmDevice(frontend_domid, backend_domid, devid)
    for path in (dev.backend_path, dev.frontend_path, dev.libxl_path):
        try:
            xs.rm(path)
        except XenStoreError as e:
            if e.errno_name != "ENOENT":
                raise
    log.info("detached vTPM %d of domain %d", devid, frontend_domid)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xenvtpm", description="Toolstack: create or remove a vTPM device."
    )
    sub = p.add_subparsers(dest="command", required=True)
    attach = sub.add_parser("attach", help="write a vTPM's xenstore directories (dom0)")
    attach.add_argument("--domid", type=int, required=True, help="the guest's domain id")
    attach.add_argument("--instance", type=int, required=True, help="vTPM instance id")
    attach.add_argument("--name", required=True, help="the guest's name")
    attach.add_argument(
        "--resume",
        action="store_true",
        help="the domain resumes a saved one (xl restore): keep its vTPM's state and PCRs",
    )
    detach = sub.add_parser("detach", help="remove a vTPM's xenstore directories (dom0)")
    detach.add_argument("--domid", type=int, required=True)
    for sp in (attach, detach):
        sp.add_argument("--backend-domid", type=int, default=0)
        sp.add_argument("--devid", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    hv = open_hypervisor()
    try:
        if args.command == "attach":
            dev = attach_vtpm(
                hv.xenstore,
                args.domid,
                args.instance,
                args.name,
                args.backend_domid,
                args.devid,
                resumed=args.resume,
            )
            print(dev.backend_path)
        else:
            detach_vtpm(hv.xenstore, args.domid, args.backend_domid, args.devid)
    finally:
        hv.close()
    return 0
