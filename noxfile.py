"""Every entry point a user runs: ``nox -s tests``, ``nox -s sim``, ``nox -s lint``;
``nox -s xen`` (Xen under QEMU) and ``nox -s certify -- root@HOST`` (a real Xen host).

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

# harness.paths.REPO_ROOT, repeated: nox imports this file before the package is installed.
ROOT = Path(__file__).parent
ARTIFACTS = ROOT / "artifacts"

# swtpm runs the vTPMs; libtss2-dev, pkg-config and gcc build tpm2-pytss.
DEBIAN_PACKAGES = ["swtpm", "swtpm-tools", "libtss2-dev", "pkg-config", "gcc"]
HARNESS = [
    "tpm2-pytss==3.0.0",
    "cryptography>=41",
    "pytest>=8",
    "hypothesis>=6.100",
    "pytest-xdist>=3.5",  # nox -s sim -- -n 2: workers with environments of their own
]
LINT = ["ruff>=0.6", "mypy>=1.10", "pytest>=8", "hypothesis>=6.100", "cryptography>=41"]
# Real Xen under QEMU (sessions images and xen only): host tools and SSH/console libraries.
XEN_DEBIAN_PACKAGES = [
    "qemu-system-x86",
    "qemu-utils",  # qemu-img: the run's qcow2 overlays over the cached images
    "debootstrap",
    "e2fsprogs",
    "openssh-client",
    # harness.kbuild builds --tpmfront-source against the guest kernel's headers: their
    # .kernelvariables names gcc-12 (Debian's kernel compiler), and linux-kbuild's prebuilt
    # objtool links libelf1 (ldd). dpkg-deb comes with dpkg, which is essential.
    "gcc-12",
    "make",
    "libelf1",
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
            f"missing Debian packages; as root run:\n  apt-get update && {' '.join(command)}"
        )
    session.log(f"installing Debian packages: {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    # run_install: installing is what --install-only (a venv prepared ahead) must still do
    session.run_install("apt-get", "update", "-q", external=True, env=env)
    session.run_install(*command, external=True, env=env)


def install_harness(session: nox.Session, *extra: str) -> None:
    ensure_debian_packages(session, DEBIAN_PACKAGES)
    session.install(*HARNESS, *extra)
    session.install("-e", ".", "--no-deps")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests of the driver pair over the simulated Xen (and of the
    Xen harness's pure parts, which import paramiko). setuptools: the wheel test builds
    without build isolation, so the venv must have the build backend itself."""
    install_harness(session, *XEN_PYTHON, "setuptools>=64")
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
    """ruff's lint and format check over the whole tree; mypy strict over the package,
    the harness, the tests and examples, then over the scenarios and conftest.py."""
    session.install(*LINT)
    tree = [
        "xenvtpm", "harness", "scenarios", "tests", "examples", "deploy", "noxfile.py",
        "conftest.py",
    ]  # fmt: skip
    session.run("ruff", "check", *tree)
    session.run("ruff", "format", "--check", *tree)
    session.run("mypy")
    # The scenarios in a run of their own: their module names (test_faults, ...) are also
    # those of tests/, which one mypy run would take for duplicates.
    session.run("mypy", "scenarios", "conftest.py")


