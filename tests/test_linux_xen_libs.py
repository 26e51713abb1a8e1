"""The Linux adapter over the real Xen libraries, checked on a host without Xen.

* it fails cleanly (HypervisorUnavailable) where there is no Xen, and its ctypes
  signatures declare every pointer result as c_void_p (DESIGN.md 4);
* an event channel that stays readable for ever does not keep ``consume()``;
* when libxenstore.so.4 is installed, the adapter's xenstore half runs against the
  simulated xenstored, which speaks the same wire protocol (XENSTORED_PATH).
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT
from xenvtpm.errors import HypervisorUnavailable, XenStoreError
from xenvtpm.xen import SIM_DIR_ENV, SIM_FDS_ENV, open_hypervisor
from xenvtpm.xen.interface import Access, Perm, WatchEvent
from xenvtpm.xen.linux import LinuxEventChannel, LinuxHypervisor
from xenvtpm.xen.linux_libs import PACKAGES, SIGNATURES, XenLibs

# -- the adapter where there is no Xen ----------------------------------------------------


def test_open_without_dev_xen_says_why(tmp_path: Path) -> None:
    with pytest.raises(HypervisorUnavailable, match=r"not a Xen domain: .*missing.*modprobe"):
        LinuxHypervisor.open(dev_xen=str(tmp_path / "xen"))


@pytest.mark.skipif(os.path.isdir("/dev/xen"), reason="this host is a Xen domain")
def test_open_hypervisor_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIM_FDS_ENV, raising=False)
    monkeypatch.delenv(SIM_DIR_ENV, raising=False)
    with pytest.raises(HypervisorUnavailable, match="/dev/xen"):
        open_hypervisor()


def test_missing_library_names_the_package() -> None:
    with pytest.raises(HypervisorUnavailable, match=r"libxenstore\.so\.4.*apt-get install"):
        XenLibs({"libxenstore.so.4": "libxenstore-that-does-not-exist.so.4"})


POINTER_RESULTS = {
    "xs_open",
    "xs_read",
    "xs_directory",
    "xs_get_permissions",
    "xs_check_watch",
    "xs_get_domain_path",
    "xengntshr_open",
    "xengntshr_share_pages",
    "xengnttab_open",
    "xengnttab_map_domain_grant_refs",
    "xenevtchn_open",
}


def test_pointer_results_are_c_void_p() -> None:
    """ctypes' default int restype would truncate 64-bit pointers (DESIGN.md 4)."""
    declared = {name: sig for sigs in SIGNATURES.values() for name, sig in sigs.items()}
    assert declared.keys() >= POINTER_RESULTS
    for name in POINTER_RESULTS:
        assert declared[name].restype is ctypes.c_void_p, name
    for name, sig in declared.items():
        assert sig.argtypes[0] is ctypes.c_void_p or name == "xs_open", name  # the handle
        assert sig.restype is not ctypes.c_char_p, f"{name}: c_char_p would leak the result"
    assert set(PACKAGES) == set(SIGNATURES)


def test_signatures_match_the_headers_when_installed() -> None:
    """With libxen-dev installed, each declared function returns a pointer exactly when
    its prototype in Xen's header says so."""
    headers = [Path("/usr/include", h) for h in ("xenstore.h", "xengnttab.h", "xenevtchn.h")]
    if not all(h.exists() for h in headers):
        pytest.skip("libxen-dev headers not installed")
    text = "\n".join(h.read_text() for h in headers)
    for sigs in SIGNATURES.values():
        for name, sig in sigs.items():
            # a prototype: after a ';', '}', '*/' or a preprocessor line; type, name, '('
            proto = re.compile(
                r"(?:;|\}|\*/|^#[^\n]*)\s*((?:const\s+)?(?:struct\s+)?\w+[\s*]*?)\b"
                + name
                + r"\s*\(",
                re.M,
            )
            match = proto.search(text)
            assert match is not None, name
            returns_pointer = match.group(1).rstrip().endswith("*")
            assert returns_pointer == (sig.restype is ctypes.c_void_p), (name, match.group(1))


