"""dom0 of the Xen machine runs the package and its units (harness/targets/dom0_units.py):
the options the units get, the checks of what is installed, and the session's commands,
against a dom0 double that records them."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from harness.errors import TargetNotReady
from harness.targets import dom0_units, xen_driver
from harness.targets.xen_session import Dom0Session


def systemd_words(defaults: str, variable: str) -> list[str]:
    """What ``$VARIABLE`` becomes on a unit's command line: the EnvironmentFile value
    (shell-like quotes removed), split at whitespace."""
    for line in defaults.splitlines():
        if line.startswith(f"{variable}="):
            (value,) = shlex.split(line.split("=", 1)[1])
            return value.split()
    raise AssertionError(f"{variable} not in {defaults!r}")


def test_the_defaults_file_gives_each_unit_the_harness_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(xen_driver.MANAGER_FLAGS_ENV, "--no-fsync --command-timeout 90")
    text = dom0_units.defaults_text()
    assert systemd_words(text, "XENVTPM_MANAGER_OPTS") == [
        "--confine-swtpm",
        str(dom0_units.CONFINE_UID_BASE),  # every swtpm of our dom0 confined
        "--no-fsync",
        "--command-timeout",
        "90",
    ]
    assert systemd_words(text, "XENVTPM_BACKEND_OPTS") == ["--trace", xen_driver.TRACE_DIR]
    monkeypatch.delenv(xen_driver.MANAGER_FLAGS_ENV)
    assert systemd_words(dom0_units.defaults_text(), "XENVTPM_MANAGER_OPTS") == [
        "--confine-swtpm",
        str(dom0_units.CONFINE_UID_BASE),
    ]


def test_dom0_must_import_the_installed_package_not_a_copied_folder() -> None:
    good = f"0.1.0\n{dom0_units.INSTALLED_DIR}/__init__.py\n"
    assert dom0_units.check_installed(good) == "0.1.0"
    with pytest.raises(TargetNotReady, match="not imported from"):
        dom0_units.check_installed("0.1.0\n/opt/xenvtpm/xenvtpm/__init__.py\n")
    with pytest.raises(TargetNotReady):
        dom0_units.check_installed("")


def test_a_unit_without_a_main_process_is_an_error() -> None:
    assert dom0_units.read_pids("712\n714\n", ["manager", "backend"]) == {
        "manager": 712,
        "backend": 714,
    }
    with pytest.raises(TargetNotReady, match="no main process"):
        dom0_units.read_pids("712\n0\n", ["manager", "backend"])


class Dom0Double:
    """dom0 as the session sees it: records commands and copies; answers systemctl."""

    name = "dom0"
    connected = True

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.stdin: dict[str, bytes] = {}
        self.copied: list[tuple[Path, str]] = []
        self.pid = 700
        self.start_fails = False
        self.killed = 0
        self.polls = 0

    def run(
        self, command: str, timeout: float = 60.0, *, check: bool = False, stdin: bytes = b""
    ) -> tuple[int, str, str]:
        self.commands.append(command)
        if stdin:
            self.stdin[command] = stdin
        if command.startswith("dpkg -i"):
            return 0, f"0.1.0\n{dom0_units.INSTALLED_DIR}/__init__.py\n", ""
        if command.startswith("kill -KILL"):
            self.killed = int(command.split()[-1])
            return 0, "", ""
        if command.startswith("systemctl show -p ActiveState"):
            self.polls += 1
            if self.polls < 3:  # systemd's RestartSec: still the old one, then none
                pid = self.killed if self.polls == 1 else 0
                return 0, f"ActiveState=activating\nMainPID={pid}\n", ""
            return 0, "MainPID=750\nActiveState=active\n", ""
        if command.startswith("systemctl status"):
            return 3, "xenvtpm-manager.service: failed (Result: exit-code)", ""
        if "systemctl enable" in command or "systemctl restart" in command:
            if self.start_fails:
                return 1, "", "Job for xenvtpm-manager.service failed."
            pids = []
            for _ in range(command.count(".service") // 2):
                self.pid += 1
                pids.append(str(self.pid))
            return 0, "\n".join(pids) + "\n", ""
        return 0, "", ""

    def check(self, command: str, timeout: float = 60.0) -> str:
        rc, out, err = self.run(command, timeout)
        assert rc == 0, (command, err)
        return out

    def put(self, local: Path | str, remote: str) -> None:
        self.copied.append((Path(local), remote))


@pytest.fixture
def session(tmp_path: Path) -> tuple[Dom0Session, Dom0Double]:
    dom0 = Dom0Double()
    session = Dom0Session([], tmp_path, lambda _: None, packaged=True)
    session.dom0 = dom0  # type: ignore[assignment]
    return session, dom0


def test_dom0_gets_the_package_built_from_the_runs_driver(
    session: tuple[Dom0Session, Dom0Double], tmp_path: Path
) -> None:
    s, dom0 = session
    s.deploy()
    ((deb, remote),) = dom0.copied
    assert deb.parent == tmp_path and deb.name.endswith("_all.deb")  # kept as an artifact
    assert remote == f"{dom0_units.REMOTE_DEB_DIR}/{deb.name}"
    assert dom0_units.install_command(remote) in dom0.commands
    assert s.installed["version"] == "0.1.0" and len(s.installed["sha256"]) == 64


def test_the_daemons_start_through_the_units_with_the_options_written_first(
    session: tuple[Dom0Session, Dom0Double],
) -> None:
    s, dom0 = session
    s.start_dom0_daemons()
    write = next(i for i, c in enumerate(dom0.commands) if dom0_units.DEFAULTS_FILE in c)
    start = dom0.commands.index(dom0_units.start_command())
    assert write < start
    assert dom0.stdin[dom0.commands[write]].decode() == dom0_units.defaults_text()
    assert s.daemons["dom0"] == {"manager": 701, "backend": 702}
    assert not any("nohup" in c for c in dom0.commands)
    s.restart_manager()
    assert dom0_units.restart_command("manager") in dom0.commands
    assert s.daemons["dom0"] == {"manager": 703, "backend": 702}  # the new pid is watched
    (check,) = [c for c in s.health_checks() if "manager" in c.problem]
    assert check.test == "kill -0 703" and "journalctl -u xenvtpm-manager" in check.problem


def test_a_unit_that_fails_to_start_says_why(session: tuple[Dom0Session, Dom0Double]) -> None:
    s, dom0 = session
    dom0.start_fails = True
    with pytest.raises(TargetNotReady, match=r"(?s)exited 1.*failed \(Result: exit-code\)"):
        s.start_dom0_daemons()


def test_a_crashed_unit_is_watched_again_once_systemd_started_a_new_one(
    session: tuple[Dom0Session, Dom0Double],
) -> None:
    s, dom0 = session
    s.start_dom0_daemons()
    s.crash_unit("backend", timeout=30)
    assert dom0.killed == 702 and dom0.polls == 3
    assert s.daemons["dom0"]["backend"] == 750


def test_a_crash_is_refused_where_the_daemons_are_not_units(tmp_path: Path) -> None:
    s = Dom0Session([], tmp_path, lambda _: None, packaged=False)
    s.dom0 = Dom0Double()  # type: ignore[assignment]
    with pytest.raises(TargetNotReady, match="not running as a unit"):
        s.crash_unit("backend")
