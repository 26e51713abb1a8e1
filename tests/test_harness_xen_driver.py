"""The Xen target's driver bring-up, against a host double that records commands."""

from __future__ import annotations

import pytest

from harness.errors import TargetNotReady
from harness.targets import xen_driver
from harness.targets.xen_driver import GuestVtpm


class RecordingHost:
    """Answers like a shell; ``present`` lists the paths ``test -S/-c`` finds."""

    def __init__(self, name: str, log: list[str], present: set[str]) -> None:
        self.name, self.log, self.present = name, log, present

    def run(
        self, command: str, timeout: float = 60.0, *, check: bool = False, stdin: bytes = b""
    ) -> tuple[int, str, str]:
        self.log.append(f"{self.name}: {command}")
        if command.startswith("test "):
            return (0 if command.split()[-1] in self.present else 1), "", ""
        return 0, "", ""

    def check(self, command: str, timeout: float = 60.0) -> str:
        return self.run(command, timeout, check=True)[1]


def test_dom0_then_guest_in_order() -> None:
    log: list[str] = []
    dom0 = RecordingHost("dom0", log, {xen_driver.MANAGER_SOCKET})
    guest = RecordingHost("guest0", log, {"/dev/tpm0"})
    started: list[str] = []

    def start_daemon(host: xen_driver.Host, name: str, args: str) -> int:
        started.append(f"{host.name}:{name}:{args}")
        return 1

    xen_driver.start_dom0(dom0, start_daemon)
    xen_driver.attach_guest(dom0, guest, GuestVtpm("guest 0", 3, 1000), "/opt/x", start_daemon)
    assert xen_driver.wait_for_device(guest, "guest0", timeout=5) < 5
    assert started == [
        f"dom0:manager:manager --socket {xen_driver.MANAGER_SOCKET} "
        f"--state-root {xen_driver.STATE_ROOT}",
        f"dom0:backend:backend --manager {xen_driver.MANAGER_SOCKET} "
        f"--uuid-map {xen_driver.STATE_ROOT}/vtpm-uuids.json --trace {xen_driver.TRACE_DIR}",
        "guest0:frontend:frontend --device",
    ]
    attach = next(c for c in log if "attach" in c)
    assert attach == (
        "dom0: cd /opt/x && python3 -m xenvtpm attach --domid 3 --instance 1000 --name 'guest 0'"
    )
    assert log.index(attach) < next(i for i, c in enumerate(log) if "tpm_vtpm_proxy" in c)


def test_missing_device_says_so_with_the_frontend_log() -> None:
    guest = RecordingHost("guest0", [], set())
    with pytest.raises(TargetNotReady, match="no /dev/tpm0"):
        xen_driver.wait_for_device(guest, "guest0", timeout=0.1)


def test_manager_flags_from_the_environment_follow_its_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = f"manager --socket {xen_driver.MANAGER_SOCKET} --state-root {xen_driver.STATE_ROOT}"
    monkeypatch.delenv(xen_driver.MANAGER_FLAGS_ENV, raising=False)
    assert xen_driver.manager_args() == base
    monkeypatch.setenv(xen_driver.MANAGER_FLAGS_ENV, "--no-fsync --log-level 'DEBUG;x'")
    assert xen_driver.manager_args() == f"{base} --no-fsync --log-level 'DEBUG;x'"
