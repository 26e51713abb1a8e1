"""``harness.certify_report``: a JUnit file and versions.json in, the markdown out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.certify_report import Verdict, main, parse_junit, render, verdict, write_report

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="xenvtpm-certify" errors="1" failures="1"
 skipped="2" tests="5" time="245.312" timestamp="2026-11-26T21:30:00.000000+00:00"
 hostname="vm">
<testcase classname="scenarios.test_smoke" name="test_startup" time="1.250"/>
<testcase classname="scenarios.test_commands" name="test_get_random[32]" time="0.504"/>
<testcase classname="scenarios.test_commands" name="test_pcr|extend" time="2.000">
  <failure message="assert 0x922 == 0 | rc">details</failure></testcase>
<testcase classname="scenarios.test_faults" name="test_restart_backend" time="0.001">
  <skipped type="pytest.skip" message="target xen-host lacks capability restart-backend"/>
</testcase>
<testcase classname="scenarios.test_faults" name="test_known_bug" time="0.300">
  <skipped type="pytest.xfail" message="EBUSY"/></testcase>
<testcase classname="scenarios.test_hostile" name="test_rogue" time="3.000">
  <error message="failed on setup with &quot;TargetNotReady: dom0&quot;">trace</error></testcase>
</testsuite></testsuites>
"""

VERSIONS = {
    "host": "root@127.0.0.1:40022",
    "hostname": "dom0",
    "driver": {"commit": "56f1aa5" + "0" * 33, "describe": "56f1aa5", "dirty": False},
    "xen": {
        "xen_major": "4",
        "xen_minor": "17",
        "xen_extra": ".3-pre",
        "xen_version": "4.17.3-pre",
    },
    "dom0": {"kernel": "6.1.0-50-amd64", "debian": "12.12", "os": "Debian GNU/Linux 12 (bookworm)"},
    "guests": [
        {"name": "guest0", "domid": 1, "address": "169.254.1.1", "kernel": "6.1.0-50-amd64"},
        {"name": "guest1", "domid": 2, "address": "169.254.1.2", "kernel": "6.1.0-51-amd64"},
    ],
}


def test_parse_junit_outcomes_durations_and_totals() -> None:
    suite = parse_junit(JUNIT)
    outcomes = [(c.name, c.outcome) for c in suite.cases]
    assert outcomes == [
        ("test_startup", "passed"),
        ("test_get_random[32]", "passed"),
        ("test_pcr|extend", "failed"),
        ("test_restart_backend", "skipped"),
        ("test_known_bug", "xfailed"),
        ("test_rogue", "error"),
    ]
    assert suite.cases[0].scenario == "scenarios.test_smoke::test_startup"
    assert suite.cases[2].duration == 2.0
    assert suite.cases[2].message == "assert 0x922 == 0 | rc"
    assert suite.time == pytest.approx(245.312)
    assert suite.timestamp.startswith("2026-11-26T21:30")
    assert suite.counts() == {"passed": 2, "failed": 1, "error": 1, "skipped": 1, "xfailed": 1}
    assert not suite.ok


def test_report_says_which_frontend_and_whether_faults_were_allowed() -> None:
    text = render(VERSIONS | {"guest_kind": "kernel", "destructive": True}, parse_junit(JUNIT))
    assert "| guests' vTPM frontend | the guest kernel's xen-tpmfront |" in text.splitlines()
    assert "| restarts, killed swtpm, xl reboot | allowed (--destructive) |" in text.splitlines()
    text = render(VERSIONS | {"guest_kind": "python", "destructive": False}, None)
    assert "| restarts, killed swtpm, xl reboot | not allowed |" in text.splitlines()


