"""``python3 -m xenvtpm provision --state-root DIR INSTANCE...``: make vTPMs ahead of time.

The manager makes an instance's TPM (EK, EK and platform certificates, by swtpm_setup)
the first time a guest binds it, which takes 20-30 s in a TCG dom0. An operator, or the
harness before it saves a booted machine, can make them beforehand, all at once; the
manager then finds the state and only starts swtpm. Instances already made are kept.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from xenvtpm.errors import VTPMError
from xenvtpm.manager.swtpm import Swtpm, SwtpmConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xenvtpm provision",
        description="Manufacture vTPM instances (swtpm_setup) before any guest binds them.",
    )
    p.add_argument("--state-root", required=True, help="the manager's --state-root")
    p.add_argument("--swtpm-setup", default="swtpm_setup", help="swtpm_setup executable")
    p.add_argument("instances", nargs="+", type=int, help="vTPM instance ids")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = SwtpmConfig(Path(args.state_root), swtpm_setup=args.swtpm_setup)

    def make(instance: int) -> str:
        t0 = time.monotonic()
        made = Swtpm(instance, config).manufacture()
        return f"instance {instance}: " + (
            f"made in {time.monotonic() - t0:.1f} s" if made else "exists, kept"
        )

    try:
        with ThreadPoolExecutor(len(args.instances)) as pool:
            for line in pool.map(make, args.instances):
                print(line)
    except VTPMError as e:
        print(f"cannot provision: {e}", file=sys.stderr)
        return 1
    return 0
