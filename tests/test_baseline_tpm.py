"""The dom0 baseline TPM's lifecycle, its real shell commands run by a local bash in a
fake root: ``swtpm`` and ``modprobe`` are stand-ins on PATH, and ``/sys/class/tpm`` and
the device tests point into a temporary directory (no kernel vTPM proxy is touched).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from harness.baseline_tpm import ProxySwtpm
from harness.errors import LaunchFailure, TargetNotReady

pytestmark = pytest.mark.skipif(
    shutil.which("setsid") is None or shutil.which("stdbuf") is None,
    reason="needs util-linux setsid and coreutils stdbuf",
)

FAKE_SWTPM = """\
#!/bin/bash
# Stand-in for swtpm chardev --vtpm-proxy: the chip appears, and goes on SIGTERM.
R={root}
mkdir -p $R/dev $R/sys/class/tpm/tpm{n}
touch $R/dev/tpm{n} $R/dev/tpmrm{n}
echo "New TPM device: /dev/tpm{n} (major/minor = 253/{n})"
trap 'rm -rf $R/dev/tpm{n} $R/dev/tpmrm{n} $R/sys/class/tpm/tpm{n}; exit 0' TERM
while sleep 0.1; do :; done
"""


class FakeDom0:
    """A Shell (``ProxySwtpm``'s ``(command, timeout)``) running bash here."""

    def __init__(self, root: Path, device: int = 0) -> None:
        self.root = root
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        (root / "sys" / "class" / "tpm").mkdir(parents=True)
        (bin_dir / "swtpm").write_text(textwrap.dedent(FAKE_SWTPM.format(root=root, n=device)))
        (bin_dir / "modprobe").write_text("#!/bin/sh\nexit 0\n")
        for tool in bin_dir.iterdir():
            tool.chmod(0o755)
        self.env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        self.commands: list[str] = []

    def __call__(self, command: str, timeout: float) -> tuple[int, str, str]:
        self.commands.append(command)
        local = command.replace("/sys/class/tpm", f"{self.root}/sys/class/tpm")
        local = local.replace("test -c /dev/", f"test -e {self.root}/dev/")
        proc = subprocess.run(
            ["bash", "-c", local], capture_output=True, text=True, timeout=timeout, env=self.env
        )
        return proc.returncode, proc.stdout, proc.stderr

    def swtpm_running(self, pid: int) -> bool:
        try:
            return "swtpm" in Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            return False


def test_start_serves_tpm0_and_close_removes_everything(tmp_path: Path) -> None:
    dom0 = FakeDom0(tmp_path)
    with ProxySwtpm(dom0) as tpm:
        assert tpm.pid is not None and dom0.swtpm_running(tpm.pid)
        assert (tmp_path / "sys" / "class" / "tpm" / "tpm0").exists()
        state, pid = tpm.state_dir, tpm.pid
        assert state is not None and Path(state, "swtpm.out").exists()
    assert not dom0.swtpm_running(pid)
    assert not (tmp_path / "sys" / "class" / "tpm" / "tpm0").exists()
    assert not Path(state).exists()
    tpm.close()  # idempotent


def test_another_chip_than_tpm0_is_refused_and_rolled_back(tmp_path: Path) -> None:
    dom0 = FakeDom0(tmp_path, device=1)
    states_before = set(Path("/tmp").glob("xenvtpm-baseline.*"))
    tpm = ProxySwtpm(dom0)
    with pytest.raises(LaunchFailure, match=r"made /dev/tpm1, not /dev/tpm0"):
        tpm.start()
    assert tpm.pid is None and tpm.state_dir is None
    assert not (tmp_path / "sys" / "class" / "tpm" / "tpm1").exists()  # swtpm stopped
    assert set(Path("/tmp").glob("xenvtpm-baseline.*")) == states_before  # state deleted


def test_a_dom0_with_a_tpm_already_is_refused(tmp_path: Path) -> None:
    dom0 = FakeDom0(tmp_path)
    (tmp_path / "sys" / "class" / "tpm" / "tpm0").mkdir()
    with pytest.raises(TargetNotReady, match=r"already has TPM chips \(tpm0\)"):
        ProxySwtpm(dom0).start()
    assert not any("swtpm chardev" in c for c in dom0.commands)
