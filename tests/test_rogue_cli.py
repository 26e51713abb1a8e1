"""The rogue frontend's command line (``python -m xenvtpm rogue``). Its attacks run
against a target in scenarios/test_hostile.py."""

from __future__ import annotations

import os
import subprocess

from harness.paths import REPO_ROOT as ROOT


def test_rogue_help_lists_every_attack() -> None:
    result = subprocess.run(
        [os.environ.get("PYTHON", "python3"), "-m", "xenvtpm", "rogue", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    for attack in ("size-mismatch", "flood", "race", "reopen", "garbage-nodes", "cancel-flood"):
        assert attack in result.stdout
