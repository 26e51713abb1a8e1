"""The certification report of a real Xen host: JUnit + versions -> a short markdown.

``nox -s certify`` runs the scenarios on ``--target ssh://root@HOST`` with
``--junitxml``; the target writes ``versions.json`` (driver build, Xen, dom0 and guest
versions, and each login's host key with what vouched for it,
``harness.targets.xen_host``). This module only reads those two files and
renders; it touches no host, so it is tested by feeding it files.

    python -m harness.certify_report --junit J --versions V --out report.md [--host H]

The verdict is honest about coverage (issue 16): **PASSED** only when nothing failed
and the host lacked no capability a scenario needed; **PARTIAL** (exit 2) when it did,
with how many scenarios ran and every skip with its reason; **FAILED** (exit 1) on a
failure or error, or when nothing passed at all.

Spec: pytest's JUnit XML (``testsuite``/``testcase`` with ``failure``, ``error``,
``skipped``; an xfail is ``skipped type="pytest.xfail"``).
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")
MISSING_CAPABILITY = " lacks capability "  # conftest's skip reason for a needs() marker


class Verdict(enum.Enum):
    """The report's result, and ``main``'s exit code."""

    PASSED = 0
    FAILED = 1
    PARTIAL = 2
    NO_RESULTS = 3


@dataclass(frozen=True)
class CaseResult:
    """One testcase of the JUnit file."""

    classname: str
    name: str
    outcome: str  # one of OUTCOMES
    duration: float
    message: str = ""

    @property
    def scenario(self) -> str:
        return f"{self.classname}::{self.name}" if self.classname else self.name


@dataclass(frozen=True)
class Suite:
    """Every testcase, in order, and the run's wall time and start (from the file)."""

    cases: tuple[CaseResult, ...]
    time: float
    timestamp: str

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for case in self.cases:
            out[case.outcome] += 1
        return out

    @property
    def ok(self) -> bool:
        counts = self.counts()
        return counts["failed"] == 0 and counts["error"] == 0 and counts["passed"] > 0


def _outcome(case: ET.Element) -> tuple[str, str]:
    for kind in ("failure", "error"):
        child = case.find(kind)
        if child is not None:
            outcome = "failed" if kind == "failure" else "error"
            return outcome, child.get("message") or (child.text or "").strip()
    skipped = case.find("skipped")
    if skipped is not None:
        kind = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
        return kind, skipped.get("message") or ""
    return "passed", ""


