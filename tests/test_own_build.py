"""Bring your own build (harness/own_build.py, harness/binaries.py): every piece is
checked before QEMU starts, recorded with its sha256, and keys the saved machine."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_harness_fixtures import inner_env
from test_kbuild import elf64

from harness import binaries
from harness.binaries import BadFile
from harness.certify_report import render
from harness.images import cache_root
from harness.own_build import OwnBuild, OwnBuildError, PreparedBuild
from harness.paths import REPO_ROOT

RELEASE = "6.1.0-50-amd64"
VERMAGIC = f"{RELEASE} SMP preempt mod_unload modversions "


# -- files as a user's build makes them (small, built here) -----------------------------
def fake_xen(path: Path, compress: bool = False) -> Path:
    """A multiboot header at offset 16, as Xen's head.S puts one in its first 8 KiB."""
    flags = 0x00010003
    header = struct.pack(
        "<III", binaries.MULTIBOOT_MAGIC, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF
    )
    data = b"\0" * 16 + header + b"\0" * 4096
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def fake_bzimage(
    path: Path, banner: str = f"{RELEASE} (debian-kernel@lists.debian.org) #1"
) -> Path:
    data = bytearray(0x4000)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x1000 - 0x200)
    data[0x1000 : 0x1000 + len(banner) + 1] = banner.encode() + b"\0"
    path.write_bytes(bytes(data))
    return path


