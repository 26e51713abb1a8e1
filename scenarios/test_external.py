"""External suites in the guest (issue 7): software written for any Linux TPM, not for
this driver, uses the guest kernel's ``/dev/tpm0``.

- The kernel's own TPM 2.0 selftests, from the guest kernel's source
  (``/opt/tpm2-selftests``, made by harness/images.py): the classes 6.1's
  ``test_smoke.sh`` (SmokeTest, AsyncTest) and ``test_space.sh`` (SpaceTest) run. They
  test the kernel and the TPM as much as the path between, so they also run once in dom0
  against plain swtpm behind dom0's own vTPM proxy (harness/baseline_tpm.py): a test that
  fails in the guest must fail there too, or it is ours. Each test's result on both sides
  is printed and written to ``artifacts/external/tpm2-selftests-<target>.md``.
- Debian's tpm2-tools on ``/dev/tpm0`` through the device TCTI, no resource manager.
- Debian's tpm2-pytss (1.2, ``python3-tpm2-pytss``) in the guest's own Python, on
  ``device:/dev/tpm0`` and, where the kernel has a resource manager, ``/dev/tpmrm0``.

The selftests open ``/dev/tpm0``, which admits one opener: nothing here opens a harness
transport (``guest.transport()`` holds ``/dev/tpm0`` while it is open), and each run
first checks that no process in the guest holds it. Left behind for later scenarios:
nothing but PCR 1, which SmokeTest.test_unseal_with_wrong_policy extends and only a TPM
reset clears (no scenario reads it); PCR 16 is reset, transients flushed, NV removed.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.baseline_tpm import ProxySwtpm
from harness.paths import REPO_ROOT as ROOT
from harness.target import Dom0Shell
from harness.tpmwire import DEBUG_PCR, nv_index, pcr_extended
from harness.unittest_results import (
    Outcome,
    Row,
    SuiteRun,
    UnittestOutputError,
    compare,
    markdown_table,
    write_report,
)

pytestmark = [pytest.mark.external, pytest.mark.device, pytest.mark.needs("kernel-tpm")]

SELFTESTS = "/opt/tpm2-selftests"
# What 6.1's test_smoke.sh and test_space.sh run (tools/testing/selftests/tpm2).
SELFTEST_CLASSES = ("SmokeTest", "AsyncTest", "SpaceTest")
SELFTEST_TIMEOUT = 600  # the directory's kselftest "settings": timeout=600
REPORT_DIR = ROOT / "artifacts" / "external"
# The 6.1 selftests that open /dev/tpmrm0 (tpm2.Client.FLAG_SPACE): a guest kernel
# without a resource manager cannot run them. Stock xen-tpmfront never probes for TPM
# 2.0, so its kernel registers a TPM 1.2 chip and makes no /dev/tpmrm0.
NEEDS_TPMRM = ("SpaceTest.", "AsyncTest.test_flush_invalid_context")
NO_TPMRM = "no /dev/tpmrm0 in this guest (its kernel registered the vTPM as TPM 1.2)"
NV_INDEX = nv_index(0x80)

# (command, timeout) -> (exit code, stdout, stderr): guest.run, target.dom0_run.
Shell = Callable[[str, float], tuple[int, str, str]]


# -- the kernel's tpm2 selftests ----------------------------------------------------------
def run_selftests(run: Shell, where: str, cls: str) -> SuiteRun:
    """``python3 -m unittest -v tpm2_tests.CLS`` in ``/opt/tpm2-selftests``, as
    test_smoke.sh does; its results (exit code 1 only means a test failed)."""
    command = (
        f"cd {SELFTESTS} && timeout {SELFTEST_TIMEOUT} python3 -m unittest -v tpm2_tests.{cls}"
    )
    rc, out, err = run(command, SELFTEST_TIMEOUT + 60)
    try:
        return SuiteRun.from_output(err)
    except UnittestOutputError as e:
        pytest.fail(f"{where}: {command} exited {rc} (124: timed out): {e}\n{out}", pytrace=False)


def tpm0_holders(guest: Any) -> str:
    """Processes in the guest with ``/dev/tpm0`` open (pid and command line), if any."""
    script = (
        'for f in /proc/[0-9]*/fd/*; do [ "$(readlink "$f")" = /dev/tpm0 ] || continue; '
        'p=${f%/fd/*}; echo "${p#/proc/}: $(tr "\\0" " " <"$p/cmdline")"; done 2>/dev/null; '
        "exit 0"
    )
    return str(guest.run(script)[1]).strip()


def reset_guest_tpm(guest: Any) -> None:
    """What the selftests may leave: PCR 16 extended, transients or sessions loaded."""
    tools(
        guest,
        f"tpm2_pcrreset {DEBUG_PCR}\n"
        "tpm2_flushcontext -t\ntpm2_flushcontext -l\ntpm2_flushcontext -s",
    )


@dataclass
class Baseline:
    """The selftests' results in dom0 on plain swtpm, and what they ran on."""

    runs: dict[str, SuiteRun]
    swtpm: str


