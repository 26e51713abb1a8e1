"""Build an out-of-tree kernel module (e.g. a patched xen-tpmfront) for the Xen guest.

A module loads only into the kernel it was built against (vermagic, symbol CRCs), so
it is built on the host against that kernel's own Debian headers packages, fetched from
the images' mirror, by the compiler Debian built the kernel with (gcc-12, named in the
headers' ``.kernelvariables``). No chroot, no root, no guest: seconds.

Layout under an images build directory (:attr:`harness.images.Images.dir`), pruned with
it::

    kbuild/lock                  one fetch at a time
    kbuild/root/                 the three headers .debs, extracted and relocated
        usr/src/linux-headers-<kernel_version>/     what ``make -C`` is given
    modules/lock                 one build at a time
    modules/<key>/               one build (sources, objects, build.log, the .ko); key:
                                 sources' names and contents, kernel and package version

Spec: Documentation/kbuild/modules.rst (``make -C <headers> M=<dir> modules``); the
Debian Linux Kernel Handbook (out-of-tree modules); elf(5) for ``.modinfo``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.binaries import module_info
from harness.errors import HeadersUnavailable, KbuildError, ModuleBuildFailed
from harness.image_builder import Progress, stop_step
from harness.images import cache_root
from harness.process import tail

POOL = "pool/main/l/linux"
DEB_ARCH = "amd64"
BUILD_TIMEOUT = 600.0  # seconds; a module builds in a few
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress on one request
# gcc-12: the headers' .kernelvariables names it; objtool (from linux-kbuild) needs libelf1.
HOST_PACKAGES = "gcc-12 make libelf1"
# Left behind by an in-place build of the user's sources: neither copied nor hashed.
BUILD_PRODUCTS = (".o", ".ko", ".mod", ".mod.c", ".cmd", ".symvers", ".order", ".a")
# Caller's variables that would redirect Kbuild away from the headers' own settings.
KBUILD_ENV = re.compile(r"ARCH|CROSS_COMPILE|CC|LD|LLVM|O|M|KBUILD_OUTPUT|KBUILD_EXTMOD|KC\w*FLAGS")
ABSOLUTE_INCLUDE = re.compile(r"^(-?include|sinclude)\s+(/\S+)\s*$", re.MULTILINE)
HERE = "xenvtpm-headers-dir"  # make variable: the rewritten Makefile's own directory


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second run waits, then reuses the first's work
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise KbuildError(
            f"missing host tools {missing}; as root: apt-get install -y "
            f"--no-install-recommends {HOST_PACKAGES}"
        )


# -- the headers ------------------------------------------------------------------------
def header_debs(manifest: dict[str, Any]) -> list[str]:
    """File names of the packages a module build needs: 6.1.0-50-amd64 / 6.1.176-1 ->
    linux-headers-6.1.0-50-{amd64,common} and linux-kbuild-6.1 (Debian's split)."""
    kver, pkgver = str(manifest["kernel_version"]), str(manifest["kernel_package_version"])
    abi = kver.rpartition("-")[0]
    major_minor = ".".join(kver.split(".")[:2])
    return [
        f"linux-headers-{kver}_{pkgver}_{DEB_ARCH}.deb",
        f"linux-headers-{abi}-common_{pkgver}_all.deb",
        f"linux-kbuild-{major_minor}_{pkgver}_{DEB_ARCH}.deb",
    ]


def _download(url: str, dest: Path, say: Progress) -> None:
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp, part.open("wb") as f:
            total = int(resp.headers.get("Content-Length") or 0)
            say(f"kbuild: GET {url} ({total / 1e6:.1f} MB)")
            done, quarter = 0, 1
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total > 4_000_000 and done * 4 >= total * quarter and quarter < 4:
                    say(f"kbuild:   {dest.name}: {25 * quarter}%")
                    quarter += 1
    except urllib.error.HTTPError as e:
        gone = " (the mirror has moved on from this kernel)" if e.code == 404 else ""
        raise HeadersUnavailable(
            url,
            f"HTTP {e.code} {e.reason}{gone}; rebuild the images against the mirror's "
            "current kernel: nox -s images -- --rebuild",
        ) from e
    except (urllib.error.URLError, OSError) as e:
        raise HeadersUnavailable(url, f"{e} (network or mirror down?)") from e
    part.rename(dest)


def relocate(root: Path) -> list[Path]:
    """Make an extracted headers tree self-contained; returns what was rewritten.

    Why: Debian's trees expect to live at /: ``lib/modules/<kver>/build`` links to
    /usr/src/linux-headers-<kver>, and that flavour's Makefile is one line,
    ``include /usr/src/linux-headers-<abi>-common/Makefile``. Extracted elsewhere, those
    reach the host's own /usr/src: nothing, or worse another kernel's headers and a module
    silently built against them. Absolute symlinks become relative; an absolute include
    becomes relative to its Makefile's own directory, so the tree survives being renamed.
    """
    changed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            target = os.readlink(path) if path.is_symlink() else ""
            if target.startswith("/"):
                path.unlink()
                path.symlink_to(os.path.relpath(root / target.lstrip("/"), path.parent))
                changed.append(path)
    for makefile in sorted(root.glob("usr/src/linux-headers-*/Makefile")):
        text = makefile.read_text()

        def inside(m: re.Match[str], here: Path = makefile.parent) -> str:
            return f"{m[1]} $({HERE}){os.path.relpath(root / m[2].lstrip('/'), here)}"

        new = ABSOLUTE_INCLUDE.sub(inside, text)
        if new != text:  # $(lastword $(MAKEFILE_LIST)) is this file only before any include
            makefile.write_text(f"{HERE} := $(dir $(lastword $(MAKEFILE_LIST)))\n{new}")
            changed.append(makefile)
    return changed


def fetch_headers(images_dir: Path, manifest: dict[str, Any], say: Progress) -> Path:
    """The guest kernel's headers tree (``make -C`` it), fetched and extracted once.

    The .debs come from debootstrap's cache if there, else from the images' mirror.
    """
    kver = str(manifest["kernel_version"])
    cache = images_dir / "kbuild"
    root = cache / "root"
    headers = Path("usr", "src", f"linux-headers-{kver}")
    with _locked(cache / "lock"):
        if (root / headers / "Makefile").is_file():
            return root / headers
        _need("dpkg-deb")
        t0 = time.monotonic()
        work, downloads = cache / "root.tmp", cache / "debs.tmp"
        for d in (work, downloads):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        try:
            for name in header_debs(manifest):
                deb = cache_root() / "debs" / name
                if not deb.is_file():
                    deb = downloads / name
                    _download(f"{str(manifest['mirror']).rstrip('/')}/{POOL}/{name}", deb, say)
                out = subprocess.run(
                    ["dpkg-deb", "-x", str(deb), str(work)], capture_output=True, text=True
                )
                if out.returncode != 0:
                    raise KbuildError(f"dpkg-deb -x {deb} failed: {out.stderr.strip()}")
            relocate(work)
            if not (work / headers / "Makefile").is_file():
                raise KbuildError(f"{header_debs(manifest)} hold no {headers}/Makefile")
            shutil.rmtree(root, ignore_errors=True)
            work.rename(root)
        finally:  # after the rename, work is gone; after a failure, nothing half-made stays
            for d in (work, downloads):
                shutil.rmtree(d, ignore_errors=True)
        say(f"kbuild: headers for {kver} in {root} ({time.monotonic() - t0:.1f} s)")
    return root / headers


# -- the build --------------------------------------------------------------------------
def source_files(source: Path) -> list[Path]:
    """The module's sources, relative to ``source``: no hidden files, no build products."""
    return sorted(
        p.relative_to(source)
        for p in source.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(source).parts)
        and not p.name.endswith(BUILD_PRODUCTS)
    )


