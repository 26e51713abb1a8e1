"""Every entry point a user runs: ``nox -s tests``, ``nox -s sim``, ``nox -s lint``.

Sessions install what they need themselves: Debian packages with apt-get when run as
root (otherwise they print the exact command and stop), PyPI packages into nox's venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "sim"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
ARTIFACTS = ROOT / "artifacts"

# swtpm runs the vTPMs; libtss2-dev, pkg-config and gcc build tpm2-pytss.
DEBIAN_PACKAGES = ["swtpm", "swtpm-tools", "libtss2-dev", "pkg-config", "gcc"]
HARNESS = ["tpm2-pytss==3.0.0", "cryptography>=41", "pytest>=8", "hypothesis>=6.100"]
LINT = ["ruff>=0.6", "mypy>=1.10", "pytest>=8", "hypothesis>=6.100", "cryptography>=41"]
# Real Xen under QEMU (sessions images and xen only): host tools and SSH/console libraries.
XEN_DEBIAN_PACKAGES = [
    "qemu-system-x86",
    "qemu-utils",  # qemu-img: the run's qcow2 overlays over the cached images
    "debootstrap",
    "e2fsprogs",
    "openssh-client",
]
XEN_PYTHON = ["paramiko>=3", "pexpect>=4.8"]


def missing_debian_packages(packages: list[str]) -> list[str]:
    missing = []
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        )
        if "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def ensure_debian_packages(session: nox.Session, packages: list[str]) -> None:
    """Install missing Debian packages as root; otherwise say exactly what to run."""
    if shutil.which("dpkg-query") is None:
        session.warn("not a Debian system: make sure these are installed: " + " ".join(packages))
        return
    missing = missing_debian_packages(packages)
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        session.error(
            "missing Debian packages; as root run:\n"
            f"  apt-get update && {' '.join(command)}"
        )
    session.log(f"installing Debian packages: {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-q", external=True, env=env)
    session.run(*command, external=True, env=env)


def install_harness(session: nox.Session, *extra: str) -> None:
    ensure_debian_packages(session, DEBIAN_PACKAGES)
    session.install(*HARNESS, *extra)
    session.install("-e", ".", "--no-deps")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests of the driver pair over the simulated Xen."""
    install_harness(session)
    junit = ARTIFACTS / "tests" / "junit.xml"
    session.run("pytest", "tests", f"--junitxml={junit}", *session.posargs)


@nox.session
def sim(session: nox.Session) -> None:
    """The main job: every scenario on the simulated Xen, with 2 guests."""
    install_harness(session)
    out = ARTIFACTS / "sim"
    session.run(
        "pytest",
        "scenarios",
        "--target=sim",
        "--guests=2",
        f"--junitxml={out / 'junit.xml'}",
        f"--artifacts={out}",
        *session.posargs,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy over the driver pair and the harness."""
    session.install(*LINT)
    session.run("ruff", "check", "xenvtpm", "harness", "scenarios", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "xenvtpm", "harness")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (issue 6): driver vs direct swtpm latency, and scale to many guests.

    Options after ``--``: ``--quick`` (under 3 minutes), ``--target sim|xen``,
    ``--out DIR`` (default artifacts/bench). Writes bench.json, a PNG and a table.
    ``--target xen`` boots Xen under QEMU (as ``nox -s xen``) and adds a ``xen`` key.
    """
    if "xen" in session.posargs or "--target=xen" in session.posargs:
        ensure_debian_packages(session, XEN_DEBIAN_PACKAGES)
        install_harness(session, *XEN_PYTHON)
    else:
        install_harness(session, "matplotlib>=3.7", "py-spy>=0.3")
    session.run("python", "-m", "harness.bench", *session.posargs)


@nox.session
def images(session: nox.Session) -> None:
    """Build (or reuse from ~/.cache/xenvtpm/images) the dom0 and guest images for Xen."""
    ensure_debian_packages(session, XEN_DEBIAN_PACKAGES)
    session.install(*XEN_PYTHON, "cryptography>=41")
    session.install("-e", ".", "--no-deps")
    session.run("python", "-m", "harness.images", *session.posargs)


@nox.session
def xen(session: nox.Session) -> None:
    """Boot Xen 4.17 + dom0 under QEMU, start 2 PV guests, run the xen scenarios."""
    ensure_debian_packages(session, XEN_DEBIAN_PACKAGES)
    install_harness(session, *XEN_PYTHON)
    out = ARTIFACTS / "xen"
    session.run(
        "pytest",
        "scenarios",
        "--target=xen",
        "--guests=2",
        f"--junitxml={out / 'junit.xml'}",
        f"--artifacts={out}",
        *session.posargs,
    )


@nox.session
def fuzz(session: nox.Session) -> None:
    """Fuzzing (issue 5): backend request intake, ring, TPM header, xenstore wire + server.

    ``--seconds N`` (default 60) bounds the campaign; ``--target NAME`` (repeatable),
    ``--engine atheris|hypothesis``. Coverage-guided with atheris when it installs,
    else hypothesis. Crashing or hanging inputs go to artifacts/fuzz/. Last line:
    ``fuzz: N inputs, C crashes, H hangs``.
    """
    session.install("hypothesis>=6.100")
    try:
        session.install("atheris>=2.3")
    except nox.command.CommandFailed:
        session.warn("atheris does not install here: fuzzing with hypothesis instead")
    session.install("-e", ".", "--no-deps")
    session.run("python", "-m", "harness.fuzz", *session.posargs)
