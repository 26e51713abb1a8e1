"""Commands: a guest's vTPM answers TPM 2.0 commands as a TPM does, end to end.

Each scenario drives the guest's TPM through tpm2-pytss (``esapi`` fixture) and checks the
answer against something computed outside the TPM: hashlib digests, ``cryptography``
signature checks, X.509 parsing.
"""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import ESAPI, ESYS_TR, TSS2_Exception
from tpm2_pytss.constants import (
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_PT,
    TPM2_PT_PCR,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_NV,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_SENSITIVE_CREATE,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SIGNATURE,
    TPMT_TK_HASHCHECK,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template
from tpm_helpers import (
    attestation_template,
    get_property,
    handles,
    nv_read_all,
    nv_space,
    object_name,
    public_key,
    read_pcr,
    sha256_digests,
    signing_template,
    storage_template,
    tss_rc,
)

from harness.tpmwire import (
    DEBUG_PCR,
    EK_CERT_ECC_P256,
    EK_CERT_ECC_P384,
    EK_CERT_RSA2048,
    EK_PERSISTENT_RSA,
    TPM2_PT_MANUFACTURER,
    TPM_GENERATED_VALUE,
    TPM_MAX_COMMAND_SIZE,
    TPM_ST_ATTEST_QUOTE,
    QuoteInfo,
    nv_index,
    pcr_extended,
    pcr_selection_bytes,
    policy_pcr_digest,
)

# ---- GetCapability ------------------------------------------------------------------


def test_manufacturer(esapi: ESAPI) -> None:
    """TPM_PT_MANUFACTURER reads as swtpm's vendor id "IBM"."""
    value = get_property(esapi, TPM2_PT_MANUFACTURER)
    assert value.to_bytes(4, "big").rstrip(b"\0 ") == b"IBM"


def test_fixed_properties(esapi: ESAPI) -> None:
    """The fixed properties say TPM 2.0: family "2.0", level 0, a sane revision."""
    assert get_property(esapi, TPM2_PT.FAMILY_INDICATOR).to_bytes(4, "big") == b"2.0\0"
    assert get_property(esapi, TPM2_PT.LEVEL) == 0
    assert get_property(esapi, TPM2_PT.REVISION) >= 116  # revision 1.16 or later
    assert get_property(esapi, TPM2_PT_PCR.COUNT) == 24


def test_max_command_and_response_size(esapi: ESAPI) -> None:
    """TPM_PT_MAX_COMMAND_SIZE and _RESPONSE_SIZE are 4096, the size the driver relays."""
    assert get_property(esapi, TPM2_PT.MAX_COMMAND_SIZE) == TPM_MAX_COMMAND_SIZE
    assert get_property(esapi, TPM2_PT.MAX_RESPONSE_SIZE) == TPM_MAX_COMMAND_SIZE


def test_supported_commands_listed(esapi: ESAPI) -> None:
    """TPM_CAP_COMMANDS lists the commands these scenarios use."""
    _, data = esapi.get_capability(TPM2_CAP.COMMANDS, 0x11F, 256)
    codes = {int(a) & 0xFFFF for a in data.data.command}
    # GetRandom, PCR_Extend, PCR_Read, CreatePrimary, Quote, Sign, NV_Read, PolicyPCR
    assert {0x17B, 0x182, 0x17E, 0x131, 0x158, 0x15D, 0x14E, 0x17F} <= codes


# ---- GetRandom ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 16, 32, 48])
def test_get_random_sizes(esapi: ESAPI, n: int) -> None:
    """GetRandom(n) returns exactly n bytes for n up to the largest digest."""
    assert len(bytes(esapi.get_random(n))) == n


def test_get_random_differs(esapi: ESAPI) -> None:
    """Successive GetRandom(32) answers differ and are not constant bytes."""
    samples = [bytes(esapi.get_random(32)) for _ in range(8)]
    assert len(set(samples)) == len(samples)
    assert all(len(set(s)) > 4 for s in samples)


# ---- PCRs ---------------------------------------------------------------------------


def test_pcr_extend_matches_hashlib(esapi: ESAPI) -> None:
    """PCR_Reset then two PCR_Extends give exactly sha256(sha256(0*32 || d1) || d2)."""
    esapi.pcr_reset(ESYS_TR.PCR16)
    assert read_pcr(esapi, DEBUG_PCR) == bytes(32)
    expected = bytes(32)
    for data in (b"xenvtpm scenario", os.urandom(64)):
        digest = hashlib.sha256(data).digest()
        esapi.pcr_extend(ESYS_TR.PCR16, sha256_digests(digest))
        expected = pcr_extended(expected, digest)
        assert read_pcr(esapi, DEBUG_PCR) == expected


def test_pcr_event_hashes_data(esapi: ESAPI) -> None:
    """PCR_Event(data) extends PCR 16 by sha256(data), and reports that digest."""
    esapi.pcr_reset(ESYS_TR.PCR16)
    data = b"measured by the TPM itself"
    digests = esapi.pcr_event(ESYS_TR.PCR16, data)
    reported = {int(d.hashAlg): bytes(d.digest.sha256) for d in digests}
    assert reported[TPM2_ALG.SHA256] == hashlib.sha256(data).digest()
    assert read_pcr(esapi, DEBUG_PCR) == pcr_extended(bytes(32), hashlib.sha256(data).digest())


def test_hash_matches_hashlib(esapi: ESAPI) -> None:
    """TPM2_Hash of a buffer equals hashlib's sha256 and sha384 of it."""
    data = os.urandom(512)
    for alg, fn in ((TPM2_ALG.SHA256, hashlib.sha256), (TPM2_ALG.SHA384, hashlib.sha384)):
        digest, _ticket = esapi.hash(data, alg, ESYS_TR.RH_OWNER)
        assert bytes(digest) == fn(data).digest()


# ---- keys ---------------------------------------------------------------------------


def test_create_primary_rsa2048(esapi: ESAPI) -> None:
    """CreatePrimary RSA-2048: public area has 2048-bit modulus, e=65537, correct Name."""
    handle, pub, _, _, _ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), storage_template())
    area = pub.publicArea
    assert area.type == TPM2_ALG.RSA
    assert area.parameters.rsaDetail.keyBits == 2048
    assert int(area.parameters.rsaDetail.exponent) in (0, 65537)
    modulus = bytes(area.unique.rsa)
    assert len(modulus) == 256 and modulus[0] & 0x80  # a full 2048-bit number
    key = public_key(area)
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    assert bytes(esapi.tr_get_name(handle)) == object_name(area)


