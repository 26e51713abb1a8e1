"""The arithmetic of the benchmark report: percentiles, ratios, goals, JSON, tables.

Pure functions over plain numbers, so they are unit-tested without running anything
(``tests/test_bench_stats.py``). Latencies are collected in nanoseconds
(``time.perf_counter_ns``) and reported in microseconds.

The goals are issue 6's table; each is judged from the report dict, so the terminal
table and ``bench.json`` can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

SCHEMA = 1
PATHS = ("direct", "driver")
MODES = ("pinned", "unpinned")

# name in the report -> what the table calls it
WORKLOADS: dict[str, str] = {
    "getrandom_raw": "GetRandom(16), raw bytes",
    "getrandom_esapi": "GetRandom(16), ESAPI + PyTCTI",
    "ecc_sign": "ECC P-256 Sign (ESAPI)",
    "rsa_sign": "RSA-2048 Sign (ESAPI)",
}
# the ratio keys issue 6 names: ratios.<prefix>_p50_<mode>
RATIO_PREFIX: dict[str, str] = {
    "getrandom_raw": "getrandom",
    "getrandom_esapi": "getrandom_esapi",
    "ecc_sign": "ecc_sign",
    "rsa_sign": "rsa_sign",
}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks,
    as numpy's default; ``sorted_values`` must be sorted and non-empty."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo]) * (1.0 - frac) + float(sorted_values[hi]) * frac


@dataclass(frozen=True)
class Summary:
    """One path's latency samples: count, median, p99, mean (us) and throughput."""

    n: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float
    ops_per_s: float

    @classmethod
    def from_ns(cls, samples_ns: Sequence[int], busy_s: float | None = None) -> Summary:
        """Summarise latencies in ns. ``busy_s`` is the wall time the samples took (a
        closed loop's ops/s is n / busy_s); without it, n / sum(latencies)."""
        if not samples_ns:
            raise ValueError("no samples")
        us = sorted(s / 1000.0 for s in samples_ns)
        total_s = busy_s if busy_s is not None else sum(us) / 1e6
        return cls(
            n=len(us),
            p50_us=round(percentile(us, 50), 2),
            p99_us=round(percentile(us, 99), 2),
            mean_us=round(sum(us) / len(us), 2),
            max_us=round(us[-1], 2),
            ops_per_s=round(len(us) / total_s, 1) if total_s > 0 else 0.0,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded to 3 places; None if either is missing or 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


def compare(direct: Summary, driver: Summary) -> dict[str, Any]:
    """One workload in one mode: both summaries and the driver/direct ratios."""
    return {
        "direct": direct.to_json(),
        "driver": driver.to_json(),
        "ratio_p50": ratio(driver.p50_us, direct.p50_us),
        "ratio_p99": ratio(driver.p99_us, direct.p99_us),
        "overhead_p50_us": round(driver.p50_us - direct.p50_us, 2),
    }


def ratios_of(latency: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, float | None]:
    """``ratios.<workload>_p50_<mode>`` for every measured workload and mode."""
    out: dict[str, float | None] = {}
    for workload, modes in latency.items():
        prefix = RATIO_PREFIX.get(workload, workload)
        for mode, cmp in modes.items():
            out[f"{prefix}_p50_{mode}"] = cmp.get("ratio_p50")
    return out


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys over xs; None with fewer than two distinct xs."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} xs but {len(ys)} ys")
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx


# -- goals -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """One line of issue 6's goal table: a value from the report against a limit."""

    name: str
    measure: str
    limit: float
    unit: str
    value: Callable[[Mapping[str, Any]], float | None]
    extra: Callable[[Mapping[str, Any]], str] | None = None


@dataclass(frozen=True)
class GoalResult:
    name: str
    measure: str
    goal: str
    value: float | None
    met: bool | None  # None: not measured in this run
    note: str

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT MET", None: "not measured"}[self.met]


def _get(report: Mapping[str, Any], *path: str) -> Any:
    node: Any = report
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _scale_at(report: Mapping[str, Any], instances: int) -> Mapping[str, Any] | None:
    for entry in report.get("scale", []):
        if entry.get("instances") == instances:
            return entry  # type: ignore[no-any-return]
    return None


def _p99_at_128(report: Mapping[str, Any]) -> float | None:
    entry = _scale_at(report, 128)
    if entry is None:
        return None
    if entry.get("errors", 0):
        return math.inf  # errors fail the goal whatever the latency
    p99 = entry.get("p99_us")
    return None if p99 is None else p99 / 1000.0


