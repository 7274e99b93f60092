"""CAGrad, Nash-MTL and IMTL on singular and badly scaled Gram matrices (issue 20, items 3 and 5).

Each op against an independent reference of tests/manipulation_reference.py: CAGrad's inner problem by cvxpy +
Clarabel, Nash-MTL's G·α = 1/α by Newton in float64 (its badly scaled rows: the property harness,
tests/test_weighting_properties.py), IMTL's conditions by numpy's pseudo-inverse; and the properties the methods claim
on the degenerate families (rank-1 20×100 with mixed signs, duplicated rows, zero rows; float32 and float64) and on
badly scaled rows (one row × s, another × 1/√s).
"""

from __future__ import annotations

import cvxpy as cp
import manipulation_reference as reference
import numpy as np
import pytest
import torch

from selgroup_fast import methods, ops
from selgroup_fast.methods.nash_mtl import clip_weights


def _scaled(seed: int, scale: float, K: int = 6, P: int = 50) -> np.ndarray:
    J = np.random.default_rng(seed).standard_normal((K, P))
    J[0] *= scale
    J[1] /= np.sqrt(scale)
    return J


def _degenerate(family: str, seed: int = 0) -> np.ndarray:
    """The issue's singular families: every one has zero in the rows' convex hull."""
    rng = np.random.default_rng(seed)
    if family == "rank1":  # 20×100, rank 1, coefficients of both signs
        coefficients = rng.standard_normal(20)
        coefficients[:2] = [1.0, -1.0]
        return coefficients[:, None] * rng.standard_normal(100)[None]
    if family == "duplicated":  # g, g, −g and three more: G singular
        J = rng.standard_normal((6, 30))
        J[1], J[2] = J[0], -J[0]
        return J
    if family == "zero":  # a zero gradient (zero is a row)
        J = rng.standard_normal((5, 30))
        J[3] = 0.0
        return J
    raise ValueError(family)


FAMILIES = ["rank1", "duplicated", "zero"]


