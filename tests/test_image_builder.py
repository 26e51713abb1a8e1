"""The image builder's steps without debootstrap: the kernel selftests step on a fake
dom0 rootfs (the source must be the kernel's own version, only the tpm2 directory is
kept, the big tarball is deleted), and how a build step is judged: by its exit status,
never by the end of its output (issue 19).
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from harness.errors import ImageBuildError
from harness.image_builder import (
    KERNEL_SOURCE_TARBALL,
    SELFTESTS_DIR,
    Builder,
    upstream_version,
)
from harness.process import proc_stat

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs dpkg-query")

KERNEL = "6.1.0-50-amd64"


def fake_rootfs(root: Path, kernel: str, source: str) -> Path:
    """A rootfs with a dpkg database holding both packages and a small source tarball."""
    dpkg = root / "var" / "lib" / "dpkg"
    (dpkg / "info").mkdir(parents=True)
    (dpkg / "updates").mkdir()
    stanzas = [
        f"Package: linux-image-{KERNEL}\nStatus: install ok installed\nVersion: {kernel}\n"
        "Architecture: amd64\n",
        f"Package: linux-source-6.1\nStatus: install ok installed\nVersion: {source}\n"
        "Architecture: all\n",
    ]
    (dpkg / "status").write_text("\n".join(stanzas))
    tarball = root / KERNEL_SOURCE_TARBALL
    tarball.parent.mkdir(parents=True)
    files = {
        "linux-source-6.1/tools/testing/selftests/tpm2/tpm2_tests.py": b"class SmokeTest: ...\n",
        "linux-source-6.1/tools/testing/selftests/tpm2/test_smoke.sh": b"#!/bin/sh\n",
        "linux-source-6.1/kernel/sched/core.c": b"int x;\n",
    }
    with tarfile.open(tarball, "w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


def builder(tmp_path: Path) -> Builder:
    return Builder(tmp_path, "http://m.example/debian", tmp_path, "ssh-ed25519 AAA", print)


def test_upstream_version_drops_epoch_and_revision() -> None:
    assert upstream_version("6.1.176-1") == "6.1.176"
    assert upstream_version("1:6.1.176-1+deb12u1") == "6.1.176"
    assert upstream_version("6.1.176") == "6.1.176"


def test_selftests_extracted_and_tarball_deleted(tmp_path: Path) -> None:
    rootfs = fake_rootfs(tmp_path / "dom0.rootfs", "6.1.176-1", "6.1.176-1")
    info = builder(tmp_path).install_selftests(rootfs, KERNEL)
    assert info == {"kernel_package_version": "6.1.176-1", "kernel_source_version": "6.1.176-1"}
    dest = rootfs / SELFTESTS_DIR
    assert sorted(p.name for p in dest.iterdir()) == ["SOURCE", "test_smoke.sh", "tpm2_tests.py"]
    assert (dest / "SOURCE").read_text().startswith("linux-source-6.1 6.1.176-1 ")
    assert not (rootfs / KERNEL_SOURCE_TARBALL).exists()


def test_source_of_another_kernel_version_stops_the_build(tmp_path: Path) -> None:
    rootfs = fake_rootfs(tmp_path / "dom0.rootfs", "6.1.176-1", "6.1.170-3")
    with pytest.raises(ImageBuildError, match=r"6\.1\.170 != 6\.1\.176"):
        builder(tmp_path).install_selftests(rootfs, KERNEL)
    assert (rootfs / KERNEL_SOURCE_TARBALL).exists()  # nothing done


# A build step's fate is judged by its exit status, never by poll() at end of output:
# stdout reaching EOF does not mean the status is there yet (issue 19: tar was killed
# with SIGTERM in that gap and the build failed with "exit code -15").


def test_a_step_that_closes_its_output_before_exiting_succeeds(tmp_path: Path) -> None:
    step = ["sh", "-c", "echo working; exec >&- 2>&-; sleep 0.3; exit 0"]
    builder(tmp_path).run("late exit", step)  # no ImageBuildError
    assert "working" in (tmp_path / "build.log").read_text()


def test_a_step_that_closes_its_output_then_fails_reports_its_own_exit_code(
    tmp_path: Path,
) -> None:
    step = ["sh", "-c", "exec >&- 2>&-; sleep 0.3; exit 7"]
    with pytest.raises(ImageBuildError, match="exit code 7"):
        builder(tmp_path).run("late failure", step)


def test_steps_that_exit_right_after_their_output_always_succeed(tmp_path: Path) -> None:
    b = builder(tmp_path)
    for _ in range(200):
        b.run("quick", ["sh", "-c", "echo done"])


def test_an_interrupted_step_is_stopped_with_everything_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    step = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo 'I: Retrieving x'; wait"]
    b = builder(tmp_path)

    def interrupt(message: str) -> None:  # Ctrl-C while the step runs
        raise KeyboardInterrupt

    b.say = interrupt
    with pytest.raises(KeyboardInterrupt):
        b.run("interrupted", step, progress=True)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while (st := proc_stat(child)) is not None and st.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert st is None or not st.running, "the step's background child was left running"
