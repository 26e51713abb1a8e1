"""Parsing ``python3 -m unittest -v`` output (the kernel's tpm2 selftests) and the
guest-vs-baseline table, on real output: a captured 3.11 run (Debian 12's python3, as in
the images) and a run made now with this interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.unittest_results import (
    Outcome,
    SuiteRun,
    TestResult,
    UnittestOutputError,
    compare,
    markdown_table,
    write_report,
)

# python3 3.11 (bookworm), -v, stderr, verbatim: a docstring, a test writing to stderr,
# a failure, an error, a skip, an expected failure.
CAPTURED_311 = """\
test_doc (tpm2_tests.SmokeTest.test_doc)
First line of a docstring. ... ok
test_error (tpm2_tests.SmokeTest.test_error) ... ERROR
test_fail (tpm2_tests.SmokeTest.test_fail) ... FAIL
test_noisy (tpm2_tests.SmokeTest.test_noisy) ... noise from the test
ok
test_ok (tpm2_tests.SmokeTest.test_ok) ... ok
test_skip (tpm2_tests.SmokeTest.test_skip) ... skipped 'no sha1 bank'
test_xfail (tpm2_tests.SmokeTest.test_xfail) ... expected failure

======================================================================
ERROR: test_error (tpm2_tests.SmokeTest.test_error)
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/tmp/ut/tpm2_tests.py", line 5, in test_error
    def test_error(self): raise OSError(62, "Timer expired")
                          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
OSError: [Errno 62] Timer expired

======================================================================
FAIL: test_fail (tpm2_tests.SmokeTest.test_fail)
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/tmp/ut/tpm2_tests.py", line 4, in test_fail
    def test_fail(self): self.assertEqual(1, 2)
                         ^^^^^^^^^^^^^^^^^^^^^^
AssertionError: 1 != 2

----------------------------------------------------------------------
Ran 7 tests in 0.001s

FAILED (failures=1, errors=1, skipped=1, expected failures=1)
"""

# python3 3.9 names tests "test_x (module.Class)".
CAPTURED_39 = """\
test_async (tpm2_tests.AsyncTest) ... ok
test_flush_invalid_context (tpm2_tests.AsyncTest) ... ok

----------------------------------------------------------------------
Ran 2 tests in 0.130s

