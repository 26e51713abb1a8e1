"""Build ``xenvtpm_<version>_all.deb``: the driver pair, its systemd units and docs, as a
Debian 12 host installs them (``python3 deploy/deb.py OUT_DIR``, or ``nox -s deb``).

Standard library only, and ``dpkg-deb`` (dpkg is essential on Debian), so it builds on
any Debian machine with no toolchain. The package holds:

- ``/usr/lib/python3/dist-packages/xenvtpm/``: the package folder, sources only;
- ``/lib/systemd/system/xenvtpm-*.service``: deploy/systemd/, not enabled by the install;
- ``/usr/share/doc/xenvtpm/``: the README, docs/ and deploy/README.md.

It depends on what every host needs (python3, Xen's libxenstore, libxengnttab and
libxenevtchn, which the real adapter opens by ctypes) and recommends what only dom0
needs (swtpm and swtpm-tools; util-linux, for --confine-swtpm's unshare, prlimit and
setpriv, is essential on Debian). ``nox -s deb`` runs lintian over it.
"""

from __future__ import annotations

import argparse
import email.utils
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
RECOMMENDS = "swtpm, swtpm-tools"
MAINTAINER = "xenvtpm developers <xenvtpm@example.org>"
# Every file's mtime, unless SOURCE_DATE_EPOCH says otherwise: fixed, so the same
# sources give the same bytes, and not 1970, which lintian calls ancient.
DEFAULT_EPOCH = 1764547200  # 2025-12-01 00:00:00 UTC
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


SOURCE = REPO_ROOT / "xenvtpm"


def sources(source: Path = SOURCE) -> list[Path]:
    """The package's files, relative to ``source``'s parent: every .py under it, no
    caches, no build leftovers."""
    return sorted(
        p.relative_to(source.parent) for p in source.rglob("*.py") if "__pycache__" not in p.parts
    )


def packaged_unit(text: str) -> str:
    """A unit as the package installs it: without ``WorkingDirectory=`` (the copied
    folder's /opt/xenvtpm), so that nothing left there shadows the installed package."""
    return "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith("WorkingDirectory=")
    )


def _copy(src: Path, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def stage(root: Path, source: Path = SOURCE) -> int:
    """Lay the package's tree out under ``root``, the driver from ``source``; its
    installed size in KiB."""
    for rel in sources(source):
        _copy(source.parent / rel, root / PYTHON_DIR / rel)
    for unit in sorted((REPO_ROOT / "deploy" / "systemd").glob("*.service")):
        dest = root / UNIT_DIR / unit.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(packaged_unit(unit.read_text()))
        dest.chmod(0o644)
    docs = root / DOC_DIR
    _copy(REPO_ROOT / "README.md", docs / "README.md")
    _copy(REPO_ROOT / "deploy" / "README.md", docs / "deploy.md")
    for doc in sorted((REPO_ROOT / "docs").glob("*.md")):
        _copy(doc, docs / "docs" / doc.name)
    license_text = (
        "Copyright 2025-2026 the xenvtpm developers.\n"
        "xenvtpm is distributed under the MIT license (pyproject.toml).\n"
    )
    (docs / "copyright").write_text(license_text)
    with gzip.GzipFile(docs / "changelog.gz", "wb", mtime=0) as out:
        out.write(changelog().encode())
    for path in root.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024 + 1


def epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))


def changelog() -> str:
    """One Debian changelog entry for this version, dated at ``epoch()``."""
    date = email.utils.formatdate(epoch(), usegmt=False)
    return (
        f"xenvtpm ({version()}) unstable; urgency=medium\n\n"
        "  * Built from the xenvtpm sources by deploy/deb.py.\n\n"
        f" -- {MAINTAINER}  {date}\n"
    )


def control(installed_kib: int) -> str:
    return (
        "Package: xenvtpm\n"
        f"Version: {version()}\n"
        "Architecture: all\n"
        f"Maintainer: {MAINTAINER}\n"
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


def build(out_dir: Path, source: Path = SOURCE) -> Path:
    """The .deb in ``out_dir``, of the driver folder ``source``; every file root-owned,
    mtimes from SOURCE_DATE_EPOCH."""
    out_dir.mkdir(parents=True, exist_ok=True)
    deb = out_dir / f"xenvtpm_{version()}_all.deb"
    with tempfile.TemporaryDirectory(prefix="xenvtpm-deb-") as tmp:
        root = Path(tmp) / "root"
        size = stage(root, source)
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
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch())}
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
    p.add_argument(
        "--source", type=Path, default=SOURCE, help="the xenvtpm/ folder to package (default: ours)"
    )
    args = p.parse_args(argv)
    if not (args.source / "__main__.py").is_file():
        print(f"deb: {args.source} is not a xenvtpm package folder", file=sys.stderr)
        return 1
    if shutil.which("dpkg-deb") is None:
        print("deb: dpkg-deb not found (a Debian host builds the package)", file=sys.stderr)
        return 1
    print(build(args.out_dir, args.source.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