def fake_module(path: Path, modinfo: dict[str, str]) -> Path:
    """An ELF64 relocatable with a ``.modinfo`` section, the way modpost writes one."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    path.write_bytes(elf64({b".text": b"\xc3", b".modinfo": info}))
    return path


def tpmfront_info(**changes: str) -> dict[str, str]:
    info = {"name": "xen_tpmfront", "vermagic": VERMAGIC, "depends": "tpm", "srcversion": "ABC123"}
    return {**info, **changes}


def modules_tree(root: Path, release: str = RELEASE) -> Path:
    tree = root / "lib" / "modules" / release
    (tree / "kernel" / "drivers").mkdir(parents=True)
    (tree / "modules.order").write_text("kernel/drivers/x.ko\n")
    return root


# -- what a file is ---------------------------------------------------------------------
def test_multiboot_xen_plain_and_gzipped_is_accepted(tmp_path: Path) -> None:
    binaries.check_xen(fake_xen(tmp_path / "xen"))
    binaries.check_xen(fake_xen(tmp_path / "xen.gz", compress=True))


@pytest.mark.parametrize(
    ("content", "said"),
    [(b"#!/bin/sh\necho not xen\n", "a text file"), (b"MZ" + bytes(9000), "a PE/EFI executable")],
)
def test_a_file_that_is_not_a_multiboot_xen_is_refused_saying_what_it_is(
    tmp_path: Path, content: bytes, said: str
) -> None:
    path = tmp_path / "xen.efi"
    path.write_bytes(content)
    with pytest.raises(BadFile, match=f"--xen .*not a multiboot image \\({said}"):
        binaries.check_xen(path)


def test_the_bundled_xen_and_kernel_are_recognised() -> None:
    builds = sorted(cache_root().glob("*/manifest.json"))
    if not builds:
        pytest.skip("no cached images (nox -s images builds them)")
    build = builds[-1].parent
    manifest = json.loads((build / "manifest.json").read_text())
    binaries.check_xen(build / "xen.bin")
    kernel = binaries.kernel_image(build / "vmlinuz", "--guest-kernel")
    assert (kernel.format, kernel.release) == ("bzImage", manifest["kernel_version"])


def test_kernel_release_comes_from_the_bzimage_header(tmp_path: Path) -> None:
    kernel = binaries.kernel_image(fake_bzimage(tmp_path / "bzImage"), "--dom0-kernel")
    assert kernel.release == RELEASE and kernel.format == "bzImage"


def test_kernel_release_comes_from_an_elf_vmlinux_banner(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF\x02\x01" + bytes(100) + b"Linux version 6.12.9-custom (me@host) #3")
    assert binaries.kernel_image(path, "--guest-kernel").release == "6.12.9-custom"


def test_a_text_file_given_as_a_kernel_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_text("not a kernel\n")
    with pytest.raises(BadFile, match=r"--guest-kernel .*not a Linux kernel \(a text file"):
        binaries.kernel_image(path, "--guest-kernel")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BadFile, match="no such file"):
        binaries.kernel_image(tmp_path / "nope", "--dom0-kernel")


def test_module_info_reads_the_modinfo_section(tmp_path: Path) -> None:
    ko = fake_module(tmp_path / "x.ko", tpmfront_info())
    assert binaries.module_info(ko) == tpmfront_info()


def test_module_info_refuses_a_file_that_is_no_module(tmp_path: Path) -> None:
    (tmp_path / "a.ko").write_text("text\n")
    with pytest.raises(BadFile, match="not an ELF file"):
        binaries.module_info(tmp_path / "a.ko")
    (tmp_path / "b.ko").write_bytes(elf64({b".text": b"\xc3"}))  # an object, no module
    with pytest.raises(BadFile, match=r"no \.modinfo section"):
        binaries.module_info(tmp_path / "b.ko")


@pytest.mark.parametrize("layout", ["lib/modules/R", "R", "modules/R", "."])
def test_modules_are_found_in_the_layouts_builds_make(tmp_path: Path, layout: str) -> None:
    tree = tmp_path / "m" / layout.replace("R", RELEASE) if layout != "." else tmp_path / RELEASE
    (tree / "kernel").mkdir(parents=True)
    root = tree if layout == "." else tmp_path / "m"
    assert binaries.modules_release_dir(root, RELEASE, "--guest-modules") == tree


def test_modules_of_another_kernel_are_refused_naming_theirs(tmp_path: Path) -> None:
    modules_tree(tmp_path, "6.12.9-custom")
    with pytest.raises(BadFile, match=f"no modules for kernel {RELEASE} .*6.12.9-custom"):
        binaries.modules_release_dir(tmp_path, RELEASE, "--guest-modules")


# -- the flags together ---------------------------------------------------------------------
def test_tpmfront_is_for_stock_guests_only(tmp_path: Path) -> None:
    own = OwnBuild(tpmfront=fake_module(tmp_path / "x.ko", tpmfront_info()))
    own.check(guest_kind="kernel")
    with pytest.raises(OwnBuildError, match="stock-guest kind"):
        own.check(guest_kind="python")


def test_a_real_host_takes_only_the_driver_and_tpmfront(tmp_path: Path) -> None:
    with pytest.raises(OwnBuildError, match="--xen: a real Xen host boots its own"):
        OwnBuild(xen=fake_xen(tmp_path / "xen")).check(on_a_host=True)
    OwnBuild(driver="HEAD").check(on_a_host=True)


def test_modules_need_their_kernel_and_one_tpmfront_at_most(tmp_path: Path) -> None:
    with pytest.raises(OwnBuildError, match="--guest-modules: give the kernel"):
        OwnBuild(guest_modules=modules_tree(tmp_path)).check()
    ko = fake_module(tmp_path / "x.ko", tpmfront_info())
    with pytest.raises(OwnBuildError, match="give one of them"):
        OwnBuild(tpmfront=ko, tpmfront_source=tmp_path).check(guest_kind="kernel")


def test_a_module_for_another_kernel_is_refused_before_anything_boots(tmp_path: Path) -> None:
    ko = fake_module(tmp_path / "x.ko", tpmfront_info(vermagic="6.12.9-custom SMP mod_unload "))
    with pytest.raises(BadFile, match=f"built for kernel 6.12.9-custom .*guests run {RELEASE}"):
        OwnBuild(tpmfront=ko).prepare(tmp_path / "work", RELEASE)


def test_a_module_that_is_not_xen_tpmfront_is_refused(tmp_path: Path) -> None:
    ko = fake_module(tmp_path / "x.ko", tpmfront_info(name="tpm_vtpm_proxy"))
    with pytest.raises(BadFile, match="is module tpm_vtpm_proxy, not xen_tpmfront"):
        OwnBuild(tpmfront=ko).prepare(tmp_path / "work", RELEASE)


def test_the_module_is_checked_against_the_users_guest_kernel(tmp_path: Path) -> None:
    """With --guest-kernel, the module must fit that kernel, not the image's."""
    custom = "6.12.9-custom"
    kernel = fake_bzimage(tmp_path / "bzImage", f"{custom} (me@host) #1")
    ko = fake_module(tmp_path / "x.ko", tpmfront_info(vermagic=f"{custom} SMP mod_unload "))
    own = OwnBuild(
        guest_kernel=kernel, guest_modules=modules_tree(tmp_path / "m", custom), tpmfront=ko
    )
    prepared = own.prepare(tmp_path / "work", RELEASE)
    assert prepared.guest_kernel is not None and prepared.guest_kernel.release == custom
    assert prepared.guest_modules == tmp_path / "m" / "lib" / "modules" / custom
    with pytest.raises(BadFile, match=f"built for kernel {RELEASE}"):
        OwnBuild(
            guest_kernel=kernel,
            guest_modules=modules_tree(tmp_path / "n", custom),
            tpmfront=fake_module(tmp_path / "y.ko", tpmfront_info()),
        ).prepare(tmp_path / "work", RELEASE)


