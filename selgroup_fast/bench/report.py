"""The bench's reports: the terminal table, JSON, CSV, Markdown, the charts and a README-ready summary.

The table has the columns of the paper's Table E.1 (forward, backprop, gradient
manipulation, optimizer step, clustering + affinity update, total), each phase as
median seconds and share of the median total, plus the time outside every phase
(``other``), the paired ratio to GD with its spread over the rounds, the selective
method's average number of groups and the peak memory.
"""

from __future__ import annotations

import csv
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cli_common import environment, markdown_table, text_table
from ..profiling import PHASE_TITLES, PHASES
from .plots import plot_breakdown, plot_sweep
from .timing import MethodResult, Suite

MIB = 1024 * 1024


def run_record(suite: Suite, command: str, notes: list[str]) -> dict[str, Any]:
    """The whole run as one JSON-ready dict (what ``results.json`` holds)."""
    config = suite.config
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(config.device),
        "model": {"factory": suite.model, "description": suite.description},
        "config": {
            "batch_size": config.batch_size,
            "rounds": config.rounds,
            "steps_per_round": config.steps,
            "warmup": config.warmup,
            "device": str(config.device),
            "dtype": str(config.dtype).removeprefix("torch."),
            "amp": config.amp,
            "space": config.space,
            "seed": config.seed,
        },
        "notes": notes,
        "breakdown_num_tasks": suite.breakdown,
        "runs": [
            {
                "num_tasks": num_tasks,
                "tasks": suite.tasks[num_tasks],
                "results": [result_record(result) for result in results],
            }
            for num_tasks, results in sorted(suite.results.items())
        ],
    }


def result_record(result: MethodResult) -> dict[str, Any]:
    """One method's numbers as a flat JSON-ready dict (seconds, shares in [0, 1])."""
    return {
        "method": result.method,
        "num_tasks": result.num_tasks,
        "steps": result.steps,
        **{f"{phase}_s": result.phases[phase] for phase in PHASES},
        "other_s": result.other,
        "total_s": result.total,
        **{f"{phase}_share": share for phase, share in result.shares.items()},
        "ratio_to_gd": result.ratio,
        "ratio_to_gd_mad": result.ratio_mad,
        "round_totals_s": result.round_totals,
        "round_ratios_to_gd": result.round_ratios,
        "groups_mean": result.groups_mean,
        "peak_memory_mib": None if result.peak_memory_bytes is None else result.peak_memory_bytes / MIB,
        "state_bytes": result.state_bytes,
    }


def _cell(seconds: float, share: float) -> str:
    return "–" if seconds == 0.0 else f"{seconds:.4f} ({100 * share:.1f} %)"


def table_rows(results: list[MethodResult]) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the Table E.1-shaped breakdown, as strings."""
    header = [
        "method",
        *(PHASE_TITLES[phase] for phase in PHASES),
        "other",
        "total (s)",
        "× GD (± MAD)",
        "groups",
        "peak MiB",
        "state MiB",
    ]
    rows = []
    for result in results:
        shares = result.shares
        rows.append(
            [
                result.method,
                *(_cell(result.phases[phase], shares[phase]) for phase in PHASES),
                f"{result.other:.4f}",
                f"{result.total:.4f}",
                "–" if result.ratio is None else f"{result.ratio:.2f} ± {result.ratio_mad:.2f}",
                "–" if result.groups_mean is None else f"{result.groups_mean:.2f}",
                "–" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / MIB:.0f}",
                "–" if result.state_bytes == 0 else f"{result.state_bytes / MIB:.3g}",
            ]
        )
    return header, rows


def sweep_rows(suite: Suite) -> tuple[list[str], list[list[str]]]:
    """Median total seconds per batch: one row per method, one column per K."""
    ks = sorted(suite.results)
    header = ["method", *(f"K={k}" for k in ks)]
    by_method: dict[str, dict[int, MethodResult]] = {}
    for k in ks:
        for result in suite.results[k]:
            by_method.setdefault(result.method, {})[k] = result
    rows = [[name, *(f"{per_k[k].total:.4f}" if k in per_k else "–" for k in ks)] for name, per_k in by_method.items()]
    return header, rows


def tables_markdown(suite: Suite) -> str:
    """The breakdown table and, for a sweep, the time-per-batch table."""
    text = f"### Per-batch breakdown, K = {suite.breakdown}\n\n" + markdown_table(
        *table_rows(suite.results[suite.breakdown])
    )
    if len(suite.results) > 1:
        text += "\n### Time per batch (s) against the number of tasks K\n\n" + markdown_table(*sweep_rows(suite))
    return text


def drift_note(suite: Suite) -> str | None:
    """GD's median step in each round at the breakdown K: how the machine's speed moved during the run."""
    gd = next((result for result in suite.results[suite.breakdown] if result.method == "gd"), None)
    if gd is None or not gd.round_totals:
        return None
    rounds = gd.round_totals
    return (
        f"GD drift: GD's median step per round {', '.join(f'{t:.4f}' for t in rounds)} s "
        f"(last / first {rounds[-1] / rounds[0]:.2f}×, slowest / fastest {max(rounds) / min(rounds):.2f}×); "
        "the paired ratios (× GD) compare each round with GD's same round, so this drift cancels in them"
    )


def run_notes(suite: Suite, extra: Sequence[str] = ()) -> list[str]:
    """What the numbers mean, for the table's foot and the reports (``extra`` is appended)."""
    config = suite.config
    names = {result.method for results in suite.results.values() for result in results}
    notes = [
        f"order: {config.warmup} warm-up steps per method one after the other, then {config.rounds} interleaved "
        f"rounds of {config.steps} step(s) per method, the running order rotated from round to round so that no "
        "method always runs early or late; each method keeps its own weights, optimizer and state across rounds",
        "total: median wall clock around the whole step() (with torch.cuda.synchronize before and after on a GPU); "
        "phases: medians of the methods' own profiling (CUDA events on a GPU, wall clock on a CPU); "
        "share: a phase's median over the median total; other: total minus the phases (loop overhead, zero_grad)",
        "× GD: the median over the rounds of the method's median step over GD's median step in the same round "
        "(paired ratios), ± their median absolute deviation",
    ]
    drift = drift_note(suite)
    if drift:
        notes.append(drift)
    if config.amp:
        notes.append(f"amp: the forward pass (the closure) runs under torch.autocast({config.amp})")
    if "selective" in names:
        notes.append(
            f"selective: built with warmup_steps={config.warmup} (the bench's warm-up steps), so the measured steps "
            "run past its warm-up with the regrouped updates; groups: its average number of groups per measured step"
        )
    if config.device.type == "cuda":
        notes.append(
            "peak MiB: torch.cuda.max_memory_allocated over the method's warm-up steps, above what was allocated "
            "before them (optimizer state, gradients, activations, the method's buffers; not the shared weights)"
        )
    else:
        notes.append(
            "peak MiB: growth of the process's resident set size over the method's warm-up steps, sampled every "
            "2 ms (optimizer state, gradients, activations, the method's buffers; a lower bound: memory freed by "
            "earlier methods and reused does not show)"
        )
    if any(result.state_bytes for results in suite.results.values() for result in results):
        notes.append(
            "state MiB: what the method keeps between steps besides the model and the optimizer (method.state_bytes: "
            "DB-MTL's and MoCo's K×P rows, the selective method's K×K affinity, the loss weights' K numbers), "
            "allocated once; part of its peak; – : none"
        )
    return [*notes, *extra]


