"""The root conftest's contract, run as a user would: pytest on a scenario file.

The direct target (plain swtpm) keeps this fast and independent of the driver pair.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT
from harness.process import all_procs, proc_cmdline


def inner_env() -> dict[str, str]:
    """The environment of an inner pytest run: ours, minus pytest-xdist's worker id,
    which would make the inner run file its logs under a worker's directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return {**env, "PYTHONPATH": str(REPO_ROOT)}


def inner_pytest(
    tmp_path: Path, name: str, scenario: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``scenario`` as ``name`` under the repository's conftest.py in ``tmp_path``."""
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "conftest.py").read_text())
    (tmp_path / name).write_text(textwrap.dedent(scenario))
    return subprocess.run(
        [sys.executable, "-m", "pytest", name, "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env=inner_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


pytestmark = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
    reason="swtpm and swtpm_setup are not installed",
)
pytest.importorskip("tpm2_pytss")

SCENARIO = """
import struct
import pytest
from tpm2_pytss import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, ESYS_TR
from harness import tpmwire

def test_raw(raw_tpm):
    assert raw_tpm.transmit(tpmwire.get_random(8))[6:10] == b"\\0\\0\\0\\0"

def test_leaves_a_transient_object(esapi):
    esapi.create_primary(TPM2B_SENSITIVE_CREATE(), "ecc256")
    # left loaded on purpose: the fixture must flush it

def test_nothing_left_loaded(raw_tpm):
    resp = tpmwire.Response.from_bytes(
        raw_tpm.transmit(tpmwire.get_capability_handles(0x80000000)))
    assert tpmwire.parse_handles(resp)[1] == []

def test_guests(target, guests, guest):
    assert len(guests) == 2 and guest is guests[0]
    assert guests[0].instance != guests[1].instance
    assert "kill-swtpm" in target.capabilities

@pytest.mark.needs("reboot")
def test_needs_reboot(target):
    raise AssertionError("must be skipped on direct")

@pytest.mark.needs("multi-guest", "kill-swtpm")
def test_needs_what_direct_has(target):
    pass

def test_kill_swtpm_recovers(target, guest):
    pid = target.swtpm_pid(guest)
    target.kill_swtpm(guest)
    assert target.swtpm_pid(guest) not in (None, pid)
    with guest.transport() as t:
        assert t.transmit(tpmwire.get_random(8))[6:10] == b"\\0\\0\\0\\0"

def test_fails_on_purpose(guest):
    assert False, "deliberate"
"""


def test_fixture_contract_on_direct(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    result = inner_pytest(
        tmp_path,
        "test_contract.py",
        SCENARIO,
        "--target",
        "direct",
        "-rs",
        f"--junitxml={artifacts / 'junit.xml'}",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "6 passed" in out and "1 failed" in out and "1 skipped" in out, out
    assert "target direct lacks capability reboot" in out
    # The failing test's report names the logs; the summary table lists every scenario.
    assert "xenvtpm logs" in out and "swtpm-guest0: " in out
    assert "xenvtpm summary (target direct)" in out
    assert "test_contract.py::test_fails_on_purpose" in out and "failed" in out
    # Every daemon log of a failing run lands in artifacts/logs.
    assert (artifacts / "logs" / "swtpm-guest0.log").exists()
    assert (artifacts / "junit.xml").exists()
    assert "[harness] bringing up target direct" in out
    # Nothing is left running.
    runs = [line.split()[-1] for line in out.splitlines() if "kept run directory" in line]
    assert runs, out
    cmds = [proc_cmdline(p.pid) for p in all_procs() if p.running]
    assert not [c for c in cmds if any(runs[0] in a for a in c)]
    shutil.rmtree(runs[0], ignore_errors=True)


ATTACHED = """
import pytest
from harness import tpmwire

def test_raw_on_each_guest(guests):
    for g in guests:
        with g.transport() as t:
            assert t.transmit(tpmwire.get_random(8))[6:10] == b"\\0\\0\\0\\0"

@pytest.mark.needs("restart-manager")
def test_would_disturb(target):
    raise AssertionError("must be skipped when attached")
"""


def test_attach_to_a_running_environment(tmp_path: Path) -> None:
    """``harness up``; ``pytest --attach`` twice against it; ``harness down``."""
    run = Path(f"/tmp/xvt-attach-{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XENVTPM_RUN": str(run)}
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "conftest.py").read_text())
    (tmp_path / "test_attached.py").write_text(textwrap.dedent(ATTACHED))

    def pytest_attached() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "test_attached.py",
                "--attach",
                "-rs",
                "-p",
                "no:cacheprovider",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    harness = [sys.executable, "-m", "harness"]
    try:
        nothing = pytest_attached()
        assert nothing.returncode != 0 and "nothing is up" in nothing.stdout + nothing.stderr
        up = subprocess.run(
            [*harness, "up", "--target", "direct"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert up.returncode == 0, up.stderr
        for _ in range(2):  # the environment outlives each run
            result = pytest_attached()
            out = result.stdout + result.stderr
            assert result.returncode == 0, out
            assert "1 passed, 1 skipped" in out
            assert "target direct (attached) lacks capability restart-manager" in out
    finally:
        subprocess.run([*harness, "down"], env=env, capture_output=True, timeout=60, check=False)
        shutil.rmtree(run, ignore_errors=True)


OPT_IN = """
import pytest

@pytest.mark.powercut
def test_cuts_power():
    pass

def test_ordinary():
    pass
"""


@pytest.mark.parametrize(
    ("select", "expected"),
    [([], "1 passed, 1 skipped"), (["-m", "powercut"], "1 passed, 1 deselected")],
)
def test_power_cut_scenarios_run_only_when_selected(
    tmp_path: Path, select: list[str], expected: str
) -> None:
    result = inner_pytest(tmp_path, "test_opt_in.py", OPT_IN, "--target", "direct", "-rs", *select)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert expected in out, out
    if not select:
        assert "opt-in (a cold boot of Xen under TCG takes minutes): -m powercut" in out


KEPT = """
from harness import tpmwire

def test_passes(raw_tpm):
    assert raw_tpm.transmit(tpmwire.get_random(8))[6:10] == b"\\0\\0\\0\\0"

def test_fails(raw_tpm):
    raw_tpm.transmit(tpmwire.get_random(8))
    assert False, "deliberate"

def test_after(raw_tpm):
    assert raw_tpm.transmit(tpmwire.get_random(4))[6:10] == b"\\0\\0\\0\\0"
"""


def test_keep_on_failure_leaves_the_environment_for_harness(tmp_path: Path) -> None:
    """The run stops at the first failure and hands the sim environment to ``harness``:
    ``status`` sees it running, ``pytest --attach`` runs the next scenario on it, and
    ``harness down`` stops it all."""
    run = Path(f"/tmp/xvt-keep-{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XENVTPM_RUN": str(run)}
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "conftest.py").read_text())
    (tmp_path / "test_kept.py").write_text(textwrap.dedent(KEPT))
    harness = [sys.executable, "-m", "harness"]

    def pytest_run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "test_kept.py", "-p", "no:cacheprovider", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        return result.stdout + result.stderr

    try:
        out = pytest_run("--target", "sim", "--keep-on-failure")
        assert "1 failed, 1 passed" in out and "test_after" not in out.split("summary")[-1], out
        assert "kept sim running after the first failure:" in out, out
        assert "python -m harness down" in out
        status = subprocess.run(
            [*harness, "status"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert status.returncode == 0, status.stdout + status.stderr
        again = pytest_run("--attach", "-k", "test_after")
        assert "1 passed" in again, again
        refused = pytest_run("--target", "sim", "--keep-on-failure")
        assert "an environment is already up" in refused, refused
    finally:
        subprocess.run([*harness, "down"], env=env, capture_output=True, timeout=60, check=False)
        shutil.rmtree(run, ignore_errors=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "xen"], "--target xen would start one machine per"),
        (["--attach"], "--attach shares one environment"),
        (["--keep-on-failure"], "--keep-on-failure keeps one environment"),
    ],
)
def test_workers_are_refused_where_they_would_share_or_crowd(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """``-n`` spreads scenarios over sim environments only (README, Quick start)."""
    pytest.importorskip("xdist")
    result = inner_pytest(tmp_path, "test_nothing.py", NOTHING, "-n", "2", *args)
    out = result.stdout + result.stderr
    assert result.returncode == 4 and message in out, out


NOTHING = "def test_nothing():\n    pass\n"

CAPABILITY_SCENARIO = """
def test_reboots(reboots):
    pass

def test_cuts_power(power_cut):
    pass
"""


def test_a_capability_fixture_skips_before_the_target_comes_up(tmp_path: Path) -> None:
    """A scenario that takes a capability the target lacks is skipped with its name,
    and when every selected scenario is, no target is brought up at all."""
    result = inner_pytest(
        tmp_path, "test_caps.py", CAPABILITY_SCENARIO, "--target", "direct", "-rs"
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "2 skipped" in out, out
    assert "target direct lacks capability reboot" in out
    assert "target direct lacks capability power-cut" in out
    assert "bringing up target" not in out
