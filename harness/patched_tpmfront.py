"""The patch series of ``linux/xen-tpmfront/`` (issue 17) as an out-of-tree source directory
for the guest kernel's ``xen-tpmfront``: ``linux/xen-tpmfront/make_source.sh`` takes
``xen-tpmfront.c`` and ``tpm.h`` from the images' own ``linux-source-6.1`` package
(debootstrap's cache keeps it) and applies the patches with no fuzz.

Made once per set of patches and kept with the images; :mod:`harness.kbuild` then
builds it in seconds. The ``xen-kernel-tpm2`` target loads the result in its guests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from harness.errors import HarnessError
from harness.images import cache_root
from harness.paths import REPO_ROOT

PATCH_DIR = REPO_ROOT / "linux" / "xen-tpmfront"
MAKE_SOURCE = PATCH_DIR / "make_source.sh"


class PatchedSourceError(HarnessError):
    """The patched source could not be made (no linux-source, a patch that fails)."""


def recipe() -> list[Path]:
    """The patches, in order, and the script that applies them."""
    return [*sorted(PATCH_DIR.glob("[0-9][0-9][0-9][0-9]-*.patch")), MAKE_SOURCE]


def recipe_key() -> str:
    h = hashlib.sha256()
    for path in recipe():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def linux_source_deb(images_dir: Path) -> Path:
    """The images' own ``linux-source-6.1`` .deb: the kernel's exact source."""
    manifest = json.loads((images_dir / "manifest.json").read_text())
    version = manifest.get("kernel_source_version", "?")
    deb = cache_root() / "debs" / f"linux-source-6.1_{version}_all.deb"
    if not deb.exists():
        raise PatchedSourceError(
            f"{deb} is missing (the images' package cache): rebuild the images with "
            "`nox -s images -- --rebuild`"
        )
    return deb


def source_dir(images_dir: Path, say: Callable[[str], None]) -> Path:
    """The patched source directory for the kernel of the images in ``images_dir``
    (made now if need be)."""
    out = images_dir / "tpmfront-patched" / recipe_key()
    if (out / "SOURCE").exists():
        return out
    deb = linux_source_deb(images_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    say(f"xen-tpmfront: applying {len(recipe()) - 1} patches of linux/xen-tpmfront/ to {deb.name}")
    result = subprocess.run(
        ["sh", str(MAKE_SOURCE), str(tmp), str(deb)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise PatchedSourceError(
            f"linux/xen-tpmfront/make_source.sh exited {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