@dataclass
class SelftestReport:
    """The guest-vs-baseline table of every class run so far, rewritten after each."""

    path: Path
    preamble: list[str]
    guest: str
    rows: dict[str, list[Row]] = field(default_factory=dict)

    def add(self, cls: str, rows: list[Row]) -> str:
        self.rows[cls] = rows
        every = [row for per_class in self.rows.values() for row in per_class]
        write_report(
            self.path,
            "Kernel tpm2 selftests: guest vs dom0 baseline",
            self.preamble,
            markdown_table(every, self.guest, "dom0 baseline"),
        )
        return markdown_table(rows, self.guest, "dom0 baseline")


@pytest.fixture(scope="module")
def baseline(dom0_shell: Dom0Shell) -> Baseline:
    """The selftest classes once in dom0, against swtpm behind dom0's vTPM proxy. A
    class with no passing test there is a broken baseline, which would excuse every
    failure in the guest: that fails here, with swtpm's log."""
    with ProxySwtpm(dom0_shell.dom0_run) as tpm:
        runs = {cls: run_selftests(dom0_shell.dom0_run, "dom0", cls) for cls in SELFTEST_CLASSES}
        broken = [
            c for c, run in runs.items() if all(r.outcome is not Outcome.OK for r in run.results)
        ]
        if broken:
            pytest.fail(
                f"dom0 baseline: no test of {broken} passed on plain swtpm ({runs}); "
                f"swtpm in dom0:\n{tpm.log_tail()}",
                pytrace=False,
            )
    _, version, _ = dom0_shell.dom0_run("swtpm --version", 30)
    return Baseline(runs, version.split(",", 1)[0].strip())  # "TPM emulator version 0.7.1"


@pytest.fixture(scope="module")
def selftest_report(target: Any, guests: Any, baseline: Baseline) -> SelftestReport:
    guest = guests[0]
    _, source, _ = guest.run(f"cat {SELFTESTS}/SOURCE")
    _, kernel, _ = guest.run("uname -r")
    preamble = [
        f"- target: {target.name}; guest: {guest.name}, kernel {kernel.strip()}",
        f"- selftests: {source.strip()} (classes {', '.join(SELFTEST_CLASSES)})",
        f"- baseline: {baseline.swtpm}, `swtpm chardev --vtpm-proxy` in dom0 (same kernel)",
        "- guest only failure: fails in the guest but not on the baseline (a driver bug)",
    ]
    return SelftestReport(REPORT_DIR / f"tpm2-selftests-{target.name}.md", preamble, guest.name)


@pytest.mark.needs("dom0-shell")
@pytest.mark.parametrize("cls", SELFTEST_CLASSES)
def test_kernel_tpm2_selftests(
    target: Any,
    guest: Any,
    baseline: Baseline,
    selftest_report: SelftestReport,
    capsys: pytest.CaptureFixture[str],
    cls: str,
) -> None:
    """The kernel's selftest class in the guest: every test failing there also fails on
    the dom0 baseline, or cannot apply to the guest (``NEEDS_TPMRM`` without
    /dev/tpmrm0; the table says so)."""
    device = getattr(guest, "tpm_device", "/dev/tpm0")
    if device != "/dev/tpm0":
        pytest.skip(f"the selftests open /dev/tpm0; {guest.name}'s TPM is {device} now")
    holders = tpm0_holders(guest)
    assert not holders, f"/dev/tpm0 in {guest.name} is held open (a harness relay?):\n{holders}"
    try:
        run = run_selftests(guest.run, guest.name, cls)
    finally:
        reset_guest_tpm(guest)
    has_tpmrm = guest.run("test -c /dev/tpmrm0")[0] == 0
    if "tpm2-chip" in target.capabilities:  # no test may be excused there (issue 17)
        assert has_tpmrm, f"{guest.name} has a TPM 2.0 chip but no /dev/tpmrm0"
    excused = {
        r.test: NO_TPMRM
        for r in baseline.runs[cls].results
        if not has_tpmrm and r.test.startswith(NEEDS_TPMRM)
    }
    rows = compare(run, baseline.runs[cls], excused)
    table = selftest_report.add(cls, rows)
    with capsys.disabled():
        print(f"\ntpm2 selftests {cls} ({selftest_report.path}):\n{table}")
    ours = [row.test for row in rows if row.guest_only_failure]
    assert not ours, f"fail in {guest.name} but not on the dom0 baseline: {ours}\n{table}"


