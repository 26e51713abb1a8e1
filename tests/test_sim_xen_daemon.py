"""The simxend daemon end to end: its run directory, the stats it keeps, what it
releases when a process or a domain dies, and the toolstack calls only dom0 may make.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from simxen import Xen, readable, start_simxend, stop, wait_for

from harness.paths import REPO_ROOT
from xenvtpm.errors import GrantError, XenStoreError
from xenvtpm.sim.adapter import SimHypervisor
from xenvtpm.sim.hypercall import HcError, HcOp, HypercallClient


def test_daemon_run_dir_and_clean_stop(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start_simxend(run)
    try:
        assert (run.stat().st_mode & 0o777) == 0o700
        assert {"xenstored.sock", "privcmd.sock", "ready"} <= set(os.listdir(run))
        assert int((run / "ready").read_text()) == proc.pid
        second = subprocess.run(
            [sys.executable, "-m", "xenvtpm.sim.simxend", "--dir", str(run)],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            timeout=10,
        )
        assert second.returncode == 1  # refuses to steal a live daemon's sockets
    finally:
        assert stop(proc) == 0
    assert os.listdir(run) == []


def test_stats_return_to_zero(xen: Xen, dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    assert xen.ctl.stats(g1.domid) == {
        "grants": 0,
        "mappings": 0,
        "mapped_pages": 0,
        "ports": 0,
        "connections": 2,
        "domains": 1,
    }
    base0 = xen.ctl.stats(0)
    shared = g1.grants.share_pages(0, 3)
    mapped = dom0.grants.map_grant_refs(g1.domid, shared.refs)
    port = g1.events.bind_unbound_port(0)
    bound = dom0.events.bind_interdomain(g1.domid, port.port)
    s1 = xen.ctl.stats(g1.domid)
    assert (s1["grants"], s1["ports"]) == (3, 1)
    s0 = xen.ctl.stats(0)
    assert s0["mappings"] == base0["mappings"] + 1
    assert s0["mapped_pages"] == base0["mapped_pages"] + 3
    assert s0["ports"] == base0["ports"] + 1
    for obj in (mapped, shared, port, bound):
        obj.close()
    assert xen.ctl.stats(g1.domid)["grants"] == 0 and xen.ctl.stats(g1.domid)["ports"] == 0
    assert xen.ctl.stats(0) == base0
    g1.close()
    wait_for(lambda: xen.ctl.stats(g1.domid)["connections"] == 0, "g1's connections to close")


GUEST_SCRIPT = """
import os, time
from xenvtpm.xen import open_hypervisor
hv = open_hypervisor()
shared = hv.grants.share_pages(0, 2)
shared.pages[0][:4] = b"live"
port = hv.events.bind_unbound_port(0)
hv.xenstore.write("data/out", "%s %s" % (",".join(map(str, shared.refs)), port.port))
time.sleep(60)
"""


def test_killed_process_releases_its_resources(xen: Xen, dom0: SimHypervisor) -> None:
    domid = xen.ctl.create_domain("killed")
    proc = xen.ctl.spawn(
        domid,
        [sys.executable, "-c", GUEST_SCRIPT],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        out = f"/local/domain/{domid}/data/out"

        def published() -> bool:
            try:
                dom0.xenstore.read(out)
            except XenStoreError:
                return False
            return True

        wait_for(published, "the guest process to publish its grants", timeout=10)
        refs_text, port_text = dom0.xenstore.read(out).decode().split()
        refs = [int(r) for r in refs_text.split(",")]
        assert xen.ctl.stats(domid)["grants"] == 2 and xen.ctl.stats(domid)["ports"] == 1
        mapped = dom0.grants.map_grant_refs(domid, refs)
        channel = dom0.events.bind_interdomain(domid, int(port_text))
        assert channel.consume() is True
        proc.kill()
        proc.wait()
        wait_for(lambda: xen.ctl.stats(domid)["grants"] == 0, "grants released")
        stats = xen.ctl.stats(domid)
        assert stats["ports"] == 0 and stats["connections"] == 0
        assert readable(channel.fileno()) and channel.consume() is False
        assert bytes(mapped.pages[0][:4]) == b"live"  # our mapping stays valid
        with pytest.raises(GrantError):
            dom0.grants.map_grant_refs(domid, refs)
        mapped.close()
        channel.close()
    finally:
        proc.kill()
        proc.wait()
        xen.ctl.destroy_domain(domid)


def test_destroy_domain_releases_everything(xen: Xen, dom0: SimHypervisor) -> None:
    domid = xen.ctl.create_domain("destroyed")
    guest = SimHypervisor.from_fds(*xen.ctl.connect_domain(domid))
    try:
        shared = guest.grants.share_pages(0, 1)
        port = guest.events.bind_unbound_port(0)
        bound = dom0.events.bind_interdomain(domid, port.port)
        bound.consume()
        mapped = dom0.grants.map_grant_refs(domid, shared.refs)
        xen.ctl.destroy_domain(domid)
        assert xen.ctl.stats(domid) == dict.fromkeys(
            ("grants", "mappings", "mapped_pages", "ports", "connections", "domains"), 0
        )
        assert readable(bound.fileno()) and bound.consume() is False  # the channel is revoked
        mapped.pages[0][0] = 1  # dom0's mapping lives until dom0 unmaps it
        mapped.close()
        bound.close()
        with pytest.raises(HcError) as info:
            xen.ctl.destroy_domain(domid)
        assert info.value.errno_name == "ESRCH"
    finally:
        guest.close()


def test_toolstack_is_dom0_only_and_bad_requests(xen: Xen, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    hc = HypercallClient.from_fd(xen.ctl.connect_domain(g1.domid)[1])
    try:
        assert hc.call(HcOp.WHOAMI)[0] == {"domid": g1.domid}
        for op, args in (
            (HcOp.CREATE_DOMAIN, {"name": "x"}),
            (HcOp.DESTROY_DOMAIN, {"domid": 0}),
            (HcOp.CONNECT_DOMAIN, {"domid": 0}),
        ):
            with pytest.raises(HcError) as info:
                hc.call(op, **args)
            assert info.value.errno_name == "EPERM"
        with pytest.raises(HcError) as info:
            hc.call(HcOp.GNT_SHARE, domid=0, count="two")
        assert info.value.errno_name == "EINVAL"
    finally:
        hc.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.settimeout(5)
        raw.connect(os.path.join(xen.run, "privcmd.sock"))
        for junk in (b"not json", b"[1]", b'{"op": "reboot"}'):
            raw.send(junk)
            assert json.loads(raw.recv(4096))["errno"] == "EINVAL"
    with pytest.raises(HcError) as info:
        xen.ctl.create_domain(xen.ctl.list_domains()[g1.domid])
    assert info.value.errno_name == "EEXIST"
