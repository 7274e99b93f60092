"""What a run leaves behind: results.json, metrics.jsonl, TensorBoard events, PNG plots, the summary table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..cli_common import pyplot, text_table


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` atomically: a reader, or a run killed meanwhile, never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Writes ``record`` atomically (a reader never sees a half-written file)."""
    write_text(path, json.dumps(record, indent=2) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


class TensorBoardLog:
    """Scalars for TensorBoard under ``out/tensorboard`` (a no-op when tensorboard is not installed)."""

    def __init__(self, directory: Path, start_iteration: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the `train` extra brings it; without it the run still trains
            self._writer = None
            return
        # purge_step drops the events a killed run wrote after its last checkpoint.
        self._writer = SummaryWriter(str(directory), purge_step=start_iteration or None)

    def scalars(self, values: dict[str, float], iteration: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, iteration)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


#: The figures of a method with groups and an affinity (:func:`write_plots`).
PLOTS = ("affinity.png", "cogrouping.png", "groups.png", "affinity_entries.png")


#: Up to this many tasks every cell of a heat map carries its value (11-task Taskonomy included).
ANNOTATED_TASKS = 16


def _heat_map(matrix: np.ndarray, names: list[str], title: str, label: str, path: Path, symmetric: bool) -> None:
    """A K×K heat map, each cell's value written in it; the colour scale spans the off-diagonal entries.

    The diagonal (a task with itself: co-grouped in every batch, its own affinity the largest) would
    otherwise stretch the scale so that the differences between pairs, the thing to read, vanish.
    """
    plt = pyplot()
    size = 1.2 + 0.55 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    off = matrix[~np.eye(len(names), dtype=bool)] if len(names) > 1 else matrix.ravel()
    if symmetric:
        limit = float(np.abs(off).max()) or 1.0
        low, high = -limit, limit
    else:
        low, high = float(off.min()), float(off.max())
        if high <= low:
            low, high = low - 0.5, high + 0.5
    image = ax.imshow(matrix, cmap="RdBu_r" if symmetric else "viridis", vmin=low, vmax=high)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    if len(names) <= ANNOTATED_TASKS:
        for (i, j), value in np.ndenumerate(matrix):
            shade = (min(max(value, low), high) - low) / (high - low)
            dark = abs(shade - 0.5) > 0.3 if symmetric else shade < 0.6  # white text on dark cells
            ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label=label + " (scale: off-diagonal range)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(
    out: Path, names: list[str], history: dict[str, Any], affinity: np.ndarray, cogrouping: np.ndarray
) -> list[str]:
    """The figures of a method with groups and an affinity (the selective update: the paper's Figures 3
    and 4c) as PNG files; returns their names."""
    plt = pyplot()
    _heat_map(
        affinity, names, "final proximal inter-task affinity A[source, target]", "affinity", out / "affinity.png", True
    )
    _heat_map(
        cogrouping, names, "co-grouping frequency after warm-up", "fraction of batches", out / "cogrouping.png", False
    )

    fig, ax = plt.subplots(figsize=(6, 3.2))
    counts = history["groups"]
    ax.plot(np.arange(1, len(counts) + 1), counts, lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("number of groups")
    ax.set_title("number of task groups per batch")
    fig.tight_layout()
    fig.savefig(out / "groups.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.array(history["affinity_steps"])
    snapshots = np.array(history["affinity"]).reshape(len(steps), len(names), len(names)) if len(steps) else None
    for source, target in chosen_pairs(affinity):
        if snapshots is not None:
            ax.plot(steps, snapshots[:, source, target], label=f"{names[source]} → {names[target]}")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("affinity")
    ax.set_title("affinity entries over training")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "affinity_entries.png", dpi=120)
    plt.close(fig)
    return list(PLOTS)


def chosen_pairs(affinity: np.ndarray, count: int = 8) -> list[tuple[int, int]]:
    """The off-diagonal entries to draw over time: all of them for K <= 3, else the ``count`` largest in magnitude."""
    k = affinity.shape[0]
    pairs = [(s, t) for s in range(k) for t in range(k) if s != t]
    pairs.sort(key=lambda pair: -abs(float(affinity[pair])))
    return sorted(pairs[:count])


def summary_table(results: dict[str, Any]) -> str:
    """The terminal's final table: each task's primary metric, against the baseline when one is given."""
    baseline = results.get("baseline_metrics")
    header = ["task", "metric", "value"] + (["baseline", "change %"] if baseline else [])
    rows = []
    for task in results["tasks"]:
        metric = results["primary"][task]
        value = results["metrics"][task][metric]
        row = [task, metric + (" ↑" if results["higher_is_better"][task][metric] else " ↓"), f"{value:.4g}"]
        if baseline:
            base = baseline[task][metric]
            sign = 1 if results["higher_is_better"][task][metric] else -1
            row += [f"{base:.4g}", f"{sign * (value - base) / base * 100:+.2f}"]
        rows.append(row)
    lines = [text_table(header, rows).rstrip("\n")]
    if results.get("delta_m") is not None:
        lines.append(
            f"Δm = {results['delta_m']:+.2f} % (primary metrics; higher is better), "
            f"over all metrics {results['delta_m_all']:+.2f} %"
        )
    lines.append(
        f"{results['method']}: {results['iterations']} iterations, {results['time_per_batch_s'] * 1000:.1f} ms per batch, "
        f"wall time {results['wall_time_s']:.1f} s"
        + (f", {results['groups_mean']:.2f} groups per batch on average" if "groups_mean" in results else "")
    )
    return "\n".join(lines) + "\n"