# -- tpm2-tools -----------------------------------------------------------------------------
def tcti(guest: Any) -> str:
    """tpm2-tools' device TCTI on the guest's TPM device (/dev/tpm0, or the chip a
    stock guest's kernel numbered anew after xl restore)."""
    return f"device:{getattr(guest, 'tpm_device', '/dev/tpm0')}"


def tools(guest: Any, script: str, timeout: float = 300.0) -> str:
    """Run ``script`` (tpm2-tools, one command a line, stopping at the first failure) in
    a scratch directory of the guest with ``TPM2TOOLS_TCTI=device:/dev/tpm0``; stdout.

    With no resource manager every object a tool loads stays loaded after it exits (the
    vTPM holds 3): ``t CMD`` runs CMD and flushes the transients.
    """
    command = (
        'd=$(mktemp -d) || exit 1; (set -e; cd "$d"; '
        f"export TPM2TOOLS_TCTI={tcti(guest)}; "
        't() { "$@"; tpm2_flushcontext -t; }\n'
        f'{script}\n); rc=$?; rm -rf "$d"; exit $rc'
    )
    rc, out, err = guest.run(command, timeout)
    assert rc == 0, (
        f"{guest.name}: tpm2-tools exited {rc}:\n{script}\nstdout:\n{out}\nstderr:\n{err}"
    )
    return str(out)


def pcr_values(out: str, pcr: int) -> list[bytes]:
    """Every value of ``pcr`` that tpm2_pcrread printed (``  16: 0x...``), in order."""
    return [bytes.fromhex(h) for h in re.findall(rf"^\s*{pcr}: 0x([0-9A-Fa-f]+)$", out, re.M)]


def test_tpm2_getrandom(guest: Any) -> None:
    out = tools(guest, "tpm2_getrandom --hex 16; echo\ntpm2_getrandom --hex 16; echo")
    first, second = out.split()
    assert re.fullmatch(r"[0-9a-f]{32}", first), out
    assert re.fullmatch(r"[0-9a-f]{32}", second), out
    assert first != second


def test_tpm2_getcap_says_tpm_2_0(guest: Any) -> None:
    out = tools(guest, "tpm2_getcap properties-fixed")
    assert re.search(
        r'^TPM2_PT_FAMILY_INDICATOR:\n\s+raw: 0x322E3000\n\s+value: "2\.0"$', out, re.M
    ), out


@pytest.fixture
def debug_pcr(guest: Any) -> Iterator[int]:
    """PCR 16 reset before and after."""
    tools(guest, f"tpm2_pcrreset {DEBUG_PCR}")
    yield DEBUG_PCR
    tools(guest, f"tpm2_pcrreset {DEBUG_PCR}")


def test_tpm2_pcrextend_then_pcrread(guest: Any, debug_pcr: int) -> None:
    digest = hashlib.sha256(b"xenvtpm external suites").digest()
    out = tools(
        guest,
        f"tpm2_pcrread sha256:{debug_pcr}\n"
        f"tpm2_pcrextend {debug_pcr}:sha256={digest.hex()}\n"
        f"tpm2_pcrread sha256:{debug_pcr}",
    )
    assert pcr_values(out, debug_pcr) == [bytes(32), pcr_extended(bytes(32), digest)], out


def test_tpm2_key_chain_signs_and_verifies(guest: Any) -> None:
    """createprimary, readpublic, create, load, sign, verifysignature; a changed message
    does not verify; nothing stays loaded."""
    out = tools(
        guest,
        "t tpm2_createprimary -C o -G ecc -c p.ctx -Q\n"
        "t tpm2_readpublic -c p.ctx\n"
        "t tpm2_create -C p.ctx -G ecc256 -u k.pub -r k.priv -Q\n"
        "t tpm2_load -C p.ctx -u k.pub -r k.priv -c k.ctx -Q\n"
        "printf 'xenvtpm external suites' >msg\n"
        "t tpm2_sign -c k.ctx -g sha256 -o sig msg\n"
        "t tpm2_verifysignature -c k.ctx -g sha256 -m msg -s sig\n"
        "echo verified\n"
        "printf 'changed' >msg\n"
        "if tpm2_verifysignature -c k.ctx -g sha256 -m msg -s sig 2>/dev/null; "
        "then echo changed-verified; else echo changed-rejected; fi\n"
        "tpm2_flushcontext -t\n"
        "echo transients: $(tpm2_getcap handles-transient)",
    )
    assert re.search(r"^type:\n\s+value: ecc$", out, re.M), out
    assert re.search(r"^name: 000b[0-9a-f]{64}$", out, re.M), out
    lines = out.splitlines()
    assert "verified" in lines and "changed-rejected" in lines, out
    assert "transients:" in lines, out  # nothing listed after it


