"""Protocol v2 attacks of ``python3 -m xenvtpm rogue`` (registered into ``rogue.ATTACKS``).

The rogue of :mod:`xenvtpm.tools.rogue` speaks the 2006 ring; these attacks speak protocol v2
as Linux xen-tpmfront does (one shared page, ``feature-protocol-v2 = 1`` next to
``ring-ref``), then break its rules. Their observations are JSON lines like the others'.

* ``cancel-flood``: SUBMIT a long command (TPM2_Create of an RSA-2048 key, 0.2-0.6 s in
  swtpm here), CANCEL it, SUBMIT again at once, ``--count`` times, never waiting for the
  backend's IDLE. Before issue 14 each CANCEL freed the device's slot at once while the
  command stayed queued in the manager, so N cycles queued N commands in dom0. Now the
  slot is held until the manager answers, so at most one of them is anywhere on the
  path; the last CANCEL is completed (IDLE) once the command that holds the slot is
  done. Create, not CreatePrimary: a CreatePrimary that ran after its cancel leaves its
  object loaded, and three of them fill swtpm's object slots (TPM_RC_OBJECT_MEMORY),
  after which every further one fails at once.
* ``cancel``: not an attack but what a v2 client does when its user gives up (Linux
  xen-tpmfront's ``vtpm_cancel``, called on the kernel's own timeout): SUBMIT a long RSA
  CreatePrimary, CANCEL it 20 ms later, wait for the page. The backend keeps the
  device's slot (the page says CANCEL) until the manager answers the command, then
  writes IDLE without the answer; the cancelled command's object, if swtpm ran it to
  its end, is flushed, and GetRandom works after. Up to ``--count`` tries, for the
  command that ended before its CANCEL arrived.

Standard library only: it deploys with the driver into any domain.
Spec: Linux include/xen/interface/io/tpmif.h; drivers/char/tpm/xen-tpmfront.c.
"""

from __future__ import annotations

import argparse
import struct
import time

from xenvtpm import tpm, tpmif_v2
from xenvtpm.tools.rogue import Rogue, RogueError, attack, emit, report
from xenvtpm.tpmif_v2 import FEATURE_PROTOCOL_V2, VtpmState
from xenvtpm.xenbus import XenbusState

S = XenbusState
_DATA = tpmif_v2.data_offset(0)  # xen-tpmfront: no extra pages, data at offset 8
_LENGTH_I = struct.Struct("=I")
_STATE = 4
TPM_CC_CREATE = 0x153  # TPM2 Part 2, 6.5.2


def create_primary_rsa(bits: int, unique: bytes = b"") -> bytes:
    """TPM2_CreatePrimary(owner, RSA ``bits`` restricted decrypt key, AES-128-CFB).

    RSA key generation is the longest common command (0.15-0.5 s on swtpm 0.7.1 here,
    for 2048 and 3072 bits). Spec: TPM2 Part 3, 24.1; Part 2, 12.2 (TPMT_PUBLIC).
    """
    sensitive = struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE: no auth, no data
    public = struct.pack(">HHIH", 0x0001, 0x000B, 0x00030072, 0)  # RSA, SHA256, attrs, policy
    public += struct.pack(">HHHH", 0x0006, 128, 0x0043, 0x0010)  # AES-128-CFB, scheme NULL
    public += struct.pack(">HIH", bits, 0, len(unique)) + unique
    body = struct.pack(">IIIHBH", 0x40000001, 9, 0x40000009, 0, 0, 0)  # owner, password
    body += sensitive + struct.pack(">H", len(public)) + public + struct.pack(">HI", 0, 0)
    return struct.pack(">HII", 0x8002, 10 + len(body), tpm.TPM_CC.CreatePrimary) + body


def create_rsa(parent: int, bits: int) -> bytes:
    """TPM2_Create(parent, RSA ``bits`` signing key): key generation like CreatePrimary,
    but the key is returned, not loaded, so it takes no object slot however many run.
    Spec: TPM2 Part 3, 12.1; Part 2, 12.2 (unrestricted: symmetric and scheme NULL)."""
    sensitive = struct.pack(">HHH", 4, 0, 0)
    public = struct.pack(">HHIH", 0x0001, 0x000B, 0x00040072, 0)  # RSA, SHA256, sign key
    public += struct.pack(">HHHIH", 0x0010, 0x0010, bits, 0, 0)  # no sym, no scheme
    body = struct.pack(">IIIHBH", parent, 9, 0x40000009, 0, 0, 0)  # parent, password
    body += sensitive + struct.pack(">H", len(public)) + public + struct.pack(">HI", 0, 0)
    return struct.pack(">HII", 0x8002, 10 + len(body), TPM_CC_CREATE) + body


def connect_v2(r: Rogue) -> memoryview:
    """xen-tpmfront's setup_ring: one zeroed page (IDLE, no extra pages), a port,
    ``feature-protocol-v2 = 1``, Initialised; then wait for Connected."""
    pages = r.grant(1)
    if r.channel is None:
        r.channel = r.hv.events.bind_unbound_port(r.backend_id)
    r.xs.write(f"{r.node}/ring-ref", str(pages.refs[0]))
    r.xs.write(f"{r.node}/event-channel", str(r.channel.port))
    r.xs.write(f"{r.node}/{FEATURE_PROTOCOL_V2}", "1")
    r.set_state(S.INITIALISED)
    state = r.wait_backend([S.CONNECTED, S.CLOSING, S.CLOSED])
    if state != S.CONNECTED:
        raise RogueError(f"backend refused a v2 handshake: {r.backend_error()}")
    r.set_state(S.CONNECTED)
    time.sleep(0.01)
    r.drain()  # bind_interdomain leaves one event pending for us (DESIGN 4)
    return pages.pages[0]


