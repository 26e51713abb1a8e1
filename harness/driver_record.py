"""What build of the driver a run deployed: the git commit of its tree, and the version
of its package folder. Recorded by certify (``versions.json``, the report)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from harness.paths import REPO_ROOT


def driver_build(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The git commit of the driver being deployed, and whether the tree had changes."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {
        "commit": git("rev-parse", "HEAD") or "unknown (not a git checkout)",
        "describe": git("describe", "--always", "--dirty"),
        "dirty": bool(changed),
        "changed_files": len(changed),
    }


def package_version(package: Path) -> str:
    """``__version__`` of a xenvtpm package folder, or "unknown"."""
    try:
        found = re.search(r'^__version__ = "([^"]+)"', (package / "__init__.py").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"