OK
"""


def test_every_outcome_of_a_captured_311_run() -> None:
    run = SuiteRun.from_output(CAPTURED_311)
    assert run.results == (
        TestResult("SmokeTest.test_doc", Outcome.OK),
        TestResult("SmokeTest.test_error", Outcome.ERROR, "OSError: [Errno 62] Timer expired"),
        TestResult("SmokeTest.test_fail", Outcome.FAIL, "AssertionError: 1 != 2"),
        TestResult("SmokeTest.test_noisy", Outcome.OK),
        TestResult("SmokeTest.test_ok", Outcome.OK),
        TestResult("SmokeTest.test_skip", Outcome.SKIPPED, "no sha1 bank"),
        TestResult("SmokeTest.test_xfail", Outcome.EXPECTED_FAILURE),
    )


def test_older_pythons_test_names() -> None:
    run = SuiteRun.from_output(CAPTURED_39)
    assert [r.test for r in run.results] == [
        "AsyncTest.test_async",
        "AsyncTest.test_flush_invalid_context",
    ]
    assert {r.outcome for r in run.results} == {Outcome.OK}


def test_a_run_made_now(tmp_path: Path) -> None:
    """This interpreter's unittest, on a module shaped like the selftests (setUp opens a
    device that is not there, as on a machine without /dev/tpm0)."""
    (tmp_path / "tpm2_tests.py").write_text(
        textwrap.dedent(
            """\
            import unittest

            class SpaceTest(unittest.TestCase):
                def test_make_two_spaces(self):
                    pass

                def test_invalid_cc(self):
                    self.assertEqual(0x143, 0x90143)

            class AsyncTest(unittest.TestCase):
                def setUp(self):
                    open("/nonexistent/tpm0", "r+b", buffering=0)

                def test_async(self):
                    pass
            """
        )
    )
    runs = []
    for cls in ("SpaceTest", "AsyncTest"):
        proc = subprocess.run(
            [sys.executable, "-m", "unittest", "-v", f"tpm2_tests.{cls}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1
        runs.append(SuiteRun.from_output(proc.stderr))
    run = runs[0].merged(runs[1])
    assert [(r.test, r.outcome) for r in run.results] == [
        ("SpaceTest.test_invalid_cc", Outcome.FAIL),
        ("SpaceTest.test_make_two_spaces", Outcome.OK),
        ("AsyncTest.test_async", Outcome.ERROR),
    ]
    assert run.get("AsyncTest.test_async").detail.startswith("FileNotFoundError: [Errno 2]")


def test_a_killed_run_is_refused() -> None:
    killed = "test_async (tpm2_tests.AsyncTest.test_async) ... ok\ntest_flush (tpm2_tests.As"
    with pytest.raises(UnittestOutputError, match="no 'Ran N tests' line"):
        SuiteRun.from_output(killed)
    with pytest.raises(UnittestOutputError, match="'Ran 3 tests' but 2 results"):
        SuiteRun.from_output(CAPTURED_39.replace("Ran 2 tests", "Ran 3 tests"))


def test_only_failures_the_baseline_does_not_share_count() -> None:
    guest = SuiteRun(
        (
            TestResult("SmokeTest.a", Outcome.FAIL, "AssertionError"),  # fails on both
            TestResult("SmokeTest.b", Outcome.ERROR, "OSError: [Errno 62] Timer expired"),
            TestResult("SmokeTest.c", Outcome.OK),
            TestResult("SmokeTest.d", Outcome.SKIPPED, "no bank"),
        )
    )
    baseline = SuiteRun(
        (
            TestResult("SmokeTest.a", Outcome.ERROR, "OSError"),
            TestResult("SmokeTest.b", Outcome.OK),
            TestResult("SmokeTest.c", Outcome.FAIL, "x"),
            TestResult("SmokeTest.d", Outcome.OK),
            TestResult("SmokeTest.e", Outcome.OK),  # never ran in the guest
        )
    )
    rows = compare(guest, baseline)
    assert [r.test for r in rows] == [f"SmokeTest.{x}" for x in "abcde"]
    assert [r.test for r in rows if r.guest_only_failure] == ["SmokeTest.b", "SmokeTest.e"]
    table = markdown_table(rows, "guest0", "dom0 swtpm")
    assert table.splitlines()[0] == "| test | guest0 | dom0 swtpm | guest only failure |"
    assert "| SmokeTest.b | ERROR: OSError: [Errno 62] Timer expired | ok | **yes** |" in table
    assert "| SmokeTest.e | not run | ok | **yes** |" in table
    assert "| SmokeTest.a | FAIL: AssertionError | ERROR: OSError |  |" in table

    excused = compare(guest, baseline, {"SmokeTest.b": "no /dev/tpmrm0"})
    assert [r.test for r in excused if r.guest_only_failure] == ["SmokeTest.e"]
    table = markdown_table(excused, "guest0", "dom0 swtpm")
    row = "| SmokeTest.b | ERROR: OSError: [Errno 62] Timer expired | ok | n/a: no /dev/tpmrm0 |"
    assert row in table


def test_report_file(tmp_path: Path) -> None:
    rows = compare(SuiteRun.from_output(CAPTURED_39), SuiteRun.from_output(CAPTURED_39))
    path = tmp_path / "external" / "tpm2-selftests-xen.md"
    write_report(path, "tpm2 selftests", ["kernel 6.1.0-50-amd64"], markdown_table(rows, "g", "b"))
    text = path.read_text()
    assert text.startswith("# tpm2 selftests\n\nkernel 6.1.0-50-amd64\n\n| test | g | b |")
    assert "| AsyncTest.test_async | ok | ok |  |" in text
