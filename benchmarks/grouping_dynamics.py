"""Grouping dynamics of the selective update over a long run, for both crediting modes (issue #24, item 3).

Question: under the paper's crediting (Definition 2) the grouping froze after warm-up in every run of
the committed sweep; the paper says the number of groups "continuously fluctuates". Is that the
scale (runs too short, K too small) or the rule (a jointly stepped group's own pairs are credited
positive whenever both losses fall, which reinforces the group that was just chosen)?

Each run trains with ``selgroup-train``'s Python API (:func:`selgroup_fast.train.fit`) and records,
for every batch, the K losses of each forward and the groups stepped (a wrapper around
:meth:`AffinityTracker.credit_batch`, which sees exactly what the tracker credits), and the
affinity every ``--every`` batches. From that record, in float64, it reports:

* the number of groups per batch and how often the partition changes, per window of batches;
* for every measurement, the credited group's intra-group pairs: how often both losses fell (then
  the pair's affinity moves up), against the inter-group targets' share of improvements;
* the group actually stepped between the two forwards (whichever group is credited), so that the
  two crediting modes can be compared on the same footing.

Usage (the committed record, benchmarks/results/grouping_dynamics/)::

    python benchmarks/grouping_dynamics.py --tasks taskonomy --iters 3000 --out benchmarks/results/grouping_dynamics
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selgroup_fast.affinity import AffinityTracker
from selgroup_fast.train import TrainConfig, fit
from selgroup_fast.train.config import parse_method_option

ATTRIBUTIONS = ("paper", "reference")
#: SelectiveGroupUpdate's default warm-up (singleton groups), kept out of the statistics
WARMUP_STEPS = 100


class Recorder:
    """Wraps ``AffinityTracker.credit_batch``: keeps each batch's losses (F×K), groups and crediting."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.batches: list[dict[str, Any]] = []
        self.affinity: list[np.ndarray] = []
        self.affinity_batches: list[int] = []
        self._original = AffinityTracker.credit_batch

    def __enter__(self) -> Recorder:
        recorder, original = self, self._original

        def credit_batch(tracker: AffinityTracker, losses: torch.Tensor, stepped: Any, **kwargs: Any) -> None:
            original(tracker, losses, stepped, **kwargs)
            recorder.batches.append(
                {
                    "losses": losses.detach().double().cpu().numpy(),
                    "stepped": [sorted(int(t) for t in group) for group in stepped],
                    "attribution": kwargs.get("attribution", "paper"),
                }
            )
            if len(recorder.batches) % recorder.every == 0:
                recorder.affinity.append(tracker.affinity.double().cpu().numpy().copy())
                recorder.affinity_batches.append(len(recorder.batches))

        AffinityTracker.credit_batch = credit_batch  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        AffinityTracker.credit_batch = self._original  # type: ignore[method-assign]