def test_tpm2_nv_define_write_read_undefine(guest: Any) -> None:
    index = f"{NV_INDEX:#x}"
    data = "xenvtpm external nv"
    remove = f"TPM2TOOLS_TCTI={tcti(guest)} tpm2_nvundefine {index} -C o 2>/dev/null"
    guest.run(remove)  # left by an interrupted run
    try:
        out = tools(
            guest,
            f"tpm2_nvdefine {index} -C o -s 32 -a 'ownerread|ownerwrite'\n"
            f"printf {shlex.quote(data)} >data\n"
            f"tpm2_nvwrite {index} -C o -i data\n"
            f"echo read: $(tpm2_nvread {index} -C o -s {len(data)})\n"
            f"tpm2_nvreadpublic {index}\n"
            f"tpm2_nvundefine {index} -C o\n"
            "echo left: $(tpm2_getcap handles-nv-index)",
        )
    finally:
        guest.run(remove)
    assert f"read: {data}" in out.splitlines(), out
    assert re.search(
        rf"^{index}:\n(?:\s+.*\n)*?\s+friendly: ownerwrite\|ownerread\|written$", out, re.M
    ), out
    assert re.search(r"^\s+size: 32$", out, re.M), out
    left = out.rsplit("left:", 1)[1].lower()
    assert index not in left, out


# Run by the guest's own python3 with Debian's tpm2-pytss: random bytes and the TPM's
# family, through ESAPI on the device TCTI named in argv[1].
PYTSS_SCRIPT = """
import sys
from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_PT
with ESAPI("device:" + sys.argv[1]) as esys:
    first, second = bytes(esys.get_random(16)), bytes(esys.get_random(16))
    _, caps = esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.FAMILY_INDICATOR, 1)
    family = caps.data.tpmProperties.tpmProperty[0].value
    print(first.hex(), second.hex(), hex(family))
"""


def pytss_check(guest: Any, device: str) -> tuple[str, str]:
    """The guest's tpm2-pytss on ``device``: ("ok", family) or ("failed", why)."""
    rc, out, err = guest.run(f"python3 -c {shlex.quote(PYTSS_SCRIPT)} {device}")
    words = out.split()
    if rc != 0 or len(words) != 3:
        return "failed", (err.strip().splitlines() or [f"exit {rc}: {out!r}"])[-1]
    first, second, family = words
    if not re.fullmatch(r"[0-9a-f]{32}", first) or first == second:
        return "failed", f"GetRandom gave {first} then {second}"
    if family != "0x322e3000":
        return "failed", f"TPM_PT_FAMILY_INDICATOR {family}, not '2.0'"
    return "ok", "2.0"


def test_tpm2_pytss_in_the_guests_own_python(target: Any, guest: Any) -> None:
    """ESAPI of the guest's own tpm2-pytss on its TPM device, and on /dev/tpmrm0 where
    its kernel registered a TPM 2.0 chip: 16 random bytes twice, family "2.0". Each
    device's result goes to ``artifacts/external/tpm2-pytss-<target>.md``."""
    chip = str(guest.tpm_device)
    rm = chip.replace("/tpm", "/tpmrm")
    has_rm = guest.run(f"test -c {rm}")[0] == 0
    results = {
        device: pytss_check(guest, device) for device in [chip, rm] if has_rm or device == chip
    }
    _, versions, _ = guest.run(
        "dpkg-query -W -f '${Package} ${Version}\\n' python3-tpm2-pytss libtss2-esys-3.0.2-0"
    )
    _, kernel, _ = guest.run("uname -r")
    rows = [f"| `device:{d}` | {outcome} | {detail} |" for d, (outcome, detail) in results.items()]
    if not has_rm:
        rows.append(f"| `device:{rm}` | n/a | {NO_TPMRM} |")
    write_report(
        REPORT_DIR / f"tpm2-pytss-{target.name}.md",
        "tpm2-pytss in the guest's own Python",
        [
            f"- target: {target.name}; guest: {guest.name}, kernel {kernel.strip()}",
            *(f"- {line}" for line in versions.strip().splitlines()),
            "- check: ESAPI on the device TCTI, GetRandom(16) twice, TPM_PT_FAMILY_INDICATOR",
        ],
        "| TCTI | result | family, or why not |\n|---|---|---|\n" + "\n".join(rows) + "\n",
    )
    print(f"\ntpm2-pytss in {guest.name}: {results}")
    failed = {d: why for d, (outcome, why) in results.items() if outcome != "ok"}
    assert not failed, failed