def test_create_primary_ecc_p256(esapi: ESAPI) -> None:
    """CreatePrimary ECC P-256: a 32-byte point that lies on the curve, correct Name."""
    handle, pub, _, _, _ = esapi.create_primary(
        TPM2B_SENSITIVE_CREATE(), storage_template("ecc256")
    )
    area = pub.publicArea
    assert area.type == TPM2_ALG.ECC
    assert area.parameters.eccDetail.curveID == TPM2_ECC.NIST_P256
    assert len(bytes(area.unique.ecc.x)) == 32 and len(bytes(area.unique.ecc.y)) == 32
    key = public_key(area)  # cryptography refuses a point not on the curve
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert bytes(esapi.tr_get_name(handle)) == object_name(area)


def test_primary_is_deterministic(esapi: ESAPI) -> None:
    """The same template under the same hierarchy seed gives the same primary key."""
    tmpl = storage_template("ecc256")
    h1, pub1, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), tmpl)
    h2, pub2, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), tmpl)
    assert pub1.publicArea.marshal() == pub2.publicArea.marshal()
    assert int(esapi.tr_get_tpm_handle(h1)) != int(esapi.tr_get_tpm_handle(h2))


def _sign(esapi: ESAPI, alg: str, message: bytes) -> tuple[ESYS_TR, TPM2B_PUBLIC, TPMT_SIGNATURE]:
    """Create+Load a signing key under an RSA primary, sign sha256(message) with it."""
    parent, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), storage_template())
    priv, pub, *_ = esapi.create(parent, TPM2B_SENSITIVE_CREATE(), signing_template(alg))
    key = esapi.load(parent, priv, pub)
    esapi.flush_context(parent)
    ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
    sig = esapi.sign(
        key,
        TPM2B_DIGEST(hashlib.sha256(message).digest()),
        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
        ticket,
    )
    return key, pub, sig


def _verify_outside(area: TPMT_PUBLIC, sig: TPMT_SIGNATURE, message: bytes) -> None:
    """Verify a TPM signature with ``cryptography`` only; raise InvalidSignature if bad."""
    key = public_key(area)
    if sig.sigAlg == TPM2_ALG.RSASSA:
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(bytes(sig.signature.rsassa.sig), message, padding.PKCS1v15(), hashes.SHA256())
    elif sig.sigAlg == TPM2_ALG.ECDSA:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    else:
        raise AssertionError(f"unexpected signature algorithm {sig.sigAlg}")


