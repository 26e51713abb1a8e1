"""harness.kbuild: a module built on the host for the Xen guest's kernel.

The pure parts (``.modinfo`` parsing, relocation, the cache key, a mirror's 404) run
anywhere. The real builds need a cached images build, its kernel's headers (from the
mirror, once) and gcc-12; they build the stock ``drivers/char/tpm/xen-tpmfront.c`` from
the ``linux-source-6.1`` .deb debootstrap cached, and skip, saying why, without them.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.binaries import ELF64_EHDR, ELF64_SHDR, BadFile, module_info
from harness.errors import HeadersUnavailable, KbuildError, ModuleBuildFailed
from harness.images import CACHE_ENV, cache_root
from harness.kbuild import build_module, cache_key, fetch_headers, header_debs, relocate

MANIFEST: dict[str, Any] = {
    "kernel_version": "6.1.0-50-amd64",
    "kernel_package_version": "6.1.176-1",
    "mirror": "http://m.example/debian",
}
# What xen-tpmfront.c includes from its own directory (``#include "tpm.h"``), and tpm.h none.
TPMFRONT_MEMBERS = ("drivers/char/tpm/xen-tpmfront.c", "drivers/char/tpm/tpm.h")
KBUILD = "obj-m += xen-tpmfront.o\n"


def elf64(sections: dict[bytes, bytes], ident: bytes = b"\x7fELF\x02\x01\x01") -> bytes:
    """A minimal ELF64 relocatable: a null section, ``sections``, then .shstrtab."""
    names = {**sections, b".shstrtab": b""}
    strtab = b"\0" + b"".join(n + b"\0" for n in names)
    names[b".shstrtab"] = strtab
    body, headers = b"", [ELF64_SHDR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    for name, data in names.items():
        offset = ELF64_EHDR.size + len(body)
        headers.append(
            ELF64_SHDR.pack(strtab.index(name + b"\0"), 1, 0, 0, offset, len(data), 0, 0, 1, 0)
        )
        body += data
    shoff, n = ELF64_EHDR.size + len(body), len(headers)
    # e_ident, ET_REL, EM_X86_64, EV_CURRENT, ..., e_shstrndx: .shstrtab is the last
    ehdr = ELF64_EHDR.pack(ident.ljust(16, b"\0"), 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, n, n - 1)
    return ehdr + body + b"".join(headers)


# -- .modinfo ---------------------------------------------------------------------------
def test_modinfo_gives_each_key_and_joins_repeated_ones(tmp_path: Path) -> None:
    ko = tmp_path / "m.ko"
    info = b"license=GPL\0alias=xen:vtpm\0alias=x\0depends=\0\0\0vermagic=6.1.0-50-amd64 SMP \0"
    ko.write_bytes(elf64({b".text": b"\xc3", b".modinfo": info}))
    assert module_info(ko) == {
        "license": "GPL",
        "alias": "xen:vtpm\nx",
        "depends": "",
        "vermagic": "6.1.0-50-amd64 SMP ",
    }


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"obj-m += x.o\n", "not an ELF file"),
        (elf64({b".modinfo": b"a=b\0"}, ident=b"\x7fELF\x01\x01\x01"), "not a 64-bit"),
        (elf64({b".modinfo": b"a=b\0"}, ident=b"\x7fELF\x02\x02\x01"), "little-endian"),
        (elf64({b".text": b"\xc3"}), "no .modinfo section"),
        (elf64({b".modinfo": b"a=b\0"})[:80], "malformed ELF section headers"),
    ],
    ids=["text", "elf32", "big-endian", "no-modinfo", "truncated"],
)
def test_a_file_that_is_not_a_module_is_refused_saying_why(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    bad = tmp_path / "bad.ko"
    bad.write_bytes(content)
    with pytest.raises(BadFile, match=reason) as e:
        module_info(bad)
    assert e.value.path == bad


# -- the headers tree -------------------------------------------------------------------
def test_the_package_names_follow_debians_kernel_split() -> None:
    assert header_debs(MANIFEST) == [
        "linux-headers-6.1.0-50-amd64_6.1.176-1_amd64.deb",
        "linux-headers-6.1.0-50-common_6.1.176-1_all.deb",
        "linux-kbuild-6.1_6.1.176-1_amd64.deb",
    ]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_relocated_tree_points_inside_itself_even_after_a_rename(tmp_path: Path) -> None:
    """Debian's absolute symlinks and flavour Makefile include would reach the host's
    /usr/src; relocated, they reach the tree's own files wherever it is moved."""
    root = tmp_path / "root.tmp"
    src = root / "usr/src"
    (src / "linux-headers-6.1.0-50-common").mkdir(parents=True)
    (src / "linux-headers-6.1.0-50-common/Makefile").write_text(
        "this := $(lastword $(MAKEFILE_LIST))\nall:\n\t@echo common at $(realpath $(this))\n"
    )
    flavour = src / "linux-headers-6.1.0-50-amd64"
    flavour.mkdir()
    (flavour / "Makefile").write_text("include /usr/src/linux-headers-6.1.0-50-common/Makefile\n")
    (flavour / "scripts").symlink_to("../../lib/linux-kbuild-6.1/scripts")  # already relative
    (root / "lib/modules/6.1.0-50-amd64").mkdir(parents=True)
    (root / "lib/modules/6.1.0-50-amd64/build").symlink_to("/usr/src/linux-headers-6.1.0-50-amd64")

    changed = relocate(root)
    moved = root.rename(tmp_path / "root")

    assert sorted(p.relative_to(root).as_posix() for p in changed) == [
        "lib/modules/6.1.0-50-amd64/build",
        "usr/src/linux-headers-6.1.0-50-amd64/Makefile",
    ]
    build = moved / "lib/modules/6.1.0-50-amd64/build"
    assert os.readlink(build) == "../../../usr/src/linux-headers-6.1.0-50-amd64"
    assert os.readlink(moved / "usr/src/linux-headers-6.1.0-50-amd64/scripts").startswith("../")
    out = subprocess.run(["make", "-s", "-C", str(build)], capture_output=True, text=True)
    common = (moved / "usr/src/linux-headers-6.1.0-50-common/Makefile").resolve()
    assert out.stdout.strip() == f"common at {common}", out.stderr


