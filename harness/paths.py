"""The checkout's root, defined once for the harness, the scenarios and the tests.

Subprocesses (frontends, the manager, endpoints, fuzz workers) get it as ``PYTHONPATH``
so that they import this same tree, and recipes (``images/``), the fuzz corpus and
``conftest.py`` are found beside it. ``noxfile.py`` keeps a copy of its own: nox
imports it before this package is importable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