def test_another_guest_kernel_release_needs_its_modules(tmp_path: Path) -> None:
    kernel = fake_bzimage(tmp_path / "bzImage", "6.12.9-custom (me@host) #1")
    with pytest.raises(OwnBuildError, match="give its --guest-modules"):
        OwnBuild(guest_kernel=kernel).prepare(tmp_path / "work", RELEASE)


def test_a_tar_of_modules_is_unpacked(tmp_path: Path) -> None:
    modules_tree(tmp_path / "src")
    archive = tmp_path / "modules.tar.xz"
    subprocess.run(["tar", "-cJf", str(archive), "-C", str(tmp_path / "src"), "lib"], check=True)
    kernel = fake_bzimage(tmp_path / "bzImage")
    prepared = OwnBuild(guest_kernel=kernel, guest_modules=archive).prepare(tmp_path / "w", RELEASE)
    assert prepared.guest_modules == tmp_path / "w" / "guest-modules" / "lib" / "modules" / RELEASE


# -- recorded, and keying the saved machine -----------------------------------------------------
def test_every_piece_is_recorded_with_its_origin_and_sha256(tmp_path: Path) -> None:
    xen = fake_xen(tmp_path / "xen.gz", compress=True)
    ko = fake_module(tmp_path / "x.ko", tpmfront_info())
    prepared = OwnBuild(xen=xen, tpmfront=ko).prepare(tmp_path / "work", RELEASE)
    assert prepared.xen == tmp_path / "work" / "xen.bin"  # unzipped for QEMU
    binaries.check_xen(prepared.xen)
    prepared.record(tmp_path / "artifacts")
    record = json.loads((tmp_path / "artifacts" / "own-build.json").read_text())
    assert [r["flag"] for r in record] == ["--xen", "--tpmfront"]
    import hashlib

    assert record[0]["sha256"] == hashlib.sha256(xen.read_bytes()).hexdigest()
    assert record[1]["origin"] == str(ko) and "srcversion ABC123" in record[1]["what"]


def test_the_saved_machine_is_keyed_by_what_it_booted(tmp_path: Path) -> None:
    assert PreparedBuild().machine_key() == ""
    ko = fake_module(tmp_path / "x.ko", tpmfront_info())
    # Loaded after a warm start: the bundled machine serves it.
    assert OwnBuild(tpmfront=ko).prepare(tmp_path / "w", RELEASE).machine_key() == ""
    one = OwnBuild(xen=fake_xen(tmp_path / "a")).prepare(tmp_path / "w", RELEASE).machine_key()
    other = tmp_path / "b"
    other.write_bytes(fake_xen(tmp_path / "b").read_bytes() + b"\1")
    two = OwnBuild(xen=other).prepare(tmp_path / "w", RELEASE).machine_key()
    assert one and two and one != two