def submit(page: memoryview, command: bytes) -> None:
    """vtpm_send's writes: the command, its length, then SUBMIT."""
    page[_DATA : _DATA + len(command)] = command
    _LENGTH_I.pack_into(page, 0, len(command))
    page[_STATE] = VtpmState.SUBMIT


def wait_state(page: memoryview, states: tuple[VtpmState, ...], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while page[_STATE] not in states:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def transact_v2(r: Rogue, page: memoryview, command: bytes) -> bytes | None:
    """One well-behaved command once the page is idle; None without an answer."""
    submit(page, command)
    r.notify()
    if not wait_state(page, (VtpmState.FINISH, VtpmState.IDLE), r.timeout):
        return None
    if page[_STATE] != VtpmState.FINISH:
        return None
    return tpmif_v2.read_response(page, tpmif_v2.capacity(0))


@attack("cancel-flood", "protocol v2: SUBMIT an RSA Create, CANCEL, again, --count times")
def _cancel_flood(r: Rogue, a: argparse.Namespace) -> None:
    page = connect_v2(r)
    parent = primary(r, page)
    command = create_rsa(parent, 2048)
    half = 1.0 / (2 * a.rate)  # --rate: cycles per second at most
    idle_seen = 0
    t0 = time.monotonic()
    for _ in range(a.count):
        submit(page, command)
        r.notify()
        time.sleep(half)
        page[_STATE] = VtpmState.CANCEL
        r.notify()
        time.sleep(half)
        idle_seen += page[_STATE] == VtpmState.IDLE
    flood_s = time.monotonic() - t0
    # The last CANCEL completes once the command holding the slot is done (one command).
    t1 = time.monotonic()
    idle = wait_state(page, (VtpmState.IDLE,), r.timeout)
    idle_after_s = round(time.monotonic() - t1, 3) if idle else None
    emit(
        "cancel-flood",
        "flood",
        "summary",
        cycles=a.count,
        seconds=round(flood_s, 2),
        idle_seen=idle_seen,
        idle_after_s=idle_after_s,
    )
    transact_v2(r, page, struct.pack(">HIII", 0x8001, 14, tpm.TPM_CC.FlushContext, parent))
    t2 = time.monotonic()
    report("cancel-flood", "after", transact_v2(r, page, tpm.get_random_command(16)), t2)


CANCEL_AFTER_S = 0.02  # RSA-2048 key generation: 0.15-0.5 s in swtpm here, seconds in TCG
TPM_CAP_HANDLES, TRANSIENT_FIRST = 1, 0x80000000  # TPM2 Part 2, 6.12 and 7.2


@attack("cancel", "protocol v2: a client CANCELs its long CreatePrimary (not an attack)")
def _cancel(r: Rogue, a: argparse.Namespace) -> None:
    page = connect_v2(r)
    for attempt in range(1, min(a.count, 5) + 1):
        command = create_primary_rsa(2048, struct.pack(">I", attempt))
        submit(page, command)
        r.notify()
        time.sleep(CANCEL_AFTER_S)
        page[_STATE] = VtpmState.CANCEL
        r.notify()
        t0 = time.monotonic()
        ended = wait_state(page, (VtpmState.IDLE, VtpmState.FINISH), r.timeout)
        held_s = round(time.monotonic() - t0, 3)
        # The page still holding our command (its code, not a response code, at offset
        # 6) means the answer was dropped: the CANCEL reached the command in flight.
        in_flight = bytes(page[_DATA : _DATA + len(command)]) == command
        emit(
            "cancel",
            f"try-{attempt}",
            "cancelled" if in_flight else "answered-first",
            state=int(page[_STATE]) if ended else None,
            held_s=held_s,
        )
        flush_transients(r, page)  # swtpm ran the CreatePrimary: its object is loaded
        if in_flight:
            break
    t1 = time.monotonic()
    report("cancel", "after", transact_v2(r, page, tpm.get_random_command(16)), t1)


def flush_transients(r: Rogue, page: memoryview) -> None:
    """FlushContext of every loaded object (GetCapability of the transient handles)."""
    command = struct.pack(
        ">HIIIII", 0x8001, 22, tpm.TPM_CC.GetCapability, TPM_CAP_HANDLES, TRANSIENT_FIRST, 16
    )
    response = transact_v2(r, page, command)
    if response is None or tpm.response_code(response) != tpm.TPM_RC.SUCCESS:
        raise RogueError(f"GetCapability(handles) failed: {response!r}")
    (count,) = struct.unpack_from(">I", response, tpm.HEADER_SIZE + 5)  # more, cap
    for i in range(count):
        (handle,) = struct.unpack_from(">I", response, tpm.HEADER_SIZE + 9 + 4 * i)
        transact_v2(r, page, struct.pack(">HIII", 0x8001, 14, tpm.TPM_CC.FlushContext, handle))


def primary(r: Rogue, page: memoryview) -> int:
    """A storage primary key to create keys under; its handle."""
    for _ in range(5):  # swtpm may answer TPM_RC_RETRY to a first RSA command
        response = transact_v2(r, page, create_primary_rsa(2048, b"flood"))
        if response is None or tpm.response_code(response) != tpm.TPM_RC.RETRY:
            break
    if response is None or tpm.response_code(response) != tpm.TPM_RC.SUCCESS:
        raise RogueError(f"CreatePrimary failed: {response.hex() if response else 'no answer'}")
    (handle,) = struct.unpack_from(">I", response, tpm.HEADER_SIZE)
    return int(handle)