@nox.session(python=False)
def deb(session: nox.Session) -> None:
    """The Debian package: artifacts/deb/xenvtpm_<version>_all.deb (deploy/deb.py; the
    driver pair, its systemd units and docs; reproducible, dpkg-deb only), then lintian
    over it: any error fails the session (issue 18)."""
    ensure_debian_packages(session, ["lintian"])
    out = ARTIFACTS / "deb"
    session.run("python3", "deploy/deb.py", str(out), external=True)
    (package,) = sorted(out.glob("xenvtpm_*_all.deb"))
    session.run("lintian", "--fail-on", "error", "--info", str(package), external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: the driver's latency against direct swtpm, and scaling to many guests.

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


def orphan_qemu_pids() -> set[int]:
    """Running QEMUs whose parent is gone (reparented to pid 1): what a suite that did
    not clean up leaves; a QEMU another running program owns has a live parent."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if comm.startswith("qemu-system") and ppid == 1:
                pids.add(int(entry.name))
    return pids


# The kinds of guest ``nox -s xen`` runs the suite on, in order: our frontend (through
# tpm_vtpm_proxy), the guest kernels' own xen-tpmfront (protocol v2), and the same with
# the patches of linux/xen-tpmfront/ (a TPM 2.0 chip).
XEN_GUEST_KINDS = {"python": "xen", "kernel": "xen-kernel", "kernel-tpm2": "xen-kernel-tpm2"}


@nox.session
def xen(session: nox.Session) -> None:
    """Boot Xen 4.17 + dom0 under QEMU with 2 PV guests and run the whole scenario suite
    through their kernels' /dev/tpm0, once per kind of guest: with our frontend
    (``--target xen``), with stock xen-tpmfront (``--target xen-kernel``), and with
    xen-tpmfront patched for TPM 2.0 (``--target xen-kernel-tpm2``).

    ``nox -s xen -- --kind kernel [pytest args]`` runs one kind; ``-- -m powercut`` runs
    the opt-in power-cut scenario (a cold boot, about 4 minutes per kind). Each kind writes
    artifacts/<target>/junit.xml and its logs; the session fails if any kind failed or
    a QEMU of the run is left behind.

    Bring your own build (harness/own_build.py): ``--xen FILE``, ``--dom0-kernel FILE``,
    ``--guest-kernel FILE --guest-modules DIR|TAR``, ``--tpmfront FILE.ko`` or
    ``--tpmfront-source DIR`` (stock guests only: the kernel kind alone runs unless
    --kind says otherwise), ``--driver GITREF|DIR``. Each is checked before QEMU starts
    and recorded with its sha256 in artifacts/<target>/own-build.json.
    """
    ensure_debian_packages(session, XEN_DEBIAN_PACKAGES)
    install_harness(session, *XEN_PYTHON)
    kinds, pytest_args = list(XEN_GUEST_KINDS), list(session.posargs)
    if "--kind" in pytest_args:
        i = pytest_args.index("--kind")
        if i + 1 >= len(pytest_args) or pytest_args[i + 1] not in XEN_GUEST_KINDS:
            session.error(f"--kind takes one of {', '.join(XEN_GUEST_KINDS)}")
        kinds = [pytest_args[i + 1]]
        del pytest_args[i : i + 2]
    elif {"--tpmfront", "--tpmfront-source"} & {a.split("=", 1)[0] for a in pytest_args}:
        kinds = ["kernel"]
        session.log("xen: --tpmfront replaces the stock guests' driver: the kernel kind only")
    before = orphan_qemu_pids()  # e.g. a `harness up` machine
    failed = []
    try:
        for kind in kinds:
            target = XEN_GUEST_KINDS[kind]
            out = ARTIFACTS / target
            session.log(f"xen: the scenario suite on {kind} guests (--target {target})")
            try:
                session.run(
                    "pytest",
                    "scenarios",
                    f"--target={target}",
                    "--guests=2",
                    f"--junitxml={out / 'junit.xml'}",
                    f"--artifacts={out}",
                    *pytest_args,
                )
            except nox.command.CommandFailed:
                failed.append(f"{kind} (artifacts/{target}/)")
    finally:
        left = orphan_qemu_pids() - before
        if left:
            for pid in left:
                os.kill(pid, 9)
            session.error(f"QEMU left running after the suite (killed): pids {sorted(left)}")
    if failed:
        session.error(f"scenarios failed on: {', '.join(failed)}")


@nox.session
def certify(session: nox.Session) -> None:
    """A real Xen host: the xen scenarios on an existing host, and a report of it.

    ``nox -s certify -- root@HOST[:PORT] --host-guest NAME[=ADDRESS] [...] [--ssh-key KEY]
    [--known-hosts FILE] [--accept-new-host-keys] [--guest-kind kernel] [--destructive]
    [--driver GITREF|DIR] [--tpmfront FILE.ko] [pytest args]``.
    Host keys not in ~/.ssh/known_hosts or FILE are refused unless
    --accept-new-host-keys; --guest-kind kernel tests the guests' own xen-tpmfront (or
    the --tpmfront given); --destructive allows restarts, killed swtpm and xl reboot;
    --driver certifies another build of the driver (recorded with its sha256). Writes
    artifacts/certify/junit.xml and report.md (driver commit, Xen, dom0 and guest
    versions, each login's host key, each scenario's result); the host's logs go to
    artifacts/certify/host/. See README, "Certifying a real Xen host".
    """
    if not session.posargs or session.posargs[0].startswith("-"):
        session.error(
            "usage: nox -s certify -- root@HOST[:PORT] --host-guest NAME[=ADDRESS] "
            "[--host-guest ...] [--ssh-key KEY] [--known-hosts FILE] "
            "[--accept-new-host-keys] [--guest-kind kernel] [--destructive] "
            "[--driver GITREF|DIR] [--tpmfront FILE.ko] [pytest args]"
        )
    host, rest = session.posargs[0], session.posargs[1:]
    url = host if host.startswith("ssh://") else f"ssh://{host}"
    install_harness(session, *XEN_PYTHON)
    out = ARTIFACTS / "certify"
    for stale in ("junit.xml", "report.md", "host/versions.json", "host/known_hosts"):
        (out / stale).unlink(missing_ok=True)
    junit, report = out / "junit.xml", out / "report.md"
    try:
        session.run(
            "pytest",
            "scenarios",
            f"--target={url}",
            f"--junitxml={junit}",
            f"--artifacts={out}",
            "-o",
            "junit_suite_name=xenvtpm-certify",
            *rest,
            env={"XENVTPM_ARTIFACTS": str(out / "host")},
        )
    finally:
        said = session.run(
            "python",
            "-m",
            "harness.certify_report",
            f"--junit={junit}",
            f"--versions={out / 'host' / 'versions.json'}",
            f"--out={report}",
            f"--host={url.removeprefix('ssh://')}",
            success_codes=[0, 1, 2],  # PASSED, FAILED, PARTIAL
            silent=True,
        )
        session.log(str(said).strip())
    if not str(said).startswith("certify: PASSED"):  # pytest passed, but skips made it PARTIAL
        session.error(f"the host is not certified: {str(said).strip()}")


@nox.session
def fuzz(session: nox.Session) -> None:
    """Fuzz what a guest controls: request intake, ring, TPM header, xenstore wire, server.

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