def _gram(J: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    Jt = torch.tensor(J, dtype=dtype)
    return Jt, Jt @ Jt.T


# ---- CAGrad --------------------------------------------------------------------------------


def _assert_cagrad_exact(J: np.ndarray, c: float) -> np.ndarray:
    # The op's simplex point x = (w − 1/K)/Σ(w − 1/K) is at least as good as the interior-point solver's (whose
    # gaps, 1e-8, leave its x ~1e-6 off), and the updates agree to that solver's accuracy.
    weights = ops.cagrad_weights(torch.tensor(J @ J.T), c=c, rescale=0).numpy()
    expected, point = reference.cagrad_dual_point(J, c)
    ours = (weights - 1.0 / len(J)) / (weights - 1.0 / len(J)).sum()
    reference_objective = reference.cagrad_objective(J @ J.T, point, c)
    assert reference.cagrad_objective(J @ J.T, ours, c) <= reference_objective + 1e-13 * abs(reference_objective)
    np.testing.assert_allclose(weights @ J, expected @ J, atol=1e-4 * np.linalg.norm(expected @ J))
    return weights @ J


@pytest.mark.parametrize("scale", [1.0, 10.0, 1e3])
def test_cagrad_matches_its_inner_problem_on_badly_scaled_rows(scale):
    for seed in range(3):
        _assert_cagrad_exact(_scaled(seed, scale), 0.4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("c", [1.0, 2.0])
def test_cagrad_returns_its_optimum_when_zero_is_in_the_hull(family, c, dtype):
    # For c ≥ 1 the ball ‖d − g0‖ ≤ c‖g0‖ holds 0, and with zero in the rows' hull no d improves every task: the
    # optimum of max_d min_k g_k·d is 0. The update must not conflict with any task beyond rounding.
    J, G = _gram(_degenerate(family), dtype)
    d = ops.cagrad_weights(G, c=c) @ J
    improvements = (J @ d).double()
    assert torch.isfinite(improvements).all()
    assert improvements.min() >= -1e-6 * improvements.norm()


def test_cagrad_keeps_a_positive_optimum_for_c_above_one():
    # All gradients within 60° of each other: zero is not in the hull, the optimum improves every task (> 0) and is
    # the dual formula's, which the rule must leave as it is.
    rng = np.random.default_rng(3)
    J = np.ones((4, 20)) + 0.3 * rng.standard_normal((4, 20))
    d = _assert_cagrad_exact(J, 2.0)
    assert (J @ d).min() > 0


def _torchjd_cagrad_weights(G: np.ndarray, c: float) -> np.ndarray:
    """TorchJD 0.18's CAGradWeighting.forward re-derived: the problem on G/trace(G) by Clarabel, no 1e-8 terms,
    weights 1/K + c·‖g0‖/‖g_w‖ · w (mean-based, no rescale)."""
    K = G.shape[0]
    U, S, _ = np.linalg.svd(G / np.trace(G))
    reduced = U @ np.diag(np.sqrt(S))
    g0 = reduced.T @ np.ones(K) / K
    sqrt_phi = c * np.linalg.norm(g0)
    w = cp.Variable(K)
    cost = (reduced @ g0) @ w + sqrt_phi * cp.norm(reduced.T @ w, 2)
    cp.Problem(cp.Minimize(cost), [w >= 0, cp.sum(w) == 1]).solve(solver=cp.CLARABEL)
    return np.ones(K) / K + sqrt_phi / np.linalg.norm(reduced.T @ w.value) * w.value


@pytest.mark.parametrize("c", [0.4, 0.8])
def test_cagrad_is_torchjd_times_k_over_one_plus_c_squared(c):
    # Our CAGrad (the authors' rescale=1 and their ×K "to match the sum loss") = K/(1+c²) × TorchJD's CAGrad. The
    # tolerance is Clarabel's accuracy at its default gaps (~1e-4 on d); a wrong constant is off by ≥ c²/(1+c²).
    J = np.random.default_rng(4).standard_normal((5, 40))
    ours = methods.aggregate("cagrad", torch.tensor(J), c=c).numpy()
    torchjd = _torchjd_cagrad_weights(J @ J.T, c) @ J
    np.testing.assert_allclose(ours, 5 / (1 + c * c) * torchjd, atol=1e-3 * np.linalg.norm(ours))


# ---- Nash-MTL ------------------------------------------------------------------------------


def test_nash_mtl_solves_singular_grams_that_have_a_solution():
    # Duplicated rows: 1/α lies in G's range with α equal on the copies, so a solution exists (G singular).
    J = np.random.default_rng(5).standard_normal((4, 30))
    J = np.vstack([J, J[:1]])
    G = J @ J.T
    alpha = ops.nash_mtl_weights(torch.tensor(G), torch.ones(5, dtype=torch.float64)).numpy()
    assert alpha[0] == pytest.approx(alpha[4], rel=1e-9)
    np.testing.assert_allclose(alpha * (G @ alpha), np.ones(5), atol=1e-9)
    # A zero gradient: no α solves its equation (α_k = ∞); the others are the problem without it.
    J[4] = 0.0
    G = J @ J.T
    alpha = ops.nash_mtl_weights(torch.tensor(G), torch.ones(5, dtype=torch.float64)).numpy()
    assert np.isfinite(alpha[4]) and alpha[4] > 0
    np.testing.assert_allclose(alpha[:4], reference.nash_mtl_weights(G[:4, :4]), rtol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_nash_mtl_stays_positive_and_finite_on_singular_grams(family, dtype):
    J, G = _gram(_degenerate(family), dtype)
    for start in (torch.ones(len(J), dtype=dtype), torch.full((len(J),), 1e6, dtype=dtype)):
        alpha = ops.nash_mtl_weights(G, start)
        assert torch.isfinite(alpha).all() and (alpha > 0).all(), alpha
        d = methods.aggregate("nash_mtl", J, max_norm=1.0)
        assert torch.isfinite(d).all() and d.double().norm() <= 1.0 + 1e-5


def test_nash_mtl_clip_does_not_overflow(dtype):
    # wᵀGw = 2.5e61 overflows float32 (and 2.5e401 float64): ‖d‖ comes from w/max|w| instead.
    weights = torch.tensor([3.0, 4.0], dtype=dtype) * (1e30 if dtype == torch.float32 else 1e200)
    clipped = clip_weights(weights, torch.eye(2, dtype=dtype), 1.0)
    torch.testing.assert_close(clipped, torch.tensor([0.6, 0.8], dtype=dtype))


# ---- IMTL ----------------------------------------------------------------------------------


IMTL_INPUTS = {
    "rank1 20x10": lambda: (
        np.random.default_rng(6).standard_normal(20)[:, None] * np.random.default_rng(7).standard_normal(10)
    ),
    "parallel": lambda: (
        np.abs(np.random.default_rng(8).standard_normal(6))[:, None] * np.random.default_rng(9).standard_normal(10)
    ),
    "duplicated": lambda: _degenerate("duplicated"),
    "zero": lambda: _degenerate("zero"),
    "8 tasks in 5 dimensions": lambda: np.random.default_rng(10).standard_normal((8, 5)),
    "scaled 1e4": lambda: _scaled(11, 1e4),
}


@pytest.mark.parametrize("name", list(IMTL_INPUTS))
def test_imtl_is_the_pseudo_inverse_solution_and_permutes_with_the_tasks(name, dtype):
    J = IMTL_INPUTS[name]()
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    _, G = _gram(J, dtype)
    weights = ops.imtl_weights(G).double().numpy()
    expected = reference.imtl_weights(J)
    size = np.abs(expected * np.linalg.norm(J, axis=1)).max()  # the weights' scale on the gradients
    np.testing.assert_allclose(
        weights * np.linalg.norm(J, axis=1), expected * np.linalg.norm(J, axis=1), atol=tolerance * size
    )
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(J))
        _, permuted_gram = _gram(J[order], dtype)
        permuted = ops.imtl_weights(permuted_gram).double().numpy()
        np.testing.assert_allclose(
            permuted * np.linalg.norm(J[order], axis=1),
            (weights * np.linalg.norm(J, axis=1))[order],
            atol=tolerance * size,
        )
