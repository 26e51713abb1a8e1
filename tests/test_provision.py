"""``python3 -m xenvtpm provision`` and the CA configuration it shares with the manager."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

from harness.paths import REPO_ROOT
from xenvtpm.manager.swtpm import PERMALL, write_ca_config


def test_concurrent_first_writers_of_the_ca_config_all_succeed(tmp_path: Path) -> None:
    """Two instances manufactured at once on a fresh state root both write the CA
    configuration: neither may fail (a shared temporary file name made one fail with
    FileNotFoundError on a fresh dom0)."""
    errors: list[BaseException] = []
    for _ in range(40):  # each round: a fresh root, 8 first writers at once
        shutil.rmtree(tmp_path / "ca", ignore_errors=True)
        barrier = threading.Barrier(8)

        def writer(barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait(5)
                write_ca_config(tmp_path)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []
    ca = tmp_path / "ca"
    assert sorted(p.name for p in ca.iterdir()) == [
        "localca.conf",
        "localca.options",
        "swtpm_setup.conf",
    ]


def test_provision_makes_each_instance_once(tmp_path: Path) -> None:
    """Two instances made at once (real swtpm_setup); a second run keeps them."""

    def provision(*instances: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "xenvtpm",
                "provision",
                "--state-root",
                str(tmp_path),
                *instances,
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = provision("7", "8")
    assert first.returncode == 0, first.stderr
    lines = sorted(first.stdout.splitlines())
    assert [line.split(": made in ")[0] for line in lines] == ["instance 7", "instance 8"]
    state = {i: (tmp_path / i / PERMALL).read_bytes() for i in ("7", "8")}
    assert state["7"] != state["8"]  # two TPMs, two seeds
    again = provision("7")
    assert again.returncode == 0 and again.stdout.strip() == "instance 7: exists, kept"
    assert (tmp_path / "7" / PERMALL).read_bytes() == state["7"]
