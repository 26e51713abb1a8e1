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
from harness.targets import dom0_units, xen_driver
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


def exec_start(name: str, options: list[str] | None = None) -> list[str]:
    """The daemon's arguments, with ``$XENVTPM_<NAME>_OPTS`` (systemd splits it at
    whitespace, and an unset one is no argument) replaced by ``options``."""
    argv = shlex.split(unit(name)["Service"]["ExecStart"])
    assert argv[:3] == ["/usr/bin/python3", "-m", "xenvtpm"] and argv[3] == name, argv
    assert argv[-1] == f"${options_variable(name)}", argv
    return argv[4:-1] + (options or [])


def options_variable(name: str) -> str:
    return f"XENVTPM_{name.upper()}_OPTS"


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
    backend = backend_parser().parse_args(exec_start("backend"))
    assert backend.manager == manager.socket


@pytest.mark.parametrize("name", ["manager", "backend"])
def test_the_harness_runs_the_units_command_lines_with_its_options(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Xen the harness starts these units (harness/targets/dom0_units.py) with its
    options in /etc/default/xenvtpm: the unit's command line with them is exactly what
    xen_driver says each daemon runs, with the manager's flags from the environment, and
    each swtpm confined."""
    monkeypatch.setenv(xen_driver.MANAGER_FLAGS_ENV, "--no-fsync")
    options = {"manager": dom0_units.manager_options, "backend": xen_driver.backend_options}
    args = {"manager": xen_driver.manager_args, "backend": xen_driver.backend_args}
    confined = ["--confine-swtpm", str(dom0_units.CONFINE_UID_BASE)] if name == "manager" else []
    parser = PARSERS[name]()
    via_unit = parser.parse_args(exec_start(name, options[name]()))
    assert via_unit == parser.parse_args(shlex.split(args[name]())[1:] + confined)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_each_unit_takes_its_options_from_etc_default_xenvtpm(name: str) -> None:
    assert unit(name)["Service"]["EnvironmentFile"] == "-/etc/default/xenvtpm"
    exec_start(name)  # ends with $XENVTPM_<NAME>_OPTS


def test_the_manager_may_give_a_confined_swtpm_its_own_network_namespace() -> None:
    """--confine-swtpm runs each swtpm under ``unshare --net``: the manager's unit lets
    it make network namespaces, and no other kind."""
    assert unit("manager")["Service"]["RestrictNamespaces"] == "net"
    assert unit("backend")["Service"]["RestrictNamespaces"] == "yes"


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
