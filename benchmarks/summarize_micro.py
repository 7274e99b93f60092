"""The table of a saved pytest-benchmark run of ``benchmarks/test_fused_ops.py``: fused op against the reference way.

One row per op and K (and device): the median of each side and the ratio reference / fused.
Reads the newest JSON under ``--storage`` unless a file is given::

    python benchmarks/summarize_micro.py --output benchmarks/results/ops_micro_cpu.md
    python benchmarks/summarize_micro.py benchmarks/results/pytest-benchmark/*/0001_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STORAGE = Path("benchmarks/results/pytest-benchmark")
#: What made the committed CPU run (ops_micro_cpu.md); ``--command`` says it for another run.
COMMAND = (
    "python -m pytest benchmarks/test_fused_ops.py --benchmark-max-time=0.5 "
    "--benchmark-storage=benchmarks/results/pytest-benchmark --benchmark-save=cpu`, then "
    "`python benchmarks/summarize_micro.py --output benchmarks/results/ops_micro_cpu.md"
)


def newest_run(storage: Path) -> Path:
    runs = sorted(storage.glob("*/*.json"), key=lambda path: path.name)
    if not runs:
        raise SystemExit(f"error: no saved pytest-benchmark run under {storage}")
    return runs[-1]


def _microseconds(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e6:,.1f}"


def _ratio(value: float) -> str:
    """10× and more without decimals, 1–10× with one, below 1× with two (a slower fused op stays readable)."""
    return f"{value:,.0f}×" if value >= 10 else f"{value:.1f}×" if value >= 1 else f"{value:.2f}×"


def summary(run: dict[str, Any], source: str, notes: Sequence[str] = (), command: str = COMMAND) -> str:
    """The Markdown report of one saved run (``source``: where it was read from; ``command``: what made it)."""
    fused: dict[tuple[str, int, str], float] = {}  # (op, K, device) -> median seconds
    reference: dict[tuple[str, int], float] = {}  # (op, K) -> median seconds (the references run on the CPU)
    for bench in run["benchmarks"]:
        info, median = bench["extra_info"], bench["stats"]["median"]
        if info["side"] == "fused":
            fused[(info["op"], info["num_tasks"], info["device"])] = median
        else:
            reference[(info["op"], info["num_tasks"])] = median
    machine = run["machine_info"]
    versions = ", ".join(f"{name} {version}" for name, version in machine.get("versions", {}).items() if version)
    lines = [
        "# Fused ops against the reference way (pytest-benchmark)",
        "",
        f"- date: {run['datetime']}",
        f"- machine: {machine.get('cpu_model', machine['cpu'].get('brand_raw'))}, {machine.get('cpu_cores')} cores, "
        f"{machine.get('torch_threads')} torch threads"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"),
        f"- versions: python {machine['python_version']}, {versions}",
        f"- command: `{command}`",
        f"- data: `{source}`; times are pytest-benchmark's medians per call (µs); ratio = reference / fused",
        "- references: `.item()` double loop (`ReferenceAffinity.update`) for the affinity update, the reference "
        "code's tensor expression for the similarity, scikit-learn for affinity propagation, the float64 "
        "NumPy/SciPy references of `tests/manipulation_reference.py` on J (K × 2048) for the weighting ops "
        "(the fused op takes the float32 J and computes J·Jᵀ itself)",
        *(f"- {note}" for note in notes),
        "",
        "| op | K | device | fused (µs) | reference (µs) | reference / fused |",
        "|---|---|---|---|---|---|",
    ]
    for (op, num_tasks, device), ours in sorted(fused.items()):
        slow = reference.get((op, num_tasks))
        ratio = "–" if slow is None else _ratio(slow / ours)
        lines.append(f"| `{op}` | {num_tasks} | {device} | {_microseconds(ours)} | {_microseconds(slow)} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="a saved run (default: the newest under --storage)")
    parser.add_argument("--storage", type=Path, default=STORAGE)
    parser.add_argument("--note", action="append", default=[], help="a line to add to the header (repeatable)")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    parser.add_argument("--command", default=COMMAND, help="the command(s) that made the run, for the header")
    args = parser.parse_args(argv)
    path = args.run or newest_run(args.storage)
    text = summary(json.loads(path.read_text()), path.as_posix(), args.note, args.command)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
