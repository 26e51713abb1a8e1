"""Every error the harness raises, under one base class.

HarnessError
    LaunchFailure           a process exited (or never started) while we waited for it
    TargetNotReady          a target or guest did not reach its ready state in time
    DeadlineExpired         a wait ran out of time (carries what it waited for)
    UnsupportedOperation    the target lacks the capability an operation needs
    ResetFailed             the operator's reset of a vTPM instance was not acknowledged
    TransportError          talking to a guest's TPM failed
        TransportClosed         the peer closed the channel (e.g. swtpm died mid-command)
        TransportTimeout        no response within the transport timeout
    RunStateError       the CLI's recorded environment is in the way or missing
        EnvironmentRunning      ``up`` while one is already running
        EnvironmentNotRunning   ``down``/``status`` with nothing recorded
    KbuildError         building a module against the guest kernel (harness.kbuild) failed
        HeadersUnavailable      a kernel headers .deb is not on the mirror (or unreachable)
        ModuleBuildFailed       ``make modules`` failed (carries command, exit code, log tail)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class HarnessError(Exception):
    """Base of every error raised by the harness."""


class LaunchFailure(HarnessError):
    """A managed process could not start or died before it was ready.

    Carries the evidence (STYLE.md 5, like QEMU's ``VMLaunchFailure``): the command, the
    exit code (None if it is still running, e.g. it hung) and the tail of its log.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        returncode: int | None,
        log_tail: str,
        log_path: Path | None = None,
        reason: str = "exited before it was ready",
    ) -> None:
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(
            f"{name}: {reason}; exit code {returncode}{where}\n"
            f"command: {' '.join(command)}\nlog tail:\n{log_tail}"
        )
        self.name = name
        self.command = list(command)
        self.returncode = returncode
        self.log_tail = log_tail
        self.log_path = log_path
        self.reason = reason


class DeadlineExpired(HarnessError):
    """A wait ran out of time."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:.1f} s waiting for {what}")
        self.what = what
        self.seconds = seconds


class TargetNotReady(HarnessError):
    """A target or one of its guests did not become ready; ``logs`` says where to look."""

    def __init__(self, what: str, detail: str = "", logs: dict[str, Path] | None = None) -> None:
        self.logs = dict(logs or {})
        lines = [f"{what} is not ready" + (f": {detail}" if detail else "")]
        lines += [f"  {name}: {path}" for name, path in sorted(self.logs.items())]
        super().__init__("\n".join(lines))
        self.what = what
        self.detail = detail


class UnsupportedOperation(HarnessError):
    """The target lacks the capability an operation needs."""

    def __init__(self, target: str, capability: str) -> None:
        super().__init__(f"target {target} lacks capability {capability}")
        self.target = target
        self.capability = capability


class ResetFailed(HarnessError):
    """``python3 -m xenvtpm reset`` failed (e.g. the instance's swtpm was hung: the
    manager restarted it, fresh, and answered TPM_RC_FAILURE)."""

    def __init__(self, instance: int, output: str) -> None:
        self.instance = instance
        super().__init__(f"reset of vTPM instance {instance} failed: {output.strip()}")


class TransportError(HarnessError):
    """Talking to a guest's TPM endpoint failed."""


class TransportClosed(TransportError):
    """The TPM endpoint closed the channel."""


class TransportTimeout(TransportError):
    """The TPM endpoint did not answer in time."""


class DeviceRefused(TransportError):
    """A guest kernel's TPM device refused the command (write/read failed); ``errno_name``
    says how (``EINVAL``, ``E2BIG``, ``ENODATA``, ``EBUSY`` ...).

    The transport stays usable: this is what a local TPM client would have seen.
    """

    def __init__(self, where: str, errno_name: str) -> None:
        super().__init__(f"{where}: the TPM device refused the command: {errno_name}")
        self.errno_name = errno_name


class RunStateError(HarnessError):
    """The CLI's recorded environment is not in the state the command needs."""


class EnvironmentRunning(RunStateError):
    """``up`` was asked while an environment is already up."""


class EnvironmentNotRunning(RunStateError):
    """A command needs a running environment and none is recorded."""


class ImageBuildError(HarnessError):
    """An image could not be built; says which step and where its log is."""


class MirrorUnreachable(ImageBuildError):
    """The apt mirror from the host's sources cannot be reached."""


class KbuildError(HarnessError):
    """Building an out-of-tree module against the guest kernel failed (harness.kbuild)."""


class HeadersUnavailable(KbuildError):
    """A kernel headers package could not be downloaded; ``url`` says which."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"cannot download {url}: {detail}")
        self.url = url


class ModuleBuildFailed(KbuildError):
    """``make modules`` failed: the command, its exit code (None: killed on timeout) and
    the tail of its log (STYLE.md 5)."""

    def __init__(
        self, command: Sequence[str], returncode: int | None, log_tail: str, log_path: Path
    ) -> None:
        super().__init__(
            f"module build failed: exit code {returncode} (log: {log_path})\n"
            f"command: {' '.join(command)}\nlog tail:\n{log_tail}"
        )
        self.command = list(command)
        self.returncode = returncode
        self.log_tail = log_tail
        self.log_path = log_path
