"""What an instance answers in failure mode: its volatile state was lost under a running
domain (see :mod:`xenvtpm.manager.continuity`).

A TPM in failure mode answers TPM_RC_FAILURE to every command except GetCapability and
GetTestResult, so that software can tell what happened; nothing it says can be mistaken
for a freshly reset TPM. GetCapability goes to the (restarted) swtpm; GetTestResult is
answered here, with ``testResult`` TPM_RC_FAILURE, because the restarted swtpm would
report a passing self-test.

Spec: TCG TPM2 Part 1, "Failure Mode" (12.3); Part 3, 10.4 TPM2_GetTestResult.
"""

from __future__ import annotations

import struct

from xenvtpm.tpm import TPM_CC, TPM_RC, TPM_ST, error_response

_GET_TEST_RESULT_HIIHI = struct.Struct(">HIIHI")  # header, outData.size 0, testResult

FAILURE = error_response(TPM_RC.FAILURE)
#: TPM2_GetTestResult in failure mode: no manufacturer data, testResult TPM_RC_FAILURE.
GET_TEST_RESULT = _GET_TEST_RESULT_HIIHI.pack(
    TPM_ST.NO_SESSIONS, _GET_TEST_RESULT_HIIHI.size, TPM_RC.SUCCESS, 0, TPM_RC.FAILURE
)


def answer(code: int) -> bytes | None:
    """The answer to command ``code`` in failure mode; None: swtpm answers it."""
    if code == TPM_CC.GetCapability:
        return None
    if code == TPM_CC.GetTestResult:
        return GET_TEST_RESULT
    return FAILURE
