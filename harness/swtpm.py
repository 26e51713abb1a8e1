"""swtpm instances for targets that run swtpm themselves (``direct``).

Facts (DESIGN.md 3, measured): ``swtpm_setup --tpm2 --createek --create-ek-cert
--create-platform-cert`` manufactures a TPM in about a second, given a local CA config
under our own directory (never the system's ``/var/lib/swtpm-localca``); ``swtpm socket
... --flags not-need-init,startup-clear`` serves one data connection at a time.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness.deadline import Deadline
from harness.errors import LaunchFailure
from harness.process import ManagedProcess, tail

STATE_FILE = "tpm2-00.permall"


def manufacture(state_dir: Path, setup_conf: Path, log_path: Path, deadline: Deadline) -> None:
    """Create a TPM's state (EK, certificates) unless ``state_dir`` already holds one."""
    if (state_dir / STATE_FILE).exists():
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = ["swtpm_setup", "--tpm2", "--tpmstate", str(state_dir), "--createek"]
    argv += ["--create-ek-cert", "--create-platform-cert", "--config", str(setup_conf)]
    argv += ["--overwrite"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as logf:
        try:
            rc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                timeout=max(deadline.remaining, 0.1),
                check=False,
            ).returncode
        except subprocess.TimeoutExpired as e:
            raise LaunchFailure(
                "swtpm_setup", argv, None, tail(log_path), log_path, "did not finish in time"
            ) from e
        except OSError as e:
            raise LaunchFailure(
                "swtpm_setup", argv, None, str(e), log_path, "could not be executed"
            ) from e
    if rc != 0:
        raise LaunchFailure("swtpm_setup", argv, rc, tail(log_path), log_path, "failed")


def swtpm_process(
    name: str, state_dir: Path, socket_path: Path, log_path: Path, die_with_parent: bool = True
) -> ManagedProcess:
    """A swtpm serving ``socket_path`` (data) and ``<socket_path>.ctrl``; ready once bound."""
    argv = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state_dir}"]
    argv += ["--server", f"type=unixio,path={socket_path}"]
    argv += ["--ctrl", f"type=unixio,path={socket_path}.ctrl"]
    argv += ["--flags", "not-need-init,startup-clear"]

    class _Swtpm(ManagedProcess):
        def start(self) -> _Swtpm:
            for stale in (socket_path, Path(f"{socket_path}.ctrl")):
                stale.unlink(missing_ok=True)
            super().start()
            return self

    return _Swtpm(name, argv, log_path, ready=socket_path.exists, die_with_parent=die_with_parent)
