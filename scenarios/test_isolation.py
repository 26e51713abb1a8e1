"""Isolation: two guests, two vTPMs; nothing of one is visible or reachable from the other.

TPM-level checks (PCRs, NV, persistent keys, EKs) run on every target with two guests.
Hypervisor-level checks (xenstore, grants, event channels) use ``guest.probe``, which
runs one operation as that guest's domain; every denial is paired with a positive
control (the guest can do the same to its own device) so a broken probe cannot pass.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import pytest
from tpm2_pytss import ESYS_TR
from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE
from tpm_helpers import (
    handles,
    nv_exists,
    nv_space,
    open_esapi,
    persistent_key,
    read_pcr,
    storage_template,
)

from harness.target import Dom0Shell, Faults
from harness.tpmwire import (
    DEBUG_PCR,
    EK_PERSISTENT_RSA,
    assert_channel_works,
    nv_index,
    pcr_extended,
    persistent_handle,
)

pytestmark = pytest.mark.needs("multi-guest")

DEVICE = "device/vtpm/0"


@pytest.fixture
def pair(guests: Sequence[Any]) -> tuple[Any, Any]:
    """Guest A (does things) and guest B (must not be affected)."""
    return guests[0], guests[1]


def test_instance_ids_differ(guests: Sequence[Any]) -> None:
    """Each guest is bound to its own vTPM instance (and, on Xen, its own domain)."""
    instances = [g.instance for g in guests]
    assert len(set(instances)) == len(instances)
    domids = [g.domid for g in guests if g.domid is not None]
    assert len(set(domids)) == len(domids)


def test_distinct_endorsement_keys(pair: tuple[Any, Any]) -> None:
    """The two vTPMs are different TPMs: their EKs (persisted by swtpm_setup) differ."""
    a, b = pair
    keys = []
    for g in (a, b):
        with open_esapi(g) as ctx:
            pub, _, _ = ctx.read_public(ctx.tr_from_tpmpublic(EK_PERSISTENT_RSA))
            keys.append(bytes(pub.publicArea.unique.rsa))
    assert keys[0] != keys[1]


def test_pcr_extend_invisible_to_other_guest(pair: tuple[Any, Any]) -> None:
    """PCR 16 extended in A: A sees the hashlib value, B's PCR 16 is unchanged."""
    a, b = pair
    with open_esapi(a) as ctx_a, open_esapi(b) as ctx_b:
        ctx_b.pcr_reset(ESYS_TR.PCR16)
        ctx_a.pcr_reset(ESYS_TR.PCR16)
        b_before = read_pcr(ctx_b, DEBUG_PCR)
        data = os.urandom(16)
        ctx_a.pcr_event(ESYS_TR.PCR16, data)
        assert read_pcr(ctx_a, DEBUG_PCR) == pcr_extended(bytes(32), hashlib.sha256(data).digest())
        assert read_pcr(ctx_b, DEBUG_PCR) == b_before == bytes(32)


def test_nv_index_invisible_to_other_guest(pair: tuple[Any, Any]) -> None:
    """An NV index defined and written in A is absent in B; B can define its own at the
    same index with other contents, and A's data is untouched."""
    a, b = pair
    index = nv_index(0x20)
    with open_esapi(a) as ctx_a, open_esapi(b) as ctx_b:
        with nv_space(ctx_a, index, 16) as nv_a:
            ctx_a.nv_write(nv_a, b"A" * 16, 0)
            assert not nv_exists(ctx_b, index)
            with nv_space(ctx_b, index, 16) as nv_b:
                ctx_b.nv_write(nv_b, b"B" * 16, 0)
                assert bytes(ctx_a.nv_read(nv_a, 16, 0)) == b"A" * 16
                assert bytes(ctx_b.nv_read(nv_b, 16, 0)) == b"B" * 16
        assert not nv_exists(ctx_a, index) and not nv_exists(ctx_b, index)


