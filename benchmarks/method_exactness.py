"""Exactness of every gradient method on badly scaled and degenerate inputs, next to TorchJD 0.18 and LibMTL's rule.

For each method of tests/test_weighting_properties.py's table with an exact reference (tests/manipulation_reference.py:
Clarabel's min-norm point for MGDA, Newton for Nash-MTL, eigh for Aligned-MTL, pinv for IMTL, the PCGrad and
GradDrop rules) or an optimality residual (CAGrad: the gap to Clarabel's primal optimum), on the harness's input
families (tests/method_families.py) in float64: the worst cosine to the reference and the worst relative error over
the seeds, for ours, TorchJD 0.18's aggregator (run directly, scaled by our convention's constant) and LibMTL's rule
(re-derived in float64 NumPy: the authors' Frank-Wolfe for MGDA, SLSQP for CAGrad, the closed form with an inverse
for IMTL-G, float32's rank tolerance for Aligned-MTL). Then the harness's properties that hold for ours.

    python benchmarks/method_exactness.py                 # writes benchmarks/results/method_exactness.md
    python benchmarks/method_exactness.py --seeds 2 --out /tmp/x.md

Needs the torchjd test extra (TorchJD with its cvxpy extras) and cvxpy/Clarabel.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import manipulation_reference as reference  # noqa: E402
import test_weighting_properties as harness  # noqa: E402
from method_families import Case  # noqa: E402

RATIOS = (1.0, 10.0, 100.0, 1e3, 1e4)
DEGENERATE = ("strong_stationary", "weak_stationary", "non_weak_stationary", "rank_deficient", "duplicate_rows")
TASKS = 6  # the K for the badly scaled inputs


def libmtl_direction(name: str, J: np.ndarray, options: dict[str, Any]) -> np.ndarray | None:
    """LibMTL's rule for method ``name`` in float64, in our convention's scale; None where it is the reference's."""
    K = J.shape[0]
    if name == "mgda":
        return J.T @ reference.mgda_weights(J)
    if name == "cagrad":
        return K * (J.T @ reference.cagrad_weights(J, c=options["c"]))
    if name == "imtl":  # the authors' closed form with an inverse (no pseudo-inverse on a singular system)
        units = J / np.linalg.norm(J, axis=1, keepdims=True)
        D, U = J[:1] - J[1:], units[:1] - units[1:]
        alpha = np.linalg.solve((D @ U.T).T, J[0] @ U.T)
        return J.T @ np.concatenate([[1 - alpha.sum()], alpha])
    if name == "aligned_mtl":
        return J.T @ reference.aligned_mtl_weights(J, np.float32)  # the authors' float32 training: its epsilon
    return None  # PCGrad, GradDrop: the rule is the reference; Nash-MTL: the authors' cvxpy loop, as TorchJD's


def torchjd_direction(name: str, J: np.ndarray) -> np.ndarray | None:
    row = harness.ROWS[name]
    if name == "nash_mtl":
        from torchjd.aggregation import NashMTL

        aggregator: Any = NashMTL(n_tasks=J.shape[0], max_norm=0.0, update_weights_every=1)
    elif row.torchjd is not None:
        aggregator = row.torchjd(J.shape[0])
    else:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = aggregator(torch.from_numpy(J)).double().numpy()
    return d * row.torchjd_factor(J.shape[0], row.options)


