"""``python3 -m xenvtpm rogue ATTACK``: the hostile frontend's command line.

Apart from :mod:`xenvtpm.tools.rogue` so that the attack modules, which import the rogue,
are imported here (registering their attacks) and not back from the rogue itself.
"""

from __future__ import annotations

import argparse
import sys

from xenvtpm.errors import XenError
from xenvtpm.tools import rogue_attacks, rogue_v2  # noqa: F401  (register the attacks)
from xenvtpm.tools.rogue import ATTACKS, Rogue, RogueError, S, emit
from xenvtpm.xen import open_hypervisor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xenvtpm rogue",
        description="A hostile vTPM frontend: handshake, then one attack; one JSON line per "
        "observation. Attacks:\n"
        + "\n".join(f"  {name:<16} {text}" for name, (_, text) in ATTACKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("attack", choices=sorted(ATTACKS))
    p.add_argument("--devid", type=int, default=0)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument("--seconds", type=float, default=5.0, help="length of flood/race/storm")
    p.add_argument("--rate", type=float, default=100_000, help="notifies per second (flood)")
    p.add_argument("--count", type=int, default=1000, help="reopen cycles / race rounds")
    p.add_argument(
        "--settle",
        type=float,
        default=0.2,
        help="seconds for the backend to see each handshake-order step",
    )
    p.add_argument("--quick", action="store_true", help="50 reopen cycles, 1 s flood/race")
    p.add_argument(
        "--foreign-domid",
        type=int,
        default=None,
        help="domain to grant pages to in bad-refs (default: this domain)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.count = min(args.count, 50)
        args.seconds = min(args.seconds, 1.0)
    try:
        hv = open_hypervisor()
    except XenError as e:
        print(f"rogue: no hypervisor: {e}", file=sys.stderr)
        return 1
    if args.foreign_domid is None:
        args.foreign_domid = getattr(hv, "domid", 0)
    rogue = Rogue(hv, args.devid, args.timeout)
    try:
        if rogue.wait_backend([S.INIT_WAIT], 10.0) != S.INIT_WAIT:
            raise RogueError(f"backend not in InitWait (state {rogue.backend_state()})")
        ATTACKS[args.attack][0](rogue, args)
        emit(args.attack, "end", "done", backend_state=rogue.backend_state())
    except (RogueError, XenError) as e:
        emit(args.attack, "end", "error", message=str(e))
        return 1
    finally:
        rogue.close()
        hv.close()
    return 0