def cache_key(source: Path, manifest: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for rel in source_files(source):
        h.update(rel.as_posix().encode() + b"\0" + (source / rel).read_bytes() + b"\0")
    h.update(f"{manifest['kernel_version']}\0{manifest['kernel_package_version']}".encode())
    return h.hexdigest()[:16]


def _pick(build: Path, name: str | None) -> Path:
    kos = sorted(build.rglob("*.ko"))
    chosen = [k for k in kos if name is None or k.stem == name.removesuffix(".ko")]
    if len(chosen) == 1:
        return chosen[0]
    names = [k.relative_to(build).as_posix() for k in kos]
    if not chosen:
        raise KbuildError(f"build {build} made no .ko" + (f" named {name}" if name else ""))
    raise KbuildError(f"build {build} made several modules {names}: pick one with name=")


def _make(headers: Path, work: Path, log_path: Path) -> None:
    argv = ["make", "-C", str(headers), f"M={work}", "modules"]
    env = {k: v for k, v in os.environ.items() if not KBUILD_ENV.fullmatch(k)} | {"LC_ALL": "C"}
    with log_path.open("wb") as logf:
        logf.write(f"=== {' '.join(argv)}\n".encode())
        logf.flush()
        # In its own process group: a timeout or ^C stops all of make's children.
        proc = subprocess.Popen(
            argv, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.returncode is None:  # timed out or interrupted: stop all of it
                stop_step(proc)
    if rc != 0:
        raise ModuleBuildFailed(argv, rc, tail(log_path), log_path)


def build_module(
    source: Path,
    images_dir: Path,
    manifest: dict[str, Any],
    say: Progress,
    *,
    name: str | None = None,
) -> Path:
    """The .ko built from ``source`` for the images' kernel (cached by content).

    ``source`` is copied first: the user's directory is never written. ``name`` picks
    one module when the Kbuild makes several.
    """
    source = source.resolve()
    files = source_files(source) if source.is_dir() else []
    if not {"Kbuild", "Makefile"} & {f.as_posix() for f in files}:
        raise KbuildError(f"{source}: no Kbuild or Makefile (one with obj-m += NAME.o)")
    key = cache_key(source, manifest)
    modules = images_dir / "modules"
    final = modules / key
    with _locked(modules / "lock"):
        if final.is_dir():
            say(f"kbuild: cache hit {final}")
            return _pick(final, name)
        headers = fetch_headers(images_dir, manifest, say)
        _need("make", "gcc-12")
        work = modules / f"{key}.tmp"  # a failed build's stays until the next try, for its log
        shutil.rmtree(work, ignore_errors=True)
        for rel in files:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, work / rel)
        t0 = time.monotonic()
        _make(headers, work.resolve(), work / "build.log")
        work.rename(final)
    ko = _pick(final, name)
    say(
        f"kbuild: built {ko.name} for {manifest['kernel_version']} in {time.monotonic() - t0:.1f} s"
    )
    return ko


# -- reading a .ko ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:  # pragma: no cover - python -m harness.kbuild
    import argparse
    import json

    from harness.errors import HarnessError
    from harness.images import build_images

    parser = argparse.ArgumentParser(description="build a kernel module for the Xen guest")
    parser.add_argument("source", type=Path, help="directory with the sources and a Kbuild")
    parser.add_argument("--name", help="the module to return when the Kbuild makes several")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"[kbuild] {message}", file=sys.stderr, flush=True)

    try:
        images = build_images(say)
        manifest = json.loads((images.dir / "manifest.json").read_text())
        ko = build_module(args.source, images.dir, manifest, say, name=args.name)
        vermagic = module_info(ko).get("vermagic", "(none)")
    except HarnessError as e:
        print(f"kbuild: {e}", file=sys.stderr)
        return 1
    print(ko)
    print(f"vermagic: {vermagic}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