def test_persistent_key_invisible_to_other_guest(pair: tuple[Any, Any]) -> None:
    """A key made persistent by EvictControl in A is absent from B's persistent handles."""
    a, b = pair
    handle = persistent_handle(0x21)
    with (
        open_esapi(a) as ctx_a,
        open_esapi(b) as ctx_b,
        persistent_key(ctx_a, handle, storage_template("ecc256")) as area,
    ):
        assert handle in handles(ctx_a, handle, 1)
        assert handle not in handles(ctx_b, handle, 1)
        pub, _, _ = ctx_a.read_public(ctx_a.tr_from_tpmpublic(handle))
        assert pub.publicArea.marshal() == area.marshal()


def test_same_template_gives_different_primaries(pair: tuple[Any, Any]) -> None:
    """The same primary template gives different keys in A and B: separate seeds."""
    a, b = pair
    publics = []
    for g in (a, b):
        with open_esapi(g) as ctx:
            _, pub, *_ = ctx.create_primary(TPM2B_SENSITIVE_CREATE(), storage_template("ecc256"))
            publics.append(pub.publicArea.marshal())
    assert publics[0] != publics[1]


# ---- hypervisor level: guest.probe --------------------------------------------------


def _probe_ok(g: Any, *args: str) -> Any:
    res = g.probe(*args)
    assert res["ok"] is True, (args, res)
    return res["value"]


def _probe_denied(g: Any, errno: str, *args: str) -> None:
    res = g.probe(*args)
    assert res["ok"] is False and res["errno"] == errno, (args, res)


@pytest.mark.needs("xen-probe")
def test_probe_runs_as_own_domain(pair: tuple[Any, Any]) -> None:
    """Control: each guest's probe runs as that guest's domain and reads its own device."""
    for g in pair:
        assert int(_probe_ok(g, "whoami")) == g.domid
        ring_ref = _probe_ok(g, "xs-read", f"/local/domain/{g.domid}/{DEVICE}/ring-ref")
        assert int(ring_ref) >= 8  # refs below 8 are reserved (GNTTAB_NR_RESERVED_ENTRIES)


@pytest.mark.needs("xen-probe")
def test_cannot_read_other_guest_xenstore(pair: tuple[Any, Any]) -> None:
    """A cannot read or list B's vTPM device directory: EACCES."""
    a, b = pair
    _probe_denied(a, "EACCES", "xs-read", f"/local/domain/{b.domid}/{DEVICE}/ring-ref")
    _probe_denied(a, "EACCES", "xs-read", f"/local/domain/{b.domid}/{DEVICE}/event-channel")
    _probe_denied(a, "EACCES", "xs-directory", f"/local/domain/{b.domid}/{DEVICE}")


@pytest.mark.needs("xen-probe")
def test_cannot_write_other_guest_xenstore(pair: tuple[Any, Any]) -> None:
    """A cannot write B's ring-ref or state (redirecting B's backend): EACCES, unchanged."""
    a, b = pair
    path = f"/local/domain/{b.domid}/{DEVICE}/ring-ref"
    before = _probe_ok(b, "xs-read", path)
    _probe_denied(a, "EACCES", "xs-write", path, "8")
    _probe_denied(a, "EACCES", "xs-write", f"/local/domain/{b.domid}/{DEVICE}/state", "6")
    assert _probe_ok(b, "xs-read", path) == before


@pytest.mark.needs("xen-probe")
def test_cannot_write_backend_directory(pair: tuple[Any, Any]) -> None:
    """A cannot rewrite its backend's directory in dom0 (e.g. its instance id): EACCES."""
    a, b = pair
    backend = f"/local/domain/0/backend/vtpm/{a.domid}/0"
    _probe_denied(a, "EACCES", "xs-write", f"{backend}/instance", str(b.instance))
    _probe_denied(a, "EACCES", "xs-write", f"{backend}/frontend-id", str(b.domid))
    _probe_denied(
        a,
        "EACCES",
        "xs-write",
        f"/local/domain/0/backend/vtpm/{b.domid}/0/instance",
        str(a.instance),
    )


