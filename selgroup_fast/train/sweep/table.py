"""The sweep's tables: every run's metrics read back, Δm against the single-task baselines, cost, grouping.

:func:`tabulate` turns a plan's finished runs into ``table.md``, ``table.csv`` and ``table.json``
(a timing plan: ``timing.md``, ``timing.json``): each task's primary metric, Δm against the
single-task baselines (mean ± sample std over seeds, and paired with GD's at the same seed), time
per training batch and its ratio to GD, the selective method's groups, how often the tasks the
dataset relates by construction were grouped, and the numbers behind each of the paper's claims.
Δm is computed here, from each run's metrics and the preset's ``baseline.json``, with
:func:`selgroup_fast.metrics.delta_m` (the trainer's definition), so runs do not wait for the
baselines. Nothing here runs anything: the committed results regenerate their tables.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import shlex
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ...cli_common import markdown_table, pyplot
from ...tasks import PRESETS
from ..report import write_text
from .plan import Plan, Size, Variant
from .runs import HISTORY_NAME, is_complete, last_error_line, read_json

#: Pairs of tasks that the ``scenes`` dataset relates by construction (issue 9): same
#: geometry (the two depths), normals and the shading they produce, occlusion edges and
#: depth discontinuities; for NYUD, depth and the normals derived from it.
KNOWN_RELATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "taskonomy": (
        ("depth_euclidean", "depth_zbuffer"),
        ("normal", "reshading"),
        ("depth_zbuffer", "edge_occlusion"),
    ),
    "nyud": (("depth", "normals"),),
}


def grouping_dynamics(history: dict[str, Any], post_warmup_batches: int) -> dict[str, float | None]:
    """How settled the grouping was after warm-up, and how much the tracked affinity moved.

    ``groups_after_warmup``: the mean number of groups per batch after warm-up;
    ``group_count_changes``: the fraction of consecutive post-warm-up batches whose number of
    groups differs; ``affinity_fluctuation``: the mean absolute change of an affinity entry
    between consecutive snapshots over the mean absolute entry (0: frozen).

    >>> grouping_dynamics({"groups": [4, 4, 2, 2, 3, 3], "affinity": [[1.0, -1.0], [1.0, -3.0]]}, 4)
    {'groups_after_warmup': 2.5, 'group_count_changes': 0.3333333333333333, 'affinity_fluctuation': 0.6666666666666666}
    """
    groups = history.get("groups") or []
    after = groups[len(groups) - post_warmup_batches :] if post_warmup_batches else []
    changes = [a != b for a, b in itertools.pairwise(after)]
    snapshots = history.get("affinity") or []
    steps = [abs(b - a) for before, now in itertools.pairwise(snapshots) for a, b in zip(before, now, strict=False)]
    scale = statistics.fmean(abs(value) for snapshot in snapshots for value in snapshot) if snapshots else 0.0
    return {
        "groups_after_warmup": statistics.fmean(after) if after else None,
        "group_count_changes": statistics.fmean(changes) if changes else None,
        "affinity_fluctuation": statistics.fmean(steps) / scale if steps and scale > 0 else None,
    }


# --------------------------------------------------------------------------- reading the runs


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    finite = [value for value in values if value is not None and math.isfinite(value)]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def _mean_matrix(matrices: Sequence[Sequence[Sequence[float]]]) -> list[list[float]] | None:
    if not matrices:
        return None
    size = len(matrices[0])
    return [[statistics.fmean(m[i][j] for m in matrices) for j in range(size)] for i in range(size)]


def summarize(plan: Plan, root: Path) -> dict[str, Any]:
    """Per preset and variant: metrics, Δm (mean, std, per seed), cost, groups, co-grouping; and the claims."""
    from selgroup_fast.metrics import delta_m, delta_m_all

    presets: dict[str, Any] = {}
    environment: dict[str, Any] = {}
    for preset in dict.fromkeys(run.preset for run in plan.runs):
        tasks = [spec.name for spec in PRESETS[preset]]
        baseline_run = next((run for run in plan.runs if run.preset == preset and run.is_baseline), None)
        baseline = (
            read_json(baseline_run.result_file(root)) if baseline_run and is_complete(baseline_run, root) else None
        )
        rows: dict[str, Any] = {}
        if baseline is not None:
            rows["single-task"] = {
                "label": "single-task",
                "seeds": [baseline_run.seed],  # type: ignore[union-attr]
                "primary": {task: baseline["metrics"][task][baseline["primary"][task]] for task in tasks},
                "primary_std": {task: None for task in tasks},
                "delta_m": 0.0,
                "delta_m_std": None,
                "delta_m_per_seed": [0.0],
            }
        labels = dict.fromkeys(run.variant.label for run in plan.runs if run.preset == preset and run.variant)
        for label in labels:
            runs = [run for run in plan.runs if run.preset == preset and run.variant and run.variant.label == label]
            records = [(run.seed, read_json(run.result_file(root))) for run in runs if is_complete(run, root)]
            failed = [
                {"seed": run.seed, "error": last_error_line(run.folder(root))}
                for run in runs
                if not is_complete(run, root) and run.folder(root).exists()
            ]
            row: dict[str, Any] = {"label": label, "seeds": [seed for seed, _ in records], "failed": failed}
            if records:
                environment = environment or {key: records[0][1].get(key) for key in ("machine", "versions")}
                primary_name = records[0][1]["primary"]
                row["primary"], row["primary_std"] = {}, {}
                for task in tasks:
                    row["primary"][task], row["primary_std"][task] = _mean_std(
                        [record["metrics"][task][primary_name[task]] for _, record in records]
                    )
                if baseline is not None:
                    per_seed = [
                        delta_m(
                            record["metrics"], baseline["metrics"], baseline["higher_is_better"], baseline["primary"]
                        )
                        for _, record in records
                    ]
                    per_seed_all = [
                        delta_m_all(record["metrics"], baseline["metrics"], baseline["higher_is_better"])
                        for _, record in records
                    ]
                    row["delta_m_per_seed"] = per_seed
                    row["delta_m"], row["delta_m_std"] = _mean_std(per_seed)
                    row["delta_m_all"], row["delta_m_all_std"] = _mean_std(per_seed_all)
                row["time_per_batch_s"], row["time_per_batch_std"] = _mean_std(
                    [record["time_per_batch_s"] for _, record in records]
                )
                row["wall_time_s"] = sum(record.get("wall_time_s") or 0.0 for _, record in records)
                groups = [record.get("groups_mean") for _, record in records]
                row["groups_mean"], row["groups_std"] = _mean_std([g for g in groups if g is not None])
                cogrouping = [record["cogrouping"] for _, record in records if record.get("cogrouping")]
                row["cogrouping"] = _mean_matrix(cogrouping)
                row["cogrouping_per_seed"] = cogrouping
                row["affinity"] = _mean_matrix([record["affinity"] for _, record in records if record.get("affinity")])
                dynamics = [
                    grouping_dynamics(history, record.get("cogrouping_batches", 0))
                    for run, (_, record) in zip([run for run in runs if is_complete(run, root)], records, strict=False)
                    if (history := read_json(run.folder(root) / HISTORY_NAME)) is not None
                ]
                for key in ("groups_after_warmup", "group_count_changes", "affinity_fluctuation"):
                    row[key], row[f"{key}_std"] = _mean_std([d[key] for d in dynamics if d[key] is not None])
            rows[label] = row
        gd = rows.get("gd", {})
        gd_time = gd.get("time_per_batch_s")
        gd_by_seed = dict(zip(gd.get("seeds", []), gd.get("delta_m_per_seed", []), strict=False))
        for row in rows.values():
            time_per_batch = row.get("time_per_batch_s")
            row["times_gd"] = time_per_batch / gd_time if time_per_batch is not None and gd_time else None
            # Paired by seed: runs of one seed share the initial weights, the data order and the validation
            # scenes (the trainer draws them from --seed), so their difference cancels what the seed adds.
            paired = [
                value - gd_by_seed[seed]
                for seed, value in zip(row.get("seeds", []), row.get("delta_m_per_seed", []), strict=False)
                if seed in gd_by_seed and row["label"] != "single-task"
            ]
            row["vs_gd_per_seed"] = paired
            row["vs_gd"], row["vs_gd_std"] = _mean_std(paired)
        presets[preset] = {
            "tasks": tasks,
            "primary": baseline["primary"] if baseline else None,
            "higher_is_better": baseline["higher_is_better"] if baseline else None,
            "rows": rows,
            "relations": relations(preset, tasks, rows.get("selective")),
            "ablations": [
                {
                    "title": ablation.title,
                    "key": ablation.key,
                    "default": ablation.default,
                    "labels": list(ablation.labels),
                }
                for ablation in plan.ablations.get(preset, ())
            ],
        }
    return {"presets": presets, **environment, "claims": claims(presets)}


def relations(preset: str, tasks: list[str], selective: dict[str, Any] | None) -> dict[str, Any] | None:
    """How often the dataset's related task pairs were grouped, ranked among all pairs (1 = most often)."""
    if not selective or not selective.get("cogrouping"):
        return None
    matrix = selective["cogrouping"]
    pairs = sorted(
        ((matrix[i][j], tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))), reverse=True
    )
    ranking = [{"pair": [a, b], "frequency": value} for value, a, b in pairs]
    checked = []
    for a, b in KNOWN_RELATIONS.get(preset, ()):
        i, j = tasks.index(a), tasks.index(b)
        per_seed = [m[i][j] for m in selective["cogrouping_per_seed"]]
        rank = 1 + sum(value > matrix[i][j] for value, _, _ in pairs)
        checked.append(
            {
                "pair": [a, b],
                "frequency": matrix[i][j],
                "per_seed": per_seed,
                "rank": rank,
                "of": len(pairs),
                "affinity": None
                if not selective.get("affinity")
                else [selective["affinity"][i][j], selective["affinity"][j][i]],
            }
        )
    mean_pair = statistics.fmean(value for value, _, _ in pairs) if pairs else None
    return {"ranking": ranking, "known": checked, "mean_pair_frequency": mean_pair}