def partition_key(stepped: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(sorted({tuple(group) for group in stepped}))


def analyse(batches: list[dict[str, Any]], warmup: int, window: int) -> dict[str, Any]:
    """Float64 statistics of a run's record (see the module docstring)."""
    # A lone group is stepped twice per batch (docs/algorithm.md §Groupings): count distinct groups.
    keys = [partition_key(batch["stepped"]) for batch in batches]
    counts = [len(key) for key in keys]
    after = range(warmup, len(batches))
    changes = [keys[i] != keys[i - 1] for i in after if i > warmup]
    windows = []
    for start in range(warmup, len(batches), window):
        stop = min(start + window, len(batches))
        part = range(start, stop)
        windows.append(
            {
                "batches": [start, stop],
                "groups_mean": float(np.mean([counts[i] for i in part])),
                "groups_min": int(min(counts[i] for i in part)),
                "groups_max": int(max(counts[i] for i in part)),
                "partition_changes": int(sum(keys[i] != keys[i - 1] for i in part if i > start)),
                "distinct_partitions": len({keys[i] for i in part}),
            }
        )
    # Measurements: forwards m and m + 1 bracket the step of stepped[m]; credited group per mode.
    intra_both_fell = intra_pairs = 0
    stepped_intra_both_fell = stepped_intra_pairs = 0
    inter_fell = inter_targets = 0
    for i in after:
        batch = batches[i]
        losses, stepped = batch["losses"], batch["stepped"]
        shift = ATTRIBUTIONS.index(batch["attribution"])
        for m in range(len(losses) - 1):
            if m + shift >= len(stepped):
                continue
            before, later = losses[m], losses[m + 1]
            fell = later < before
            credited, actual = stepped[m + shift], stepped[m]
            pairs = [(s, t) for s in credited for t in credited if s != t]
            intra_pairs += len(pairs)
            intra_both_fell += sum(bool(fell[s] and fell[t]) for s, t in pairs)
            own = [(s, t) for s in actual for t in actual if s != t]
            stepped_intra_pairs += len(own)
            stepped_intra_both_fell += sum(bool(fell[s] and fell[t]) for s, t in own)
            outside = [t for t in range(len(before)) if t not in credited]
            inter_targets += len(outside)
            inter_fell += sum(bool(fell[t]) for t in outside)
    return {
        "batches": len(batches),
        "warmup": warmup,
        "groups_mean_after_warmup": float(np.mean(counts[warmup:])) if len(counts) > warmup else None,
        "partition_changes_after_warmup": int(sum(changes)),
        "last_partition_change": max((i for i in after if i > warmup and keys[i] != keys[i - 1]), default=None),
        "credited_intra_pairs_both_fell": intra_both_fell / intra_pairs if intra_pairs else None,
        "credited_intra_pairs": intra_pairs,
        "stepped_intra_pairs_both_fell": stepped_intra_both_fell / stepped_intra_pairs if stepped_intra_pairs else None,
        "credited_inter_targets_fell": inter_fell / inter_targets if inter_targets else None,
        "windows": windows,
    }


def plot(runs: dict[str, dict[str, Any]], names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.4 * len(runs)), sharex=True, squeeze=False)
    for ax, (label, run) in zip(axes[:, 0], runs.items(), strict=True):
        counts = run["groups"]
        ax.plot(np.arange(1, len(counts) + 1), counts, lw=0.6, drawstyle="steps-post")
        ax.set_ylabel("groups")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, len(names) + 0.5)
    axes[-1, 0].set_xlabel("batch")
    fig.tight_layout()
    fig.savefig(out / "groups_per_batch.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False, sharey=True)
    for ax, (label, run) in zip(axes[0], runs.items(), strict=True):
        steps = np.asarray(run["affinity_batches"])
        stack = np.asarray(run["affinity"])  # T×K×K
        final = stack[-1]
        # The 8 off-diagonal entries largest in magnitude at the end, both modes the same pairs' kind.
        order = np.argsort(-np.abs(final - np.diag(np.diag(final))).ravel())
        shown = [divmod(int(index), final.shape[0]) for index in order[:8]]
        for s, t in shown:
            ax.plot(steps, stack[:, s, t], lw=0.9, label=f"{names[s]}→{names[t]}")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("batch")
        ax.legend(fontsize=6, ncol=2)
    axes[0, 0].set_ylabel("A[s, t]")
    fig.tight_layout()
    fig.savefig(out / "affinity_entries.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="taskonomy")
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="paper,reference")
    parser.add_argument("--every", type=int, default=10, help="record the affinity every N batches")
    parser.add_argument("--window", type=int, default=250, help="batches per window of the statistics")
    parser.add_argument("--option", action="append", default=[], help="one more method option KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = dict(parse_method_option(item) for item in args.option)  # as --method-option: 50 is an int
    runs: dict[str, dict[str, Any]] = {}
    names: list[str] = []
    for mode in args.modes.split(","):
        label = f"{args.tasks} attribution={mode} seed {args.seed}"
        folder = args.out / f"{args.tasks}_{mode}_seed{args.seed}"
        config = TrainConfig(
            tasks=args.tasks,
            method="selective",
            method_options={"attribution": mode, **options},
            iters=args.iters,
            eval_every=args.iters,
            checkpoint_every=args.iters,
            seed=args.seed,
            workers=0,
            out=str(folder),
            progress=False,
        )
        start = time.perf_counter()
        with Recorder(args.every) as recorder:
            results = fit(config)
        seconds = time.perf_counter() - start
        names = list(results["tasks"])
        warmup = int(options.get("warmup_steps", WARMUP_STEPS))
        stats = analyse(recorder.batches, warmup, args.window)
        stats["seconds"] = seconds
        stats["options"] = {"attribution": mode, **options}
        runs[label] = {
            "groups": [len(partition_key(batch["stepped"])) for batch in recorder.batches],
            "affinity": [a.tolist() for a in recorder.affinity],
            "affinity_batches": recorder.affinity_batches,
            "stats": stats,
        }
        (args.out).mkdir(parents=True, exist_ok=True)
        (folder / "dynamics.json").write_text(json.dumps(runs[label], indent=1))
        print(label, json.dumps({k: v for k, v in stats.items() if k != "windows"}), flush=True)
    plot(runs, names, args.out)


if __name__ == "__main__":
    main()
