"""Each swtpm confined (``manager --confine-swtpm UID_BASE``): a uid of its own, only its
own state directory, a file-size limit, and no network.

swtpm parses what a guest sends, so a bug in libtpms is a guest's code running in dom0.
Confined, it runs as uid ``UID_BASE + instance`` (gid the same, no supplementary
groups, no capabilities), in a network namespace of its own with nothing in it, and
with RLIMIT_FSIZE set; its state directory is its uid's, mode 0700, under a state root
that others may cross but not list (0711). One instance can then neither read nor
write another's TPM, reach the network, or fill dom0's disk. XenServer's swtpm-wrapper
does the same with a uid per domain and a chroot; swtpm 0.7 (Debian 12) has no chroot
option, so the other directories stay as readable as they are to any unprivileged user.

The three steps are util-linux's ``unshare``, ``prlimit`` and ``setpriv``, each of which
execs the next in place, so swtpm keeps the pid the manager started. Spec:
docs/threat-model.md, "swtpm confined".
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from xenvtpm.errors import VTPMError

#: The highest uid given: uids above 2^31 - 1 break too many tools.
MAX_UID = 0x7FFFFFFF - 1
#: Room for the state files (tens of KiB) and a long swtpm log; a write beyond it fails
#: (SIGXFSZ ends swtpm, and its instance goes into failure mode, as on any crash).
DEFAULT_FILE_SIZE_LIMIT = 64 << 20
TOOLS = ("unshare", "prlimit", "setpriv")


@dataclass(frozen=True)
class Confinement:
    """How every swtpm of one manager is confined."""

    uid_base: int
    file_size_limit: int = DEFAULT_FILE_SIZE_LIMIT

    def __post_init__(self) -> None:
        if not 0 < self.uid_base <= MAX_UID:
            raise VTPMError(f"--confine-swtpm {self.uid_base}: a uid in 1..{MAX_UID}")
        if self.file_size_limit < 1 << 20:
            raise VTPMError(f"file-size limit {self.file_size_limit}: at least 1 MiB")
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise VTPMError(f"--confine-swtpm needs util-linux's {', '.join(missing)}")

    def uid(self, instance: int) -> int:
        uid = self.uid_base + instance
        if uid > MAX_UID:
            raise VTPMError(f"instance {instance} has no uid under {MAX_UID} above the base")
        return uid

    def prepare(self, state_root: Path, state_dir: Path, instance: int) -> None:
        """Give the instance's state that root wrote (swtpm_setup, the manager) to its
        uid; the root may be crossed, not listed. State of another owner, or open to
        others, is refused as found (:func:`check_state`)."""
        uid = self.uid(instance)
        closed = [p for p in state_root.parents if not os.stat(p).st_mode & 0o001]
        if closed:
            raise VTPMError(
                f"{closed[0]} is closed to others (mode {os.stat(closed[0]).st_mode & 0o777:o})"
                f": a confined swtpm cannot reach {state_dir}"
            )
        paths = check_state(state_dir, instance, uid)
        os.chmod(state_root, 0o711)
        for path in paths:
            if os.lstat(path).st_uid == 0:
                os.chown(path, uid, uid, follow_symlinks=False)

    def wrap(self, command: list[str], instance: int) -> list[str]:
        """``command`` run with no network, the file-size limit, and the instance's uid."""
        uid = self.uid(instance)
        return [
            "unshare", "--net", "--",
            "prlimit", f"--fsize={self.file_size_limit}", "--",
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            *command,
        ]  # fmt: skip


def check_state(state_dir: Path, instance: int, uid: int) -> list[str]:
    """Every path of the instance's state; VTPMError for one owned by neither root nor
    ``uid`` (another instance's swtpm may have written it), for a state directory that
    others may enter, and for a file anyone may write. Nothing is repaired: whoever
    runs the host decides, and the error says what was found."""
    mode = stat.S_IMODE(os.lstat(state_dir).st_mode)
    if mode & 0o077:
        raise VTPMError(
            f"instance {instance}: {state_dir} has mode {mode:o}, open to others: refused, "
            f"not repaired (check it, then chmod 700 {state_dir})"
        )
    paths = [str(state_dir)]
    for directory, dirs, files in os.walk(state_dir):
        paths += [os.path.join(directory, name) for name in dirs + files]
    for path in paths:
        info = os.lstat(path)
        if info.st_uid not in (0, uid):
            raise VTPMError(
                f"instance {instance}: {path} is owned by uid {info.st_uid}, neither root "
                f"nor the instance's uid {uid}: refused, not repaired (check it, then "
                f"chown -R {uid}:{uid} {state_dir})"
            )
        if stat.S_ISREG(info.st_mode) and info.st_mode & 0o002:
            raise VTPMError(f"instance {instance}: {path} is writable by anyone: refused")
    return paths