def claims(presets: dict[str, Any]) -> dict[str, Any]:
    """The numbers behind each of the paper's claims (the verdicts are written by a person)."""
    out: dict[str, Any] = {}
    for name, preset in presets.items():
        rows = {label: row for label, row in preset["rows"].items() if row.get("delta_m") is not None}
        methods = {label: row for label, row in rows.items() if ":" not in label and label != "single-task"}
        ranked = sorted(methods, key=lambda label: methods[label]["delta_m"], reverse=True)
        selective = methods.get("selective", {})
        entry: dict[str, Any] = {
            "delta_m_ranking": [
                {
                    "method": label,
                    "delta_m": methods[label]["delta_m"],
                    "std": methods[label]["delta_m_std"],
                    "seeds": len(methods[label]["seeds"]),
                    "times_gd": methods[label].get("times_gd"),
                    "vs_gd": methods[label].get("vs_gd"),
                    "vs_gd_per_seed": methods[label].get("vs_gd_per_seed"),
                }
                for label in ranked
            ],
            "selective_rank": (ranked.index("selective") + 1) if "selective" in ranked else None,
            "selective_times_gd": selective.get("times_gd"),
            "selective_groups_mean": selective.get("groups_mean"),
        }
        for ablation in preset["ablations"]:
            entry[ablation["key"]] = [
                {
                    "variant": label,
                    "delta_m": rows[label]["delta_m"],
                    "std": rows[label]["delta_m_std"],
                    "per_seed": rows[label]["delta_m_per_seed"],
                    "seeds": rows[label]["seeds"],
                    "vs_gd_per_seed": rows[label].get("vs_gd_per_seed"),
                    "groups_mean": rows[label].get("groups_mean"),
                }
                for label in ablation["labels"]
                if label in rows
            ]
        out[name] = entry
    return out


