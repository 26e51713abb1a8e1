"""``python3 -m xenvtpm manager``: run the vTPM manager (:mod:`xenvtpm.manager.manager`) until
SIGTERM/SIGINT, which is a planned stop (commands in flight finish, swtpm's volatile
state is saved for the next manager). It runs as every daemon does
(:func:`xenvtpm.daemon.serve`): ``XENVTPM_LOG_LEVEL`` sets its level unless
``--log-level`` does."""

from __future__ import annotations

import argparse
import signal

from xenvtpm.daemon import default_log_level, serve
from xenvtpm.loop import Loop
from xenvtpm.manager.confinement import DEFAULT_FILE_SIZE_LIMIT, Confinement
from xenvtpm.manager.continuity import BOOT_ID_FILE
from xenvtpm.manager.manager import Manager


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m xenvtpm manager`` (everything after ``manager``)."""
    p = argparse.ArgumentParser(
        prog="xenvtpm manager",
        description="vTPM manager: route instance-prefixed TPM packets to one swtpm each.",
    )
    p.add_argument("--socket", required=True, help="SOCK_SEQPACKET path to listen on")
    p.add_argument("--state-root", required=True, help="directory of per-instance state")
    p.add_argument("--swtpm", default="swtpm", help="swtpm executable (default: %(default)s)")
    p.add_argument("--swtpm-setup", default="swtpm_setup", help="swtpm_setup executable")
    p.add_argument(
        "--command-timeout",
        type=float,
        default=60.0,
        help="seconds before a silent swtpm is restarted (default: %(default)s)",
    )
    p.add_argument("--max-instances", type=int, default=1024, help="instances served at most")
    p.add_argument(
        "--boot-id-file",
        default=BOOT_ID_FILE,
        help="this host boot's id; saved state of another boot is never restored "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--no-fsync",
        dest="durable",
        action="store_false",
        help="answer before swtpm's state changes are on disk (benchmarks only: an "
        "acknowledged NV write can then be lost in a power cut)",
    )
    p.add_argument(
        "--confine-swtpm",
        metavar="UID_BASE",
        type=int,
        help="run each instance's swtpm as uid UID_BASE + instance, alone in its state "
        "directory, with no network and a file-size limit (root only; "
        "xenvtpm/manager/confinement.py)",
    )
    p.add_argument(
        "--swtpm-file-size-limit",
        type=int,
        default=DEFAULT_FILE_SIZE_LIMIT,
        metavar="BYTES",
        help="with --confine-swtpm: RLIMIT_FSIZE of each swtpm (default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default=default_log_level(),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the manager until SIGTERM/SIGINT; exit 0 after a clean shutdown."""
    args = build_parser().parse_args(argv)

    def build(loop: Loop) -> Manager:
        confinement = None
        if args.confine_swtpm is not None:
            confinement = Confinement(args.confine_swtpm, args.swtpm_file_size_limit)
        manager = Manager(
            args.socket,
            args.state_root,
            swtpm=args.swtpm,
            swtpm_setup=args.swtpm_setup,
            command_timeout=args.command_timeout,
            max_instances=args.max_instances,
            boot_id_file=args.boot_id_file,
            durable=args.durable,
            loop=loop,
            confinement=confinement,
        )
        for signum in (signal.SIGTERM, signal.SIGINT):  # a planned stop: drain, then stop
            loop.call_on_signal(signum, manager.request_stop)
        loop.call_on_signal(signal.SIGUSR1, manager.request_status)
        return manager

    return serve("manager", args.log_level, build)
