"""The benchmark's arithmetic and report shape (harness/bench/stats.py, profiling parsers,
scale bookkeeping): no benchmark runs here."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from harness.bench import cli, nvwrite, profiling, scale, stats, tpm_timing
from harness.bench import xen as xenbench
from xenvtpm import tpm


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 4.0
    assert stats.percentile(values, 50) == 2.5
    assert stats.percentile(values, 99) == pytest.approx(3.97)
    assert stats.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile(values, 101)


def test_summary_from_nanoseconds() -> None:
    s = stats.Summary.from_ns([3000, 1000, 2000, 100_000], busy_s=0.001)
    assert s.n == 4
    assert s.p50_us == 2.5
    assert s.max_us == 100.0
    assert s.mean_us == 26.5
    assert s.ops_per_s == 4000.0
    # without a wall time: n / sum(latencies)
    assert stats.Summary.from_ns([10_000] * 10).ops_per_s == 100_000.0
    with pytest.raises(ValueError):
        stats.Summary.from_ns([])


def test_ratio_and_compare() -> None:
    assert stats.ratio(30.0, 10.0) == 3.0
    assert stats.ratio(1.0, 3.0) == 0.333
    assert stats.ratio(None, 1.0) is None
    assert stats.ratio(1.0, 0.0) is None
    direct = stats.Summary.from_ns([10_000] * 100)
    driver = stats.Summary.from_ns([25_000] * 100)
    cmp = stats.compare(direct, driver)
    assert cmp["ratio_p50"] == 2.5
    assert cmp["overhead_p50_us"] == 15.0
    assert cmp["direct"]["p50_us"] == 10.0


def test_ratio_keys_are_the_ones_issue_6_names() -> None:
    direct = stats.Summary.from_ns([10_000])
    driver = stats.Summary.from_ns([20_000])
    latency = {w: {m: stats.compare(direct, driver) for m in stats.MODES} for w in stats.WORKLOADS}
    ratios = stats.ratios_of(latency)
    assert ratios["getrandom_p50_pinned"] == 2.0
    assert ratios["ecc_sign_p50_pinned"] == 2.0
    assert {"getrandom_p50_unpinned", "getrandom_esapi_p50_pinned", "rsa_sign_p50_unpinned"} <= set(
        ratios
    )


def test_slope() -> None:
    assert stats.slope([1, 8, 32], [10.0, 10.7, 13.1]) == pytest.approx(0.1, abs=1e-9)
    assert stats.slope([1, 1], [1.0, 2.0]) is None
    with pytest.raises(ValueError):
        stats.slope([1, 2], [1.0])


def _report(**over: object) -> dict[str, object]:
    report: dict[str, object] = {
        "ratios": {"getrandom_p50_pinned": 2.5, "ecc_sign_p50_pinned": 1.2},
        "scale": [
            {"instances": 1, "p99_us": 500.0, "errors": 0, "ops_per_s": 3000.0},
            {"instances": 128, "p99_us": 19_000.0, "errors": 0, "ops_per_s": 7000.0},
        ],
        "memory": {"backend_mb_per_instance": 0.05, "swtpm_mb_per_instance": 6.5},
    }
    report.update(over)
    return report


def test_goals_met_not_met_and_not_measured() -> None:
    results = {g.name: g for g in stats.evaluate_goals(_report())}
    assert results["getrandom_ratio_pinned"].met is True
    assert results["ecc_sign_ratio"].met is False
    assert results["scale_128_p99"].met is True
    assert results["scale_128_p99"].value == 19.0
    assert results["backend_memory_per_instance"].met is True
    # quick mode: no 128 level -> not measured (never a pass)
    quick = _report(scale=[{"instances": 32, "p99_us": 9000.0, "errors": 0}])
    r = {g.name: g for g in stats.evaluate_goals(quick)}["scale_128_p99"]
    assert r.met is None and r.verdict == "not measured"
    assert "32 instances" in r.note
    # errors fail the scale goal whatever the latency
    bad = _report(scale=[{"instances": 128, "p99_us": 1.0, "errors": 3}])
    r = {g.name: g for g in stats.evaluate_goals(bad)}["scale_128_p99"]
    assert r.met is False and r.value is None
    # a missing measurement is never met
    r = {g.name: g for g in stats.evaluate_goals({})}["getrandom_ratio_pinned"]
    assert r.met is None


def test_report_is_json_and_tables_render() -> None:
    direct = stats.Summary.from_ns([9000, 10_000, 11_000])
    driver = stats.Summary.from_ns([250_000, 260_000, 400_000])
    latency = {"getrandom_raw": {"pinned": stats.compare(direct, driver)}}
    entries: list[dict[str, Any]] = [
        {
            "instances": 1,
            "ops_per_s": 3000.0,
            "p50_us": 250.0,
            "p99_us": 600.0,
            "errors": 0,
            "backend_rss_mb": 20.0,
            "swtpm_rss_mb": 6.5,
        },
        {
            "instances": 8,
            "ops_per_s": 4500.0,
            "p50_us": 1500.0,
            "p99_us": 5000.0,
            "errors": 0,
            "backend_rss_mb": 20.7,
            "swtpm_rss_mb": 6.4,
        },
    ]
    scale.backend_shares(entries)
    assert entries[0]["backend_mb_per_instance"] is None
    assert entries[1]["backend_mb_per_instance"] == pytest.approx(0.1)
    assert entries[1]["rss_mb_per_instance"] == pytest.approx(6.5)
    report = _report(latency=latency, scale=entries)
    json.loads(json.dumps(report))
    text = stats.latency_table(latency)
    assert "GetRandom(16), raw bytes" in text and "26.0" in text  # 260 / 10
    assert "5,000" in stats.scale_table(entries)
    goals = stats.goals_table(stats.evaluate_goals(report))
    assert "not measured" in goals and "NOT MET" in goals


def test_load_entry_uses_littles_law() -> None:
    load = scale.LoadResult(latencies_ns=[1_000_000] * 100, completed=100, window_s=1.0)
    e = scale.load_entry(8, load)
    assert e["ops_per_s"] == 100.0
    assert e["little_mean_us"] == 80_000.0
    assert e["p99_us"] == 1000.0
    assert scale.load_entry(8, scale.LoadResult())["p99_us"] is None


def test_py_spy_collapsed_stacks_summary() -> None:
    head = "main (x/__main__.py:3);Loop.run (xenvtpm/loop.py:79);"
    raw = "\n".join(
        [
            head + "EpollSelector.select (selectors.py:468) 30",
            head + "Link._send (xenvtpm/backend/manager_link.py:112) 50",
            head + "read_ring (xenvtpm/tpmif.py:99) 20",
            "garbage",
        ]
    )
    s = profiling.summarize_collapsed(raw)
    assert s["samples"] == 100
    assert s["idle_pct"] == 30.0
    assert s["self"][0] == ["Link._send (backend/manager_link.py)", 50.0]
    inclusive = dict(map(tuple, s["inclusive"]))
    assert "main (x/__main__.py)" not in inclusive  # in every sample: no information
    assert profiling.summarize_collapsed("")["samples"] == 0


def test_strace_summary_parser() -> None:
    text = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.004000          13       900       300 recvfrom
 30.00    0.003000          10       600           epoll_wait
 30.00    0.003000          10       600           sendto
------ ----------- ----------- --------- --------- ----------------
100.00    0.010000                  2100       300 total
"""
    assert profiling.parse_strace_summary(text) == {
        "recvfrom": 900,
        "epoll_wait": 600,
        "sendto": 600,
    }
    assert math.isclose(sum(profiling.parse_strace_summary(text).values()) / 300, 7.0)