# --------------------------------------------------------------------------- writing the table


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    small_or_large = value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4)
    return f"{value:.{digits}g}" if small_or_large else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "–"
    return f"{mean:+.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def preset_rows(preset: dict[str, Any], labels: Iterable[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one table: Δm, each task's primary metric, time per batch, × GD, groups."""
    primary = preset["primary"] or {}
    hib = preset["higher_is_better"] or {}
    header = ["method", "seeds", "Δm (%)", "Δm − GD's, same seed", "Δm all (%)"]
    for task in preset["tasks"]:
        metric = primary.get(task, "?")
        arrow = "" if task not in hib else (" ↑" if hib[task].get(metric) else " ↓")
        header.append(f"{task} {metric}{arrow}")
    header += ["s / batch", "× GD", "groups", "groups after warm-up", "group-count changes", "affinity fluctuation"]
    rows = []
    for label in labels:
        row = preset["rows"].get(label)
        if row is None:
            continue
        if not row.get("primary"):
            reason = "; ".join(f"seed {f['seed']}: {f['error']}" for f in row.get("failed", []))
            rows.append([label, "0", f"failed ({reason})" if reason else "not run", *["–"] * (len(header) - 3)])
            continue
        seeds = str(len(row["seeds"])) + (f" ({len(row['failed'])} failed)" if row.get("failed") else "")
        cells = [
            label,
            seeds,
            _pm(row.get("delta_m"), row.get("delta_m_std")),
            _pm(row.get("vs_gd"), row.get("vs_gd_std")),
            _pm(row.get("delta_m_all"), row.get("delta_m_all_std")),
        ]
        for task in preset["tasks"]:
            mean, std = row["primary"][task], row["primary_std"].get(task)
            cells.append(_number(mean, 4) + ("" if std is None else f" ± {_number(std, 2)}"))
        cells += [
            _number(row.get("time_per_batch_s"), 3),
            "–" if row.get("times_gd") is None else f"{row['times_gd']:.2f}",
            "–" if row.get("groups_mean") is None else f"{row['groups_mean']:.2f}",
            *(
                "–"
                if row.get(key) is None
                else f"{row[key]:.2f}" + ("" if row.get(f"{key}_std") is None else f" ± {row[f'{key}_std']:.2f}")
                for key in ("groups_after_warmup", "group_count_changes", "affinity_fluctuation")
            ),
        ]
        rows.append(cells)
    return header, rows