def error_of(name: str, J: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """(cosine, relative error) of d to the exact direction, or (nan, optimality residual) for CAGrad."""
    row = harness.ROWS[name]
    if row.reference is None:
        assert row.optimality is not None
        return float("nan"), row.optimality(J, d, None, row.options)
    expected = row.reference(J, {**row.options, "device": "cpu", "dtype": np.float64})
    size = float(np.linalg.norm(expected))
    # Where d* vanishes (zero in the hull) a cosine says nothing: the error is over the problem's scale.
    meaningful = size > harness.EXACT[torch.float64] * harness.scale_of(J) and np.linalg.norm(d) > 0
    cosine = float(d @ expected) / (size * float(np.linalg.norm(d))) if meaningful else float("nan")
    return cosine, harness.relative_error(d, expected, J, torch.float64)


def worst(name: str, cases: list[Case], direction: Callable[[np.ndarray], np.ndarray | None], missing: str) -> str:
    """The worst cosine and error of ``direction`` over ``cases``; ``missing`` where it gives None."""
    cosines, errors = [], []
    claim = harness.ROWS[name].exact
    for case in cases:
        if claim is None or not claim.covers(case):
            continue
        J = case.jacobian()
        try:
            d = direction(J)
        except Exception as error:  # a peer's solver that fails is a result, not a crash of the table
            return f"fails ({type(error).__name__})"
        if d is None:
            return missing
        if not np.isfinite(d).all():
            return "non-finite"
        cosine, error = error_of(name, J, d)
        cosines.append(cosine)
        errors.append(error)
    if not errors:
        return "n/a"  # the method claims nothing there (e.g. Nash-MTL has no solution with zero in the hull)
    cosine = "" if np.isnan(cosines).all() else f"cos {np.nanmin(cosines):.4f}, "
    return f"{cosine}err {max(errors):.1e}"


def properties_holding(name: str, cases: list[Case]) -> str:
    """The harness's claims for ``name`` that hold on ``cases`` (float64, CPU): one word per property."""
    row, held = harness.ROWS[name], []
    checks = {
        "non-conflicting": row.non_conflicting,
        "permutation-invariant": row.permutation_invariant,
        "optimal": row.optimal if row.optimality is not None else None,
    }
    for label, claim in checks.items():
        if claim is None:
            continue
        ok = True
        for case in cases:
            if not claim.covers(case):
                continue
            J = torch.from_numpy(case.jacobian())
            d, w = harness.run(name, J, **(claim.options if label == "non-conflicting" else {}))
            J64 = J.numpy()
            if label == "non-conflicting" and np.linalg.norm(d) > harness.EXACT[torch.float64] * harness.scale_of(J64):
                norms = np.linalg.norm(J64, axis=1)
                ok &= bool(((J64 @ d)[norms > 0] / (norms[norms > 0] * np.linalg.norm(d))).min() >= -1e-9)
            elif label == "permutation-invariant":
                permuted = harness.run(name, J[np.random.default_rng(0).permutation(case.tasks)].contiguous())[0]
                tolerance = harness.allowed(name, claim, J64, d, torch.float64, 100 * harness.EXACT[torch.float64])
                ok &= harness.relative_error(permuted, d, J64, torch.float64) <= tolerance
            elif label == "optimal":
                assert row.optimality is not None
                ok &= row.optimality(J64, d, w, row.options) <= 1e-7
        held.append(label if ok else f"~~{label}~~")
    return ", ".join(held) or "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "method_exactness.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = tuple(range(args.seeds))
    start = time.perf_counter()
    scaled = {ratio: [Case("norm_ratio", TASKS, seed, ratio) for seed in seeds] for ratio in RATIOS}
    degenerate = [
        Case(family, 20 if family == "rank_deficient" else TASKS, seed, 1.0 if family == "rank_deficient" else 0.0)
        for family in DEGENERATE
        for seed in seeds
    ]
    lines = [
        "# Gradient methods: exactness on badly scaled and degenerate inputs",
        "",
        f"- command: `python benchmarks/method_exactness.py --seeds {args.seeds}`",
        f"- machine: {platform.machine()} {platform.processor() or ''}, {platform.system()} {platform.release()}; "
        f"torch {torch.__version__}, torchjd {version('torchjd')}, cvxpy {version('cvxpy')}, "
        f"clarabel {version('clarabel')}, numpy {np.__version__}",
        f"- inputs (tests/method_families.py, float64): K = {TASKS}, P = {2 * TASKS + 3}, one row × s and one ÷ √s "
        f"(`norm_ratio`); degenerate: {', '.join(DEGENERATE)} (K = {TASKS}; rank-1 K = 20 × P = 10); "
        f"seeds 0..{args.seeds - 1}, the worst kept",
        "- exact reference: tests/manipulation_reference.py (see the harness, docs/algorithm.md §Property harness); "
        "`cos`: worst cosine to it, `err`: worst ‖d − d*‖/‖d*‖; CAGrad: its primal optimality residual "
        "(the gap to Clarabel's optimum over the smallest task's scale, and the distance outside the ball); "
        "MGDA and Aligned-MTL at large s: within the error G's rounding allows (K·ε·(max‖g‖/‖d*‖)², K·ε·κ(G); "
        "the harness's `conditioning`)",
        "- TorchJD 0.18 run directly, scaled by our convention's constant (CAGrad K/(1+c²), Aligned-MTL K); "
        "LibMTL's rule re-derived in float64; `n/a`: the method claims nothing there (no Nash-MTL solution with "
        "zero in the hull, PCGrad's rule is discontinuous on opposite rank-1 pairs)",
        "",
    ]
    for title, groups in (
        ("Badly scaled (norm ratio s)", {f"s = {ratio:g}": cases for ratio, cases in scaled.items()}),
        ("Degenerate", {family: [c for c in degenerate if c.family == family] for family in DEGENERATE}),
    ):
        lines += [f"## {title}", ""]
        header = "| method | implementation | " + " | ".join(groups) + " |"
        lines += [header, "|" + "---|" * (2 + len(groups))]
        for name in harness.ROWS:
            implementations: dict[str, tuple[Callable[[np.ndarray], np.ndarray | None], str]] = {
                "ours": (lambda J: harness.run(name, torch.from_numpy(J))[0], ""),
                "TorchJD 0.18": (lambda J: torchjd_direction(name, J), "another RNG"),
                "LibMTL rule": (
                    lambda J: libmtl_direction(name, J, harness.ROWS[name].options),
                    "the authors' cvxpy loop: TorchJD's row" if name == "nash_mtl" else "= reference (the rule)",
                ),
            }
            for label, (direction, missing) in implementations.items():
                cells = [worst(name, cases, direction, missing) for cases in groups.values()]
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Properties of ours that hold (on every input above; ~~struck~~: violated somewhere)", ""]
    lines += ["| method | properties |", "|---|---|"]
    everything = [case for cases in scaled.values() for case in cases] + degenerate
    lines += [f"| {name} | {properties_holding(name, everything)} |" for name in harness.ROWS]
    lines += ["", f"Wall time: {time.perf_counter() - start:.0f} s.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
