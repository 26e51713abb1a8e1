"""TransportTCTI: ESAPI over any RawTransport (here the in-memory FakeTPM)."""

from __future__ import annotations

import pytest

from harness.errors import TransportClosed
from harness.fakes import FakeTPM

pytss = pytest.importorskip("tpm2_pytss")

from harness.tcti import TransportTCTI  # noqa: E402 - needs tpm2_pytss


def test_esapi_round_trips_through_the_transport() -> None:
    tpm = FakeTPM()
    tcti = TransportTCTI(tpm)
    with pytss.ESAPI(tcti) as ectx:
        ectx.startup(pytss.TPM2_SU.CLEAR)
        data = bytes(ectx.get_random(8))
    assert len(data) == 8
    assert [c[6:10].hex() for c in tpm.commands] == ["00000144", "0000017b"]
    tcti.close()
    assert tpm.closed


def test_transport_error_reaches_the_caller() -> None:
    tpm = FakeTPM()
    tpm.close()
    tcti = TransportTCTI(tpm)
    with pytss.ESAPI(tcti) as ectx, pytest.raises((TransportClosed, pytss.TSS2_Exception)):
        ectx.get_random(8)


def test_tpm_error_codes_come_back_as_tss2_exceptions() -> None:
    tpm = FakeTPM()  # answers TPM_RC_COMMAND_CODE to what it does not know
    with pytss.ESAPI(TransportTCTI(tpm)) as ectx, pytest.raises(pytss.TSS2_Exception) as info:
        ectx.read_clock()
    assert info.value.rc == 0x143


def test_esys_startup_already_tolerates_initialize() -> None:
    tpm = FakeTPM()
    tpm.started = True
    with pytss.ESAPI(TransportTCTI(tpm)) as ectx:
        ectx.startup(pytss.TPM2_SU.CLEAR)  # TPM_RC_INITIALIZE is not an error here