def headline_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Δm and × GD per method (no ablations), one pair of columns per preset: the README's table."""
    presets = summary["presets"]
    methods: list[str] = []
    for preset in presets.values():
        methods += [
            label for label in preset["rows"] if ":" not in label and label != "single-task" and label not in methods
        ]
    header = ["method"]
    for name in presets:
        header += [f"{name} Δm (%)", f"{name} × GD"]
    rows = []
    for label in methods:
        cells = [label]
        for preset in presets.values():
            row = preset["rows"].get(label, {})
            cells.append(_pm(row.get("delta_m"), row.get("delta_m_std")) if row.get("primary") else "–")
            cells.append("–" if row.get("times_gd") is None else f"{row['times_gd']:.2f}")
        rows.append(cells)
    return header, rows


def render_markdown(summary: dict[str, Any], command: str, notes: Sequence[str]) -> str:
    machine = summary.get("machine") or {}
    versions = summary.get("versions") or {}
    lines = [
        "# selgroup-train: single-task baselines, multi-task methods, selective ablations",
        "",
        f"* Command: `{command}`",
        f"* Date: {summary['date']}",
        f"* Machine: {json.dumps(machine, sort_keys=True)}",
        f"* Versions: {json.dumps(versions, sort_keys=True)}",
        f"* Size (every run): `{summary['size']}`",
        f"* Code: {summary.get('code', 'unknown')}",
        (
            "* Δm (%): Maninis et al. over each task's primary metric against the single-task baselines, "
            "higher is better; mean ± sample std over seeds. Δm − GD's: each seed's Δm minus GD's Δm at the same seed "
            "(same initial weights, data order and validation scenes), mean ± std over the seeds both have. Δm all: over every metric (LibMTL's convention). "
            "Metric columns: mean ± std over seeds (↑ higher is better, ↓ lower). s / batch: mean training-step "
            "time; × GD: its ratio to GD's on the same preset; groups: the selective method's average number of "
            "groups per batch (warm-up included: K groups a batch); after warm-up: the same over the batches "
            "after warm-up; group-count changes: the fraction of consecutive post-warm-up batches whose number "
            "of groups differs; affinity fluctuation: the mean absolute change of an affinity entry between "
            "snapshots (every 10 iterations) over its mean absolute value."
        ),
        *(f"* {note}" for note in notes),
        "",
        "## Headline",
        "",
        markdown_table(*headline_rows(summary)),
    ]
    for name, preset in summary["presets"].items():
        main_labels = [label for label in preset["rows"] if ":" not in label]
        lines += [f"## {name}", "", markdown_table(*preset_rows(preset, main_labels))]
        for ablation in preset["ablations"]:
            lines += [
                f"### Ablation: {ablation['title']} (`{ablation['key']}`; `{ablation['labels'][0]}` = `{ablation['key']}={ablation['default']}`)",
                "",
                markdown_table(*preset_rows(preset, ablation["labels"])),
            ]
        if preset["relations"]:
            rel = preset["relations"]
            lines += [
                f"### Co-grouping of the selective runs ({name})",
                "",
                (
                    "Fraction of batches in which a pair of tasks shared a group, mean over the selective seeds "
                    f"(mean over all {len(rel['ranking'])} pairs: {_number(rel['mean_pair_frequency'])})."
                ),
                "",
                "| related pair | co-grouping | per seed | rank among pairs | affinity (a→b, b→a) |",
                "|---|---|---|---|---|",
            ]
            for known in rel["known"]:
                affinity = "–" if known["affinity"] is None else ", ".join(_number(v) for v in known["affinity"])
                lines.append(
                    f"| {known['pair'][0]} – {known['pair'][1]} | {_number(known['frequency'])} | "
                    f"{', '.join(_number(v) for v in known['per_seed'])} | {known['rank']} of {known['of']} | {affinity} |"
                )
            top = ", ".join(f"{r['pair'][0]}–{r['pair'][1]} {_number(r['frequency'])}" for r in rel["ranking"][:5])
            lines += ["", f"Most often grouped: {top}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def decay_figure(plan: Plan, root: Path, preset: str) -> Path | None:
    """Figure D.6 / 4c at this scale: every affinity entry (top) and the number of groups (bottom) over
    training for each decay β of the preset's decay ablation (its first seed); None without histories."""
    ablation = next((a for a in plan.ablations.get(preset, ()) if a.key == "decay"), None)
    if ablation is None:
        return None
    panels = []
    for label in ablation.labels:
        run = next((r for r in plan.runs if r.preset == preset and r.variant and r.variant.label == label), None)
        if run is None:
            continue
        history = read_json(run.folder(root) / HISTORY_NAME)
        if history and history.get("affinity"):
            variant = Variant.parse(label)
            panels.append((dict(variant.options).get(ablation.key, ablation.default), history, run.seed))
    if not panels:
        return None
    plt = pyplot()
    panels.sort(key=lambda panel: -float(panel[0]))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6), squeeze=False, sharex=True)
    for column, (value, history, seed) in enumerate(panels):
        names = history["tasks"]
        k = len(names)
        snapshots = history["affinity"]
        for s in range(k):
            for t in range(k):
                if s != t:
                    axes[0][column].plot(
                        history["affinity_steps"],
                        [snap[s * k + t] for snap in snapshots],
                        lw=0.8,
                        label=f"{names[s]} → {names[t]}",
                    )
        axes[0][column].axhline(0, color="black", lw=0.5)
        axes[0][column].set_title(f"β = {value} (seed {seed})")
        axes[1][column].plot(range(1, len(history["groups"]) + 1), history["groups"], lw=0.8)
        axes[1][column].set_xlabel("iteration")
    axes[0][0].set_ylabel("affinity A[source → target]")
    axes[1][0].set_ylabel("number of groups")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{preset}: tracked affinity and number of groups for each affinity decay β")
    fig.tight_layout()
    path = root / f"{preset}_decay.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timing_summary(plan: Plan, root: Path) -> dict[str, Any]:
    """Per variant: the median time per batch over rounds and the median of each round's ratio to GD."""
    records = {(run.variant.label, run.seed): read_json(run.result_file(root)) for run in plan.runs if run.variant}
    rounds = sorted({run.seed for run in plan.runs})
    rows = []
    environment: dict[str, Any] = {}
    for label in dict.fromkeys(run.variant.label for run in plan.runs if run.variant):
        times, ratios, groups = [], [], []
        for round_ in rounds:
            record, gd = records.get((label, round_)), records.get(("gd", round_))
            if record is None or "time_per_batch_s" not in record:
                continue
            environment = environment or {key: record.get(key) for key in ("machine", "versions")}
            times.append(record["time_per_batch_s"])
            if gd is not None and "time_per_batch_s" in gd:
                ratios.append(record["time_per_batch_s"] / gd["time_per_batch_s"])
            if record.get("groups_mean") is not None:
                groups.append(record["groups_mean"])
        rows.append(
            {
                "label": label,
                "rounds": len(times),
                "time_per_batch_s": statistics.median(times) if times else None,
                "times_gd": statistics.median(ratios) if ratios else None,
                "times_gd_per_round": ratios,
                "groups_mean": statistics.fmean(groups) if groups else None,
            }
        )
    return {"rows": rows, **environment}