def _load_text(load: list[float] | None) -> str:
    return f"; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end" if load else ""


def summary_markdown(record: dict[str, Any], tables: str, images: list[str]) -> str:
    """A README-ready summary: what ran where, the tables, the charts."""
    machine, versions, config = record["machine"], record["versions"], record["config"]
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    version_text = ", ".join(f"{name} {value}" for name, value in versions.items() if value is not None)
    amp = f" under autocast {config['amp']}" if config["amp"] else ""
    amp += ", gradient methods in representation space" if config.get("space") == "representation" else ""
    lines = [
        "## selgroup-bench results",
        "",
        f"* Command: `{record['command']}`",
        f"* Date: {record['date']}",
        f"* Machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads){gpu}"
        + _load_text(machine.get("load_average")),
        f"* Versions: {version_text}",
        f"* Model: {record['model']['description']} (`{record['model']['factory']}`), "
        f"batch {config['batch_size']}, {config['dtype']}{amp} on {config['device']}",
        f"* Timing: medians over {config['rounds']} rounds × {config['steps_per_round']} steps per method after "
        f"{config['warmup']} warm-up steps per method",
        *(f"* {note}" for note in record["notes"]),
        "",
        tables,
    ]
    lines += [f"![{Path(image).stem}]({image})\n" for image in images]
    return "\n".join(lines)


def write_reports(out_dir: Path, suite: Suite, command: str, notes: list[str], images: list[str]) -> dict[str, Path]:
    """Writes results.json, results.csv, results.md and README.md into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = run_record(suite, command, notes)
    paths = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "markdown": out_dir / "results.md",
        "summary": out_dir / "README.md",
    }
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    rows = [result_record(result) for k in sorted(suite.results) for result in suite.results[k]]
    with paths["csv"].open("w", newline="") as handle:
        # the per-round lists stay in results.json
        writer = csv.DictWriter(handle, fieldnames=[key for key in rows[0] if not key.startswith("round_")])
        writer.writeheader()
        writer.writerows({key: value for key, value in row.items() if not key.startswith("round_")} for row in rows)
    tables = tables_markdown(suite)
    paths["markdown"].write_text(tables)
    paths["summary"].write_text(summary_markdown(record, tables, images))
    return paths


def print_table(suite: Suite, notes: list[str], stream: Any = None) -> None:
    """The breakdown (and sweep) tables on the terminal (stdout by default), with the notes under them."""
    stream = stream if stream is not None else sys.stdout
    stream.write(f"\nPer-batch breakdown, K = {suite.breakdown} (median seconds, share of the total)\n\n")
    stream.write(text_table(*table_rows(suite.results[suite.breakdown])))
    if len(suite.results) > 1:
        stream.write("\nTime per batch (s) against the number of tasks K\n\n")
        stream.write(text_table(*sweep_rows(suite)))
    stream.write("\n" + "".join(f"* {note}\n" for note in notes))


def write_outputs(suite: Suite, out_dir: str | Path, command: str, extra_notes: Sequence[str] = ()) -> list[Path]:
    """Everything the command writes: the table on stdout, the reports and the charts under ``out_dir``.

    ``command`` is recorded as the way the run was made. Returns the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = run_notes(suite, extra_notes)
    print_table(suite, notes)
    what = f"{suite.description}, batch {suite.config.batch_size}, {suite.config.device}"
    images = [
        plot_breakdown(suite.results[suite.breakdown], out_dir / "breakdown.png", f"K = {suite.breakdown}: {what}")
    ]
    if len(suite.results) > 1:
        images.append(plot_sweep(suite, out_dir / "sweep.png", f"time per batch against K: {what}"))
    paths = write_reports(out_dir, suite, command, notes, [image.name for image in images])
    return [*paths.values(), *images]
