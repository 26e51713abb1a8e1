"""Which accelerator runs Xen on this host: KVM, unless a trial here showed it cannot.

Whether a host's KVM can run Xen (nested virtualisation) is only known by trying, and
a trial costs up to 45 s, so the first boot tries KVM once and records the verdict in
``<cache>/accel.json``: the host (kernel release and QEMU version), whether Xen
booted, why not, and when it was measured. A failed trial is trusted for
:data:`RETRY_AFTER_S` only: one bad trial (a loaded host, a console hiccup) must not
lock a host into TCG for ever, and a kernel or QEMU update tries again at once.
``XENVTPM_ACCEL=kvm|tcg`` overrides any verdict (issue 16).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.qemu import Accel

RETRY_AFTER_S = 7 * 86400.0  # a failed KVM trial is tried again after a week


@dataclass(frozen=True)
class AccelVerdict:
    """One KVM trial's outcome on one host."""

    host: str  # "<kernel release> | <QEMU version>"
    kvm_runs_xen: bool
    why: str
    measured: float  # time.time() of the trial
    measured_utc: str = ""  # the same, for people reading the file

    @classmethod
    def now(cls, host: str, kvm_runs_xen: bool, why: str) -> AccelVerdict:
        t = time.time()
        utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        return cls(host, kvm_runs_xen, why, t, utc)


def read_verdict(path: Path) -> AccelVerdict | None:
    """The recorded verdict; None if there is none or it is unreadable (a record from
    before ``measured`` existed counts as none: it is tried again)."""
    try:
        data = json.loads(path.read_text())
        return AccelVerdict(
            str(data["host"]),
            bool(data["kvm_runs_xen"]),
            str(data.get("why", "")),
            float(data["measured"]),
            str(data.get("measured_utc", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_verdict(path: Path, verdict: AccelVerdict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(verdict), indent=1) + "\n")
    tmp.replace(path)


def choose(
    verdict: AccelVerdict | None,
    host: str,
    *,
    forced: str = "auto",
    kvm_usable: bool = True,
    now: float | None = None,
) -> Accel:
    """``forced`` (``$XENVTPM_ACCEL``) first; TCG without a usable /dev/kvm; TCG while a
    failed trial of this host is younger than :data:`RETRY_AFTER_S`; else KVM."""
    if forced in ("kvm", "tcg"):
        return "kvm" if forced == "kvm" else "tcg"
    if not kvm_usable:
        return "tcg"
    if verdict is not None and verdict.host == host and not verdict.kvm_runs_xen:
        age = (time.time() if now is None else now) - verdict.measured
        if 0 <= age < RETRY_AFTER_S:
            return "tcg"
    return "kvm"
