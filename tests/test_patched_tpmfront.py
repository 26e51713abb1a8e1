"""The patch series of linux/xen-tpmfront/ becomes a module for the guest kernel
(harness/patched_tpmfront.py, then harness/kbuild.py), and a patch that does not apply
is an error, never a fuzzy guess."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_kbuild import guest_kernel, headers, images_dir  # noqa: F401 (fixtures)

from harness import patched_tpmfront
from harness.binaries import module_info
from harness.kbuild import build_module


def test_the_series_applies_to_the_images_source_and_builds(
    images_dir: Path,  # noqa: F811
    guest_kernel: tuple[Path, dict[str, Any]],  # noqa: F811
) -> None:
    manifest = guest_kernel[1]
    (images_dir / "manifest.json").write_text(json.dumps(manifest))
    try:
        patched_tpmfront.linux_source_deb(images_dir)
    except patched_tpmfront.PatchedSourceError as e:
        pytest.skip(str(e))
    said: list[str] = []
    source = patched_tpmfront.source_dir(images_dir, said.append)
    assert "tpm2_probe(" in (source / "xen-tpmfront.c").read_text()  # patch 0004 is in
    assert patched_tpmfront.recipe_key() == source.name
    ko = build_module(source, images_dir, manifest, said.append, name="xen-tpmfront")
    info = module_info(ko)
    assert info["name"] == "xen_tpmfront"
    assert info["vermagic"].split()[0] == manifest["kernel_version"]
    assert patched_tpmfront.source_dir(images_dir, said.append) == source  # made once


def test_a_patch_that_does_not_apply_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    guest_kernel: tuple[Path, dict[str, Any]],  # noqa: F811
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "manifest.json").write_text(json.dumps(guest_kernel[1]))
    try:
        patched_tpmfront.linux_source_deb(images)
    except patched_tpmfront.PatchedSourceError as e:
        pytest.skip(str(e))
    patches = tmp_path / "patches"
    patches.mkdir()
    shutil.copy(patched_tpmfront.MAKE_SOURCE, patches / "make_source.sh")
    (patches / "0001-bogus.patch").write_text(
        "--- a/drivers/char/tpm/xen-tpmfront.c\n+++ b/drivers/char/tpm/xen-tpmfront.c\n"
        "@@ -1,3 +1,3 @@\n-no such line\n+another\n context\n context\n"
    )
    monkeypatch.setattr(patched_tpmfront, "PATCH_DIR", patches)
    monkeypatch.setattr(patched_tpmfront, "MAKE_SOURCE", patches / "make_source.sh")
    with pytest.raises(
        patched_tpmfront.PatchedSourceError, match=r"0001-bogus\.patch does not apply"
    ):
        patched_tpmfront.source_dir(images, lambda _: None)
    assert not (images / "tpmfront-patched" / patched_tpmfront.recipe_key()).exists()


def test_the_key_follows_the_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patches = tmp_path / "p"
    shutil.copytree(patched_tpmfront.PATCH_DIR, patches)
    monkeypatch.setattr(patched_tpmfront, "PATCH_DIR", patches)
    monkeypatch.setattr(patched_tpmfront, "MAKE_SOURCE", patches / "make_source.sh")
    before = patched_tpmfront.recipe_key()
    first = sorted(patches.glob("0*.patch"))[0]
    first.write_text(first.read_text() + "\n")
    assert patched_tpmfront.recipe_key() != before