def test_xen_target_is_accepted() -> None:
    args = cli.build_parser().parse_args(["--target", "xen", "--quick"])
    assert args.target == "xen" and args.quick


def _timing(samples_us: list[int], busy_s: float) -> dict[str, object]:
    return {
        "kind": "x",
        "path": "p",
        "samples_ns": [u * 1000 for u in samples_us],
        "busy_s": busy_s,
    }


def test_xen_summary_pools_rounds_and_takes_the_ratio() -> None:
    direct = [_timing([100, 100], 0.0002), _timing([100, 300], 0.0004)]
    driver = [_timing([1000, 1000, 1000], 0.003), _timing([1000], 0.001)]
    samples, busy = xenbench.pool(direct)
    assert samples == [100_000, 100_000, 100_000, 300_000]
    assert busy == pytest.approx(0.0006)
    cmp = xenbench.summarize(direct, driver)
    assert cmp["direct"]["n"] == 4 and cmp["direct"]["p50_us"] == 100.0
    assert cmp["driver"]["ops_per_s"] == 1000.0
    assert cmp["ratio_p50"] == 10.0
    assert cmp["overhead_p50_us"] == 900.0


def test_xen_result_is_merged_beside_sim_keys() -> None:
    sim = {"schema": 1, "latency": {"getrandom_raw": {}}, "ratios": {"x": 1.0}}
    merged = xenbench.merge(sim, {"accel": "tcg"})
    assert merged == sim | {"xen": {"accel": "tcg"}}
    assert "xen" not in sim  # the input is not modified
    assert xenbench.merge(None, {"accel": "tcg"}) == {
        "schema": stats.SCHEMA,
        "xen": {"accel": "tcg"},
    }
    # a second xen run replaces the first
    assert xenbench.merge(merged, {"accel": "kvm"})["xen"] == {"accel": "kvm"}


