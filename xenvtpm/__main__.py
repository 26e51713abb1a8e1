"""``python3 -m xenvtpm COMMAND ...``: one entry point per daemon and tool."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "frontend": ("xenvtpm.frontend.frontend", "guest side: xenbus handshake, ring, TPM endpoint"),
    "backend": (
        "xenvtpm.backend.backend",
        "dom0 side: validates requests, forwards to the manager",
    ),
    "manager": ("xenvtpm.manager.cli", "the seed's /dev/vtpm: one swtpm per vTPM instance"),
    "simxend": ("xenvtpm.sim.simxend", "the simulated Xen hypervisor (xenstore, grants, events)"),
    "provision": ("xenvtpm.manager.provision", "make vTPM instances (swtpm_setup) ahead of time"),
    "reset": (
        "xenvtpm.manager.reset",
        "operator: power-cycle an instance, ending its failure mode",
    ),
    "attach": ("xenvtpm.tools.toolstack", "toolstack: write a vTPM's xenstore directories"),
    "detach": ("xenvtpm.tools.toolstack", "toolstack: remove a vTPM's xenstore directories"),
    "rogue": (
        "xenvtpm.tools.rogue_cli",
        "a hostile frontend: one attack on the backend, JSON lines",
    ),
    "probe": ("xenvtpm.tools.probe", "try one xenstore/grant/event operation as this domain"),
    "relay": ("xenvtpm.tools.relay", "guest: framed TPM commands on stdin to /dev/tpm0 (harness)"),
}


def usage() -> str:
    lines = ["usage: python3 -m xenvtpm COMMAND [--help] ...", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if name in ("attach", "detach"):
        rest = [name, *rest]
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
