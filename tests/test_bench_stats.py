"""The benchmark's arithmetic and report shape (harness/bench/stats.py, profiling parsers,
scale bookkeeping): no benchmark runs here."""

from __future__ import annotations

import json
import math

import pytest

from harness.bench import cli, profiling, scale, stats


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
    entries = [
        {"instances": 1, "ops_per_s": 3000.0, "p50_us": 250.0, "p99_us": 600.0, "errors": 0,
         "backend_rss_mb": 20.0, "swtpm_rss_mb": 6.5},
        {"instances": 8, "ops_per_s": 4500.0, "p50_us": 1500.0, "p99_us": 5000.0, "errors": 0,
         "backend_rss_mb": 20.7, "swtpm_rss_mb": 6.4},
    ]  # fmt: skip
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
    raw = "\n".join([
        head + "EpollSelector.select (selectors.py:468) 30",
        head + "Link._send (xenvtpm/manager_link.py:112) 50",
        head + "read_ring (xenvtpm/tpmif.py:99) 20",
        "garbage",
    ])  # fmt: skip
    s = profiling.summarize_collapsed(raw)
    assert s["samples"] == 100
    assert s["idle_pct"] == 30.0
    assert s["self"][0] == ["Link._send (xenvtpm/manager_link.py)", 50.0]
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


def test_xen_target_is_refused_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", "xen", "--quick"]) == 2
    assert "not available yet" in capsys.readouterr().err