def test_driver_from_a_git_ref_is_exported_and_named_by_commit(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    prepared = OwnBuild(driver="HEAD").prepare(tmp_path / "work", RELEASE)
    assert (prepared.driver / "__main__.py").exists()
    assert prepared.pieces[0].what == f"git commit {head}"


def test_driver_from_a_directory_and_a_bad_ref(tmp_path: Path) -> None:
    prepared = OwnBuild(driver=str(REPO_ROOT)).prepare(tmp_path / "w", RELEASE)
    assert prepared.driver == REPO_ROOT / "xenvtpm"
    with pytest.raises(OwnBuildError, match="neither a directory nor a git ref"):
        OwnBuild(driver="no-such-ref-xyz").prepare(tmp_path / "w", RELEASE)
    with pytest.raises(BadFile, match="not the xenvtpm package"):
        OwnBuild(driver=str(tmp_path)).prepare(tmp_path / "w", RELEASE)


def test_the_certify_report_lists_the_users_pieces() -> None:
    piece = {"flag": "--driver", "origin": "v1.2", "what": "git commit abc", "sha256": "f" * 64}
    text = render({"host": "h", "own_build": [piece]}, None)
    assert f"| own build --driver | v1.2: git commit abc; sha256 `{'f' * 64}` |" in text


# -- where the flags are taken ---------------------------------------------------------------------
def test_xen_target_checks_the_pieces_before_anything_starts(tmp_path: Path) -> None:
    from harness.targets.xen import XenKernelFrontendTarget, XenTarget

    text = tmp_path / "vmlinuz"
    text.write_text("oops\n")
    with pytest.raises(BadFile, match="--dom0-kernel"):
        XenTarget(1, tmp_path / "run", own_build=OwnBuild(dom0_kernel=text))
    ko = fake_module(tmp_path / "x.ko", tpmfront_info())
    with pytest.raises(OwnBuildError, match="stock-guest kind"):
        XenTarget(1, tmp_path / "run", own_build=OwnBuild(tpmfront=ko))
    target = XenKernelFrontendTarget(1, tmp_path / "run", own_build=OwnBuild(tpmfront=ko))
    assert target.own_build.tpmfront == ko and target.machine.qemu is None


def pytest_with_flags(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """An inner pytest of one empty test under the repository's conftest, with ``args``."""
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "conftest.py").read_text())
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "test_x.py", *args],
        cwd=tmp_path,
        env=inner_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_pytest_refuses_the_flags_for_a_target_without_xen(tmp_path: Path) -> None:
    result = pytest_with_flags(tmp_path, "--target", "sim", "--xen", "/etc/hostname")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "--xen: for xen targets, not --target sim" in result.stderr


def test_pytest_refuses_a_wrong_file_before_the_target_starts(tmp_path: Path) -> None:
    (tmp_path / "notxen").write_text("hello\n")
    result = pytest_with_flags(tmp_path, "--target", "xen", "--xen", "notxen")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "not a multiboot image (a text file" in result.stderr


def test_harness_up_refuses_the_flags_for_sim(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness", "up", "--target", "sim", "--driver", "HEAD"],
        cwd=REPO_ROOT,
        env={**inner_env(), "XENVTPM_RUN": str(tmp_path / "run")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "--driver: for xen targets, not sim" in result.stderr


def test_the_patched_kind_loads_its_tpmfront_and_has_a_tpm2_chip(tmp_path: Path) -> None:
    """xen-kernel-tpm2: the stock guests' capabilities, plus shared clients and a TPM
    2.0 chip; its module may be replaced by the user's (the check takes the kind)."""
    from harness.targets import capabilities_of, target_class

    stock = capabilities_of("xen-kernel", 2)
    patched = capabilities_of("xen-kernel-tpm2", 2)
    assert patched - stock == {"shared-clients", "tpm2-chip"}
    assert "save-restore" in patched and "restart-backend" not in patched
    assert "tpm2-chip" not in stock
    ko = fake_module(tmp_path / "x.ko", tpmfront_info())
    target = target_class("xen-kernel-tpm2")(1, tmp_path / "run", own_build=OwnBuild(tpmfront=ko))
    assert target.frontend.kind == "kernel-tpm2"