@pytest.mark.needs("xen-probe")
def test_cannot_map_other_guest_grant(pair: tuple[Any, Any]) -> None:
    """A cannot map B's ring page (the grant is for dom0 only): EINVAL."""
    a, b = pair
    ring_ref = _probe_ok(b, "xs-read", f"/local/domain/{b.domid}/{DEVICE}/ring-ref")
    _probe_denied(a, "EINVAL", "gnt-map", str(b.domid), str(ring_ref))
    for ref in range(8, 20):  # nor any of B's other grants (the data pages)
        _probe_denied(a, "EINVAL", "gnt-map", str(b.domid), str(ref))


@pytest.mark.needs("xen-probe")
def test_cannot_bind_other_guest_event_channel(pair: tuple[Any, Any]) -> None:
    """A cannot bind B's event channel port (it is offered to dom0 only): EINVAL."""
    a, b = pair
    port = _probe_ok(b, "xs-read", f"/local/domain/{b.domid}/{DEVICE}/event-channel")
    _probe_denied(a, "EINVAL", "evtchn-bind", str(b.domid), str(port))


@pytest.mark.needs("xen-probe")
def test_other_guest_still_works_after_probes(pair: tuple[Any, Any]) -> None:
    """After A's denied attempts, B's vTPM still answers commands."""
    a, b = pair
    _probe_denied(a, "EACCES", "xs-write", f"/local/domain/{b.domid}/{DEVICE}/ring-ref", "9")
    with open_esapi(b) as ctx:
        assert len(bytes(ctx.get_random(16))) == 16


@pytest.mark.needs("confined-swtpm", "dom0-shell", "kill-swtpm")
def test_each_swtpm_is_confined_away_from_the_other_guests_state(
    pair: tuple[Any, Any], faults: Faults, dom0_shell: Dom0Shell
) -> None:
    """In dom0, each guest's swtpm runs as a uid of its own (not root) with a network
    namespace of its own, and as guest A's swtpm uid, guest B's state can be neither
    read, written, added to nor listed: a guest that took over its swtpm through a
    libtpms bug gets no further (docs/threat-model.md, "swtpm confined"). A's own state
    is readable to that uid: the positive control."""

    def dom0(command: str) -> tuple[int, str, str]:
        return dom0_shell.dom0_run(command, 30)

    seen = {}
    for guest in pair:
        with guest.transport() as t:
            assert_channel_works(t)  # its swtpm runs
        pid = faults.swtpm_pid(guest)
        assert pid is not None
        _, out, _ = dom0(
            f"stat -c %u /proc/{pid}; readlink /proc/{pid}/ns/net /proc/1/ns/net; "
            f"tr '\\0' '\\n' </proc/{pid}/cmdline | sed -n 's/^dir=\\([^,]*\\).*/\\1/p'"
        )
        uid, own_net, dom0_net, state = out.split()
        assert int(uid) != 0 and own_net != dom0_net, out
        seen[guest.name] = (int(uid), state)
    (uid_a, state_a), (uid_b, state_b) = seen[pair[0].name], seen[pair[1].name]
    assert uid_a != uid_b and state_a != state_b
    as_a = f"setpriv --reuid={uid_a} --regid={uid_a} --clear-groups"
    rc, _, err = dom0(f"{as_a} cat {state_a}/tpm2-00.permall >/dev/null")
    assert rc == 0, err
    for attempt in (
        f"cat {state_b}/tpm2-00.permall >/dev/null",
        f"sh -c 'echo x >> {state_b}/tpm2-00.permall'",
        f"touch {state_b}/planted",
        f"ls {state_b}",
    ):
        rc, _, err = dom0(f"{as_a} {attempt}")
        assert rc != 0 and "Permission denied" in err, (attempt, rc, err)
    assert dom0(f"test -e {state_b}/planted")[0] != 0