def render_timing(summary: dict[str, Any], command: str, notes: Sequence[str]) -> str:
    header = ["method", "rounds", "s / batch (median)", "× GD (median of rounds)", "× GD per round", "groups"]
    rows = [
        [
            row["label"],
            str(row["rounds"]),
            _number(row["time_per_batch_s"], 4),
            "–" if row["times_gd"] is None else f"{row['times_gd']:.2f}",
            ", ".join(f"{ratio:.2f}" for ratio in row["times_gd_per_round"]) or "–",
            "–" if row["groups_mean"] is None else f"{row['groups_mean']:.2f}",
        ]
        for row in summary["rows"]
    ]
    lines = [
        "# selgroup-train: time per training batch, methods interleaved",
        "",
        f"* Command: `{command}`",
        f"* Date: {summary['date']}",
        f"* Machine: {json.dumps(summary.get('machine') or {}, sort_keys=True)}",
        f"* Versions: {json.dumps(summary.get('versions') or {}, sort_keys=True)}",
        f"* Size (every run): `{summary['size']}`",
        f"* Code: {summary.get('code', 'unknown')}",
        (
            "* Every round runs each method once (one at a time, the order rotated every round, the round number "
            "as the seed); s / batch is the trainer's mean training-step time (no evaluation, no data loading); "
            "× GD is taken within each round, so that a load change between rounds cancels."
        ),
        *(f"* {note}" for note in notes),
        "",
        markdown_table(header, rows),
    ]
    return "\n".join(lines).rstrip() + "\n"