class StormingEvtchn:
    """libxenevtchn (``XenLibs.evtchn``) for one port whose peer notifies again after
    every unmask, as a guest in a tight notify loop does: its fd never stops polling
    readable. ``storming = False`` ends the storm at the next unmask. Spec: xenevtchn.h.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._r, self._w = os.pipe()
        os.write(self._w, b"\x01")  # pending now, and again after every unmask
        self.storming = True
        self.pendings = 0
        self.unmasks = 0

    def xenevtchn_fd(self, handle: int) -> int:
        return self._r

    def xenevtchn_pending(self, handle: int) -> int:
        self.pendings += 1
        return self.port

    def xenevtchn_unmask(self, handle: int, port: int) -> int:
        assert port == self.port
        self.unmasks += 1
        if not self.storming:
            os.read(self._r, 1)  # the peer stopped: nothing pending after this unmask
        return 0

    def xenevtchn_notify(self, handle: int, port: int) -> int:
        return 0

    def xenevtchn_unbind(self, handle: int, port: int) -> int:
        return 0

    def xenevtchn_close(self, handle: int) -> int:
        os.close(self._r)
        os.close(self._w)
        return 0


class EvtchnOnly:
    """``XenLibs`` with only its libxenevtchn, which is all ``LinuxEventChannel`` uses."""

    def __init__(self, evtchn: StormingEvtchn) -> None:
        self.evtchn = evtchn


def test_consume_returns_during_an_event_channel_storm() -> None:
    """XSA-391 class: a guest that notifies again after every unmask keeps its port
    pending for as long as it likes. ``consume()`` runs on the backend's only thread, so
    it must return after a bounded number of pending/unmask rounds (the event loop calls
    it again once every other ready fd is served), not loop while the port is pending."""
    storm = StormingEvtchn(port=7)
    channel = LinuxEventChannel(EvtchnOnly(storm), 1, 7)  # type: ignore[arg-type]
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(channel.consume()), daemon=True)
    thread.start()
    thread.join(2.0)
    stuck = thread.is_alive()
    storm.storming = False  # lets a looping consume() go, so the test ends
    thread.join(5)
    try:
        assert not stuck, f"consume() still looping after 2 s: {storm.pendings} rounds"
        assert result == [True]
        assert 1 <= storm.pendings <= 64, storm.pendings  # bounded
        assert storm.unmasks == storm.pendings  # every event taken is unmasked
        assert select.select([channel.fileno()], [], [], 0)[0]  # still pending: next turn
    finally:
        channel.close()


# -- the xenstore half against the simulated xenstored ------------------------------------


def _libs_or_skip() -> XenLibs:
    try:
        return XenLibs()
    except HypervisorUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def simxend(tmp_path: Path) -> Iterator[Path]:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenvtpm", "simxend", "--dir", str(run)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not (run / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "simxend did not start"
            time.sleep(0.02)
        yield run
    finally:
        proc.terminate()
        proc.wait(10)


def test_libxenstore_against_the_simulated_xenstored(
    simxend: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    libs = _libs_or_skip()
    from xenvtpm.xen.linux_xenstore import LinuxXenStore

    monkeypatch.setenv("XENSTORED_PATH", str(simxend / "xenstored.sock"))  # read by xs_open
    with LinuxXenStore.open(libs) as xs:
        assert xs.get_domain_path(3) == "/local/domain/3"
        xs.write("/t/a", b"hello\0x")
        assert xs.read("/t/a") == b"hello\0x"
        assert xs.directory("/t") == ["a"]
        perms = [Perm(0, Access.NONE), Perm(3, Access.READ), Perm(4, Access.BOTH)]
        xs.set_perms("/t/a", perms)
        assert xs.get_perms("/t/a") == perms
        with pytest.raises(XenStoreError) as info:
            xs.read("/t/missing")
        assert (info.value.errno_name, info.value.op) == ("ENOENT", "read")
        with pytest.raises(XenStoreError, match="EINVAL"):
            xs.read("/t/a\0b")
        xs.watch("/t", "tok")
        assert select.select([xs.fileno()], [], [], 5)[0]
        assert xs.read_watches() == [WatchEvent("/t", "tok")]  # fires once on registration
        tx = xs.transaction_start()
        xs.write("/t/b", "1", tx=tx)
        assert xs.transaction_end(tx)
        assert select.select([xs.fileno()], [], [], 5)[0]
        assert xs.read_watches() == [WatchEvent("/t/b", "tok")]
        assert xs.read_watches() == []
        xs.unwatch("/t", "tok")
        xs.rm("/t")
        xs.close()
    xs.close()  # idempotent
