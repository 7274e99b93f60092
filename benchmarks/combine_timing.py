"""One Markdown table of several ``selgroup-bench`` runs side by side: each method's step time and × GD per run.

Usage (the evidence sweep's timing, benchmarks/results/evidence/README.md)::

    python benchmarks/combine_timing.py nyud=timing/nyud/results.json pascal=timing/pascal/results.json ...

Each ``LABEL=PATH`` is one run's ``results.json``; × GD is the bench's paired ratio (the median over the
interleaved rounds of the method's step over GD's in the same round, ± its median absolute deviation).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selgroup_fast.cli_common import markdown_table


def main(arguments: list[str]) -> str:
    columns: list[tuple[str, dict[str, dict]]] = []
    order: list[str] = []
    for argument in arguments:
        label, sep, path = argument.partition("=")
        if not sep:
            raise SystemExit(f"error: expected LABEL=PATH, got {argument!r}")
        runs = json.loads(Path(path).read_text())["runs"]
        rows = {row["method"]: row for run in runs for row in run["results"]}
        order += [name for name in rows if name not in order]
        columns.append((f"{label} (K = {runs[0]['num_tasks']})", rows))
    header = ["method"] + [f"{label} {what}" for label, _ in columns for what in ("ms / step", "× GD")]
    table = []
    for name in order:
        cells = [name]
        for _, rows in columns:
            row = rows.get(name)
            if row is None:
                cells += ["–", "–"]
            else:
                cells += [f"{1e3 * row['total_s']:.1f}", f"{row['ratio_to_gd']:.2f} ± {row['ratio_to_gd_mad']:.2f}"]
        table.append(cells)
    return markdown_table(header, table)


if __name__ == "__main__":
    print(main(sys.argv[1:]), end="")