def test_xen_table_names_tcg_and_the_ratio() -> None:
    cmp = xenbench.summarize([_timing([100], 0.0001)], [_timing([2500], 0.0025)])
    text = xenbench.xen_table(
        {"accel": "tcg", "latency": cmp, "guest": {"name": "guest0"}, "errors": []}
    )
    assert "Xen target (TCG)" in text
    assert "guest0 /dev/tpm0" in text
    assert "driver/direct: p50 x25.0" in text
    assert "only the driver/direct ratio means anything" in text
    assert "busy on the host" not in text
    hogs = {"start": [{"pid": 7, "comm": "qemu-system-x86", "cpu_pct": 90}]}
    busy = xenbench.xen_table({"accel": "tcg", "host_busy_processes": hogs})
    assert "busy on the host before this run's QEMU started: qemu-system-x86 (pid 7" in busy
    failed = xenbench.xen_table({"accel": None, "errors": ["TargetNotReady: no dom0"]})
    assert "ERROR: TargetNotReady: no dom0" in failed
    assert "only the" not in failed


def test_xen_plan_is_smaller_when_quick() -> None:
    quick, full = xenbench.plan_for(True), xenbench.plan_for(False)
    assert quick["ops_per_round"] * quick["rounds"] < full["ops_per_round"] * full["rounds"]


def test_timing_script_runs_as_stdin_against_a_swtpm_like_socket(tmp_path: Path) -> None:
    """tpm_timing.py, fed to ``python3 -`` as in a domain, against a socket server that
    answers every GetRandom(16) in two pieces (a stream does not frame)."""
    assert tpm.get_random_command(16) == tpm_timing.GET_RANDOM_16
    path = tmp_path / "tpm.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    answer = bytes.fromhex("80010000001c00000000") + bytes.fromhex("0010") + bytes(16)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while conn.recv(4096):
                conn.sendall(answer[:5])
                conn.sendall(answer[5:])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-", "socket", str(path), "7", "2"],
            input=xenbench.TIMING_SCRIPT.read_bytes(),
            capture_output=True,
            timeout=60,
        )
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["samples_ns"]) == 7 and out["busy_s"] > 0
    assert all(s > 0 for s in out["samples_ns"])


def test_timing_script_refuses_a_failed_command() -> None:
    with pytest.raises(tpm_timing.TimingError):
        tpm_timing.check(bytes.fromhex("80010000000a00000101"))  # TPM_RC_FAILURE
    with pytest.raises(tpm_timing.TimingError):
        tpm_timing.check(b"\x80\x01")
    assert tpm_timing.main(["bogus"]) == 2


def test_nv_write_table_has_both_managers_and_their_ratio() -> None:
    def summary(p50: float, p99: float) -> dict[str, float]:
        return {"p50_us": p50, "p99_us": p99}

    entry = {
        "fsync": {"nv_write": summary(4000.0, 9000.0), "getrandom": summary(150.0, 900.0)},
        "no_fsync": {"nv_write": summary(500.0, 3000.0), "getrandom": summary(150.0, 800.0)},
        "ratio": {
            "nv_write_p50": 8.0,
            "nv_write_p99": 3.0,
            "getrandom_p50": 1.0,
            "getrandom_p99": 1.125,
        },
    }
    lines = nvwrite.nv_table(entry).splitlines()
    assert lines[0].split() == ["through", "the", "manager", "(us)", "fsync", "--no-fsync", "ratio"]
    assert lines[2].split() == ["NV_Write(64", "bytes)", "p50", "4,000", "500.0", "8"]
    assert lines[5].split() == ["GetRandom(16)", "p99", "900.0", "800.0", "1.12"]


def test_filesystem_of_names_the_mount_holding_a_path(tmp_path: Path) -> None:
    fstype, on, source = nvwrite.filesystem_of(tmp_path).split(" ", 2)
    assert on == "on" and fstype and source
