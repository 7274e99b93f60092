"""Task weights (or the direction) on one CPU thread: this library's methods against TorchJD 0.18's own objects.

For each K, a random K × P Jacobian J (standard normal, seeded; P = 2,000: nearly orthogonal tasks, about half
of each pair conflicting) and, for each method, the call that the training step makes on the matrix the method
reads, ours against TorchJD's object (default options on both sides, or the ones ``CASES`` names):

* a weighting of G = J·Jᵀ (``upgrad``, ``dualproj``, ``gradvac``, ``cr_mogm``, ``krum``): ``Weighting.weights(G)``
  against TorchJD's ``...Weighting(G)``;
* a weighting of A = J_1·J_2ᵀ of two batches (``modo``, ``sdmgrad``): ``weights(A)`` against ``...Weighting(A)``;
* an aggregator of J itself (``excess_mtl``, ``trimmed_mean``): the direction, ``combine(J)`` against
  TorchJD's aggregator ``(J)``.

The calls alternate (ours, TorchJD's, ours, ...) so that both see the same machine load; the table reports
the medians, the ratio and the largest relative difference of the first call's answers (the same problem
must give the same answer; GradVac's random visiting orders: our generator seeded ``s`` draws TorchJD's orders
under ``torch.manual_seed(s)``). The stateful methods (GradVac, CR-MOGM, MoDo, SDMGrad, ExcessMTL) run from
the state their previous calls left, the same on both sides. ``torch.set_num_threads(1)``.

    PYTHONPATH=. python benchmarks/bench_weightings.py --output benchmarks/results/weightings_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, cast

import torch
from torchjd import aggregation

from selgroup_fast.methods import aggregator
from selgroup_fast.methods.weighting import Weighting


@dataclass(frozen=True)
class Case:
    """One method: what it reads (``"gram"``, ``"cross"``: A of two batches, ``"jacobian"``), our options,
    TorchJD's object, and the seed of both sides' random draws (GradVac's orders)."""

    reads: str
    theirs: Callable[[], Callable[[torch.Tensor], torch.Tensor]]
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None


#: Our registry name -> the case (default options on both sides unless named).
CASES: dict[str, Case] = {
    "upgrad": Case("gram", aggregation.UPGradWeighting),
    "dualproj": Case("gram", aggregation.DualProjWeighting),
    "gradvac": Case("gram", aggregation.GradVacWeighting, {"seed": 0}, seed=0),
    "cr_mogm": Case("gram", lambda: aggregation.CRMOGMWeighting(aggregation.UPGradWeighting())),
    "krum": Case("gram", lambda: aggregation.KrumWeighting(n_byzantine=1), {"n_byzantine": 1}),
    "modo": Case("cross", aggregation.MoDoWeighting),
    "sdmgrad": Case("cross", aggregation.SDMGradWeighting),
    "excess_mtl": Case("jacobian", aggregation.ExcessMTL),
    "trimmed_mean": Case("jacobian", lambda: aggregation.TrimmedMean(trim_number=1), {"trim_number": 1}),
}


def calls(name: str, case: Case, K: int, columns: int, generator: torch.Generator):
    """Our call and TorchJD's on this K's matrix (fresh objects; TorchJD's drawing from its seeded global RNG)."""
    J = torch.randn(K, columns, dtype=torch.float64, generator=generator)
    ours = aggregator(name, K, dtype=torch.float64, **case.options)
    if case.seed is not None:
        torch.manual_seed(case.seed)
    theirs = case.theirs()
    if case.reads == "jacobian":
        return (lambda: ours.combine(J)[0]), (lambda: theirs(J))
    second = torch.randn(K, columns, dtype=torch.float64, generator=generator) if case.reads == "cross" else J
    matrix = J @ second.T
    weighting = cast(Weighting, ours)
    return (lambda: weighting.weights(matrix)), (lambda: theirs(matrix))


def median_seconds(call: Callable[[], object], other: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Medians of ``call`` and ``other`` timed alternately, ``repeats`` times each, after one warm-up each."""
    call(), other()
    ours, theirs = [], []
    for _ in range(repeats):
        for target, times in ((call, ours), (other, theirs)):
            start = time.perf_counter()
            target()
            times.append(time.perf_counter() - start)
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 11, 32, 64, 128])
    parser.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--columns", type=int, default=2000, help="P, the Jacobian's columns")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of TorchJD time per (method, K) at most")
    parser.add_argument("--output", help="also write the Markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    lines = [
        "| method | K | ours (ms) | TorchJD (ms) | TorchJD / ours | max rel. diff (w, or d for J's) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in args.methods:
        case = CASES[name]
        for K in args.sizes:
            ours, theirs = calls(name, case, K, args.columns, generator)
            expected = theirs()
            answer = ours()
            start = time.perf_counter()
            theirs()
            repeats = max(3, min(200, int(args.budget / max(time.perf_counter() - start, 1e-6))))
            ours_s, theirs_s = median_seconds(ours, theirs, repeats)
            difference = float((answer - expected).abs().max() / expected.abs().max())
            lines.append(
                f"| {name} | {K} | {ours_s * 1e3:.3f} | {theirs_s * 1e3:.3f} | {theirs_s / ours_s:.1f}× "
                f"| {difference:.1e} |"
            )
            print(lines[-1], flush=True)
    header = [
        f"# Weights (or the direction) against TorchJD, one CPU thread ({datetime.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {platform.platform()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, torchjd {version('torchjd')}.",
        "Command: `PYTHONPATH=. python benchmarks/bench_weightings.py "
        f"--sizes {' '.join(map(str, args.sizes))} --columns {args.columns} --methods {' '.join(args.methods)}`.",
        "",
    ]
    report = "\n".join(header + lines) + "\n"
    print(report)
    if args.output:
        with open(args.output, "w") as file:
            file.write(report)


if __name__ == "__main__":
    main()
