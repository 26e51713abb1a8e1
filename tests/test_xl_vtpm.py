"""vTPM devices that xl itself creates (``vtpm=["backend=0,uuid=..."]``, ``xl
vtpm-attach``, ``xl vtpm-detach``): libxl's own xenstore layout, with a ``uuid`` and no
``instance``, served by our backend with no step of ours in between.

The daemons are the real ones over the simulated Xen (tests/simenv.py); the toolstack
is tests/libxl_vtpm.py, which writes what libxl 4.17 writes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from libxl_vtpm import (
    LIBXL_INIT_TIMEOUT,
    backend_state,
    libxl_add,
    libxl_next_devid,
    libxl_remove,
    wait_backend_state,
)
from simenv import Guest, SimEnv, wait_for
from test_driver_pair import get_random

from xenvtpm import tpm
from xenvtpm.backend.vtpm_identity import UUID_INSTANCE_BASE, UuidInstances
from xenvtpm.errors import MalformedMessage
from xenvtpm.tools.toolstack import VtpmDevice, attach_vtpm, detach_vtpm
from xenvtpm.xenbus import parse_flag

UUID_A = "6a0c6e4e-0f2c-4f0e-9d2a-0c6c6b4f7a11"
UUID_B = "0b9e2d55-81f4-4c4a-a3b1-5d7e9f00c2d3"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[SimEnv]:
    env = SimEnv(tmp_path)
    try:
        env.start_hypervisor()
        env.start_manager()
        env.start_backend(uuid_map=uuid_map(env))
        yield env
    finally:
        env.close()


def uuid_map(env: SimEnv) -> Path:
    return env.workdir / "state" / "vtpm-uuids.json"


def mapped(env: SimEnv) -> dict[str, int]:
    return dict(json.loads(uuid_map(env).read_text())["uuids"])


def xl_guest(env: SimEnv, name: str, uuid: str, resume: str = "False") -> Guest:
    """A domain whose vTPM xl created, with our frontend in it."""
    assert env.control is not None and env.dom0 is not None
    domid = env.control.create_domain(name)
    dev = libxl_add(env.dom0.xenstore, domid, uuid, resume=resume)
    assert wait_backend_state(env.dom0.xenstore, dev, "2", LIBXL_INIT_TIMEOUT), (
        f"backend never reached InitWait within libxl's wait:\n{env.logs()}"
    )
    path = str(env.workdir / f"{name}.tpm")
    guest = Guest(name, domid, -1, path, env.start_frontend(name, domid, path))
    env.guests.append(guest)
    env.wait_connected(guest)
    return guest


def pcr16(guest: Guest) -> bytes:
    response = guest.transmit(tpm.pcr_read_command(16))
    assert struct.unpack(">I", response[6:10])[0] == 0, response.hex()
    return response[-32:]


def test_a_device_xl_wrote_serves_its_guest(env: SimEnv) -> None:
    """libxl's layout (uuid, resume = "False", no instance) connects, and the uuid is
    mapped to an instance of the uuid range, on disk before the guest sees InitWait."""
    guest = xl_guest(env, "xl-a", UUID_A)
    assert len(get_random(guest, 16)) == 16
    assert mapped(env) == {UUID_A: UUID_INSTANCE_BASE}
    assert env.manager_status(UUID_INSTANCE_BASE)["peak"] >= 1


def test_the_same_uuid_gets_its_instance_back(env: SimEnv) -> None:
    """xl destroy + xl create with the same uuid, across a backend restart too: the
    same instance (not manufactured again), so what the guest stored is still there."""
    assert env.control is not None and env.dom0 is not None
    first = xl_guest(env, "xl-a", UUID_A)
    get_random(first)
    assert libxl_remove(env.dom0.xenstore, VtpmDevice(first.domid))
    first.frontend.stop()
    env.control.destroy_domain(first.domid)
    env.daemon("backend").stop()
    env.start_backend(uuid_map=uuid_map(env))
    again = xl_guest(env, "xl-a2", UUID_A)
    get_random(again)
    assert mapped(env) == {UUID_A: UUID_INSTANCE_BASE}
    instances = [p.name for p in (env.workdir / "state").iterdir() if p.name.isdigit()]
    assert instances == [str(UUID_INSTANCE_BASE)]


def test_two_uuids_are_two_isolated_instances(env: SimEnv) -> None:
    """A second uuid gets the next instance, and its PCRs are its own."""
    a = xl_guest(env, "xl-a", UUID_A)
    b = xl_guest(env, "xl-b", UUID_B)
    assert mapped(env) == {UUID_A: UUID_INSTANCE_BASE, UUID_B: UUID_INSTANCE_BASE + 1}
    before = pcr16(b)
    response = a.transmit(tpm.pcr_extend_command(16, b"\x11" * 32))
    assert struct.unpack(">I", response[6:10])[0] == 0, response.hex()
    assert pcr16(a) != before
    assert pcr16(b) == before


def test_the_seed_instance_key_wins_over_the_uuid(env: SimEnv) -> None:
    """Where a toolstack writes ``instance`` (the seed's interface), that is the
    instance, and no uuid is mapped."""
    assert env.control is not None and env.dom0 is not None
    domid = env.control.create_domain("both")
    dev = libxl_add(env.dom0.xenstore, domid, UUID_A)
    env.dom0.xenstore.write(f"{dev.backend_path}/instance", "7")
    path = str(env.workdir / "both.tpm")
    guest = Guest("both", domid, 7, path, env.start_frontend("both", domid, path))
    env.guests.append(guest)
    env.wait_connected(guest)
    get_random(guest)
    assert env.manager_status(7)["peak"] >= 1
    assert not uuid_map(env).exists()


@pytest.mark.parametrize("uuid", ["../../etc/passwd", "6a0c6e4e0f2c4f0e9d2a0c6c6b4f7a11", ""])
def test_a_malformed_uuid_gets_no_instance(env: SimEnv, uuid: str) -> None:
    """A uuid not in libxl's canonical form is refused: no InitWait, nothing mapped,
    and the next well-formed device is served."""
    assert env.control is not None and env.dom0 is not None
    domid = env.control.create_domain("bad")
    dev = libxl_add(env.dom0.xenstore, domid, uuid)
    assert not wait_backend_state(env.dom0.xenstore, dev, "2", 1.0)
    guest = xl_guest(env, "xl-a", UUID_A)
    get_random(guest)
    assert mapped(env) == {UUID_A: UUID_INSTANCE_BASE}
    assert "uuid" in env.daemon("backend").log.read_text()


def test_xl_vtpm_detach_closes_a_connected_device(env: SimEnv) -> None:
    """``xl vtpm-detach``: the frontend sees Closing and closes, the backend says
    Closed within libxl's 10 s; attaching the uuid again serves the guest again."""
    assert env.dom0 is not None
    guest = xl_guest(env, "xl-a", UUID_A)
    get_random(guest)
    assert libxl_remove(env.dom0.xenstore, VtpmDevice(guest.domid))
    libxl_add(env.dom0.xenstore, guest.domid, UUID_A)
    wait_for(lambda: env.frontend_state(guest) == "4", 15, "the frontend to connect again")
    get_random(guest)
    assert mapped(env) == {UUID_A: UUID_INSTANCE_BASE}


def test_xl_vtpm_detach_of_a_device_no_frontend_drives(env: SimEnv) -> None:
    """A device whose guest never connected (no frontend): Closed within libxl's wait
    all the same, so xl does not report a timeout."""
    assert env.control is not None and env.dom0 is not None
    domid = env.control.create_domain("idle")
    dev = libxl_add(env.dom0.xenstore, domid, UUID_A)
    assert wait_backend_state(env.dom0.xenstore, dev, "2", LIBXL_INIT_TIMEOUT)
    assert libxl_remove(env.dom0.xenstore, dev), backend_state(env.dom0.xenstore, dev)


@pytest.mark.parametrize(
    ("raw", "value"), [(b"True", True), (b"False", False), (b"1", True), (b"0", False)]
)
def test_resume_in_libxl_spelling_and_ours(raw: bytes, value: bool) -> None:
    assert parse_flag(raw) is value


@pytest.mark.parametrize("raw", [b"yes", b"2", b"true ", b""])
def test_resume_of_another_spelling_is_refused(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_flag(raw)


def test_the_uuid_map_refuses_a_damaged_file(tmp_path: Path) -> None:
    """A map that cannot be read is an error, never an empty map: renumbering would
    hand a guest another guest's TPM."""
    path = tmp_path / "vtpm-uuids.json"
    path.write_text('{"uuids": {"6a0c6e4e-0f2c-4f0e-9d2a-0c6c6b4f7a11": ')
    with pytest.raises(ValueError, match=str(path)):
        UuidInstances(path).instance_for(UUID_A)
    path.write_text(json.dumps({"uuids": {UUID_A: 70000, UUID_B: 70000}}))
    with pytest.raises(ValueError, match="twice"):
        UuidInstances(path).instance_for(UUID_A)


def test_the_uuid_map_never_reuses_a_number(tmp_path: Path) -> None:
    """New uuids get numbers above every number ever given, upper case is the same uuid,
    and the file is complete after each new one (written, fsynced, renamed)."""
    path = tmp_path / "vtpm-uuids.json"
    uuids = UuidInstances(path)
    assert uuids.instance_for(UUID_A) == UUID_INSTANCE_BASE
    assert uuids.instance_for(UUID_B.upper()) == UUID_INSTANCE_BASE + 1
    assert UuidInstances(path).instance_for(UUID_B) == UUID_INSTANCE_BASE + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vtpm-uuids.json"]


def test_our_attach_is_a_device_where_xl_looks(env: SimEnv) -> None:
    """``python3 -m xenvtpm attach`` records its device under /libxl as libxl does, with
    a uuid of its instance, so that ``xl vtpm-attach`` takes the next devid instead of
    overwriting it (as it did on Xen), ``xl vtpm-list`` lists it, and detach clears it."""
    assert env.control is not None and env.dom0 is not None
    xs = env.dom0.xenstore
    domid = env.control.create_domain("ours")
    dev = attach_vtpm(xs, domid, 1000, "ours")
    base = f"/libxl/{domid}/device/vtpm/0"
    assert xs.read(f"{base}/backend").decode() == dev.backend_path
    assert xs.read(f"{base}/frontend").decode() == dev.frontend_path
    uuid = xs.read(f"{base}/uuid").decode()
    assert xs.read(f"{dev.backend_path}/uuid").decode() == uuid
    assert libxl_next_devid(xs, domid) == 1
    added = libxl_add(xs, domid, UUID_A)
    assert added.devid == 1
    assert xs.read(f"{dev.backend_path}/instance") == b"1000"
    detach_vtpm(xs, domid)
    assert libxl_next_devid(xs, domid) == 2
    assert xs.directory(f"/libxl/{domid}/device/vtpm") == ["1"]
