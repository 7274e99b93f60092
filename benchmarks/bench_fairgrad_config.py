"""FairGrad and ConFIG side by side with TorchJD 0.18, on one CPU thread, in one run.

* FairGrad: the weights from a Gram matrix G (K = 4, 11, 32, 64, 128; α = 2): ours
  (``ops.fairgrad_weights``, damped Newton in C++) against TorchJD's ``FairGradWeighting``
  (scipy's ``least_squares`` from 1/K), with the fixed-point residual ``max_k |(G w)_k w_k^(1/α) − 1|`` of each.
* ConFIG: the aggregate of a 32 × 200,000 Jacobian: ours (``G = J Jᵀ``, ``ops.config_weights``, ``wᵀJ``)
  against TorchJD's ``ConFIG`` (``torch.linalg.pinv`` of the unit rows: an SVD of J), with their relative gap.

The time is the median of ``--repeats`` calls after one warm-up call.

    python benchmarks/bench_fairgrad_config.py        # writes benchmarks/results/fairgrad_config_cpu.md
    python benchmarks/bench_fairgrad_config.py --repeats 3 --out /tmp/x.md

Needs the torchjd test extra (TorchJD with its fairgrad extra: scipy).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

from selgroup_fast import methods, ops

TASK_COUNTS = (4, 11, 32, 64, 128)
ALPHA = 2.0
CONFIG_SHAPE = (32, 200_000)


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gram_of(K: int, seed: int) -> torch.Tensor:
    """G of K task gradients with some conflict (a shared direction plus noise), float64."""
    generator = torch.Generator().manual_seed(seed)
    J = 0.3 * torch.randn(1, 4 * K, generator=generator, dtype=torch.float64)
    J = J + torch.randn(K, 4 * K, generator=generator, dtype=torch.float64)
    return J @ J.T


def fairness_residual(gram: torch.Tensor, weights: torch.Tensor) -> float:
    return float(((gram @ weights) * weights ** (1 / ALPHA) - 1).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fairgrad_config_cpu.md")
    args = parser.parse_args()
    from torchjd.aggregation import ConFIG, FairGradWeighting

    torch.set_num_threads(1)
    lines = [
        "# FairGrad and ConFIG against TorchJD 0.18 (one CPU thread)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()} {platform.release()}; "
        f"torch {torch.__version__}, torchjd {version('torchjd')}, scipy {version('scipy')}, one thread; "
        f"median of {args.repeats} calls after a warm-up.",
        f"Command: `python benchmarks/bench_fairgrad_config.py --repeats {args.repeats}`",
        "",
        f"## FairGrad weights from G (α = {ALPHA:g}, float64)",
        "",
        "| K | ours | TorchJD | speed-up | our residual | TorchJD's residual |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    theirs_weighting = FairGradWeighting(alpha=ALPHA)
    for K in TASK_COUNTS:
        gram = gram_of(K, K)
        ours = median_seconds(lambda gram=gram: ops.fairgrad_weights(gram, alpha=ALPHA), args.repeats)
        theirs = median_seconds(lambda gram=gram: theirs_weighting(gram), args.repeats)
        residual_ours = fairness_residual(gram, ops.fairgrad_weights(gram, alpha=ALPHA))
        residual_theirs = fairness_residual(gram, theirs_weighting(gram))
        lines.append(
            f"| {K} | {ours * 1e3:.3f} ms | {theirs * 1e3:.3f} ms | {theirs / ours:.0f}× "
            f"| {residual_ours:.1e} | {residual_theirs:.1e} |"
        )
        print(lines[-1], flush=True)

    K, P = CONFIG_SHAPE
    lines += [
        "",
        f"## ConFIG: the aggregate of a {K} × {P:,} Jacobian",
        "",
        "| dtype | ours | TorchJD | speed-up | relative gap |",
        "|---|---:|---:|---:|---:|",
    ]
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        J = (0.3 * torch.randn(1, P, generator=generator) + torch.randn(K, P, generator=generator)).to(dtype)
        ours_aggregator, theirs_aggregator = methods.aggregator("config", K, dtype=dtype), ConFIG()
        ours = median_seconds(lambda J=J: ours_aggregator(J), args.repeats)
        theirs = median_seconds(lambda J=J: theirs_aggregator(J), args.repeats)
        d_ours, d_theirs = ours_aggregator(J).double(), theirs_aggregator(J).double()
        gap = float((d_ours - d_theirs).norm() / d_theirs.norm())
        lines.append(
            f"| {str(dtype).removeprefix('torch.')} | {ours * 1e3:.1f} ms | {theirs * 1e3:.1f} ms "
            f"| {theirs / ours:.1f}× | {gap:.1e} |"
        )
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
