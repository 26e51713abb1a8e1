"""The image cache without a build (issue 16, "Images that work anywhere"): a cached
build of the current recipe is found without the host's apt sources, and pruning
removes what an interrupted build left. No debootstrap runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.errors import ImageBuildError
from harness.images import (
    CACHE_ENV,
    build_images,
    ensure_ssh_key,
    prune,
    recipe_key,
)

MANIFEST = {
    "kernel_version": "6.1.0-50-amd64",
    "dom0_kernel": "/vmlinuz",
    "dom0_initrd": "/initrd.img",
    "mirror": "http://m.example/debian",
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    d = tmp_path / "recipes"
    d.mkdir()
    (d / "dom0.packages").write_text("python3\n")
    return d


def cached_build(cache: Path, recipes: Path, mirror: str) -> Path:
    """What a finished build leaves: ``<recipe key>/manifest.json`` (and images)."""
    _, pubkey = ensure_ssh_key(cache)
    build = cache / recipe_key(recipes, mirror, pubkey)
    build.mkdir(parents=True)
    (build / "manifest.json").write_text(json.dumps(dict(MANIFEST, mirror=mirror)))
    return build


def test_a_cached_build_is_used_without_apt_sources(
    cache: Path, recipes: Path, tmp_path: Path
) -> None:
    """A host with no bookworm apt source (offline, or another distribution) uses the
    cached images it has; the mirror matters only to a build."""
    build = cached_build(cache, recipes, "http://m.example/debian")
    no_sources = tmp_path / "etc-apt"
    no_sources.mkdir()
    images = build_images(recipes=recipes, sources=no_sources)
    assert images.dir == build and not images.built
    assert images.kernel_version == "6.1.0-50-amd64"


def test_a_cache_of_another_recipe_is_not_used(cache: Path, recipes: Path, tmp_path: Path) -> None:
    cached_build(cache, recipes, "http://m.example/debian")
    (recipes / "dom0.packages").write_text("python3 kmod\n")  # the recipe changed since
    no_sources = tmp_path / "etc-apt"
    no_sources.mkdir()
    with pytest.raises(ImageBuildError, match="no apt source for Debian bookworm"):
        build_images(recipes=recipes, sources=no_sources)


def test_prune_removes_half_built_folders(cache: Path, recipes: Path) -> None:
    """An interrupted build leaves ``<key>.tmp`` (gigabytes of rootfs); prune removes
    it with the old builds and keeps the newest."""
    kept = cached_build(cache, recipes, "http://m.example/debian")
    half = cache / "0123456789abcdef.tmp"
    (half / "dom0-rootfs").mkdir(parents=True)
    prune(cache, keep=1)
    assert kept.exists() and not half.exists()
