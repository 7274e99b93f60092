"""Timing of the fused affinity ops against the reference code's way of doing the same work.

(a) ``affinity_update_`` (through ``AffinityTracker.update``) against a Python double
    loop over task pairs that reads each loss with ``.item()`` and updates the affinity
    entry by entry, as the public reference code (wooseong97/sel-update-mtl,
    ``form_task_affinity.update``) does: ``ReferenceAffinity`` of reference_loop.py,
    the same restatement that benchmarks the whole reference loop. Both replay the
    same realistic sequence of group updates (each batch: the groups of a partition in
    turn, losses drifting down with noise).
(b) ``affinity_propagation`` against scikit-learn's ``AffinityPropagation(affinity=
    "precomputed", convergence_iter=50)`` on the grouping similarity of the tracked
    affinity (the official ``next_group`` call).

Reports medians and ratios as a Markdown table (stdout, and ``--output``). CPU always;
CUDA too (timed with CUDA events) when a GPU and the CUDA kernels are present.
``--propagation-only`` times (b) alone (large K: the update's reference loop is slow),
``--threads N`` gives torch (and so the CPU team of affinity propagation) N threads.

    PYTHONPATH=. python benchmarks/bench_ops.py --output benchmarks/results/ops_cpu.md
    PYTHONPATH=. python benchmarks/bench_ops.py --propagation-only --sizes 11 32 64 128 256
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import sklearn
import torch
from reference_loop import CONVERGENCE_ITER, DECAY, ReferenceAffinity  # beside this script
from sklearn.cluster import AffinityPropagation

import selgroup_fast
from selgroup_fast import ops
from selgroup_fast.cli_common import cpu_model


def update_sequence(
    num_tasks: int, num_batches: int, seed: int = 0
) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(group, before, after) triples of a training run: a fixed partition into about
    three groups, each batch updating them in a random order."""
    generator = torch.Generator().manual_seed(seed)
    assignment = torch.randint(0, 3, (num_tasks,), generator=generator)
    groups = [torch.nonzero(assignment == g).flatten().tolist() for g in range(3)]
    groups = [g for g in groups if g]
    losses = torch.rand(num_tasks, generator=generator) + 1.0
    sequence = []
    for _ in range(num_batches):
        for index in torch.randperm(len(groups), generator=generator).tolist():
            after = losses * (1 - 0.01 * torch.randn(num_tasks, generator=generator))
            sequence.append((groups[index], losses.clone(), after.clone()))
            losses = after
    return sequence


# The CPU clock: the wall clock, or with --cpu-time the calling thread's CPU time (excludes time spent
# descheduled on a loaded machine; one-thread runs only).
clock = time.perf_counter


def median_seconds(function: Callable[[], object], repeats: int, device: str) -> float:
    """Median time of ``function`` (CUDA events on a GPU, else ``clock``), after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = clock()
            function()
            times.append(clock() - begin)
    return statistics.median(times)


def interleaved_medians(
    ours: Callable[[], object], theirs: Callable[[], object], rounds: int, device: str
) -> tuple[float, float, list[float]]:
    """Median times of ``ours`` (5 calls per round) and ``theirs`` (1 per round; CPU), the rounds alternating, and
    each round's ratio theirs / ours (so a load that changes between rounds shows as spread, not as a bias)."""
    ours_times, their_times = [], []
    for _ in range(rounds):
        ours_times.append(median_seconds(ours, 5, device))
        their_times.append(median_seconds(theirs, 1, "cpu"))
    ratios = [theirs_s / ours_s for ours_s, theirs_s in zip(ours_times, their_times, strict=True)]
    return statistics.median(ours_times), statistics.median(their_times), ratios