def _scale_note(report: Mapping[str, Any]) -> str:
    entry = _scale_at(report, 128)
    if entry is not None:
        return f"{entry.get('errors', 0)} errors, {entry.get('ops_per_s')} ops/s"
    levels = [e["instances"] for e in report.get("scale", [])]
    if not levels:
        return "no scale level ran"
    top = _scale_at(report, max(levels)) or {}
    return (
        f"largest level run: {max(levels)} instances, p99 "
        f"{(top.get('p99_us') or 0) / 1000:.1f} ms, {top.get('errors', 0)} errors"
    )


GOALS: tuple[Goal, ...] = (
    Goal(
        "getrandom_ratio_pinned",
        "GetRandom(16) raw, pinned, p50 driver/direct",
        3.0,
        "x",
        lambda r: _get(r, "ratios", "getrandom_p50_pinned"),
        lambda r: (
            f"unpinned {_get(r, 'ratios', 'getrandom_p50_unpinned')}; 3-relay floor "
            f"{_get(r, 'ratios', 'floor3_getrandom_p50_pinned')}"
        ),
    ),
    Goal(
        "ecc_sign_ratio",
        "ECC P-256 Sign, pinned, p50 driver/direct",
        1.10,
        "x",
        lambda r: _get(r, "ratios", "ecc_sign_p50_pinned"),
        lambda r: f"unpinned {_get(r, 'ratios', 'ecc_sign_p50_unpinned')}",
    ),
    Goal(
        "scale_128_p99",
        "128 concurrent instances: p99, no errors",
        20.0,
        "ms",
        _p99_at_128,
        _scale_note,
    ),
    Goal(
        "backend_memory_per_instance",
        "backend memory per instance (RSS growth, excl. swtpm)",
        2.0,
        "MB",
        lambda r: _get(r, "memory", "backend_mb_per_instance"),
        lambda r: f"swtpm {_get(r, 'memory', 'swtpm_mb_per_instance')} MB each",
    ),
)


def evaluate_goals(report: Mapping[str, Any], goals: Sequence[Goal] = GOALS) -> list[GoalResult]:
    """Judge every goal; a value the run did not produce is 'not measured', not a pass."""
    results = []
    for g in goals:
        value = g.value(report)
        met = None if value is None else value <= g.limit
        shown = None if value is None or math.isinf(value) else round(float(value), 3)
        note = g.extra(report) if g.extra is not None else ""
        results.append(GoalResult(g.name, g.measure, f"<= {g.limit:g} {g.unit}", shown, met, note))
    return results


# -- tables ----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table (right-aligned numbers, left-aligned text)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def latency_table(latency: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    rows = []
    for workload, modes in latency.items():
        for mode, cmp in modes.items():
            d, v = cmp["direct"], cmp["driver"]
            rows.append(
                [
                    WORKLOADS.get(workload, workload),
                    mode,
                    d["p50_us"],
                    d["p99_us"],
                    v["p50_us"],
                    v["p99_us"],
                    v["ops_per_s"],
                    cmp["ratio_p50"],
                    cmp["ratio_p99"],
                ]
            )
    return table(
        [
            "workload",
            "cpu",
            "direct p50 us",
            "p99",
            "driver p50 us",
            "p99",
            "driver ops/s",
            "ratio p50",
            "ratio p99",
        ],
        rows,
    )


def scale_table(scale: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for e in scale:
        cpu = (e.get("cpu_us_per_op") or {}).get("total")
        rows.append(
            [
                e["instances"],
                e["ops_per_s"],
                e.get("p50_us"),
                e["p99_us"],
                e.get("errors"),
                cpu,
                e.get("machine_cpu_busy_pct"),
                e.get("backend_mb_per_instance"),
                e.get("swtpm_rss_mb"),
                e["rss_mb_per_instance"],
                e.get("bringup_s_per_instance"),
                e.get("state"),
            ]
        )
    return table(
        [
            "instances",
            "ops/s",
            "p50 us",
            "p99 us",
            "errors",
            "CPU us/op",
            "CPUs busy %",
            "backend MB/inst",
            "swtpm MB",
            "MB/inst",
            "bring-up s/inst",
            "state",
        ],
        rows,
    )


def goals_table(results: Sequence[GoalResult]) -> str:
    return table(
        ["goal", "limit", "measured", "verdict", "note"],
        [[r.measure, r.goal, r.value, r.verdict, r.note] for r in results],
    )
