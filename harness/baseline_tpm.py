"""A baseline TPM in dom0 for external suites: plain swtpm behind dom0's own kernel vTPM
proxy, so that dom0 gets a ``/dev/tpm0`` with no split driver anywhere in its path.

A test that fails there as well as in a guest is about the kernel, swtpm or the test
itself, not about the driver (harness/unittest_results.py). dom0 has no TPM of its own,
so the proxy's chip must be ``tpm0``: anything else is refused, since the selftests
open ``/dev/tpm0`` and ``/dev/tpmrm0`` by name.

Spec: swtpm(8) ``chardev --vtpm-proxy``; Linux drivers/char/tpm/tpm_vtpm_proxy.c.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections.abc import Callable
from typing import Self

from harness.deadline import Deadline
from harness.errors import DeadlineExpired, LaunchFailure, TargetNotReady

log = logging.getLogger(__name__)

# (command, timeout) -> (exit code, stdout, stderr), as root in dom0: XenTarget.dom0_run.
Shell = Callable[[str, float], tuple[int, str, str]]

START_TIMEOUT = 60.0  # swtpm's first start makes a fresh TPM state (a few s under TCG)
STOP_TIMEOUT = 15.0
POLL_S = 0.5


class ProxySwtpm:
    """``swtpm chardev --vtpm-proxy --tpm2`` in dom0 with a fresh state directory;
    ``start()`` returns once ``/dev/tpm0`` and ``/dev/tpmrm0`` exist, ``close()`` stops
    swtpm (the kernel then removes the chip) and deletes the state."""

    def __init__(self, shell: Shell, name: str = "dom0") -> None:
        self.shell = shell
        self.name = name
        self.state_dir: str | None = None
        self.pid: int | None = None
        self.command: list[str] = []

    def _run(self, command: str, timeout: float = 30.0) -> tuple[int, str, str]:
        return self.shell(command, timeout)

    def start(self) -> None:
        if self.pid is not None:
            return
        _, out, _ = self._run("ls /sys/class/tpm 2>/dev/null; exit 0")
        if out.strip():
            raise TargetNotReady(
                f"baseline TPM in {self.name}",
                f"{self.name} already has TPM chips ({' '.join(out.split())}): the "
                "baseline's proxy chip would not be tpm0",
            )
        rc, out, err = self._run(
            "modprobe tpm_vtpm_proxy && mktemp -d /tmp/xenvtpm-baseline.XXXXXX"
        )
        if rc != 0:
            raise TargetNotReady(f"baseline TPM in {self.name}", f"exited {rc}: {err.strip()}")
        self.state_dir = state = out.strip()
        self.command = ["swtpm", "chardev", "--vtpm-proxy", "--tpm2", "--tpmstate", f"dir={state}"]
        self.command += ["--flags", "not-need-init,startup-clear"]
        self.command += ["--log", f"file={state}/swtpm.log,level=2"]
        # Line-buffered stdout: swtpm prints "New TPM device: /dev/tpmN" there. Only the
        # daemon is backgrounded: a backgrounded "cd && daemon" list would hold the SSH
        # channel open, and $! would be the list's shell, not swtpm.
        started = (
            f"cd {shlex.quote(state)} || exit 1; setsid nohup stdbuf -oL "
            f"{shlex.join(self.command)} >swtpm.out 2>&1 </dev/null & echo $!"
        )
        try:
            rc, out, err = self._run(started)
            if rc != 0 or not out.strip().isdigit():
                raise LaunchFailure(f"swtpm in {self.name}", self.command, rc, out + err)
            self.pid = int(out)
            Deadline(START_TIMEOUT).wait_for(
                self._ready, f"/dev/tpm0 and /dev/tpmrm0 from swtpm in {self.name}", POLL_S, 2.0
            )
        except BaseException:
            self.close()  # a failed start rolls back
            raise
        log.info("baseline swtpm %d in %s serves /dev/tpm0 (state %s)", self.pid, self.name, state)

    def _ready(self) -> bool:
        """True once the chip is up; LaunchFailure if swtpm died or made another chip."""
        assert self.state_dir is not None
        state = shlex.quote(self.state_dir)
        _, out, _ = self._run(
            f"kill -0 {self.pid} 2>/dev/null && echo alive; "
            f"grep -o 'New TPM device: /dev/tpm[0-9]*' {state}/swtpm.out; "
            "test -c /dev/tpm0 && test -c /dev/tpmrm0 && test -e /sys/class/tpm/tpm0 && echo ready"
        )
        lines = out.split("\n")
        device = next((ln.rsplit(" ", 1)[1] for ln in lines if ln.startswith("New TPM")), None)
        if "alive" not in lines:
            raise LaunchFailure(f"swtpm in {self.name}", self.command, None, self.log_tail())
        if device is not None and device != "/dev/tpm0":
            raise LaunchFailure(
                f"swtpm in {self.name}",
                self.command,
                None,
                self.log_tail(),
                reason=f"made {device}, not /dev/tpm0 (another TPM chip in {self.name}?)",
            )
        return "ready" in lines

    def log_tail(self, lines: int = 20) -> str:
        if self.state_dir is None:
            return ""
        state = shlex.quote(self.state_dir)
        _, out, _ = self._run(f"tail -n {lines} {state}/swtpm.out {state}/swtpm.log 2>&1")
        return out

    def close(self) -> None:
        """SIGTERM (then SIGKILL) swtpm, but only while that pid is still a swtpm; wait
        for the kernel to drop tpm0; delete the state directory. Idempotent."""
        pid, state, self.pid, self.state_dir = self.pid, self.state_dir, None, None
        try:
            if pid is not None:
                alive = f"grep -qa swtpm /proc/{pid}/cmdline 2>/dev/null"
                self._run(f"{alive} && kill -TERM {pid}; exit 0")
                with contextlib.suppress(DeadlineExpired):
                    Deadline(STOP_TIMEOUT).wait_for(
                        lambda: self._run(f"{alive} || echo gone")[1].strip() == "gone",
                        f"swtpm {pid} to exit",
                        POLL_S,
                        1.0,
                    )
                self._run(f"{alive} && kill -KILL {pid}; exit 0")
                with contextlib.suppress(DeadlineExpired):
                    Deadline(STOP_TIMEOUT).wait_for(
                        lambda: (
                            self._run("test -e /sys/class/tpm/tpm0 || echo gone")[1].strip()
                            == "gone"
                        ),
                        f"tpm0 to leave {self.name}",
                        POLL_S,
                        1.0,
                    )
        finally:
            if state is not None:
                self._run(f"rm -rf {shlex.quote(state)}")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
