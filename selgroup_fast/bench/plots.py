"""The bench's charts (matplotlib, Agg backend: no display needed).

* ``breakdown.png``: one stacked bar per method, its median phases stacked in the
  order of the paper's Table E.1 (and ``other`` on top), like the paper's Figure 2.
* ``sweep.png``: median time per batch against the number of tasks K, one line per
  method, both axes logarithmic.
"""

from __future__ import annotations

from pathlib import Path

from ..cli_common import pyplot
from ..profiling import PHASE_TITLES, PHASES
from .timing import MethodResult, Suite

_MARKERS = "osD^v<>phX*"


def plot_breakdown(results: list[MethodResult], path: Path, title: str) -> Path:
    """Stacked bars of the per-phase medians, one bar per method."""
    plt = pyplot()
    names = [result.method for result in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 3.5), 4.5))
    bottoms = [0.0] * len(results)
    segments = [(PHASE_TITLES[phase], [r.phases[phase] for r in results]) for phase in PHASES]
    segments.append(("other", [r.other for r in results]))
    for label, heights in segments:
        if any(height > 0 for height in heights):
            ax.bar(names, heights, bottom=bottoms, label=label)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=False)]
    for x, result in enumerate(results):
        ax.annotate(f"{result.total:.3g}s", (x, bottoms[x]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per batch (median)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(suite: Suite, path: Path, title: str) -> Path:
    """Median time per batch against K, one line per method."""
    plt = pyplot()
    by_method: dict[str, list[tuple[int, float]]] = {}
    for k in sorted(suite.results):
        for result in suite.results[k]:
            by_method.setdefault(result.method, []).append((k, result.total))
    fig, ax = plt.subplots(figsize=(8.0, 4.5))
    colours = plt.get_cmap("tab20").colors  # 13+ methods: the 10 default colours would repeat
    for index, (name, points) in enumerate(by_method.items()):
        ks, totals = zip(*points, strict=False)
        ax.plot(ks, totals, marker=_MARKERS[index % len(_MARKERS)], color=colours[index % len(colours)], label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(suite.results), labels=[str(k) for k in sorted(suite.results)])
    ax.set_xlabel("number of tasks K")
    ax.set_ylabel("seconds per batch (median)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
