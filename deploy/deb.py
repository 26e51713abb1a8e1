"""Build ``xenvtpm_<version>_all.deb``: the driver pair, its systemd units and docs, as a
Debian 12 host installs them (``python3 deploy/deb.py OUT_DIR``, or ``nox -s deb``).

Standard library only, and ``dpkg-deb`` (dpkg is essential on Debian), so it builds on
any Debian machine with no toolchain. The package holds:

- ``/usr/lib/python3/dist-packages/xenvtpm/``: the package folder, sources only;
- ``/lib/systemd/system/xenvtpm-*.service``: deploy/systemd/, not enabled by the install;
- ``/usr/share/doc/xenvtpm/``: the README, docs/ and deploy/README.md.

It depends on what every host needs (python3, Xen's libxenstore, libxengnttab and
libxenevtchn, which the real adapter opens by ctypes) and recommends what only dom0
needs (swtpm, swtpm-tools, util-linux's unshare, prlimit and setpriv).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON_DIR = "usr/lib/python3/dist-packages"
UNIT_DIR = "lib/systemd/system"
DOC_DIR = "usr/share/doc/xenvtpm"
DEPENDS = "python3 (>= 3.11), libxenstore4, libxengnttab1, libxenevtchn1"
RECOMMENDS = "swtpm, swtpm-tools, util-linux"
POSTINST = """#!/bin/sh
set -e
# The units are installed, not enabled: dom0 enables the manager and the backend, a
# guest with our frontend enables xenvtpm-frontend (/usr/share/doc/xenvtpm/deploy.md).
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
"""


def version() -> str:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    found = re.search(r'^version = "([^"]+)"', text, re.M)
    if found is None:
        raise SystemExit("no version in pyproject.toml")
    return found.group(1)


def sources() -> list[Path]:
    """The package's files: every .py under xenvtpm/, no caches, no build leftovers."""
    return sorted(
        p.relative_to(REPO_ROOT)
        for p in (REPO_ROOT / "xenvtpm").rglob("*.py")
        if "__pycache__" not in p.parts
    )


def _copy(src: Path, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def stage(root: Path) -> int:
    """Lay the package's tree out under ``root``; its installed size in KiB."""
    for rel in sources():
        _copy(REPO_ROOT / rel, root / PYTHON_DIR / rel)
    for unit in sorted((REPO_ROOT / "deploy" / "systemd").glob("*.service")):
        _copy(unit, root / UNIT_DIR / unit.name)
    docs = root / DOC_DIR
    _copy(REPO_ROOT / "README.md", docs / "README.md")
    _copy(REPO_ROOT / "deploy" / "README.md", docs / "deploy.md")
    for doc in sorted((REPO_ROOT / "docs").glob("*.md")):
        _copy(doc, docs / "docs" / doc.name)
    license_text = "xenvtpm is distributed under the MIT license (pyproject.toml).\n"
    (docs / "copyright").write_text(license_text)
    with gzip.GzipFile(docs / "changelog.gz", "wb", mtime=0) as out:
        out.write(f"xenvtpm ({version()}) unstable; urgency=medium\n".encode())
    for path in root.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024 + 1


def control(installed_kib: int) -> str:
    return (
        "Package: xenvtpm\n"
        f"Version: {version()}\n"
        "Architecture: all\n"
        "Maintainer: xenvtpm developers <xenvtpm@localhost>\n"
        f"Installed-Size: {installed_kib}\n"
        f"Depends: {DEPENDS}\n"
        f"Recommends: {RECOMMENDS}\n"
        "Section: admin\n"
        "Priority: optional\n"
        "Description: Xen virtual TPM split driver (frontend, backend, vTPM manager)\n"
        " The Xen vTPM split driver in Python: the guest's frontend (/dev/tpm0 through\n"
        " tpm_vtpm_proxy), dom0's backend, which also serves Linux xen-tpmfront\n"
        " (protocol v2) and xl's own vtpm=[...] devices, and the vTPM manager with one\n"
        " swtpm per instance. systemd units are installed, not enabled.\n"
    )


def build(out_dir: Path) -> Path:
    """The .deb in ``out_dir``; every file root-owned, mtimes from SOURCE_DATE_EPOCH."""
    out_dir.mkdir(parents=True, exist_ok=True)
    deb = out_dir / f"xenvtpm_{version()}_all.deb"
    with tempfile.TemporaryDirectory(prefix="xenvtpm-deb-") as tmp:
        root = Path(tmp) / "root"
        size = stage(root)
        meta = root / "DEBIAN"
        meta.mkdir(mode=0o755)
        (meta / "control").write_text(control(size))
        (meta / "postinst").write_text(POSTINST)
        (meta / "postinst").chmod(0o755)
        sums = [
            f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n"
            for p in sorted(root.rglob("*"))
            if p.is_file() and meta not in p.parents
        ]
        (meta / "md5sums").write_text("".join(sums))
        env = {**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "0")}
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    return deb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, nargs="?", default=REPO_ROOT / "artifacts" / "deb")
    args = p.parse_args(argv)
    if shutil.which("dpkg-deb") is None:
        print("deb: dpkg-deb not found (a Debian host builds the package)", file=sys.stderr)
        return 1
    print(build(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
