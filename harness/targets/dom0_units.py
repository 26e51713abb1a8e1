"""dom0's daemons as an administrator runs them (issue 18): the run's driver built into
``xenvtpm_<version>_all.deb`` (deploy/deb.py), installed in dom0 with dpkg, and the
manager and the backend started through the package's systemd units, with the
harness's options in ``/etc/default/xenvtpm``. Their logs are read from the journal.

The Xen machine under QEMU does this on every run, so that CI tests the package and the
units users install. Guests keep the copied folder (our frontend's development path);
a user's own host (certify) keeps it too: the harness installs no package there.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from harness.errors import TargetNotReady
from harness.paths import REPO_ROOT
from harness.targets import xen_driver
from harness.transport_ssh import REMOTE_PACKAGE_DIR

UNITS = {"manager": "xenvtpm-manager.service", "backend": "xenvtpm-backend.service"}
# Each swtpm confined, as the README advises a host: uid 620000 + instance, no network
CONFINE_UID_BASE = 620000
DEFAULTS_FILE = "/etc/default/xenvtpm"
INSTALLED_DIR = "/usr/lib/python3/dist-packages/xenvtpm"
REMOTE_DEB_DIR = "/var/cache/xenvtpm"
DEB_BUILDER = REPO_ROOT / "deploy" / "deb.py"


def build_deb(package: Path, out_dir: Path) -> Path:
    """``deploy/deb.py`` over the run's package folder (``--driver`` may name another)."""
    result = subprocess.run(
        [sys.executable, str(DEB_BUILDER), str(out_dir), "--source", str(package)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise TargetNotReady("package", f"deploy/deb.py failed: {result.stderr.strip()}")
    return Path(result.stdout.strip().splitlines()[-1])


def install_command(remote_deb: str) -> str:
    """dpkg installs the package (what ``apt-get install ./x.deb`` runs once its
    dependencies are there, without apt's 20 s of reading its lists under TCG); the
    copied folder goes from dom0, and ``python3 -m xenvtpm`` run from its old place must
    import the installed package. Prints the installed version, then where it imports."""
    return (
        f"dpkg -i {shlex.quote(remote_deb)} >/dev/null && "
        f"rm -rf {REMOTE_PACKAGE_DIR}/xenvtpm && mkdir -p {REMOTE_PACKAGE_DIR} && "
        "dpkg-query -W -f '${Version}\\n' xenvtpm && "
        f"cd {REMOTE_PACKAGE_DIR} && python3 -c 'import xenvtpm; print(xenvtpm.__file__)'"
    )


def check_installed(output: str) -> str:
    """The installed version, from what ``install_command`` printed; TargetNotReady
    unless dom0's python3 imports the package from where dpkg put it."""
    lines = output.split()
    if len(lines) != 2 or not lines[1].startswith(f"{INSTALLED_DIR}/"):
        raise TargetNotReady("dom0", f"xenvtpm is not imported from {INSTALLED_DIR}: {output!r}")
    return lines[0]


def manager_options() -> list[str]:
    """The manager's options in our dom0: each swtpm confined, then the run's flags."""
    return ["--confine-swtpm", str(CONFINE_UID_BASE), *xen_driver.manager_options()]


def defaults_text() -> str:
    """``/etc/default/xenvtpm`` as the harness writes it: its options for each unit."""
    options = {
        "XENVTPM_MANAGER_OPTS": manager_options(),
        "XENVTPM_BACKEND_OPTS": xen_driver.backend_options(),
    }
    lines = [f"{name}={shlex.quote(shlex.join(value))}" for name, value in options.items()]
    return (
        "# written by the xenvtpm harness (harness/targets/dom0_units.py)\n"
        + "\n".join(lines)
        + "\n"
    )


def start_command() -> str:
    """Enable and start both units (the manager first: the backend's unit orders it),
    then print each one's main pid, manager first."""
    units = " ".join(UNITS.values())
    return f"systemctl enable --now --quiet {units} && systemctl show -p MainPID --value {units}"


def restart_command(name: str) -> str:
    """Restart one unit; print its new main pid. ``Type=notify``: it has returned only
    once the daemon said READY=1 (the manager listens, the backend is connected)."""
    unit = UNITS[name]
    return f"systemctl restart {unit} && systemctl show -p MainPID --value {unit}"


def read_pids(output: str, names: list[str]) -> dict[str, int]:
    """Main pids as ``systemctl show`` printed them; TargetNotReady for a unit with none."""
    pids = output.split()
    if len(pids) != len(names) or "0" in pids:
        raise TargetNotReady("dom0", f"units {names} have no main process: {output!r}")
    return {name: int(pid) for name, pid in zip(names, pids, strict=True)}


def failure_evidence_command(name: str) -> str:
    """What a unit that failed to start left: its status and its last journal lines."""
    unit = UNITS[name]
    return f"systemctl status --no-pager --lines=40 {unit}"


def log_command(name: str) -> str:
    """The daemon's log: its unit's journal, as the daemon wrote it."""
    return f"journalctl -u {UNITS[name]} -o cat --no-pager"


def save_logs_command(log_dir: str) -> str:
    """Each unit's journal into ``log_dir``/NAME.log, where log collection fetches the
    daemons' logs from (best effort)."""
    return (
        f"mkdir -p {log_dir}; "
        + "; ".join(
            f"journalctl -u {unit} -o short-precise --no-pager > {log_dir}/{name}.log 2>&1"
            for name, unit in UNITS.items()
        )
        + "; true"
    )