SIGNING_KEYS = ["rsa2048:rsassa-sha256", "ecc256:ecdsa-sha256"]


@pytest.mark.parametrize("alg", SIGNING_KEYS)
def test_create_load_sign_verify_in_tpm(esapi: ESAPI, alg: str) -> None:
    """A created+loaded key signs; VerifySignature accepts it and rejects another digest."""
    message = b"signed inside the guest's vTPM"
    key, _pub, sig = _sign(esapi, alg, message)
    ticket = esapi.verify_signature(key, TPM2B_DIGEST(hashlib.sha256(message).digest()), sig)
    assert ticket.tag == TPM2_ST.VERIFIED
    with pytest.raises(TSS2_Exception) as err:
        esapi.verify_signature(key, TPM2B_DIGEST(hashlib.sha256(b"other").digest()), sig)
    assert tss_rc(err.value) & 0xBF == 0x9B  # TPM_RC_SIGNATURE (with a parameter number)


@pytest.mark.parametrize("alg", SIGNING_KEYS)
def test_signature_verifies_outside_tpm(esapi: ESAPI, alg: str) -> None:
    """The TPM's signature verifies with ``cryptography``; a changed message does not."""
    message = os.urandom(100)
    _key, pub, sig = _sign(esapi, alg, message)
    _verify_outside(pub.publicArea, sig, message)
    with pytest.raises(InvalidSignature):
        _verify_outside(pub.publicArea, sig, message + b"!")


# ---- NV -----------------------------------------------------------------------------


def test_nv_define_write_read_undefine(esapi: ESAPI) -> None:
    """NV_DefineSpace, NV_Write, NV_Read round-trip; after NV_UndefineSpace it is gone."""
    index = nv_index(0x01)
    data = os.urandom(64)
    with nv_space(esapi, index, len(data)) as nv:
        pub, _ = esapi.nv_read_public(nv)
        assert pub.nvPublic.nvIndex == index and pub.nvPublic.dataSize == len(data)
        with pytest.raises(TSS2_Exception) as err:  # defined but never written
            esapi.nv_read(nv, len(data), 0)
        assert tss_rc(err.value) == 0x14A  # TPM_RC_NV_UNINITIALIZED
        esapi.nv_write(nv, data, 0)
        assert bytes(esapi.nv_read(nv, len(data), 0)) == data
        esapi.nv_write(nv, b"XY", 10)
        assert bytes(esapi.nv_read(nv, 4, 9)) == data[9:10] + b"XY" + data[12:13]
    assert index not in handles(esapi, index, 1)
    with pytest.raises(TSS2_Exception):
        esapi.tr_from_tpmpublic(index)


def test_nv_index_auth_is_enforced(esapi: ESAPI) -> None:
    """An index with an auth value reads with it and refuses a wrong one (BAD_AUTH)."""
    index = nv_index(0x02)
    with nv_space(esapi, index, 16, auth=b"right") as nv:
        esapi.tr_set_auth(nv, b"right")
        esapi.nv_write(nv, b"A" * 16, 0, auth_handle=nv)
        assert bytes(esapi.nv_read(nv, 16, 0, auth_handle=nv)) == b"A" * 16
        esapi.tr_set_auth(nv, b"wrong")
        with pytest.raises(TSS2_Exception) as err:
            esapi.nv_read(nv, 16, 0, auth_handle=nv)
        assert tss_rc(err.value) == 0x9A2  # TPM_RC_BAD_AUTH, session 1 (NO_DA index)


# ---- sessions -----------------------------------------------------------------------