def parse_junit(text: str | bytes) -> Suite:
    """pytest's JUnit XML (one or more ``testsuite``), as values."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"not a JUnit XML file: {e}") from e
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    cases: list[CaseResult] = []
    total, timestamp = 0.0, ""
    for suite in suites:
        total += float(suite.get("time") or 0.0)
        timestamp = timestamp or suite.get("timestamp", "")
        for case in suite.iter("testcase"):
            outcome, message = _outcome(case)
            cases.append(
                CaseResult(
                    case.get("classname", ""),
                    case.get("name", "?"),
                    outcome,
                    float(case.get("time") or 0.0),
                    message,
                )
            )
    if not total:
        total = sum(c.duration for c in cases)
    return Suite(tuple(cases), total, timestamp)


def verdict(suite: Suite | None) -> Verdict:
    """FAILED beats PARTIAL: a failure is news whatever else was skipped."""
    if suite is None:
        return Verdict.NO_RESULTS
    if not suite.ok:
        return Verdict.FAILED
    if any(c.outcome == "skipped" and MISSING_CAPABILITY in c.message for c in suite.cases):
        return Verdict.PARTIAL
    return Verdict.PASSED


def _coverage(suite: Suite) -> str:
    ran = sum(c.outcome != "skipped" for c in suite.cases)
    total = len(suite.cases)
    return f"Coverage: {ran} of {total} scenarios ran ({100 * ran // max(total, 1)}%)."


def _cell(text: Any) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _driver(versions: Mapping[str, Any]) -> str:
    driver = versions.get("driver") or {}
    commit = driver.get("commit", "unknown")
    if driver.get("dirty"):
        state = f"dirty tree: {driver.get('changed_files', '?')} changed files not committed"
    else:
        state = "clean tree"
    describe = driver.get("describe")
    return f"`{commit}`" + (f" ({describe}, {state})" if describe else f" ({state})")


def _package(package: Mapping[str, Any]) -> str:
    """The version tested (deployed as a folder) and what the host has installed."""
    installed = package.get("installed") or ""
    host = f"xenvtpm {installed} installed on the host, not used" if installed else "none installed"
    return f"xenvtpm {package.get('version', 'unknown')}, deployed as a folder ({host})"


def _xen(versions: Mapping[str, Any]) -> str:
    xen = versions.get("xen") or {}
    if not xen:
        return "unknown"
    numbers = f"{xen.get('xen_major', '?')}.{xen.get('xen_minor', '?')}{xen.get('xen_extra', '')}"
    shown = xen.get("xen_version") or numbers
    parts = [f"xen_major {xen.get('xen_major', '?')}", f"xen_minor {xen.get('xen_minor', '?')}"]
    parts.append(f"xen_extra {xen.get('xen_extra', '?')}")
    if xen.get("xen_changeset"):
        parts.append(f"changeset {xen['xen_changeset']}")
    return f"{shown} ({', '.join(parts)})"


def _system(info: Mapping[str, Any]) -> str:
    text = f"kernel {info.get('kernel') or '?'}"
    if info.get("debian"):
        text += f", Debian {info['debian']}"
    if info.get("os"):
        text += f" ({info['os']})"
    return text


TRUST = {"known_hosts": "known_hosts", "accepted-new": "accepted new (--accept-new-host-keys)"}


def _host_keys(keys: Sequence[Mapping[str, str]] | None) -> list[str]:
    """The host key each login used and what vouched for it (``harness.hostkeys``)."""
    lines = ["## SSH host keys", ""]
    if keys is None:
        return [*lines, "Not recorded (a run before host keys were recorded)."]
    lines += [
        "| login | host | key type | SHA256 fingerprint | trusted by |",
        "|---|---|---|---|---|",
    ]
    for k in keys:
        cells = (k.get("login"), k.get("host"), k.get("type"), k.get("fingerprint"))
        trust = TRUST.get(str(k.get("trust")), str(k.get("trust")))
        lines.append("| " + " | ".join(_cell(c or "?") for c in (*cells, trust)) + " |")
    new = sum(1 for k in keys if k.get("trust") == "accepted-new")
    if new:
        lines += [
            "",
            f"**{new} key{' was' if new == 1 else 's were'} accepted new**, on the user's "
            "word, not on known_hosts: compare each fingerprint with the host's own "
            "(`ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` there), then pin them by "
            "appending `known_hosts` from the host artifacts to `~/.ssh/known_hosts`.",
        ]
    return lines


FRONTEND_NAMES = {
    "python": "xenvtpm's own (python, through tpm_vtpm_proxy)",
    "kernel": "the guest kernel's xen-tpmfront",
}


def render(versions: Mapping[str, Any], suite: Suite | None, host: str = "") -> str:
    """The report: what was tested (build, versions), every scenario, the totals."""
    host = host or str(versions.get("host", "")) or "unknown host"
    lines = [f"# xenvtpm certification: {host}", ""]
    if suite is None:
        result = "**NO RESULTS** (pytest wrote no JUnit file: it did not run)"
    else:
        result = f"**{verdict(suite).name}**"
        counts = suite.counts()
        shown = ", ".join(f"{n} {k}" for k, n in counts.items() if n or k in ("passed", "failed"))
        result += f": {shown}; {len(suite.cases)} scenarios in {suite.time:.1f} s"
    lines += [f"Result: {result}", ""]
    if suite is not None:
        lines += [_coverage(suite), ""]
    if suite is not None and suite.timestamp:
        lines += [f"Run started {suite.timestamp}.", ""]
    lines += ["| what | version |", "|---|---|"]
    rows: list[tuple[str, str]] = [("driver build (git)", _driver(versions))]
    if versions.get("package"):  # recorded since the harness installs packages
        rows.append(("driver package", _package(versions["package"])))
    if versions.get("hostname"):
        rows.append(("host", str(versions["hostname"])))
    rows += [("Xen", _xen(versions)), ("dom0", _system(versions.get("dom0") or {}))]
    if "guest_kind" in versions:  # recorded since certify took --guest-kind
        frontend = FRONTEND_NAMES.get(str(versions["guest_kind"]), str(versions["guest_kind"]))
        consent = "allowed (--destructive)" if versions.get("destructive") else "not allowed"
        rows += [
            ("guests' vTPM frontend", frontend),
            ("restarts, killed swtpm, xl reboot", consent),
        ]
    for piece in versions.get("own_build") or []:  # the user's own pieces (own_build.py)
        rows.append(
            (
                f"own build {piece.get('flag', '?')}",
                f"{piece.get('origin', '?')}: {piece.get('what', '')}; "
                f"sha256 `{piece.get('sha256', '?')}`",
            )
        )
    for guest in versions.get("guests") or []:
        where = f"domain {guest.get('domid', '?')}, {guest.get('address', '?')}"
        rows.append((f"guest {guest.get('name', '?')} ({where})", _system(guest)))
    if not versions:
        rows.append(("versions", "not recorded (the target did not reach the host)"))
    lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in rows]
    if versions:
        lines += ["", *_host_keys(versions.get("host_keys"))]
    if suite is None:
        return "\n".join(lines) + "\n"
    lines += ["", "## Scenarios", "", "| scenario | outcome | time (s) |", "|---|---|---:|"]
    lines += [f"| {_cell(c.scenario)} | {c.outcome} | {c.duration:.2f} |" for c in suite.cases]
    counts = suite.counts()
    lines += ["", "Totals: " + ", ".join(f"{n} {k}" for k, n in counts.items())]
    lines[-1] += f"; {len(suite.cases)} scenarios, {suite.time:.1f} s."
    problems = [c for c in suite.cases if c.outcome in ("failed", "error")]
    if problems:
        lines += ["", "## Failures", ""]
        lines += [
            f"- `{c.scenario}` ({c.outcome}): {_cell(_first_line(c.message))}" for c in problems
        ]
    skipped = [c for c in suite.cases if c.outcome == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- `{c.scenario}`: {_cell(_first_line(c.message))}" for c in skipped]
    return "\n".join(lines) + "\n"


def write_report(junit: Path, versions: Path, out: Path, host: str = "") -> Suite | None:
    """Read the files (either may be missing after a failed run), write ``out``."""
    suite = parse_junit(junit.read_bytes()) if junit.exists() else None
    try:
        data: dict[str, Any] = json.loads(versions.read_text())
    except (OSError, ValueError):
        data = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data, suite, host))
    return suite


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.certify_report", description=__doc__)
    p.add_argument("--junit", type=Path, required=True)
    p.add_argument("--versions", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--host", default="", help="shown in the title (default: from versions)")
    args = p.parse_args(argv)
    suite = write_report(args.junit, args.versions, args.out, args.host)
    result = verdict(suite)
    print(
        f"certify: {result.name} - report in {args.out}"
        + ("" if suite is None else f" ({len(suite.cases)} scenarios; {_coverage(suite)})")
    )
    return 1 if result is Verdict.NO_RESULTS else result.value


if __name__ == "__main__":
    sys.exit(main())
