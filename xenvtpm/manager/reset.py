"""``python3 -m xenvtpm reset --manager SOCKET INSTANCE``: an operator's power cycle.

An instance whose volatile state was lost under a running domain answers in failure
mode until that domain reboots (see :mod:`xenvtpm.manager.continuity`). When the operator knows
better (the guest will re-measure, or is being repaired), this resets the instance now:
the manager power-cycles it (PCRs reset, NV and persistent keys kept) and failure mode
ends. The guest then runs on a TPM whose PCRs no longer match its boot: that is the
operator's explicit choice, which is why no guest and no backend can send it.

Spec: :data:`xenvtpm.tpm.XENVTPM_CC_RESET` on the manager's socket (dom0 only, 0600).
"""

from __future__ import annotations

import argparse
import sys

from xenvtpm.errors import XenVTPMError
from xenvtpm.manager.client import ManagerClient
from xenvtpm.tpm import TPM_RC, reset_command, response_code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xenvtpm reset",
        description="Power-cycle a vTPM instance (PCRs reset, NV kept) and end its failure "
        "mode. Its running guest then sees a reset TPM: use when that is what you want.",
    )
    p.add_argument("--manager", required=True, help="the vTPM manager's socket (/dev/vtpm)")
    p.add_argument("instance", type=int, help="the vTPM instance id")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with ManagerClient(args.manager, timeout=args.timeout) as client:
            response = client.transact(args.instance, reset_command())
    except (OSError, XenVTPMError) as exc:
        print(f"reset of instance {args.instance} failed: {exc}", file=sys.stderr)
        return 1
    rc = response_code(response)
    if rc != TPM_RC.SUCCESS:
        print(f"reset of instance {args.instance}: manager answered 0x{rc:x}", file=sys.stderr)
        return 1
    print(f"instance {args.instance} reset")
    return 0
