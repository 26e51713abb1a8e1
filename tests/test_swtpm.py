"""One swtpm process's lifecycle (xenvtpm/manager/swtpm.py), with stand-in swtpm programs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xenvtpm.errors import InstanceStartError
from xenvtpm.manager.swtpm import PERMALL, Swtpm, SwtpmConfig

# Closes every descriptor it was given (so the control channel reads end of file), says
# why it gives up, and exits a moment later: a swtpm refusing its options, as it exits.
REFUSING_SWTPM = f"""#!{sys.executable}
import os, sys, time
print("swtpm: refusing these options", flush=True)
os.closerange(3, 1024)
time.sleep(0.3)
sys.exit(3)
"""


def test_a_swtpm_that_exits_before_answering_is_reported_with_its_exit_code(
    tmp_path: Path,
) -> None:
    fake = tmp_path / "swtpm"
    fake.write_text(REFUSING_SWTPM)
    fake.chmod(0o755)
    config = SwtpmConfig(state_root=tmp_path / "state", swtpm=str(fake), ctrl_timeout=5.0)
    (config.state_root / "7").mkdir(parents=True)
    (config.state_root / "7" / PERMALL).write_bytes(b"made")  # no swtpm_setup
    with pytest.raises(InstanceStartError) as failure:
        Swtpm(7, config).start()
    assert failure.value.returncode == 3
    assert "refusing these options" in str(failure.value)
