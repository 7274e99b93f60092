"""The derived tables of benchmarks/results/evidence/README.md, evidence_long/README.md and docs/benchmarks.md.

Read from the sweeps' own ``table.json`` (``selgroup-train sweep``) and the idle interleaved timing of
``evidence/timing/<preset>/results.json``; printed as Markdown::

    python benchmarks/evidence_tables.py ranked    # evidence/README.md: every method per preset, by Δm − GD's
    python benchmarks/evidence_tables.py compact   # docs/benchmarks.md: the ten best mean ranks, and GD
    python benchmarks/evidence_tables.py long      # evidence_long/README.md: 2,000 against 400 iterations

Δm − GD's is the sweep's paired column; "selective − method" pairs the two methods' Δm at each seed the same way.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from selgroup_fast.cli_common import markdown_table

RESULTS = Path(__file__).parent / "results"
PRESETS = ("nyud", "pascal", "taskonomy")


def sweep_rows(folder: str) -> dict[str, dict[str, dict]]:
    """Each preset's rows of a sweep's table.json, the single-task row left out."""
    presets = json.loads((RESULTS / folder / "table.json").read_text())["presets"]
    return {
        preset: {name: row for name, row in table["rows"].items() if row.get("vs_gd") is not None}
        for preset, table in presets.items()
    }


def idle_ratio(preset: str) -> dict[str, float]:
    """× GD per method from the idle interleaved timing run of ``preset``."""
    runs = json.loads((RESULTS / "evidence" / "timing" / preset / "results.json").read_text())["runs"]
    return {row["method"]: row["ratio_to_gd"] for run in runs for row in run["results"]}


def spread(mean: float, std: float | None) -> str:
    return f"{mean:+.2f}" if std is None else f"{mean:+.2f} ± {std:.2f}"


def label(method: str) -> str:
    return f"**{method}**" if method == "selective" else method


def by_gain(rows: dict[str, dict]) -> list[str]:
    return sorted(rows, key=lambda method: -rows[method]["vs_gd"])


def ranked() -> str:
    tables = []
    for preset, rows in sweep_rows("evidence").items():
        ratio = idle_ratio(preset)
        header = ["rank", "method", "seeds", "Δm (%)", "Δm − GD's, same seed", "Δm all (%)", "× GD (time, idle)"]
        body = [
            [
                str(rank),
                label(method),
                str(len(rows[method]["seeds"])),
                spread(rows[method]["delta_m"], rows[method]["delta_m_std"]),
                spread(rows[method]["vs_gd"], rows[method]["vs_gd_std"]),
                spread(rows[method]["delta_m_all"], rows[method]["delta_m_all_std"]),
                f"{ratio[method]:.2f}" if method in ratio else "–",
            ]
            for rank, method in enumerate(by_gain(rows), 1)
        ]
        tables.append(markdown_table(header, body))
    return "\n".join(tables)


def compact(shown: int = 10) -> str:
    presets = sweep_rows("evidence")
    ranks = {preset: {method: rank for rank, method in enumerate(by_gain(rows), 1)} for preset, rows in presets.items()}
    mean_rank = {method: statistics.mean(ranks[preset][method] for preset in PRESETS) for method in presets["nyud"]}
    best = sorted(mean_rank, key=mean_rank.__getitem__)[:shown]  # stable: ties in the table's order
    ratios = {preset: idle_ratio(preset) for preset in PRESETS}
    header = [
        "method",
        *(f"{name} Δm − GD's" for name in ("NYUD", "PASCAL", "Taskonomy")),
        "mean rank",
        "× GD (NYUD / PASCAL / Taskonomy)",
    ]
    body = [
        [
            label(method),
            *(
                f"{spread(presets[p][method]['vs_gd'], presets[p][method]['vs_gd_std'])} ({ranks[p][method]})"
                for p in PRESETS
            ),
            f"{mean_rank[method]:.1f}",
            " / ".join(f"{ratios[p][method]:.2f}" for p in PRESETS),
        ]
        for method in [*best, *(["gd"] if "gd" not in best else [])]
    ]
    return markdown_table(header, body)


def paired(mine: list[float], other: list[float]) -> str:
    differences = [a - b for a, b in zip(mine, other, strict=True)]
    return spread(statistics.mean(differences), statistics.stdev(differences))


def long() -> str:
    short = sweep_rows("evidence")
    names = {"nyud": "NYUD (K = 4)", "pascal": "PASCAL (K = 5)", "taskonomy": "Taskonomy (K = 11)"}
    tables = []
    for preset, rows in sweep_rows("evidence_long").items():
        ratio, at_400 = idle_ratio(preset), short[preset]
        selective = rows["selective"]["delta_m_per_seed"]
        header = [
            "rank",
            "method",
            "Δm (%), 2,000 it.",
            "Δm − GD's, 2,000 it.",
            "Δm − GD's, 400 it. (issue24)",
            "selective − method, same seed, 2,000 it.",
            "× GD (time, idle)",
        ]
        body = [
            [
                str(rank),
                label(method),
                spread(rows[method]["delta_m"], rows[method]["delta_m_std"]),
                spread(rows[method]["vs_gd"], rows[method]["vs_gd_std"]),
                spread(at_400[method]["vs_gd"], at_400[method]["vs_gd_std"]) if method in at_400 else "–",
                "–" if method == "selective" else paired(selective, rows[method]["delta_m_per_seed"]),
                f"{ratio[method]:.2f}" if method in ratio else "–",
            ]
            for rank, method in enumerate(by_gain(rows), 1)
        ]
        tables.append(f"### {names[preset]}\n\n" + markdown_table(header, body))
    return "\n".join(tables)


if __name__ == "__main__":
    choices = {"ranked": ranked, "compact": compact, "long": long}
    if len(sys.argv) != 2 or sys.argv[1] not in choices:
        raise SystemExit(f"usage: python benchmarks/evidence_tables.py {{{','.join(choices)}}}")
    print(choices[sys.argv[1]](), end="")
