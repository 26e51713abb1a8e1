"""Build (or reuse) the dom0 and guest disk images that boot Xen under QEMU.

Recipe: ``images/`` (package lists, configuration trees copied into each root file
system, the xl template) plus the code that builds them (this module and
:mod:`harness.image_builder`). The cache key is a hash of all of
it, the mirror and the harness's SSH public key, so changing any of them rebuilds and a
warm run rebuilds nothing (and says so).

Layout under ``$XENVTPM_CACHE/images`` (default ``~/.cache/xenvtpm/images``)::

    ssh/id_ed25519{,.pub}   the harness key pair (root's authorized_keys in both images)
    debs/                   debootstrap's package cache, shared by both builds
    <key>/                  one finished build, renamed into place when complete
        dom0.img guest.img  ext4 file systems (no partition table): /dev/vda, /dev/xvda
        xen.bin             Debian's xen-4.17-amd64.gz, unzipped (multiboot for -kernel)
        vmlinuz initrd.img  dom0's kernel and initrd (QEMU multiboot modules; guests
                            boot the same files from inside dom0 via xl kernel=)
        manifest.json       kernel version (and the kernel source the selftests come
                            from), paths inside dom0, timings

Both root file systems carry ``/opt/tpm2-selftests``: the kernel's TPM 2.0 selftests
(``tools/testing/selftests/tpm2``) from Debian's ``linux-source-6.1`` of the same mirror
as the kernel, checked to be the kernel's own upstream version (scenarios/test_external.py).

Nothing is mounted: ``debootstrap --variant=minbase`` into a directory, configure it
there, then ``mke2fs -t ext4 -d ROOTFS IMG SIZE``. Spec: DESIGN.md section 4.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import image_builder
from harness.errors import HarnessError, ImageBuildError, MirrorUnreachable
from harness.image_builder import RECIPES, SUITE, Builder, Progress

log = logging.getLogger(__name__)

CACHE_ENV = "XENVTPM_CACHE"
RECIPE_CODE = (Path(__file__).resolve(), Path(image_builder.__file__).resolve())
KEEP_BUILDS = 2  # older recipe builds are deleted after a new one is made
DOM0_SIZE = "3G"
GUEST_SIZE = "1536M"


def cache_root() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    base = Path(explicit) if explicit else Path.home() / ".cache" / "xenvtpm"
    return base / "images"


# -- the mirror -------------------------------------------------------------------------
def host_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian mirror of the host's own apt sources (deb822 or one-line).

    Spec: sources.list(5). Files disabled by renaming (``*.disabled*``) are ignored, as
    apt itself does; security and third-party repositories are skipped because
    debootstrap takes one mirror holding the main suite.
    """
    files = [sources_dir / "sources.list"]
    files += sorted((sources_dir / "sources.list.d").glob("*.list"))
    files += sorted((sources_dir / "sources.list.d").glob("*.sources"))
    candidates: list[tuple[str, list[str]]] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split() and fields.get("enabled") != "no":
                    suites = fields.get("suites", "").split()
                    candidates += [(uri, suites) for uri in fields.get("uris", "").split()]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    candidates.append((words[1], [words[2]]))
    for uri, suites in candidates:
        if SUITE in suites and "security" not in uri:
            return uri.rstrip("/")
    raise ImageBuildError(
        f"no apt source for Debian {SUITE} in {sources_dir}/sources.list(.d): "
        "debootstrap needs the machine's own Debian mirror"
    )


def check_mirror(mirror: str, timeout: float = 20.0) -> None:
    url = f"{mirror}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as e:
        raise MirrorUnreachable(
            f"cannot reach the apt mirror {mirror} (from the host's apt sources): "
            f"HEAD {url} failed: {e}"
        ) from e


# -- the recipe -------------------------------------------------------------------------
def read_packages(path: Path) -> list[str]:
    return [w for line in path.read_text().splitlines() for w in line.split("#", 1)[0].split()]


def ensure_ssh_key(root: Path) -> tuple[Path, str]:
    """The harness's key pair (created once): private key path, public key line."""
    key_dir = root / "ssh"
    private = key_dir / "id_ed25519"
    public = key_dir / "id_ed25519.pub"
    if not (private.exists() and public.exists()):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        tmp = private.with_suffix(".tmp")
        tmp.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        tmp.chmod(0o600)
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        public.write_text(pub.decode() + " xenvtpm-harness\n")
        tmp.replace(private)
    return private, public.read_text().strip()