@pytest.fixture
def empty_mirror(tmp_path: Path) -> Iterator[str]:
    """A local HTTP mirror that has no packages at all: every GET is a 404."""
    (tmp_path / "mirror").mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path / "mirror"), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/debian"
        finally:
            server.shutdown()
            thread.join()


def test_a_kernel_the_mirror_dropped_says_which_url_and_to_rebuild(
    tmp_path: Path, empty_mirror: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # no debootstrap cache to hit
    images = tmp_path / "images"
    with pytest.raises(HeadersUnavailable, match="404") as e:
        fetch_headers(images, dict(MANIFEST, mirror=empty_mirror), lambda _: None)
    assert e.value.url == f"{empty_mirror}/pool/main/l/linux/{header_debs(MANIFEST)[0]}"
    assert "nox -s images -- --rebuild" in str(e.value)
    assert sorted(p.name for p in (images / "kbuild").iterdir()) == ["lock"]


# -- the cache key and the choice of module ---------------------------------------------
def test_the_cache_key_follows_the_sources_and_the_kernel_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Kbuild").write_text(KBUILD)
    (src / "xen-tpmfront.c").write_text("int x;\n")
    key = cache_key(src, MANIFEST)
    for junk in ("xen-tpmfront.o", "xen-tpmfront.ko", ".xen-tpmfront.o.cmd", "modules.order"):
        (src / junk).write_text("left by an in-place build")
    assert cache_key(src, MANIFEST) == key
    (src / "xen-tpmfront.c").write_text("int y;\n")
    changed = cache_key(src, MANIFEST)
    assert changed != key
    (src / "xen-tpmfront.c").rename(src / "other.c")
    assert cache_key(src, MANIFEST) not in (key, changed)
    assert cache_key(src, dict(MANIFEST, kernel_version="6.1.0-51-amd64")) != cache_key(
        src, MANIFEST
    )


def test_sources_without_a_kbuild_or_makefile_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.c").write_text("int x;\n")
    with pytest.raises(KbuildError, match="no Kbuild or Makefile"):
        build_module(tmp_path, tmp_path / "images", MANIFEST, lambda _: None)


def test_a_build_of_several_modules_needs_a_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Kbuild").write_text("obj-m += a.o b.o\n")
    cached = tmp_path / "images" / "modules" / cache_key(src, MANIFEST)
    cached.mkdir(parents=True)
    for name in ("a.ko", "b.ko"):
        (cached / name).write_bytes(b"")
    with pytest.raises(KbuildError, match=r"several modules \['a.ko', 'b.ko'\]"):
        build_module(src, tmp_path / "images", MANIFEST, lambda _: None)
    ko = build_module(src, tmp_path / "images", MANIFEST, lambda _: None, name="b")
    assert ko == cached / "b.ko"


# -- real builds ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guest_kernel() -> tuple[Path, dict[str, Any]]:
    """The newest cached images build and its manifest."""
    manifests = sorted(cache_root().glob("*/manifest.json"), key=lambda m: m.stat().st_mtime)
    if not manifests:
        pytest.skip(f"no cached images build in {cache_root()}: run nox -s images")
    manifest: dict[str, Any] = json.loads(manifests[-1].read_text())
    if "kernel_package_version" not in manifest:
        pytest.skip(f"{manifests[-1]} predates kernel_package_version: rebuild the images")
    return manifests[-1].parent, manifest


@pytest.fixture(scope="module")
def headers(guest_kernel: tuple[Path, dict[str, Any]]) -> Path:
    missing = [t for t in ("make", "gcc-12", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs host tools {missing}")
    try:
        return fetch_headers(*guest_kernel, lambda _: None)
    except HeadersUnavailable as e:
        pytest.skip(f"no kernel headers: {e}")


@pytest.fixture
def images_dir(tmp_path: Path, guest_kernel: tuple[Path, dict[str, Any]], headers: Path) -> Path:
    """A fresh module cache that shares the real build's headers: every test builds."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "kbuild").symlink_to(guest_kernel[0] / "kbuild")
    return images


@pytest.fixture(scope="module")
def stock_tpmfront(
    guest_kernel: tuple[Path, dict[str, Any]], request: pytest.FixtureRequest
) -> Path:
    """The guest kernel's own xen-tpmfront sources, plus a Kbuild, extracted once (the
    tarball is streamed and left as soon as both members are out: ~10 s cold)."""
    debs = sorted((cache_root() / "debs").glob("linux-source-6.1_*_all.deb"))
    wanted = f"linux-source-6.1_{guest_kernel[1].get('kernel_source_version')}_all.deb"
    debs = [d for d in debs if d.name == wanted] or debs[-1:]
    if not debs:
        pytest.skip(f"no linux-source-6.1 .deb in {cache_root() / 'debs'}")
    if request.config.cache is None:
        pytest.skip("needs pytest's cache to keep the extracted sources")
    out = request.config.cache.mkdir(f"kbuild-{debs[0].stem}")
    if all((out / Path(m).name).is_file() for m in TPMFRONT_MEMBERS):
        return out
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    try:
        with tarfile.open(fileobj=tar.stdout, mode="r|") as outer:
            inner = next(m for m in outer if m.name.endswith("/linux-source-6.1.tar.xz"))
            with tarfile.open(fileobj=outer.extractfile(inner), mode="r|xz") as source:
                todo = {f"linux-source-6.1/{m}" for m in TPMFRONT_MEMBERS}
                for member in source:
                    if member.name in todo:
                        data = source.extractfile(member)
                        assert data is not None
                        (out / Path(member.name).name).write_bytes(data.read())
                        todo.discard(member.name)
                    if not todo:
                        break
    finally:
        tar.kill()
        tar.wait()
    (out / "Kbuild").write_text(KBUILD)
    return out


def test_stock_xen_tpmfront_builds_for_the_guest_kernel(
    stock_tpmfront: Path, images_dir: Path, guest_kernel: tuple[Path, dict[str, Any]]
) -> None:
    manifest = guest_kernel[1]
    before = sorted(stock_tpmfront.iterdir())
    said: list[str] = []

    ko = build_module(stock_tpmfront, images_dir, manifest, said.append)

    assert ko.name == "xen-tpmfront.ko"
    info = module_info(ko)
    assert info["vermagic"].split()[0] == manifest["kernel_version"]
    assert info["name"] == "xen_tpmfront"
    assert "modversions" in info["vermagic"].split()
    assert sorted(stock_tpmfront.iterdir()) == before  # the user's directory is not written
    assert any(m.startswith("kbuild: built xen-tpmfront.ko") for m in said)
    assert build_module(stock_tpmfront, images_dir, manifest, said.append) == ko
    assert said[-1].startswith("kbuild: cache hit")


def test_c_that_does_not_compile_fails_with_the_log_tail(
    tmp_path: Path, images_dir: Path, guest_kernel: tuple[Path, dict[str, Any]]
) -> None:
    src = tmp_path / "broken"
    src.mkdir()
    (src / "Kbuild").write_text("obj-m += broken.o\n")
    (src / "broken.c").write_text("int broken = ;\n")
    with pytest.raises(ModuleBuildFailed) as e:
        build_module(src, images_dir, guest_kernel[1], lambda _: None)
    assert e.value.returncode not in (0, None)
    assert "broken.c:1" in e.value.log_tail and "error" in e.value.log_tail
    assert e.value.log_tail in str(e.value)
    assert e.value.log_path.is_file()
