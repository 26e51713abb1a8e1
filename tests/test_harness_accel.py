"""``harness.accel_verdict``: one failed KVM trial does not lock a host into TCG for
ever, the verdict says when it was measured, and ``XENVTPM_ACCEL`` overrides it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.accel_verdict import (
    RETRY_AFTER_S,
    AccelVerdict,
    choose,
    read_verdict,
    write_verdict,
)

HOST = "6.1.0-50-amd64 | QEMU emulator version 7.2.19"


def failed(measured: float, host: str = HOST) -> AccelVerdict:
    return AccelVerdict(host, False, "no dom0 login prompt in 45 s", measured)


def test_a_recent_failed_trial_means_tcg() -> None:
    assert choose(failed(1000.0), HOST, now=1000.0 + 3600) == "tcg"


def test_a_failed_trial_is_tried_again_once_it_is_old() -> None:
    assert choose(failed(1000.0), HOST, now=1000.0 + RETRY_AFTER_S + 1) == "kvm"


def test_another_kernel_or_qemu_tries_again_at_once() -> None:
    assert choose(failed(1000.0, "6.1.0-51-amd64 | QEMU 7.2.19"), HOST, now=1001.0) == "kvm"


def test_a_successful_trial_and_no_trial_mean_kvm() -> None:
    assert choose(AccelVerdict(HOST, True, "booted", 1000.0), HOST, now=1001.0) == "kvm"
    assert choose(None, HOST) == "kvm"


@pytest.mark.parametrize("forced", ["kvm", "tcg"])
def test_the_environment_overrides_any_verdict(forced: str) -> None:
    for verdict in (None, failed(1000.0), AccelVerdict(HOST, True, "booted", 1000.0)):
        assert choose(verdict, HOST, forced=forced, now=1001.0) == forced


def test_no_usable_kvm_means_tcg() -> None:
    assert choose(None, HOST, kvm_usable=False) == "tcg"


def test_the_record_says_when_it_was_measured(tmp_path: Path) -> None:
    path = tmp_path / "accel.json"
    write_verdict(path, AccelVerdict.now(HOST, False, "console: FATAL TRAP"))
    data = json.loads(path.read_text())
    assert data["kvm_runs_xen"] is False and data["why"] == "console: FATAL TRAP"
    assert data["measured"] > 0 and data["measured_utc"].endswith("Z")
    assert read_verdict(path) == AccelVerdict(**data)


def test_a_record_without_its_time_is_tried_again(tmp_path: Path) -> None:
    """Records written before the time was kept locked TCG in; now they count as none."""
    path = tmp_path / "accel.json"
    path.write_text(json.dumps({"host": HOST, "kvm_runs_xen": False, "why": "x"}))
    assert read_verdict(path) is None
    assert choose(read_verdict(path), HOST) == "kvm"