def test_report_has_versions_every_scenario_and_totals() -> None:
    text = render(VERSIONS, parse_junit(JUNIT))
    lines = text.splitlines()
    assert lines[0] == "# xenvtpm certification: root@127.0.0.1:40022"
    assert "Result: **FAILED**: 2 passed, 1 failed, 1 error, 1 skipped, 1 xfailed; " in text
    assert f"| driver build (git) | `{'56f1aa5' + '0' * 33}` (56f1aa5, clean tree) |" in lines
    assert "| Xen | 4.17.3-pre (xen_major 4, xen_minor 17, xen_extra .3-pre) |" in lines
    assert (
        "| dom0 | kernel 6.1.0-50-amd64, Debian 12.12 (Debian GNU/Linux 12 (bookworm)) |" in lines
    )
    assert "| guest guest1 (domain 2, 169.254.1.2) | kernel 6.1.0-51-amd64 |" in lines
    assert "| scenarios.test_smoke::test_startup | passed | 1.25 |" in lines
    assert "| scenarios.test_commands::test_pcr\\|extend | failed | 2.00 |" in lines
    assert "| scenarios.test_faults::test_known_bug | xfailed | 0.30 |" in lines
    assert (
        "Totals: 2 passed, 1 failed, 1 error, 1 skipped, 1 xfailed; 6 scenarios, 245.3 s." in lines
    )
    failures = lines[lines.index("## Failures") :]
    assert any(
        "`scenarios.test_hostile::test_rogue` (error): failed on setup" in f for f in failures
    )
    # Every scenario is a table row, in order.
    rows = [ln for ln in lines if ln.startswith("| scenarios.")]
    assert len(rows) == 6


def test_dirty_tree_and_passing_run() -> None:
    junit = (
        JUNIT.split("<testcase")[0]
        + '<testcase classname="s" name="t" time="1"/></testsuite></testsuites>'
    )
    versions = dict(VERSIONS, driver={"commit": "abc", "dirty": True, "changed_files": 3})
    text = render(versions, parse_junit(junit))
    assert "Result: **PASSED**: 1 passed, 0 failed; 1 scenarios" in text
    assert "`abc` (dirty tree: 3 changed files not committed)" in text
    assert "## Failures" not in text


