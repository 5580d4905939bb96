#!/usr/bin/env python3
"""bench/plot.py — draws the PNG plots of a `ward-bench perf` result.

Usage: bench/plot.py bench/results/perf.json   (writes perf-throughput.png and perf-latency.png
next to it). Needs matplotlib (deploy/bench installs it into .ward/venv).
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/perf.json")
    report = json.loads(path.read_text())
    figures = report["figures"]
    stem = path.with_suffix("")

    fig, ax = plt.subplots(figsize=(8, 4))
    series = [
        ("single-step no-op (instances/s)", figures["throughput"]["per_second"]),
        ("3-step chain (instances/s)", figures["workflow_steps"]["chain"]["per_second"]),
        ("fan-out 1-10-1 (instances/s)", figures["workflow_steps"]["fan_out"]["per_second"]),
    ]
    for label, values in series:
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    ax.set_xlabel("second of the measured window")
    ax.set_ylabel("completed per second")
    ax.set_title("Ward throughput over time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}-throughput.png", dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    quantiles = ["p50", "p90", "p99", "max"]
    for ax, key, title in [
        (axes[0], "schedule_to_start_ms", "schedule-to-start (ms)"),
        (axes[1], "end_to_end_ms", "end-to-end from intended send (ms)"),
    ]:
        width = 0.25
        for index, run in enumerate(figures["latency"]):
            values = [run[key][q] or 0 for q in quantiles]
            positions = [q + (index - 1) * width for q in range(len(quantiles))]
            ax.bar(positions, values, width, label=f"{round(run['load_share'] * 100)} % ({run['offered_per_s']}/s)")
        ax.set_xticks(range(len(quantiles)), quantiles)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.suptitle("Ward latency at fixed offered load")
    fig.tight_layout()
    fig.savefig(f"{stem}-latency.png", dpi=110)
    print(f"plots: {stem}-throughput.png {stem}-latency.png")


if __name__ == "__main__":
    main()