def run(
    sizes: list[int], num_batches: int, repeats: int, device: str, propagation_only: bool = False
) -> list[dict[str, object]]:
    rows = []
    for K in sizes:
        sequence = update_sequence(K, num_batches)
        on_device = [(group, before.to(device), after.to(device)) for group, before, after in sequence]

        def fused() -> selgroup_fast.AffinityTracker:
            tracker = selgroup_fast.AffinityTracker(K, decay=DECAY, device=device)
            for group, before, after in on_device:
                tracker.update(group, before, after)
            return tracker

        # The reference keeps the previous forward's losses as Python floats and reads
        # the new ones pair by pair (ReferenceAffinity.update: .item() per read).
        replay = [(group, before.tolist(), list(after.unbind())) for group, before, after in on_device]

        def reference() -> torch.Tensor:
            affinity = ReferenceAffinity(K, decay=DECAY)
            for group, before, after in replay:
                affinity.previous = before
                affinity.update(group, after)
            return affinity.affinity

        tracker = fused()
        per_update = len(sequence)
        fused_s = reference_s = None
        if not propagation_only:
            torch.testing.assert_close(tracker.affinity.cpu(), reference(), rtol=1e-4, atol=1e-7)
            fused_s = median_seconds(fused, repeats, device) / per_update
            reference_s = median_seconds(reference, max(3, repeats // 3), device) / per_update

        similarity = tracker.similarity()
        similarity_np = similarity.double().cpu().numpy()

        def ours_ap() -> torch.Tensor:
            return ops.affinity_propagation(similarity, convergence_iter=CONVERGENCE_ITER)

        def sklearn_ap() -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return (
                    AffinityPropagation(affinity="precomputed", convergence_iter=CONVERGENCE_ITER, random_state=0)
                    .fit(similarity_np)
                    .labels_
                )

        # Same partition first (the labels are numbered differently), then the timings, interleaved so that
        # both sides see the same machine load.
        assert len(set(zip(ours_ap().tolist(), sklearn_ap().tolist(), strict=False))) == len(set(sklearn_ap().tolist()))
        ours_ap_s, sklearn_ap_s, ratios = interleaved_medians(ours_ap, sklearn_ap, repeats, device)
        rows.append(
            dict(
                K=K,
                device=device,
                updates=per_update,
                fused=fused_s,
                reference=reference_s,
                ours_ap=ours_ap_s,
                sklearn_ap=sklearn_ap_s,
                ratios=ratios,
            )
        )
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| K | device | affinity update: fused (µs) | reference loop (µs) | speed-up | "
        "affinity propagation: ours (µs) | scikit-learn (µs) | speed-up: median of the rounds | min–max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        update = (
            "– | – | –"
            if r["fused"] is None
            else f"{r['fused'] * 1e6:.1f} | {r['reference'] * 1e6:.1f} | {r['reference'] / r['fused']:.0f}×"
        )
        lines.append(
            f"| {r['K']} | {r['device']} | {update} | {r['ours_ap'] * 1e6:.1f} | {r['sklearn_ap'] * 1e6:.1f} | "
            f"{statistics.median(r['ratios']):.1f}× | {min(r['ratios']):.1f}–{max(r['ratios']):.1f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 11, 32])
    parser.add_argument("--batches", type=int, default=20, help="batches of group updates replayed per timing")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", help="also write the Markdown report here")
    parser.add_argument("--propagation-only", action="store_true", help="time affinity propagation only")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch's CPU threads (affinity propagation uses up to one per 64 samples from K = 128)",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the CPU side by the calling thread's CPU time instead of the wall clock",
    )
    args = parser.parse_args()

    global clock
    if args.cpu_time:
        if args.threads != 1:
            parser.error("--cpu-time measures one thread: use it with --threads 1")
        clock = time.thread_time
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.cuda_available() else [])
    rows = [
        row for device in devices for row in run(args.sizes, args.batches, args.repeats, device, args.propagation_only)
    ]
    report = "\n".join(
        [
            "# Fused affinity ops vs the reference code's way",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- machine: {cpu_model()}, {os.cpu_count()} logical cores"
            + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ", no GPU"),
            f"- versions: python {platform.python_version()}, torch {torch.__version__}, scikit-learn {sklearn.__version__}, "
            f"numpy {np.__version__}",
            f"- command: `python {' '.join(sys.argv)}` (torch.set_num_threads({args.threads}))",
            "- load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
            f"- times: medians of the {'calling thread CPU time' if args.cpu_time else 'wall clock'}; "
            "the affinity update per group update (averaged over a replayed sequence of "
            f"{args.batches} batches × ~3 groups), affinity propagation per call (convergence_iter={CONVERGENCE_ITER}, "
            "the official setting)",
            "- both sides run in this one process on the same inputs (the reference side checked equal to the fused "
            "one first, the partitions of affinity propagation too), affinity propagation's timings interleaved "
            f"({args.repeats} rounds of 5 calls of ours and 1 of scikit-learn's; its speed-up is the median of the "
            "rounds' ratios, with their range); read the ratios: absolute times move with the machine's load",
            "",
            markdown(rows),
            "",
        ]
    )
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