@pytest.mark.parametrize("salted", [False, True], ids=["unsalted", "salted"])
def test_hmac_session(esapi: ESAPI, salted: bool) -> None:
    """An HMAC session (salted by an RSA primary, or not) with parameter encryption
    authorises NV_Write/NV_Read of an auth-protected index; data round-trips."""
    index = nv_index(0x03 + salted)
    salt_key = ESYS_TR.NONE
    if salted:
        salt_key, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), storage_template())
    session = esapi.start_auth_session(
        salt_key, ESYS_TR.NONE, TPM2_SE.HMAC, "aes128cfb", TPM2_ALG.SHA256
    )
    try:
        esapi.trsess_set_attributes(session, 0x01 | 0x20 | 0x40)  # continue, decrypt, encrypt
        data = os.urandom(32)
        with nv_space(esapi, index, len(data), auth=b"nv secret") as nv:
            esapi.tr_set_auth(nv, b"nv secret")
            esapi.nv_write(nv, data, 0, auth_handle=nv, session1=session)
            assert bytes(esapi.nv_read(nv, len(data), 0, auth_handle=nv, session1=session)) == data
            esapi.tr_set_auth(nv, b"not the secret")
            with pytest.raises(TSS2_Exception) as err:
                esapi.nv_read(nv, len(data), 0, auth_handle=nv, session1=session)
            assert tss_rc(err.value) == 0x9A2  # TPM_RC_BAD_AUTH, session 1 (NO_DA index)
    finally:
        if handles(esapi, 0x02000000):
            esapi.flush_context(session)


def test_policy_pcr_gates_unseal(esapi: ESAPI) -> None:
    """A sealed secret bound by PolicyPCR to PCR 16 unseals only while PCR 16 is unchanged."""
    esapi.pcr_reset(ESYS_TR.PCR16)
    esapi.pcr_extend(ESYS_TR.PCR16, sha256_digests(hashlib.sha256(b"good state").digest()))
    selection = pcr_selection_bytes([DEBUG_PCR])
    pcr_digest = hashlib.sha256(read_pcr(esapi, DEBUG_PCR)).digest()
    policy = policy_pcr_digest(selection, pcr_digest)

    # The trial session computes the same policy digest as hashlib.
    trial = esapi.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, None, TPM2_ALG.SHA256
    )
    esapi.policy_pcr(trial, TPM2B_DIGEST(), f"sha256:{DEBUG_PCR}")
    assert bytes(esapi.policy_get_digest(trial)) == policy
    esapi.flush_context(trial)

    secret = os.urandom(32)
    parent, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), storage_template())
    sealed_tmpl = TPM2B_PUBLIC.parse(
        "keyedhash", objectAttributes=0x00000012 | 0x400, authPolicy=policy
    )  # fixedTPM|fixedParent|noDA
    priv, pub, *_ = esapi.create(
        parent, TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=secret)), sealed_tmpl
    )
    sealed = esapi.load(parent, priv, pub)

    def unseal() -> bytes:
        session = esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256
        )
        try:
            esapi.policy_pcr(session, TPM2B_DIGEST(), f"sha256:{DEBUG_PCR}")
            return bytes(esapi.unseal(sealed, session1=session))
        finally:
            esapi.flush_context(session)

    assert unseal() == secret
    esapi.pcr_extend(ESYS_TR.PCR16, sha256_digests(hashlib.sha256(b"tampered").digest()))
    with pytest.raises(TSS2_Exception) as err:
        unseal()
    assert tss_rc(err.value) & 0x0BF == 0x09D  # TPM_RC_POLICY_FAIL


def test_policy_password_gates_nv_read(esapi: ESAPI) -> None:
    """An NV index readable only by PolicyPassword: the policy with the right password
    reads, a plain password session is refused (the index has no AUTHREAD)."""
    trial = esapi.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, None, TPM2_ALG.SHA256
    )
    esapi.policy_password(trial)
    policy = bytes(esapi.policy_get_digest(trial))
    esapi.flush_context(trial)
    # PolicyPassword == PolicyAuthValue: sha256(0*32 || TPM_CC_PolicyAuthValue)
    assert policy == hashlib.sha256(bytes(32) + struct.pack(">I", 0x16B)).digest()

    index = nv_index(0x05)
    attrs = TPMA_NV.POLICYREAD | TPMA_NV.OWNERWRITE | TPMA_NV.NO_DA  # no AUTHREAD
    with nv_space(esapi, index, 8, auth=b"pw", attrs=attrs, policy=policy) as nv:
        esapi.nv_write(nv, b"gated!!!", 0, auth_handle=ESYS_TR.RH_OWNER)
        esapi.tr_set_auth(nv, b"pw")
        with pytest.raises(TSS2_Exception) as err:  # a plain password is not enough
            esapi.nv_read(nv, 8, 0, auth_handle=nv)
        assert tss_rc(err.value) == 0x12F  # TPM_RC_AUTH_UNAVAILABLE
        for password, readable in ((b"pw", True), (b"wrong", False)):
            esapi.tr_set_auth(nv, password)
            session = esapi.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256
            )
            try:
                esapi.policy_password(session)
                if readable:
                    assert (
                        bytes(esapi.nv_read(nv, 8, 0, auth_handle=nv, session1=session))
                        == b"gated!!!"
                    )
                else:
                    with pytest.raises(TSS2_Exception) as err:
                        esapi.nv_read(nv, 8, 0, auth_handle=nv, session1=session)
                    assert tss_rc(err.value) == 0x9A2  # TPM_RC_BAD_AUTH, session 1
            finally:
                if handles(esapi, 0x03000000):
                    esapi.flush_context(session)


