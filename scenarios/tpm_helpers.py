"""Helpers the scenarios share that need tpm2-pytss: ESAPI contexts, templates, cleanup.

Plain functions and frozen values, no fixtures: every target (sim, direct, qemu, ssh)
runs the same scenarios, so nothing here knows about a target. The raw commands,
response codes, NV conventions and structures are in ``harness/tpmwire.py``, which the
harness shares; these stay here because the harness must import without tpm2-pytss.

Spec: TCG TPM 2.0 Library, Part 1 (response codes), Part 2 (structures), Part 3
(commands).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import ESAPI, ESYS_TR, TSS2_Exception
from tpm2_pytss.constants import (
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HC,
    TPM2_SU,
    TPMA_NV,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPMS_NV_PUBLIC,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMU_HA,
)

from harness.tpmwire import CC, RC, RH_OWNER, RS_PW, ST, TPM2_PT_NV_BUFFER_MAX, command


def tss_rc(exc: TSS2_Exception) -> int:
    """The TPM's own response code from a TSS error, without the layer bits."""
    return int(exc.rc) & 0xFFFF


# ---- ESAPI conveniences -------------------------------------------------------------


@contextlib.contextmanager
def open_esapi(guest: Any, shared: bool = False) -> Iterator[ESAPI]:
    """An ESAPI context on ``guest`` (for a second guest, or after a restart).

    Startup(CLEAR) is sent and TPM_RC_INITIALIZE (already started) accepted, transient
    objects are flushed when done, as the ``esapi`` fixture does for the first guest.
    ``shared``: over a connection that may be open beside others (``Guest.transport``).
    """
    tcti = guest.tcti(shared)
    ctx = ESAPI(tcti)
    try:
        startup(ctx)
        yield ctx
    finally:
        try:
            flush_transients(ctx)
        finally:
            ctx.close()
            tcti.close()  # now, not at garbage collection: a Linux guest's /dev/tpm0
            # admits one opener, and a device still open outlives its frontend


def startup(ctx: ESAPI) -> None:
    try:
        ctx.startup(TPM2_SU.CLEAR)
    except TSS2_Exception as exc:
        if tss_rc(exc) != RC.INITIALIZE:
            raise


def handles(ctx: ESAPI, first: int, count: int = 64) -> list[int]:
    """Handles the TPM lists from ``first`` on, within the same handle type."""
    _, data = ctx.get_capability(TPM2_CAP.HANDLES, first, count)
    kind = first >> 24
    return [int(h) for h in data.data.handles if int(h) >> 24 == kind]


def flush_transients(ctx: ESAPI) -> None:
    """Flush every transient object (not sessions: those we flush ourselves)."""
    for h in handles(ctx, TPM2_HC.TRANSIENT_FIRST):
        ctx.flush_context(ctx.tr_from_tpmpublic(h))


def nv_exists(ctx: ESAPI, index: int) -> bool:
    return index in handles(ctx, index, 1)


NV_ORDINARY = (
    TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
)


def nv_define(
    ctx: ESAPI,
    index: int,
    size: int,
    auth: bytes = b"",
    attrs: int = NV_ORDINARY,
    policy: bytes = b"",
) -> ESYS_TR:
    """Define an ordinary owner index (by default read/write by owner or its auth value,
    not DA-protected, so that wrong-auth checks never lock the TPM out).

    A leftover from an earlier, interrupted run is removed first.
    """
    nv_remove(ctx, index)
    pub = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=index,
            nameAlg=TPM2_ALG.SHA256,
            attributes=attrs,
            authPolicy=policy,
            dataSize=size,
        )
    )
    return ctx.nv_define_space(TPM2B_AUTH(auth), pub)


def nv_remove(ctx: ESAPI, index: int) -> None:
    """Undefine ``index`` if it exists (idempotent cleanup)."""
    if nv_exists(ctx, index):
        ctx.nv_undefine_space(ctx.tr_from_tpmpublic(index))


@contextlib.contextmanager
def nv_space(ctx: ESAPI, index: int, size: int, **kw: Any) -> Iterator[ESYS_TR]:
    """A defined NV index that is undefined again afterwards, whatever happens."""
    tr = nv_define(ctx, index, size, **kw)
    try:
        yield tr
    finally:
        nv_remove(ctx, index)


def nv_read_all(ctx: ESAPI, index: int) -> bytes:
    """Read an NV index whole, in chunks of TPM_PT_NV_BUFFER_MAX (EK certs exceed it)."""
    tr = ctx.tr_from_tpmpublic(index)
    pub, _ = ctx.nv_read_public(tr)
    size = pub.nvPublic.dataSize
    chunk = get_property(ctx, TPM2_PT_NV_BUFFER_MAX)
    out = b""
    while len(out) < size:
        n = min(chunk, size - len(out))
        out += bytes(ctx.nv_read(tr, n, len(out), auth_handle=ESYS_TR.RH_OWNER))
    return out


def persistent_remove(ctx: ESAPI, handle: int) -> None:
    """Evict ``handle`` if it is a persistent object (idempotent cleanup)."""
    if handle in handles(ctx, handle, 1):
        tr = ctx.tr_from_tpmpublic(handle)
        ctx.evict_control(ESYS_TR.RH_OWNER, tr, handle)