def render_csv(summary: dict[str, Any]) -> str:
    """``table.csv``: one line per preset, variant and task."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "preset",
            "variant",
            "seeds",
            "delta_m",
            "delta_m_std",
            "delta_m_all",
            "delta_m_all_std",
            "task",
            "metric",
            "value",
            "value_std",
            "time_per_batch_s",
            "times_gd",
            "groups_mean",
        ]
    )
    for name, preset in summary["presets"].items():
        for label, row in preset["rows"].items():
            for task in preset["tasks"]:
                if not row.get("primary"):
                    continue
                writer.writerow(
                    [
                        name,
                        label,
                        len(row["seeds"]),
                        row.get("delta_m"),
                        row.get("delta_m_std"),
                        row.get("delta_m_all"),
                        row.get("delta_m_all_std"),
                        task,
                        (preset["primary"] or {}).get(task),
                        row["primary"][task],
                        row["primary_std"].get(task),
                        row.get("time_per_batch_s"),
                        row.get("times_gd"),
                        row.get("groups_mean"),
                    ]
                )
    return buffer.getvalue()


def tabulate(
    plan: Plan, root: Path, size: Size, command: str, notes: Sequence[str], date: str, code: str
) -> dict[str, str]:
    """The text of every table file of ``plan``'s finished runs under ``root``, by file name.

    ``command``, ``notes``, ``date`` and ``code`` (the commits the runs were made with) go to the header.
    """
    summary = timing_summary(plan, root) if plan.timing else summarize(plan, root)
    summary.update(date=date, size=shlex.join(size.flags()), code=code)
    record = json.dumps({"command": command, "notes": list(notes), **summary}, indent=1) + "\n"
    if plan.timing:
        return {"timing.json": record, "timing.md": render_timing(summary, command, notes)}
    return {
        "table.json": record,
        "table.md": render_markdown(summary, command, notes),
        "table.csv": render_csv(summary),
    }


def write_reports(plan: Plan, root: Path, size: Size, command: str, notes: Sequence[str], date: str, code: str) -> str:
    """Writes :func:`tabulate`'s files under ``root`` (and a sweep's decay figures); returns the Markdown table."""
    root.mkdir(parents=True, exist_ok=True)
    files = tabulate(plan, root, size, command, notes, date, code)
    for name, text in files.items():
        write_text(root / name, text)
    for preset in plan.ablations:
        decay_figure(plan, root, preset)
    return files["timing.md" if plan.timing else "table.md"]
