"""Concurrency: several clients in one guest, each with its own TPM connection.

The guest's TPM serialises commands, so the driver must interleave whole commands and
route each answer back to the client that asked. Each client checks that every answer
is its own: a distinct GetRandom size, its own NV index contents, its own PCR.

Every client opens a *shared* connection (``guest.transport(shared=True)``): on a Linux
guest that is the kernel's /dev/tpmrm0, the way concurrent TPM clients share a TPM
there (/dev/tpm0 admits one opener). A guest without one skips these: stock
xen-tpmfront registers its chip as TPM 1.2, so its kernel makes no /dev/tpmrm0. No
scenario here loads transient objects or sessions: without a resource manager (sim),
the TPM's few object slots are shared by all clients.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from tpm2_pytss import ESYS_TR
from tpm_helpers import (
    nv_define,
    nv_remove,
    open_esapi,
    read_pcr,
    sha256_digests,
    slow_create_primary_cmd,
)

from harness.tpmwire import (
    CC,
    DEBUG_PCR,
    RC,
    Response,
    assert_channel_works,
    command,
    get_random,
    nv_index,
    pcr_extended,
    pcr_selection_bytes,
)

pytestmark = pytest.mark.needs("shared-clients")

CLIENTS = 4
JOIN_S = 120.0


def run_clients(workers: Sequence[Callable[[], None]]) -> None:
    """Run the workers in threads started together; re-raise the first failure."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(workers))

    def wrap(fn: Callable[[], None]) -> None:
        try:
            barrier.wait(30)
            fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a client hung"
    if errors:
        raise errors[0]


def test_parallel_get_random_sizes(guest: Any) -> None:
    """4 clients x 100 GetRandom, each client with its own size: each answer has the
    asking client's size, so no answer went to the wrong client."""

    def client(size: int) -> Callable[[], None]:
        def run() -> None:
            with guest.transport(shared=True) as t:
                for _ in range(100):
                    assert len(assert_channel_works(t, size)) == size

        return run

    run_clients([client(5 + 7 * i) for i in range(CLIENTS)])


def test_parallel_nv_reads_not_mixed(guest: Any) -> None:
    """4 clients, each with its own ESAPI and NV index, interleave 30 writes and reads:
    every read returns that client's latest data."""
    indices = [nv_index(0x50 + i) for i in range(CLIENTS)]
    with open_esapi(guest, shared=True) as ctx:
        for index in indices:
            nv_define(ctx, index, 32)
    try:

        def client(index: int) -> Callable[[], None]:
            def run() -> None:
                with open_esapi(guest, shared=True) as ctx:
                    nv = ctx.tr_from_tpmpublic(index)
                    for round_ in range(30):
                        data = struct.pack(">II", index, round_) + os.urandom(24)
                        ctx.nv_write(nv, data, 0)
                        assert bytes(ctx.nv_read(nv, 32, 0)) == data

            return run

        run_clients([client(i) for i in indices])
    finally:
        with open_esapi(guest, shared=True) as ctx:
            for index in indices:
                nv_remove(ctx, index)


def test_pcr_reads_during_extends(guest: Any) -> None:
    """One client extends PCR 16 50 times while 3 clients read it: every value read is
    a step of the chain computed with hashlib, and the last one is the chain's end."""
    digests = [hashlib.sha256(struct.pack(">I", i)).digest() for i in range(50)]
    chain = [bytes(32)]
    for d in digests:
        chain.append(pcr_extended(chain[-1], d))
    valid = set(chain)
    with open_esapi(guest, shared=True) as ctx:
        ctx.pcr_reset(ESYS_TR.PCR16)
    done = threading.Event()

    def extender() -> None:
        try:
            with open_esapi(guest, shared=True) as ctx:
                for d in digests:
                    ctx.pcr_extend(ESYS_TR.PCR16, sha256_digests(d))
        finally:
            done.set()

    def reader() -> None:
        with open_esapi(guest, shared=True) as ctx:
            seen = 0
            while not done.is_set() or seen == 0:
                assert read_pcr(ctx, DEBUG_PCR) in valid
                seen += 1

    run_clients([extender] + [reader] * (CLIENTS - 1))
    with open_esapi(guest, shared=True) as ctx:
        assert read_pcr(ctx, DEBUG_PCR) == chain[-1]