def make_persistent(ctx: ESAPI, handle: int, template: TPM2B_PUBLIC) -> TPMT_PUBLIC:
    """Create a primary from ``template`` and EvictControl it to ``handle`` (a leftover
    there is evicted first); return its public area."""
    persistent_remove(ctx, handle)
    key, pub, *_ = ctx.create_primary(TPM2B_SENSITIVE_CREATE(), template)
    try:
        ctx.evict_control(ESYS_TR.RH_OWNER, key, handle)
    finally:
        ctx.flush_context(key)
    return pub.publicArea


@contextlib.contextmanager
def persistent_key(ctx: ESAPI, handle: int, template: TPM2B_PUBLIC) -> Iterator[TPMT_PUBLIC]:
    """A primary made persistent at ``handle``, evicted again afterwards.

    Yields the public area (to compare with what another context reads back).
    """
    area = make_persistent(ctx, handle, template)
    try:
        yield area
    finally:
        persistent_remove(ctx, handle)


def get_property(ctx: ESAPI, prop: int) -> int:
    """One TPM_PT value from GetCapability(TPM_CAP_TPM_PROPERTIES)."""
    _, data = ctx.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)
    found = {int(p.property): int(p.value) for p in data.data.tpmProperties}
    assert prop in found, f"TPM does not report property {prop:#x}"
    return found[prop]


# ---- templates ----------------------------------------------------------------------

STORAGE_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.NODA
)
SIGNING_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.NODA
)


def template(spec: str, attrs: int) -> TPM2B_PUBLIC:
    """A TPM2B_PUBLIC from tpm2-tools style ``spec`` ("rsa2048:aes128cfb", "ecc256")."""
    return TPM2B_PUBLIC.parse(spec, objectAttributes=attrs, nameAlg="sha256")


def storage_template(alg: str = "rsa2048") -> TPM2B_PUBLIC:
    return template(f"{alg}:aes128cfb", STORAGE_ATTRS)


def signing_template(alg: str) -> TPM2B_PUBLIC:
    """An unrestricted signing key: "rsa2048:rsassa-sha256" or "ecc256:ecdsa-sha256"."""
    return template(alg, SIGNING_ATTRS)


def attestation_template(alg: str) -> TPM2B_PUBLIC:
    """A restricted signing key, as Quote needs (no symmetric algorithm: Part 2, 12.2.3.6)."""
    tmpl = template(alg, SIGNING_ATTRS | TPMA_OBJECT.RESTRICTED)
    tmpl.publicArea.parameters.asymDetail.symmetric.algorithm = TPM2_ALG.NULL
    return tmpl


def sha256_digests(digest: bytes) -> TPML_DIGEST_VALUES:
    """The digest list PCR_Extend takes, with one sha256 entry."""
    return TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))])


def public_key(pub: TPMT_PUBLIC) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The ``cryptography`` key for a TPM public area, built from its raw numbers.

    Building it by hand (not via tpm2-pytss) keeps the check outside the TSS too.
    """
    if pub.type == TPM2_ALG.RSA:
        exponent = int(pub.parameters.rsaDetail.exponent) or 65537
        n = int.from_bytes(bytes(pub.unique.rsa), "big")
        return rsa.RSAPublicNumbers(exponent, n).public_key()
    if pub.type == TPM2_ALG.ECC:
        curves: dict[int, ec.EllipticCurve] = {
            TPM2_ECC.NIST_P256: ec.SECP256R1(),
            TPM2_ECC.NIST_P384: ec.SECP384R1(),
        }
        curve = curves[int(pub.parameters.eccDetail.curveID)]
        x = int.from_bytes(bytes(pub.unique.ecc.x), "big")
        y = int.from_bytes(bytes(pub.unique.ecc.y), "big")
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    raise ValueError(f"unsupported key type {pub.type}")


def object_name(pub: TPMT_PUBLIC) -> bytes:
    """Name = nameAlg || H(TPMT_PUBLIC), for SHA-256. Spec: Part 1, 16 Names."""
    assert pub.nameAlg == TPM2_ALG.SHA256
    return struct.pack(">H", TPM2_ALG.SHA256) + hashlib.sha256(pub.marshal()).digest()


def slow_create_primary_cmd() -> bytes:
    """Raw TPM2_CreatePrimary(owner, RSA-3072 storage key, random unique): ~0.2 s of
    swtpm time, so a kill or a client timeout lands inside it. Spec: Part 3, 24.1."""
    tmpl = storage_template("rsa3072")
    tmpl.publicArea.unique.rsa = os.urandom(384)  # no two commands alike
    public = tmpl.marshal()
    auth = struct.pack(">IHBH", RS_PW, 0, 0, 0)  # empty password, continueSession clear
    body = (
        struct.pack(">I", RH_OWNER)
        + struct.pack(">I", len(auth))
        + auth
        + struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE: no auth, no data
        + public
        + struct.pack(">H", 0)  # outsideInfo
        + struct.pack(">I", 0)
    )  # creationPCR: no selection
    return command(CC.CREATE_PRIMARY, body, tag=ST.SESSIONS)


# ---- PCRs -------------------------------------------------------------------------


def read_pcr(ctx: ESAPI, pcr: int) -> bytes:
    """The sha256 bank value of one PCR."""
    _, _, values = ctx.pcr_read(f"sha256:{pcr}")
    assert len(values.digests) == 1, "PCR bank sha256 not active"
    return bytes(values.digests[0])
