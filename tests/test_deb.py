"""The Debian package (deploy/deb.py, ``nox -s deb``): what it holds, that the installed
tree runs on its own, and that the same sources give the same bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "deploy"))
import deb  # deploy/ is a folder of tools, not a package: on the path above

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="not a Debian host")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deb.build(tmp_path_factory.mktemp("deb"))


def field(package: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(package), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_the_control_fields(package: Path) -> None:
    assert package.name == f"xenvtpm_{deb.version()}_all.deb"
    assert field(package, "Package") == "xenvtpm"
    assert field(package, "Architecture") == "all"
    depends = field(package, "Depends")
    for needed in ("python3 (>= 3.11)", "libxenstore4", "libxengnttab1", "libxenevtchn1"):
        assert needed in depends
    assert {"swtpm", "swtpm-tools"} <= set(field(package, "Recommends").split(", "))
    # util-linux (--confine-swtpm) is essential: lintian refuses it unversioned
    assert "util-linux" not in field(package, "Recommends")


def test_it_holds_every_source_the_units_and_nothing_else(package: Path) -> None:
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(package)], capture_output=True, text=True, check=True
    ).stdout
    files = {line.split()[-1].removeprefix("./") for line in listing.splitlines()}
    python = {f for f in files if f.startswith(deb.PYTHON_DIR) and f.endswith(".py")}
    assert python == {f"{deb.PYTHON_DIR}/{rel}" for rel in deb.sources()}
    assert not {f for f in files if "__pycache__" in f or f.endswith(".pyc")}
    units = {f"{deb.UNIT_DIR}/{u.name}" for u in (REPO_ROOT / "deploy" / "systemd").iterdir()}
    assert units <= files and len(units) == 3
    assert not any(f.startswith(("harness", "tests", "scenarios")) for f in files)
    owners = {tuple(line.split()[1].split("/")) for line in listing.splitlines()}
    assert owners == {("root", "root")}


def test_the_installed_tree_runs_with_nothing_but_python(package: Path, tmp_path: Path) -> None:
    """Unpacked as dpkg would install it, away from this checkout: every daemon's command
    line answers --help, with the standard library alone (``-S``: no site packages)."""
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(package), str(root)], check=True)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(root / deb.PYTHON_DIR)}
    for command in ("manager", "backend", "frontend", "attach"):
        result = subprocess.run(
            [sys.executable, "-S", "-m", "xenvtpm", command, "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
    if shutil.which("systemd-analyze"):
        for unit in sorted((root / deb.UNIT_DIR).glob("*.service")):
            verify = subprocess.run(
                ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
            )
            assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


def test_the_same_sources_give_the_same_package(package: Path, tmp_path: Path) -> None:
    again = deb.build(tmp_path)
    assert (
        hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(package.read_bytes()).digest()
    )


def test_the_packaged_units_run_the_installed_package_not_a_copied_folder(
    package: Path, tmp_path: Path
) -> None:
    """The units of deploy/systemd/ start in /opt/xenvtpm when it exists (the copied
    folder's home); the package's must not, or a folder left there would shadow what
    the package installed. Every other line is the same."""
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(package), str(root)], check=True)
    for source in sorted((REPO_ROOT / "deploy" / "systemd").glob("*.service")):
        packaged = (root / deb.UNIT_DIR / source.name).read_text().splitlines()
        assert not [line for line in packaged if line.startswith("WorkingDirectory=")]
        assert packaged == [
            line
            for line in source.read_text().splitlines()
            if not line.startswith("WorkingDirectory=")
        ]


def test_it_packages_another_source_folder(tmp_path: Path) -> None:
    """``--driver GITREF|DIR`` of the Xen harness: the package holds that folder's
    sources, not this checkout's."""
    source = tmp_path / "src" / "xenvtpm"
    shutil.copytree(REPO_ROOT / "xenvtpm", source, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "marker.py").write_text("MARK = 1\n")
    built = deb.build(tmp_path / "out", source=source)
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(built)], capture_output=True, text=True, check=True
    ).stdout
    assert f"./{deb.PYTHON_DIR}/xenvtpm/marker.py" in listing


def test_pip_builds_a_wheel_with_the_console_scripts(tmp_path: Path) -> None:
    """Issue 18: ``pip install .`` builds a wheel with the console scripts, ``xenvtpm``
    (the driver's daemons and tools) and ``harness``. Built from a copy of the tree, so
    that nothing is left in the checkout."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, tree / name)
    for package in ("xenvtpm", "harness"):
        shutil.copytree(
            REPO_ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    wheel_command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*wheel_command, "-q", "-w", str(tmp_path / "dist"), str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("xenvtpm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert "xenvtpm = xenvtpm.__main__:main" in scripts, scripts
    assert "harness = harness.cli:main" in scripts, scripts
    assert "xenvtpm/__main__.py" in names and "xenvtpm/manager/manager.py" in names