def recipe_files(recipes: Path = RECIPES) -> list[Path]:
    return sorted(p for p in recipes.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def recipe_key(recipes: Path, mirror: str, pubkey: str) -> str:
    """Hash of everything an image is made from: recipe files, this code, mirror, key."""
    h = hashlib.sha256()
    for path in [*recipe_files(recipes), *RECIPE_CODE]:
        h.update(str(path.relative_to(path.parent.parent)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
        h.update(oct(path.stat().st_mode & 0o111).encode())
    h.update(f"{SUITE}\0{mirror}\0{pubkey}\0{DOM0_SIZE}\0{GUEST_SIZE}".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Images:
    """A finished build: the files QEMU and the xen target use."""

    dir: Path
    dom0: Path
    guest: Path
    xen: Path
    kernel: Path
    initrd: Path
    ssh_key: Path
    kernel_version: str
    # Where the same kernel and initrd are inside dom0 (xl kernel=/ramdisk=).
    dom0_kernel: str
    dom0_initrd: str
    built: bool  # False when the cache was reused

    @classmethod
    def load(cls, directory: Path, ssh_key: Path, built: bool) -> Images:
        manifest: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
        return cls(
            dir=directory,
            dom0=directory / "dom0.img",
            guest=directory / "guest.img",
            xen=directory / "xen.bin",
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.img",
            ssh_key=ssh_key,
            kernel_version=str(manifest["kernel_version"]),
            dom0_kernel=str(manifest["dom0_kernel"]),
            dom0_initrd=str(manifest["dom0_initrd"]),
            built=built,
        )


# -- building ---------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second build waits for the first, then reuses it
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_build(root: Path, recipes: Path, pubkey: str) -> Path | None:
    """The newest cached build of the current recipe, from whichever mirror it was
    built: a cache hit needs no apt source (an offline host, or one without bookworm)."""
    manifests = sorted(root.glob("*/manifest.json"), key=lambda m: m.stat().st_mtime, reverse=True)
    for manifest in manifests:
        try:
            mirror = str(json.loads(manifest.read_text())["mirror"])
        except (OSError, ValueError, KeyError):
            continue
        if recipe_key(recipes, mirror, pubkey) == manifest.parent.name:
            return manifest.parent
    return None


def build_images(
    say: Progress | None = None,
    *,
    rebuild: bool = False,
    recipes: Path = RECIPES,
    sources: Path = Path("/etc/apt"),
) -> Images:
    """The images for the current recipe: from the cache, or built now (cold ~3 min).
    The host's apt ``sources`` are read only to build."""
    out: Progress = say or (lambda m: log.info("%s", m))
    root = cache_root()
    ssh_key, pubkey = ensure_ssh_key(root)
    with _locked(root):
        hit = None if rebuild else cached_build(root, recipes, pubkey)
        if hit is not None:
            out(f"images: cache hit {hit} (recipe {hit.name}): nothing to rebuild")
            prune(root, keep=KEEP_BUILDS)
            return Images.load(hit, ssh_key, built=False)
        mirror = host_mirror(sources)
        key = recipe_key(recipes, mirror, pubkey)
        final = root / key
        missing = [t for t in ("debootstrap", "mke2fs", "chroot") if shutil.which(t) is None]
        if missing:
            raise ImageBuildError(
                f"missing host tools {missing}; as root: apt-get install -y "
                "--no-install-recommends debootstrap e2fsprogs"
            )
        if os.geteuid() != 0:
            raise ImageBuildError("debootstrap needs root to build the images")
        out(f"images: building recipe {key} into {final} (cold build: a few minutes)")
        check_mirror(mirror)
        t0 = time.monotonic()
        work = root / f"{key}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        debs = root / "debs"
        debs.mkdir(exist_ok=True)
        b = Builder(work, mirror, debs, pubkey, out)
        try:
            dom0_root = b.debootstrap("dom0", read_packages(recipes / "dom0.packages"))
            manifest: dict[str, Any] = b.configure_dom0(dom0_root)
            manifest.update(b.install_selftests(dom0_root, manifest["kernel_version"]))
            guest_root = b.debootstrap("guest", read_packages(recipes / "guest.packages"))
            b.configure_guest(guest_root, dom0_root, manifest["kernel_version"])
            b.mkfs(dom0_root, work / "dom0.img", DOM0_SIZE, "dom0")
            b.mkfs(guest_root, work / "guest.img", GUEST_SIZE, "guest")
            b.timings["total_s"] = round(time.monotonic() - t0, 1)
            manifest.update(
                recipe=key, mirror=mirror, suite=SUITE, timings=b.timings, built=time.time()
            )
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for rootfs in (dom0_root, guest_root):
                shutil.rmtree(rootfs)
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        except BaseException:
            out(f"images: build failed; its log stays in {b.log_path}")
            raise
        out(f"images: built in {time.monotonic() - t0:.0f} s: {final}")
        prune(root, keep=KEEP_BUILDS)
        return Images.load(final, ssh_key, built=True)


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest builds (a running QEMU keeps its open files),
    and what interrupted builds left. Called with the cache's lock held."""
    builds = sorted(
        (p.parent for p in root.glob("*/manifest.json")),
        key=lambda d: (d / "manifest.json").stat().st_mtime,
        reverse=True,
    )
    for old in builds[keep:]:
        log.info("images: removing old build %s", old)
        shutil.rmtree(old, ignore_errors=True)
    for half_built in root.glob("*.tmp"):  # an interrupted build's; ours holds the lock
        if half_built.is_dir():
            log.info("images: removing the half-built %s", half_built)
            shutil.rmtree(half_built, ignore_errors=True)


def main() -> int:  # pragma: no cover - ``python -m harness.images`` / ``nox -s images``
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="build or reuse the Xen images")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cache")
    args = parser.parse_args()

    def say(message: str) -> None:
        print(f"[images] {message}", file=sys.stderr, flush=True)

    try:
        images = build_images(say, rebuild=args.rebuild)
    except HarnessError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: str(v) for k, v in images.__dict__.items()}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