def test_mixed_raw_commands(guest: Any) -> None:
    """4 raw clients send different commands (GetRandom, PCR_Read of their own PCR,
    GetCapability, a bad tag): each answer matches the command its client sent."""

    def random_client() -> None:
        with guest.transport(shared=True) as t:
            for _ in range(50):
                assert len(assert_channel_works(t, 3)) == 3

    def pcr_client(pcr: int) -> Callable[[], None]:
        def run() -> None:
            with guest.transport(shared=True) as t:
                for _ in range(50):
                    resp = Response.from_bytes(
                        t.transmit(command(CC.PCR_READ, pcr_selection_bytes([pcr])))
                    )
                    assert resp.code == RC.SUCCESS
                    # pcrUpdateCounter u32, then the selection it read: ours
                    assert resp.body[4 : 4 + 10] == pcr_selection_bytes([pcr])

        return run

    def capability_client() -> None:
        with guest.transport(shared=True) as t:
            for _ in range(50):
                # TPM_CAP_TPM_PROPERTIES, TPM_PT_MANUFACTURER, 1 property
                resp = Response.from_bytes(
                    t.transmit(command(CC.GET_CAPABILITY, struct.pack(">III", 6, 0x105, 1)))
                )
                assert resp.code == RC.SUCCESS
                assert resp.body[1:5] == struct.pack(">I", 6)  # capability echoed
                assert resp.body[9:13] == struct.pack(">I", 0x105)

    def bad_tag_client() -> None:
        with guest.transport(shared=True) as t:
            for _ in range(50):
                packet = get_random(8)
                resp = t.transmit(b"\x80\x03" + packet[2:])
                assert Response.from_bytes(resp).code == RC.VALUE and len(resp) == 10

    run_clients([random_client, pcr_client(7), capability_client, bad_tag_client])


def test_abandoned_command_answer_not_delivered_to_another_client(guest: Any) -> None:
    """A client that gives up on a slow command (CreatePrimary RSA-3072) and closes its
    connection: the next client's GetRandom gets its own answer, not the orphaned one."""
    for size in (11, 13, 17):
        t = guest.transport(shared=True)
        try:
            with pytest.raises(Exception):  # noqa: B017 - any transport timeout
                t.transmit(slow_create_primary_cmd(), timeout=0.02)
        finally:
            t.close()
        with guest.transport(shared=True) as other:
            assert len(assert_channel_works(other, size)) == size
            assert len(assert_channel_works(other, size + 1)) == size + 1
    with open_esapi(guest, shared=True):
        pass  # flushes any primary the abandoned commands left loaded


@pytest.mark.needs("multi-guest")
def test_two_guests_in_parallel(guests: Sequence[Any]) -> None:
    """Two clients in each of two guests write and read the same NV index number, each
    guest with its own data: no guest ever reads the other's data."""
    index = nv_index(0x58)
    a, b = guests[0], guests[1]
    for g in (a, b):
        with open_esapi(g, shared=True) as ctx:
            nv_define(ctx, index, 16)
    try:

        def client(g: Any, tag: bytes) -> Callable[[], None]:
            def run() -> None:
                # the two clients of one guest share its index: either may have written
                mine = {b"A" * 16, b"a" * 16} if g is a else {b"B" * 16, b"b" * 16}
                with open_esapi(g, shared=True) as ctx:
                    nv = ctx.tr_from_tpmpublic(index)
                    for _ in range(30):
                        ctx.nv_write(nv, tag * 16, 0)
                        assert bytes(ctx.nv_read(nv, 16, 0)) in mine

            return run

        run_clients([client(a, b"A"), client(a, b"a"), client(b, b"B"), client(b, b"b")])
    finally:
        for g in (a, b):
            with open_esapi(g, shared=True) as ctx:
                nv_remove(ctx, index)
