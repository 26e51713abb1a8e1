"""Simulated grant tables end to end: sharing, mapping, read-only grants, sealed pages."""

from __future__ import annotations

import fcntl
import os

import pytest
from simxen import Xen

from xenvtpm.errors import GrantError
from xenvtpm.sim.adapter import SimHypervisor
from xenvtpm.sim.hypercall import HcError, HcOp, HypercallClient, close_fds


def test_grants_share_map_and_write_back(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, g2 = guests
    with g1.grants.share_pages(0, 2) as shared:
        assert list(shared.refs) == [8, 9]  # GNTTAB_NR_RESERVED_ENTRIES
        assert all(len(p) == 4096 and p[0] == 0 for p in shared.pages)
        shared.pages[0][:5] = b"hello"
        shared.pages[1][4090:] = b"world!"
        with dom0.grants.map_grant_refs(g1.domid, shared.refs) as mapped:
            assert bytes(mapped.pages[0][:5]) == b"hello"
            assert bytes(mapped.pages[1][4090:]) == b"world!"
            mapped.pages[0][:5] = b"HELLO"
            assert bytes(shared.pages[0][:5]) == b"HELLO"
        with pytest.raises(GrantError):
            g2.grants.map_grant_refs(g1.domid, shared.refs)  # not granted to g2
        with pytest.raises(GrantError):
            dom0.grants.map_grant_refs(g1.domid, [7])  # reserved / never granted
        with g2.grants.share_pages(g1.domid, 1) as for_g1:
            assert list(for_g1.refs) == [8]  # refs are per granting domain
            with pytest.raises(GrantError):
                dom0.grants.map_grant_refs(g2.domid, for_g1.refs)  # meant for g1
            with g1.grants.map_grant_refs(g2.domid, for_g1.refs) as ok:
                assert len(ok.pages) == 1


def test_read_only_grant(dom0: SimHypervisor, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    with g1.grants.share_pages(0, 1, writable=False) as shared:
        shared.pages[0][0] = 0x5A
        with pytest.raises(GrantError):
            dom0.grants.map_grant_refs(g1.domid, shared.refs, writable=True)
        with dom0.grants.map_grant_refs(g1.domid, shared.refs, writable=False) as ro:
            assert ro.pages[0].readonly and ro.pages[0][0] == 0x5A
            with pytest.raises(TypeError):
                ro.pages[0][0] = 1


def test_grant_pages_are_sealed(xen: Xen, guests: list[SimHypervisor]) -> None:
    g1, _ = guests
    hc = HypercallClient.from_fd(xen.ctl.connect_domain(g1.domid)[1])
    try:
        _, fds = hc.call(HcOp.GNT_SHARE, domid=0, count=1, writable=True)
        try:
            (fd,) = fds
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            assert seals & want == want
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)  # a guest cannot make its mapper SIGBUS
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 8192)
            with pytest.raises(PermissionError):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            assert os.fstat(fd).st_size == 4096
        finally:
            close_fds(fds)
        with pytest.raises(HcError) as info:
            hc.call(HcOp.GNT_UNSHARE, refs=[12345])
        assert info.value.errno_name == "EINVAL"
    finally:
        hc.close()


def test_unshare_does_not_revoke_live_mapping(
    dom0: SimHypervisor, guests: list[SimHypervisor]
) -> None:
    g1, _ = guests
    shared = g1.grants.share_pages(0, 1)
    refs = list(shared.refs)
    shared.pages[0][:3] = b"abc"
    mapped = dom0.grants.map_grant_refs(g1.domid, refs)
    shared.close()
    try:
        assert bytes(mapped.pages[0][:3]) == b"abc"  # measured on Xen: still mapped
        mapped.pages[0][:3] = b"xyz"
        with pytest.raises(GrantError):
            dom0.grants.map_grant_refs(g1.domid, refs)  # but no new mapping
    finally:
        mapped.close()
