"""The PNG of latency against instances (matplotlib, Agg: no display needed).

matplotlib is imported lazily through ``importlib`` so that the harness and its type
check do not depend on it: only ``nox -s bench`` installs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def latency_vs_instances(
    scale: Sequence[Mapping[str, Any]], path: Path, title: str, p99_goal_ms: float = 20.0
) -> Path | None:
    """p50 and p99 (ms, log scale) and aggregate ops/s against instances; None if no
    level produced latencies or matplotlib is missing."""
    rows = [e for e in scale if e.get("p99_us") is not None]
    if not rows:
        return None
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    xs = [e["instances"] for e in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        ax.plot(xs, [e["p50_us"] / 1000 for e in rows], "o-", label="p50 latency")
        ax.plot(xs, [e["p99_us"] / 1000 for e in rows], "s-", label="p99 latency")
        little = [
            (e["instances"], e["little_mean_us"] / 1000) for e in rows if e.get("little_mean_us")
        ]
        if little:
            ax.plot(*zip(*little, strict=True), ":", color="grey", label="N / throughput (Little)")
        ax.axhline(
            p99_goal_ms,
            color="red",
            linestyle="--",
            linewidth=1,
            label=f"p99 goal {p99_goal_ms:g} ms",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("guests (instances), each a closed loop of GetRandom(16)")
        ax.set_ylabel("latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ops = ax.twinx()
        ops.bar(
            xs,
            [e["ops_per_s"] for e in rows],
            width=[x * 0.25 for x in xs],
            alpha=0.15,
            color="green",
            label="aggregate ops/s",
        )
        ops.set_ylabel("aggregate GetRandom/s")
        lines, labels = ax.get_legend_handles_labels()
        lines2, labels2 = ops.get_legend_handles_labels()
        ax.legend(lines + lines2, labels + labels2, loc="upper left", fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
