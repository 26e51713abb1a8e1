"""The dom0 side of the vTPM split driver.

It discovers devices under ``backend/vtpm/<domid>/<devid>`` (written by the toolstack),
maps each frontend's pages once at connect (the 2006 ring and its data pages, or the
protocol v2 shared page of Linux xen-tpmfront, as the frontend announces: see
:mod:`xenvtpm.backend.rings`), and then, per request:
copies it out of shared memory exactly once, validates that private copy, prefixes the
instance id, and hands it to the vTPM manager. Everything runs on one thread, so a slow
or dead instance never stalls another: the manager is asked, not waited for.

    frontend -> ring + event channel -> [Backend] -> manager socket (the seed's /dev/vtpm)

The guest controls the shared pages and may change them at any moment, so nothing is
read from them twice and no guest value indexes anything (XSA-155).

Spec: seed interface.tex "Virtual TPM"; DESIGN.md section 2.
"""

from __future__ import annotations

import argparse
import logging

from xenvtpm.backend.device import BackendDevice, DeviceKey
from xenvtpm.backend.manager_link import ManagerLink, Ticket
from xenvtpm.backend.traffic_trace import TrafficTrace
from xenvtpm.backend.vtpm_identity import DEFAULT_UUID_MAP, UuidInstances
from xenvtpm.daemon import default_log_level, run_service
from xenvtpm.errors import XenStoreError
from xenvtpm.loop import Loop
from xenvtpm.xen.interface import Hypervisor

log = logging.getLogger("xenvtpm.backend")  # the daemon's name, as device.py logs

DEFAULT_TIMEOUT = 120.0  # TPM2 "long" commands (RSA key generation) may take a while
DEVICES_TOKEN = "devices"
RELEASE_TOKEN = "release"


class Backend:
    """Every vTPM device whose backend is this domain."""

    def __init__(
        self,
        hv: Hypervisor,
        loop: Loop,
        manager_path: str,
        timeout: float = DEFAULT_TIMEOUT,
        trace: TrafficTrace | None = None,
        uuid_map: str = DEFAULT_UUID_MAP,
    ) -> None:
        self.hv = hv
        self.trace = trace  # a line per request answered (--trace), or None
        self.xs = hv.xenstore
        self.loop = loop
        self.timeout = timeout
        self.devices: dict[DeviceKey, BackendDevice] = {}
        self.binds: dict[int, Ticket] = {}  # per instance: the latest BIND sent
        self.manager = ManagerLink(manager_path, loop, self._on_manager_up)
        self.uuids = UuidInstances(uuid_map)  # xl's devices: read at the first one
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self.manager.start()
            self.loop.add_reader(self.xs.fileno(), self._on_xenstore)
            self.xs.watch("backend/vtpm", DEVICES_TOKEN)
            self.xs.watch("@releaseDomain", RELEASE_TOKEN)
        except BaseException:
            self.close()
            raise
        log.info("backend serving backend/vtpm, manager at %s", self.manager.path)

    def close(self) -> None:
        """Disconnect every device (Closed, pages unmapped) and the manager. Idempotent."""
        if not self._started:
            return
        self._started = False
        for dev in list(self.devices.values()):
            dev.remove(publish=True)
        self.devices.clear()
        self.loop.remove_reader(self.xs.fileno())
        self.manager.close()
        if self.trace is not None:
            self.trace.close()

    # -- xenstore ------------------------------------------------------------------

    def _on_xenstore(self) -> None:
        rescan = release = False
        touched: set[DeviceKey] = set()
        offline: set[DeviceKey] = set()  # the toolstack wrote their ``online``
        for event in self.xs.read_watches():
            if event.token == DEVICES_TOKEN:
                rescan = True
                key = online_node_key(event.path)
                if key is not None:
                    offline.add(key)
            elif event.token == RELEASE_TOKEN:
                release = True
            else:
                key = DeviceKey.from_token(event.token)
                if key is not None:
                    touched.add(key)
        if rescan:
            self._rescan()
        if release:
            self._reap_dead_domains()
        for key in offline:
            dev = self.devices.get(key)
            if dev is not None:
                dev.on_toolstack_changed()
        for key in touched:
            dev = self.devices.get(key)
            if dev is not None:
                dev.on_frontend_changed()

    def _rescan(self) -> None:
        """Add devices the toolstack created and drop the ones it removed."""
        present: set[DeviceKey] = set()
        for domid in self._list("backend/vtpm"):
            for devid in self._list(f"backend/vtpm/{domid}"):
                key = DeviceKey.parse(domid, devid)
                if key is not None:
                    present.add(key)
        for key in self.devices.keys() - present:
            self.devices.pop(key).remove(publish=False)
        for key in present - self.devices.keys():
            dev = BackendDevice(key, self)
            self.devices[key] = dev
            dev.start()

    def _reap_dead_domains(self) -> None:
        for key, _dev in list(self.devices.items()):
            if not self._domain_exists(key.domid):
                log.info("domain %d is gone: removing its vTPM %d", key.domid, key.devid)
                self.devices.pop(key).remove(publish=True)

    def _domain_exists(self, domid: int) -> bool:
        try:
            self.xs.read(f"/local/domain/{domid}")
        except XenStoreError as e:
            return e.errno_name != "ENOENT"
        return True

    def _list(self, path: str) -> list[str]:
        try:
            return self.xs.directory(path)
        except XenStoreError as e:
            if e.errno_name == "ENOENT":
                return []
            raise

    # -- the manager ---------------------------------------------------------------

    def instance_for_uuid(self, uuid: str) -> int:
        """xl's device: the uuid's instance, given and saved at its first use."""
        return self.uuids.instance_for(uuid)

    def device_for_instance(self, instance: int) -> BackendDevice | None:
        for dev in self.devices.values():
            if dev.instance == instance and dev.connected:
                return dev
        return None

    def _on_manager_up(self) -> None:
        for dev in self.devices.values():
            dev.on_manager_up()


def online_node_key(path: str) -> DeviceKey | None:
    """The device whose ``online`` node ``path`` is (``.../backend/vtpm/D/N/online``)."""
    _, found, rest = path.partition("backend/vtpm/")
    parts = rest.split("/")
    if not found or len(parts) != 3 or parts[2] != "online":
        return None
    return DeviceKey.parse(parts[0], parts[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xenvtpm backend",
        description="dom0 side of the Xen vTPM split driver: serves every backend/vtpm device "
        "of this domain and forwards well-formed requests to the vTPM manager.",
    )
    p.add_argument("--manager", required=True, help="the vTPM manager's socket (/dev/vtpm)")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds a vTPM may take per command (default {DEFAULT_TIMEOUT:.0f})",
    )
    p.add_argument(
        "--trace",
        metavar="DIR",
        help="write a line per TPM request and its answer to DIR/instance-<N>.trace "
        "(time, codes, sizes; rotated at 256 KiB): python -m harness trace GUEST reads it",
    )
    p.add_argument(
        "--uuid-map",
        default=DEFAULT_UUID_MAP,
        help="where the instances of xl's vtpm uuids are kept; keep it with the manager's "
        "--state-root (default %(default)s)",
    )
    p.add_argument("--log-level", default=default_log_level())
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trace = TrafficTrace(args.trace) if args.trace else None
    return run_service(
        "backend",
        args.log_level,
        lambda hv, loop: Backend(hv, loop, args.manager, args.timeout, trace, args.uuid_map),
    )
