"""The systemd units of deploy/systemd/ (issue 18, services): valid units, command lines
the daemons accept, the paths the Xen harness uses, and the stop that keeps PCRs."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT
from harness.targets import xen_driver
from xenvtpm.backend.backend import build_parser as backend_parser
from xenvtpm.frontend.frontend import build_parser as frontend_parser
from xenvtpm.manager.cli import build_parser as manager_parser

UNITS = REPO_ROOT / "deploy" / "systemd"
PARSERS = {"manager": manager_parser, "backend": backend_parser, "frontend": frontend_parser}


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / f"xenvtpm-{name}.service")
    return parser


def exec_start(name: str) -> list[str]:
    argv = shlex.split(unit(name)["Service"]["ExecStart"])
    assert argv[:3] == ["/usr/bin/python3", "-m", "xenvtpm"] and argv[3] == name, argv
    return argv[4:]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("path", sorted(UNITS.glob("*.service")), ids=lambda p: p.name)
def test_systemd_analyze_verify_passes(path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_each_command_line_parses_with_its_daemons_parser(name: str) -> None:
    PARSERS[name]().parse_args(exec_start(name))
    assert unit(name)["Service"]["Type"] == "notify"


def test_the_units_use_the_harness_paths() -> None:
    """What the harness tests on Xen is what the units run: the same socket, state root
    and uuid map (xen_driver.manager_args / backend_args)."""
    manager = manager_parser().parse_args(exec_start("manager"))
    harness_manager = manager_parser().parse_args(shlex.split(xen_driver.manager_args())[1:])
    assert (manager.socket, manager.state_root) == (
        harness_manager.socket,
        harness_manager.state_root,
    )
    backend = backend_parser().parse_args(exec_start("backend"))
    harness_backend = backend_parser().parse_args(shlex.split(xen_driver.backend_args())[1:])
    assert backend.manager == harness_backend.manager
    assert backend.uuid_map == harness_backend.uuid_map
    assert backend.manager == manager.socket


def test_the_backend_starts_after_the_manager_and_before_xendomains() -> None:
    backend = unit("backend")["Unit"]
    assert "xenvtpm-manager.service" in backend["After"].split()
    assert "xenvtpm-manager.service" in backend["Wants"].split()
    assert "xendomains.service" in backend["Before"].split()


def test_stop_signals_the_manager_alone_so_it_saves_swtpm_state() -> None:
    """KillMode=mixed: SIGTERM to the manager only (it saves every swtpm's volatile
    state, then stops them); control-group would SIGTERM swtpm at the same moment,
    and PCRs would not survive a planned restart."""
    service = unit("manager")["Service"]
    assert service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) >= 60