# ---- Quote --------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["rsa2048:rsassa-sha256", "ecc256:ecdsa-sha256"])
def test_quote_verified_outside_tpm(esapi: ESAPI, alg: str) -> None:
    """Quote over PCRs 0 and 16: the signature verifies with ``cryptography`` over the
    attest bytes, which carry TPM_GENERATED, the nonce and the digest of the PCRs read."""
    esapi.pcr_reset(ESYS_TR.PCR16)
    esapi.pcr_event(ESYS_TR.PCR16, b"quoted state")
    key, pub, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), attestation_template(alg))
    nonce = os.urandom(20)
    quoted, sig = esapi.quote(key, "sha256:0,16", nonce)
    attest = bytes(quoted)  # the marshalled TPMS_ATTEST: what the signature covers
    _verify_outside(pub.publicArea, sig, attest)
    info = QuoteInfo.from_bytes(attest)
    assert info.magic == TPM_GENERATED_VALUE
    assert info.type == TPM_ST_ATTEST_QUOTE
    assert info.extra_data == nonce
    assert info.qualified_signer[:2] == struct.pack(">H", TPM2_ALG.SHA256)
    assert info.pcr_select == pcr_selection_bytes([0, DEBUG_PCR])
    expected = hashlib.sha256(read_pcr(esapi, 0) + read_pcr(esapi, DEBUG_PCR)).digest()
    assert info.pcr_digest == expected
    with pytest.raises(InvalidSignature):  # a forged nonce breaks the signature
        _verify_outside(pub.publicArea, sig, attest.replace(nonce, os.urandom(20)))


# ---- EK certificates ----------------------------------------------------------------


def _nv_reader(esapi: ESAPI):  # type: ignore[no-untyped-def]
    def read(index: int) -> bytes:
        if index not in handles(esapi, index, 1):
            raise NoSuchIndex(index)
        return nv_read_all(esapi, index)

    return read


def test_ek_certificate_rsa(esapi: ESAPI) -> None:
    """The RSA EK certificate at 0x01c00002 parses as X.509, and its key is the EK that
    CreatePrimary makes from the TCG EK template (and the one persisted at 0x81010001)."""
    cert = x509.load_der_x509_certificate(nv_read_all(esapi, EK_CERT_RSA2048))
    cert_key = cert.public_key()
    assert isinstance(cert_key, rsa.RSAPublicKey) and cert_key.key_size == 2048
    _, template = create_ek_template("EK-RSA2048", _nv_reader(esapi))
    _ek, pub, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.RH_ENDORSEMENT)
    assert public_key(pub.publicArea).public_numbers() == cert_key.public_numbers()
    persisted, _, _ = esapi.read_public(esapi.tr_from_tpmpublic(EK_PERSISTENT_RSA))
    assert bytes(persisted.publicArea.unique.rsa) == bytes(pub.publicArea.unique.rsa)


def test_ek_certificate_ecc(esapi: ESAPI) -> None:
    """An ECC EK certificate (0x01c0000a P-256 or 0x01c00016 P-384) parses as X.509 and
    matches the key CreatePrimary makes from the matching TCG EK template."""
    present = [i for i in (EK_CERT_ECC_P256, EK_CERT_ECC_P384) if handles(esapi, i, 1) == [i]]
    assert present, "no ECC EK certificate in NV"
    index = present[0]
    cert = x509.load_der_x509_certificate(nv_read_all(esapi, index))
    cert_key = cert.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    ektype = "EK-ECC256" if index == EK_CERT_ECC_P256 else "EK-HIGH-ECC384"
    _, template = create_ek_template(ektype, _nv_reader(esapi))
    _ek, pub, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.RH_ENDORSEMENT)
    assert public_key(pub.publicArea).public_numbers() == cert_key.public_numbers()