def test_no_junit_and_no_versions_say_so(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    assert write_report(tmp_path / "none.xml", tmp_path / "none.json", out, "root@h") is None
    text = out.read_text()
    assert "**NO RESULTS**" in text and "# xenvtpm certification: root@h" in text
    assert "not recorded (the target did not reach the host)" in text


def test_main_writes_the_report_and_exits_by_the_verdict(tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "versions.json").write_text(json.dumps(VERSIONS))
    argv = ["--junit", str(tmp_path / "junit.xml"), "--versions", str(tmp_path / "versions.json")]
    assert main([*argv, "--out", str(tmp_path / "r.md")]) == 1
    assert "| guest guest0 (domain 1, 169.254.1.1) |" in (tmp_path / "r.md").read_text()


def test_malformed_junit_is_named() -> None:
    with pytest.raises(ValueError, match="not a JUnit XML file"):
        parse_junit("<testsuite")


HOST_KEYS = [
    {
        "login": "dom0",
        "host": "[127.0.0.1]:40022",
        "type": "ssh-ed25519",
        "fingerprint": "SHA256:7rXhQ2Vt0dom0",
        "trust": "known_hosts",
        "key": "AAAAC3dom0",
    },
    {
        "login": "guest0",
        "host": "169.254.1.1",
        "type": "ecdsa-sha2-nistp256",
        "fingerprint": "SHA256:Qx9guest0",
        "trust": "accepted-new",
        "key": "AAAAE2guest0",
    },
]


def test_report_lists_each_host_key_and_how_it_was_trusted() -> None:
    """Every login's host key (type, SHA256) and whether known_hosts vouched for it or
    the user accepted it new; accepted keys come with how to check and pin them."""
    lines = render(dict(VERSIONS, host_keys=HOST_KEYS), parse_junit(JUNIT)).splitlines()
    keys = lines[lines.index("## SSH host keys") :]
    assert "| dom0 | [127.0.0.1]:40022 | ssh-ed25519 | SHA256:7rXhQ2Vt0dom0 | known_hosts |" in keys
    assert (
        "| guest0 | 169.254.1.1 | ecdsa-sha2-nistp256 | SHA256:Qx9guest0 "
        "| accepted new (--accept-new-host-keys) |"
    ) in keys
    assert any("1 key was accepted new" in line and "known_hosts" in line for line in keys)


def test_report_with_only_known_keys_has_no_warning() -> None:
    text = render(dict(VERSIONS, host_keys=HOST_KEYS[:1]), parse_junit(JUNIT))
    assert "SHA256:7rXhQ2Vt0dom0" in text and "accepted new" not in text


def _junit(*cases: str) -> str:
    return JUNIT.split("<testcase")[0] + "".join(cases) + "</testsuite></testsuites>"


PASS = '<testcase classname="scenarios.test_smoke" name="test_a" time="1"/>'
MISSING = (
    '<testcase classname="scenarios.test_faults" name="test_restart_backend" time="0">'
    '<skipped type="pytest.skip" message="target xen-host lacks capability restart-backend"/>'
    "</testcase>"
)
NOT_HERE = (
    '<testcase classname="scenarios.test_external" name="test_tpmrm" time="0">'
    '<skipped type="pytest.skip" message="no /dev/tpmrm0 in this guest"/></testcase>'
)


def test_a_missing_capability_makes_the_run_partial_with_its_coverage() -> None:
    """Certify honestly (issue 16): a host that lacked a capability did not pass what
    it skipped; the report says PARTIAL, how much ran, and each skip with its reason."""
    suite = parse_junit(_junit(PASS, PASS.replace("test_a", "test_b"), MISSING, NOT_HERE))
    assert verdict(suite) is Verdict.PARTIAL
    text = render(VERSIONS, suite)
    assert "Result: **PARTIAL**: 2 passed, 0 failed, 2 skipped; 4 scenarios" in text
    assert "Coverage: 2 of 4 scenarios ran (50%)." in text
    lines = text.splitlines()
    skipped = lines[lines.index("## Skipped") :]
    assert (
        "- `scenarios.test_faults::test_restart_backend`: "
        "target xen-host lacks capability restart-backend" in skipped
    )
    assert "- `scenarios.test_external::test_tpmrm`: no /dev/tpmrm0 in this guest" in skipped


def test_passed_needs_every_capability_and_lists_other_skips() -> None:
    suite = parse_junit(_junit(PASS, NOT_HERE))
    assert verdict(suite) is Verdict.PASSED
    text = render(VERSIONS, suite)
    assert "Result: **PASSED**" in text and "Coverage: 1 of 2 scenarios ran (50%)." in text
    assert "## Skipped" in text


def test_failed_beats_partial_and_nothing_passed_is_failed() -> None:
    assert verdict(parse_junit(JUNIT)) is Verdict.FAILED  # a failure and a missing capability
    assert verdict(parse_junit(_junit(MISSING))) is Verdict.FAILED  # nothing ran at all
    assert verdict(None) is Verdict.NO_RESULTS


@pytest.mark.parametrize(("cases", "code"), [((PASS,), 0), ((PASS, MISSING), 2), ((MISSING,), 1)])
def test_exit_code_by_verdict(tmp_path: Path, cases: tuple[str, ...], code: int) -> None:
    (tmp_path / "junit.xml").write_text(_junit(*cases))
    argv = ["--junit", str(tmp_path / "junit.xml"), "--versions", str(tmp_path / "v.json")]
    assert main([*argv, "--out", str(tmp_path / "r.md")]) == code


def test_report_names_the_package_version_tested_and_the_hosts_own() -> None:
    tested = render(VERSIONS | {"package": {"version": "0.1.0", "installed": ""}}, None)
    assert "| driver package | xenvtpm 0.1.0, deployed as a folder (none installed) |" in tested
    both = render(VERSIONS | {"package": {"version": "0.2.0", "installed": "0.1.0"}}, None)
    assert (
        "xenvtpm 0.2.0, deployed as a folder (xenvtpm 0.1.0 installed on the host, not used)"
        in both
    )
