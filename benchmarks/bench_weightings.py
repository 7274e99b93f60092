"""Weights from G on one CPU thread: this library's weightings against TorchJD 0.18's Weighting objects.

For each K, one Gram matrix G = J·Jᵀ of a random K × P Jacobian (standard normal, seeded; P = 2,000: nearly
orthogonal tasks, about half of each pair conflicting), and for each method the call that maps G to the K
weights: ours (``Weighting.weights``, the fused op) and TorchJD's ``...Weighting`` object (its default
options, as ours). The calls alternate (ours, TorchJD's, ours, ...) so that both see the same machine load;
the table reports the medians, the ratio and the largest relative difference of the weights (the same
problem must give the same answer). ``torch.set_num_threads(1)``.

    PYTHONPATH=. python benchmarks/bench_weightings.py --output benchmarks/results/weightings_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version

import torch
from torchjd import aggregation

from selgroup_fast.methods import aggregator

#: Our registry name -> TorchJD's Weighting class (default options on both sides).
PEERS: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
    "upgrad": aggregation.UPGradWeighting,
    "dualproj": aggregation.DualProjWeighting,
}


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
    parser.add_argument("--columns", type=int, default=2000, help="P, the Jacobian's columns")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of TorchJD time per (method, K) at most")
    parser.add_argument("--output", help="also write the Markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    lines = [
        "| method | K | ours (ms) | TorchJD (ms) | TorchJD / ours | max rel. diff of w |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, peer in PEERS.items():
        for K in args.sizes:
            J = torch.randn(K, args.columns, dtype=torch.float64, generator=generator)
            G = J @ J.T
            ours, theirs = aggregator(name, K, dtype=torch.float64), peer()
            start = time.perf_counter()
            expected = theirs(G)
            repeats = max(3, min(200, int(args.budget / max(time.perf_counter() - start, 1e-6))))
            ours_s, theirs_s = median_seconds(lambda: ours.weights(G), lambda: theirs(G), repeats)
            difference = float((ours.weights(G) - expected).abs().max() / expected.abs().max())
            lines.append(
                f"| {name} | {K} | {ours_s * 1e3:.3f} | {theirs_s * 1e3:.3f} | {theirs_s / ours_s:.1f}× "
                f"| {difference:.1e} |"
            )
    header = [
        f"# Weights from G, one CPU thread ({datetime.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {platform.platform()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, torchjd {version('torchjd')}.",
        "Command: `PYTHONPATH=. python benchmarks/bench_weightings.py "
        f"--sizes {' '.join(map(str, args.sizes))} --columns {args.columns}`.",
        "",
    ]
    report = "\n".join(header + lines) + "\n"
    print(report)
    if args.output:
        with open(args.output, "w") as file:
            file.write(report)


if __name__ == "__main__":
    main()
