"""External suites written with Python's unittest (the kernel's tpm2 selftests): their
``-v`` output parsed into one result per test, a guest's run compared with a baseline
run, and the comparison as a Markdown table.

A guest's failure only counts against the driver when the same test passes on the
baseline TPM: the selftests also test the kernel and the TPM behind it, and a test that
fails on plain swtpm behind dom0's own vTPM proxy says nothing about the split driver.

Spec: CPython ``Lib/unittest/runner.py`` (TextTestResult: ``description ... ok``, the
``FAIL:``/``ERROR:`` blocks, ``Ran N tests``); 3.11 names a test ``test_x
(module.Class.test_x)``, earlier versions ``test_x (module.Class)``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class UnittestOutputError(ValueError):
    """The output is not a complete ``unittest -v`` run; carries the output."""

    def __init__(self, why: str, output: str) -> None:
        super().__init__(f"{why}; unittest output:\n{output[-4000:]}")
        self.output = output


class Outcome(enum.StrEnum):
    """A test's result as ``unittest -v`` prints it (and MISSING: not in the output)."""

    OK = "ok"
    FAIL = "FAIL"
    ERROR = "ERROR"
    SKIPPED = "skipped"
    EXPECTED_FAILURE = "expected failure"
    UNEXPECTED_SUCCESS = "unexpected success"
    MISSING = "not run"

    @property
    def failed(self) -> bool:
        """It ran and did not pass (an unexpected success fails the run too)."""
        return self in (Outcome.FAIL, Outcome.ERROR, Outcome.UNEXPECTED_SUCCESS)


@dataclass(frozen=True)
class TestResult:
    """One test: ``Class.test_name``, its outcome, and the reason (a skip's reason or
    the last line of a failure's traceback)."""

    __test__ = False  # not a pytest test class

    test: str
    outcome: Outcome
    detail: str = ""


# A test's line: "test_x (tpm2_tests.SmokeTest.test_x)" (3.11) or "(tpm2_tests.SmokeTest)".
_TEST_LINE = re.compile(r"^(?P<method>\w+) \((?P<qualified>[\w.]+)\)", re.M)
_OUTCOME = re.compile(
    r"(?:^|\.\.\. )(?P<outcome>ok|FAIL|ERROR|expected failure|unexpected success"
    r"|skipped(?: (?P<reason>.*))?)[ \t]*$",
    re.M,
)
_SEPARATOR = re.compile(r"^(?:={70}|-{70})$", re.M)
_DETAIL_BLOCK = re.compile(
    r"^(?:FAIL|ERROR): (?P<method>\w+) \((?P<qualified>[\w.]+)\)\n-{70}\n(?P<body>.*?)"
    r"(?=^={70}$|^-{70}$|\Z)",
    re.M | re.S,
)
_RAN = re.compile(r"^Ran (?P<count>\d+) tests? in ", re.M)


def _test_id(method: str, qualified: str) -> str:
    """``Class.method`` from 3.11's ``module.Class.method`` or older ``module.Class``."""
    parts = qualified.split(".")
    if len(parts) > 1 and parts[-1] == method:
        parts = parts[:-1]
    return f"{parts[-1]}.{method}"


@dataclass(frozen=True)
class SuiteRun:
    """One ``python3 -m unittest -v`` run, parsed once."""

    results: tuple[TestResult, ...]

    @classmethod
    def from_output(cls, output: str) -> SuiteRun:
        """Parse the run's stderr. A run whose ``Ran N tests`` line is missing (it was
        killed) or disagrees with the tests found is refused, with the output."""
        split = _SEPARATOR.search(output)
        progress = output[: split.start()] if split else output
        details = {
            _test_id(m["method"], m["qualified"]): _last_line(m["body"])
            for m in _DETAIL_BLOCK.finditer(output)
        }
        heads = list(_TEST_LINE.finditer(progress))
        results = []
        for i, head in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(progress)
            segment = progress[head.end() : end]
            found = list(_OUTCOME.finditer(segment))
            test = _test_id(head["method"], head["qualified"])
            if not found:
                raise UnittestOutputError(f"no result for {test}", output)
            last = found[-1]
            word = last["outcome"]
            outcome = Outcome.SKIPPED if word.startswith("skipped") else Outcome(word)
            detail = (last["reason"] or "").strip("'") or details.get(test, "")
            results.append(TestResult(test, outcome, detail))
        ran = _RAN.search(output)
        if ran is None:
            raise UnittestOutputError("no 'Ran N tests' line (killed or timed out?)", output)
        if int(ran["count"]) != len(results):
            raise UnittestOutputError(
                f"'Ran {ran['count']} tests' but {len(results)} results found", output
            )
        return cls(tuple(results))

    def merged(self, other: SuiteRun) -> SuiteRun:
        """Both runs' results (one run per test class makes one suite)."""
        return SuiteRun(self.results + other.results)

    def get(self, test: str) -> TestResult:
        for result in self.results:
            if result.test == test:
                return result
        return TestResult(test, Outcome.MISSING)


def _last_line(traceback: str) -> str:
    lines = [line.strip() for line in traceback.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class Row:
    """One test in both runs."""

    test: str
    guest: TestResult
    baseline: TestResult
    not_applicable: str = ""  # why the test cannot apply to this guest, if it cannot

    @property
    def guest_only_failure(self) -> bool:
        """Failed (or did not run) in the guest, yet did not fail on the baseline TPM,
        and could apply there: the driver's fault until shown otherwise."""
        bad = self.guest.outcome.failed or self.guest.outcome is Outcome.MISSING
        return bad and not self.baseline.outcome.failed and not self.not_applicable


def compare(
    guest: SuiteRun, baseline: SuiteRun, not_applicable: Mapping[str, str] | None = None
) -> list[Row]:
    """Every test of either run, in the baseline's order, then the guest's extras;
    ``not_applicable`` maps a test to why it cannot apply to the guest."""
    why = not_applicable or {}
    tests = [r.test for r in baseline.results]
    tests += [r.test for r in guest.results if r.test not in tests]
    return [Row(t, guest.get(t), baseline.get(t), why.get(t, "")) for t in tests]


def markdown_table(rows: Sequence[Row], guest_label: str, baseline_label: str) -> str:
    """The comparison, one line per test; failures carry their reason."""

    def cell(result: TestResult) -> str:
        text = result.outcome.value
        if result.detail and result.outcome is not Outcome.OK:
            text += f": {result.detail}"
        return text.replace("|", "\\|")

    lines = [
        f"| test | {guest_label} | {baseline_label} | guest only failure |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        flag = "**yes**" if row.guest_only_failure else ""
        if row.not_applicable and row.guest.outcome is not Outcome.OK:
            flag = f"n/a: {row.not_applicable}"
        lines.append(f"| {row.test} | {cell(row.guest)} | {cell(row.baseline)} | {flag} |")
    return "\n".join(lines) + "\n"


def write_report(path: Path, title: str, preamble: Sequence[str], table: str) -> None:
    """The table as a Markdown file (its directory made), for the run's artifacts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(preamble)
    path.write_text(f"# {title}\n\n{body}\n\n{table}")
