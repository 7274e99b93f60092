"""The baselines' gradient-manipulation ops (selgroup_fast.ops, csrc/manipulation).

Each op is checked four ways: hand-computed 2- and 3-task cases (the hand
computation is written next to the expected value), the defining property of the
method on random inputs, agreement with the float64 references of
tests/manipulation_reference.py (written from the papers and the authors' code, on
J rather than G), and torch.library.opcheck. Degenerate and bad inputs are tested
last; CPU-vs-CUDA agreement runs where a GPU and the CUDA kernels exist.
"""

from __future__ import annotations

import doctest
import inspect
import math

import manipulation_reference as reference
import numpy as np
import pytest
import scipy.linalg
import torch

from selgroup_fast import ops

WEIGHT_OPS = ["pcgrad", "mgda", "cagrad", "imtl", "aligned_mtl", "nash_mtl", "fairgrad", "config", "pcd"]
# Random problems of the agreement tests: K tasks, several seeds each.
TASK_COUNTS = [2, 3, 5, 8, 16]
SEEDS = [0, 1, 2]


def _random_jacobian(K: int, seed: int, columns: int | None = None) -> np.ndarray:
    """K task gradients with some conflict: a shared direction plus noise."""
    rng = np.random.default_rng(seed)
    P = 2 * K + 3 if columns is None else columns
    shared = rng.standard_normal(P)
    return 0.3 * shared + rng.standard_normal((K, P)) * rng.uniform(0.5, 2.0, size=(K, 1))


def _gram(jacobian: np.ndarray, dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(jacobian @ jacobian.T).to(dtype=dtype, device=device)


def _random_order(K: int, seed: int, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(K, K, generator=generator).argsort(1).to(device)


def _weights(name: str, gram: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Calls a weighting op with its default options (a fixed order / start where it needs one)."""
    K = gram.shape[0]
    if name == "pcgrad":
        return ops.pcgrad_weights(gram, _random_order(K, seed, str(gram.device)))
    if name == "nash_mtl":
        return ops.nash_mtl_weights(gram, torch.ones(K, dtype=gram.dtype, device=gram.device))
    if name == "config":
        return ops.config_weights(gram, torch.ones(K, dtype=gram.dtype, device=gram.device))
    if name == "pcd":  # unit scales, τ = 0.3 (the EMA's scales are the method's)
        ones = torch.ones(K, dtype=gram.dtype, device=gram.device)
        return ops.pcd_weights(gram, ones, 0.3 * ones[1:])
    return getattr(ops, f"{name}_weights")(gram)


def _tolerance(dtype: torch.dtype) -> dict:
    # The kernels compute in float64 whatever the input; a float32 G is G rounded
    # to 6e-8, which moves the weights by that times the problem's conditioning.
    return {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}


def _t(values, dtype=torch.float64, device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# PCGrad


def test_pcgrad_hand_two_tasks(device, dtype):
    # Orthogonal g1 = (1, 0), g2 = (0, 1): nothing to project, d = g1 + g2.
    assert torch.equal(
        ops.pcgrad_weights(_t(np.eye(2), dtype, device), _t([[0, 1], [1, 0]], torch.long, device)),
        _t([1.0, 1.0], dtype, device),
    )
    # Conflicting g1 = (1, 0), g2 = (−1, 1), g1·g2 = −1:
    #   g1^PC = g1 − (−1/‖g2‖²)·g2 = g1 + ½·g2 = (½, ½),   g2^PC = g2 − (−1/‖g1‖²)·g1 = g2 + g1 = (0, 1)
    #   d = g1^PC + g2^PC = 2·g1 + 1.5·g2.
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    w = ops.pcgrad_weights(_gram(J, dtype, device), _t([[0, 1], [1, 0]], torch.long, device))
    torch.testing.assert_close(w, _t([2.0, 1.5], dtype, device))


def test_pcgrad_hand_three_tasks_order_matters(device, dtype):
    # g1 = (1, 0), g2 = (0, 1), g3 = (−1, −1); rows of `order` list each task's projections.
    #   task 1, order (3, 2): g1 + ½g3 = (½, −½); ·g2 = −½ → + ½g2 → (½, 0):        a1 = (1, ½, ½)
    #   task 2, order (1, 3): ·g1 = 0; ·g3 = −1 → g2 + ½g3 = (−½, ½):               a2 = (0, 1, ½)
    #   task 3, order (1, 2): ·g1 = −1 → g3 + g1 = (0, −1); ·g2 = −1 → + g2 → (0, 0): a3 = (1, 1, 1)
    #   w = a1 + a2 + a3 = (2, 2.5, 2), d = (0, ½).
    J = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    order = _t([[0, 2, 1], [1, 0, 2], [2, 0, 1]], torch.long, device)
    torch.testing.assert_close(ops.pcgrad_weights(_gram(J, dtype, device), order), _t([2.0, 2.5, 2.0], dtype, device))
    # Task 1 in the order (2, 3) instead: ·g2 = 0; ·g3 = −1 → a1 = (1, 0, ½), so w = (2, 2, 2).
    order = _t([[0, 1, 2], [1, 0, 2], [2, 0, 1]], torch.long, device)
    torch.testing.assert_close(ops.pcgrad_weights(_gram(J, dtype, device), order), _t([2.0, 2.0, 2.0], dtype, device))


@pytest.mark.parametrize("seed", SEEDS)
def test_pcgrad_two_conflicting_tasks_leave_no_conflict(seed):
    # For K = 2 each projected gradient is orthogonal to the OTHER original gradient,
    # g1^PC·g2 = 0 and g2^PC·g1 = 0, hence d·g_i = g_i^PC·g_i = ‖g_i‖² − (g1·g2)²/‖g_j‖² >= 0
    # (Cauchy-Schwarz): the update conflicts with neither task.
    rng = np.random.default_rng(seed)
    g1 = rng.standard_normal(7)
    g2 = -g1 + 0.5 * rng.standard_normal(7)  # g1·g2 < 0
    J = np.stack([g1, g2])
    assert g1 @ g2 < 0
    w = ops.pcgrad_weights(_gram(J), _t([[0, 1], [1, 0]], torch.long)).numpy()
    d = w @ J
    projected_1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    np.testing.assert_allclose(d, projected_1 + g2 - (g1 @ g2) / (g1 @ g1) * g1, rtol=1e-12)
    assert abs(projected_1 @ g2) < 1e-12 * (g1 @ g1)
    for g, other in ((g1, g2), (g2, g1)):
        np.testing.assert_allclose(d @ g, g @ g - (g1 @ g2) ** 2 / (other @ other), rtol=1e-10)
        assert d @ g >= 0


@pytest.mark.parametrize("K", TASK_COUNTS)
def test_pcgrad_matches_the_loop_over_J(K, dtype):
    for seed in SEEDS:
        J = _random_jacobian(K, seed)
        order = _random_order(K, seed)
        w = ops.pcgrad_weights(_gram(J, dtype), order).double().numpy()
        expected = reference.pcgrad_update(J, order.numpy())
        np.testing.assert_allclose(w @ J, expected, **_tolerance(dtype))


# ---------------------------------------------------------------------------------------------
# MGDA


def test_mgda_hand(device, dtype):
    # g1 = (1, 0), g2 = (0, 2): min over γ of ‖γ·g1 + (1 − γ)·g2‖² = γ² + 4(1 − γ)² → γ = 4/5.
    torch.testing.assert_close(
        ops.mgda_weights(_t([[1.0, 0.0], [0.0, 4.0]], dtype, device)), _t([0.8, 0.2], dtype, device)
    )
    # g1 = (1, 0), g2 = (2, 0): g1·g2 = 2 >= ‖g1‖² = 1, so g1 itself is the min-norm point: w = (1, 0)
    # exactly (the authors' 2-point solver would answer 0.999).
    assert torch.equal(ops.mgda_weights(_t([[1.0, 2.0], [2.0, 4.0]], dtype, device)), _t([1.0, 0.0], dtype, device))
    # Three orthonormal gradients: the centroid. Wolfe's method starts at task 1, adds task 2 (G·w = (1, 0, 0))
    # with the affine minimiser (½, ½, 0), then task 3 → (⅓, ⅓, ⅓), where G·w = wᵀGw = ⅓ for every task: stop.
    torch.testing.assert_close(
        ops.mgda_weights(torch.eye(3, dtype=dtype, device=device)), torch.full((3,), 1 / 3, dtype=dtype, device=device)
    )


def _badly_scaled_jacobian(K: int, seed: int, ratio: float, columns: int = 50) -> np.ndarray:
    """Issue #20's inputs: K gradients with some conflict, one row scaled by ratio, another by 1/√ratio."""
    J = _random_jacobian(K, seed, columns)
    J[0] *= ratio
    J[-1] /= math.sqrt(ratio)
    return J


def _ill_conditioned_jacobian(K: int, seed: int, condition: float, columns: int = 50) -> np.ndarray:
    """K×P with singular values spread from 1 to 1/√condition: cond(G) = condition."""
    rng = np.random.default_rng(seed)
    left = np.linalg.qr(rng.standard_normal((K, K)))[0]
    right = np.linalg.qr(rng.standard_normal((columns, K)))[0]
    return left @ np.diag(np.logspace(0, -0.5 * math.log10(condition), K)) @ right.T


def _mgda_inputs() -> list:
    """Parameters (label, J), labelled: norm ratios 1..1e4, cond(G) = 1e12, rank-deficient G, duplicate and zero rows, K ≤ 32."""
    cases = []
    for K in (2, 3, 6, 16, 32):
        for ratio in (1.0, 10.0, 1e2, 1e3, 1e4):
            cases.append((f"K={K} ratio={ratio:g}", _badly_scaled_jacobian(K, K, ratio)))
        if K > 2:
            cases.append((f"K={K} cond=1e12", _ill_conditioned_jacobian(K, K, 1e12)))
            cases.append((f"K={K} rank {K // 3 + 1}", _random_jacobian(K, K, columns=K // 3 + 1)))
            duplicated = _badly_scaled_jacobian(K, K + 1, 100.0)
            duplicated[1] = duplicated[0] / 100  # the largest gradient again, shorter
            duplicated[-1] = duplicated[-2]
            cases.append((f"K={K} duplicate rows", duplicated))
            zero = _badly_scaled_jacobian(K, K + 2, 10.0)
            zero[K // 2] = 0.0  # the min-norm point is 0
            cases.append((f"K={K} zero row", zero))
    return [pytest.param(label, J, id=label) for label, J in cases]


def _assert_min_norm_point(J: np.ndarray, w: np.ndarray, epsilon: float, rtol: float, label: str) -> None:
    """w (from G = J·Jᵀ rounded to epsilon) is the min-norm point of J's rows' hull, up to G's rounding.

    Two independent checks, in float64 on J: the simplex KKT conditions (J·d)_k ≥ ‖d‖² for every
    k, d = wᵀ·J, to the rounding of G: K·epsilon·m·(m + ‖g_k‖), m = Σ w_k‖g_k‖ (see ops.mgda_weights);
    and ‖d‖² against Clarabel's minimum, relative rtol (and that rounding, where ‖d*‖ ≈ 0).
    """
    K = J.shape[0]
    norms = np.linalg.norm(J, axis=1)
    assert np.all(w >= 0) and abs(w.sum() - 1) <= K * epsilon, label
    d = w @ J
    mass = w @ norms
    rounding = K * epsilon * mass * (mass + norms)
    assert np.all(J @ d >= d @ d - 4 * rounding), (label, ((d @ d - J @ d) / rounding).max())
    optimum = reference.min_norm_point(J)
    excess = d @ d - optimum @ optimum
    assert excess <= rtol * (optimum @ optimum) + 4 * K * epsilon * mass**2, (label, excess / (optimum @ optimum))


@pytest.mark.parametrize("label, J", _mgda_inputs())
def test_mgda_is_the_min_norm_point_of_an_interior_point_qp(label, J):
    # Float64: exact to 1e-9 relative (Frank-Wolfe, the former solver: cos(d, d*) 0.956 at ratio 1e3).
    pytest.importorskip("cvxpy", reason="the min-norm reference is an interior-point QP (cvxpy + Clarabel)")
    w = ops.mgda_weights(torch.from_numpy(J @ J.T)).numpy()
    _assert_min_norm_point(J, w, np.finfo(np.float64).eps, 1e-9, label)
    # Float32 gradients and G: exact for the float32 G, so to float32's precision for their hull.
    J32 = torch.from_numpy(J).float()
    w32 = ops.mgda_weights(J32 @ J32.T).double().numpy()
    _assert_min_norm_point(J32.double().numpy(), w32, np.finfo(np.float32).eps, 1e-5, label)


# ---------------------------------------------------------------------------------------------
# CAGrad

# The authors' 1e-8 regularisers move the hand-computed values by about 1e-8.
CAGRAD_HAND = {"rtol": 1e-6, "atol": 1e-6}


def test_cagrad_hand(device, dtype):
    c = 0.4
    # G = I (orthonormal g1, g2): by symmetry x = (½, ½), g_x = g0, λ = c·‖g0‖/‖g0‖ = c,
    # w = (½ + c·½)/(1 + c²) = 0.7/1.16 per task (rescale = 1).
    eye = torch.eye(2, dtype=dtype, device=device)
    torch.testing.assert_close(ops.cagrad_weights(eye, c=c), torch.full_like(eye[0], 0.7 / 1.16), **CAGRAD_HAND)
    torch.testing.assert_close(ops.cagrad_weights(eye, c=c, rescale=0), torch.full_like(eye[0], 0.7), **CAGRAD_HAND)
    torch.testing.assert_close(
        ops.cagrad_weights(eye, c=c, rescale=2), torch.full_like(eye[0], 0.7 / 1.4), **CAGRAD_HAND
    )
    # Symmetric conflict g1 = (1, a), g2 = (−1, a): g_x = (2x₁ − 1, a), so g_xᵀg0 = a² for every x and
    # ‖g_x‖ is least at x = (½, ½), where g_x = g0: again λ = c and w = (½ + c/2)/(1 + c²).
    a = 0.5
    J = np.array([[1.0, a], [-1.0, a]])
    torch.testing.assert_close(
        ops.cagrad_weights(_gram(J, dtype, device), c=c), _t([0.7 / 1.16] * 2, dtype, device), **CAGRAD_HAND
    )


@pytest.mark.parametrize("K", [2, 3, 8])
def test_cagrad_with_c_zero_is_the_mean_gradient(K, dtype):
    for seed in SEEDS:
        w = ops.cagrad_weights(_gram(_random_jacobian(K, seed), dtype), c=0.0)
        # radius = 1e-8 (the authors' regulariser), so λ·x is about 1e-8.
        torch.testing.assert_close(w, torch.full((K,), 1 / K, dtype=dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("K", TASK_COUNTS)
def test_cagrad_matches_slsqp(K):
    for seed in SEEDS:
        J = _random_jacobian(K, seed)
        G = J @ J.T
        w = ops.cagrad_weights(_gram(J)).numpy()
        # The authors' call (scipy's default ftol) stops early: agree to its accuracy, and reach
        # at least the objective value it reaches.
        authors = reference.cagrad_weights(J)
        np.testing.assert_allclose(w, authors, rtol=0, atol=5e-3)
        # Driven to convergence, SLSQP finds the same optimum.
        np.testing.assert_allclose(w, reference.cagrad_weights(J, ftol=1e-15), rtol=1e-6, atol=1e-7)
        # Recover x from w = (b + λx)/(1 + c²): x ∝ w·(1 + c²) − b on the simplex.
        x_op = w * 1.16 - 1 / K
        x_op /= x_op.sum()
        x_authors = authors * 1.16 - 1 / K
        x_authors /= x_authors.sum()
        assert reference.cagrad_objective(G, x_op, 0.4) <= reference.cagrad_objective(G, x_authors, 0.4) + 1e-12


def test_cagrad_float32_matches_float64():
    for K in (3, 8):
        G = _gram(_random_jacobian(K, 0))
        torch.testing.assert_close(ops.cagrad_weights(G.float()).double(), ops.cagrad_weights(G), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# IMTL-G


def test_imtl_hand(device, dtype):
    # g1 = (1, 0), g2 = (0, 2): d = (w1, 2·w2), d·u1 = w1 = d·u2 = 2·w2, w1 + w2 = 1 → (2/3, 1/3).
    torch.testing.assert_close(
        ops.imtl_weights(_t([[1.0, 0.0], [0.0, 4.0]], dtype, device)), _t([2 / 3, 1 / 3], dtype, device)
    )
    # Orthogonal gradients of norms 1, 2, 4: w1·1 = w2·2 = w3·4 → w ∝ (1, ½, ¼) = (4, 2, 1)/7.
    torch.testing.assert_close(
        ops.imtl_weights(torch.diag(_t([1.0, 4.0, 16.0], dtype, device))), _t([4 / 7, 2 / 7, 1 / 7], dtype, device)
    )
    # Conflicting g1 = (1, 0), g2 = (−1, 1): d = (w1 − w2, w2); d·u1 = w1 − w2, d·u2 = (2w2 − w1)/√2.
    # Equal: w1·(√2 + 1) = w2·(2 + √2) → w1/w2 = √2 → w = (√2, 1)/(1 + √2).
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    root2 = math.sqrt(2)
    torch.testing.assert_close(
        ops.imtl_weights(_gram(J, dtype, device)), _t([root2 / (1 + root2), 1 / (1 + root2)], dtype, device)
    )


@pytest.mark.parametrize("K", TASK_COUNTS)
def test_imtl_gives_equal_projections_on_the_unit_gradients(K, dtype):
    for seed in SEEDS:
        J = _random_jacobian(K, seed)
        w = ops.imtl_weights(_gram(J, dtype)).double().numpy()
        units = J / np.linalg.norm(J, axis=1, keepdims=True)
        projections = units @ (w @ J)
        assert abs(w.sum() - 1) < 1e-6
        np.testing.assert_allclose(projections, np.full(K, projections.mean()), **_tolerance(dtype))
        np.testing.assert_allclose(w, reference.imtl_weights(J), **_tolerance(dtype))


# ---------------------------------------------------------------------------------------------
# Aligned-MTL


def test_aligned_mtl_hand(device, dtype):
    # G = diag(1, 4): V = I, σ = 1, W = diag(√(1/1), √(1/4)) → w = W·1 = (1, ½).
    torch.testing.assert_close(
        ops.aligned_mtl_weights(_t([[1.0, 0.0], [0.0, 4.0]], dtype, device)), _t([1.0, 0.5], dtype, device)
    )
    # G = [[1, −½], [−½, 1]]: eigenpairs (½, (1, 1)/√2) and (3/2, (1, −1)/√2); Vᵀ·1 = (√2, 0), so only
    # the first pair contributes: w = (1, 1)/√2 · √(½/½) · √2 = (1, 1).
    torch.testing.assert_close(
        ops.aligned_mtl_weights(_t([[1.0, -0.5], [-0.5, 1.0]], dtype, device)), _t([1.0, 1.0], dtype, device)
    )


@pytest.mark.parametrize("K", TASK_COUNTS)
def test_aligned_mtl_aligned_gradients_are_orthogonal_with_equal_norms(K, dtype):
    # The aligned gradients are Ĵ = W·J with W = √σ·G^(-1/2) (full rank), whose rows are orthogonal with
    # norm √σ: Ĵ·Ĵᵀ = σ·G^(-1/2)·G·G^(-1/2) = σ·I. The op returns w = W·1, so w = √σ·G^(-1/2)·1 (checked with an
    # independent matrix square root), and d = 1ᵀ·Ĵ has ‖d‖² = wᵀ·G·w = K·σ.
    for seed in SEEDS:
        J = _random_jacobian(K, seed)
        G = J @ J.T
        w = ops.aligned_mtl_weights(_gram(J, dtype)).double().numpy()
        sigma = np.linalg.eigvalsh(G).min()
        inverse_root = np.linalg.inv(np.real(scipy.linalg.sqrtm(G)))
        aligned = np.sqrt(sigma) * inverse_root @ J
        np.testing.assert_allclose(aligned @ aligned.T, sigma * np.eye(K), rtol=0, atol=1e-8 * sigma)
        np.testing.assert_allclose(w, aligned.sum(0) @ np.linalg.pinv(J), **_tolerance(dtype))
        np.testing.assert_allclose(w @ G @ w, K * sigma, **_tolerance(dtype))
        np.testing.assert_allclose(w, reference.aligned_mtl_weights(J), **_tolerance(dtype))


def test_aligned_mtl_drops_the_null_space_like_the_authors():
    # K = 5 gradients in 3 dimensions: rank 3, two eigenvalues dropped.
    J = _random_jacobian(5, 0, columns=3)
    np.testing.assert_allclose(
        ops.aligned_mtl_weights(_gram(J)).numpy(), reference.aligned_mtl_weights(J), rtol=1e-9, atol=1e-10
    )


@pytest.mark.parametrize("K", [4, 6, 16])
@pytest.mark.parametrize("ratio", [1.0, 1e2, 1e4])
def test_aligned_mtl_cuts_the_rank_at_the_epsilon_of_its_dtype(K, ratio):
    # The paper's rule (eigenvalues up to λ_max·K·ε dropped) with ε of the gradients' dtype, in float64 by
    # numpy's eigh. Cut at ε_float32 (the former kernel, whatever the dtype), the float64 inputs of ratio 1e4
    # lost their small eigenvalues and nearly all the weight went to the largest task.
    for seed in SEEDS:
        J = _badly_scaled_jacobian(K, seed, ratio)
        expected = reference.aligned_mtl_weights(J) @ J
        d = ops.aligned_mtl_weights(torch.from_numpy(J @ J.T)).numpy() @ J
        np.testing.assert_allclose(d, expected, rtol=0, atol=1e-10 * np.linalg.norm(expected))
        # Float32 gradients and G: the rule with ε_float32 (the small eigenvalues are lost in G's rounding).
        J32 = torch.from_numpy(J).float()
        expected = reference.aligned_mtl_weights(J32.double().numpy(), np.float32) @ J32.double().numpy()
        d = ops.aligned_mtl_weights(J32 @ J32.T).double().numpy() @ J32.double().numpy()
        np.testing.assert_allclose(d, expected, rtol=0, atol=1e-5 * np.linalg.norm(expected))


def test_aligned_mtl_is_k_times_torchjd():
    # TorchJD's AlignedMTLWeighting weights its default preference, the mean 1/K, where the authors sum:
    # ours = K × TorchJD's (by hand for G = diag(1, 4): B = diag(1, ½), TorchJD B·(½, ½) = (½, ¼), ours (1, ½)).
    aggregation = pytest.importorskip("torchjd.aggregation", reason="compares with TorchJD's AlignedMTL")
    for K in (2, 5, 11):
        G = _gram(_badly_scaled_jacobian(K, K, 100.0))
        torch.testing.assert_close(ops.aligned_mtl_weights(G), K * aggregation.AlignedMTLWeighting()(G))


@pytest.mark.parametrize("K", [3, 40, 130])
def test_aligned_mtl_repeated_eigenvalues_and_large_k(K, device):
    # Eigenvalues of multiplicity 2 (every gradient twice, G = [[C, C], [C, C]] up to an odd one out), half of them
    # dropped, and K past the sizes the other tests reach: Householder + QL in csrc/manipulation/eigh.h must still
    # give the float64 reference's w = W·1 (W does not depend on the basis chosen inside an eigenspace).
    rng = np.random.default_rng(K)
    half = rng.standard_normal((K // 2 + 1, 3 * K))
    J = np.vstack([half, half])[:K]
    w = ops.aligned_mtl_weights(_gram(J, device=device)).cpu().numpy()
    np.testing.assert_allclose(w, reference.aligned_mtl_weights(J), rtol=1e-8, atol=1e-9)
    # W depends on ratios of eigenvalues only: G·2^±600 (whose squares over- or underflow) gives the same w.
    for scale in (2.0**600, 2.0**-600):
        scaled = ops.aligned_mtl_weights(_gram(J, device=device) * scale).cpu().numpy()
        np.testing.assert_allclose(scaled, w, rtol=1e-12, atol=1e-12)
    # G = 3·I: one eigenvalue of multiplicity K, W = I, w = 1.
    identity = ops.aligned_mtl_weights(3 * torch.eye(K, dtype=torch.float64, device=device)).cpu()
    torch.testing.assert_close(identity, torch.ones(K, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Nash-MTL


def test_nash_mtl_hand(device, dtype):
    ones = torch.ones(2, dtype=dtype, device=device)
    # Orthogonal gradients: α_k·‖g_k‖²·α_k = 1 → α_k = 1/‖g_k‖ = (½, 1) for G = diag(4, 1).
    torch.testing.assert_close(
        ops.nash_mtl_weights(_t([[4.0, 0.0], [0.0, 1.0]], dtype, device), ones), _t([0.5, 1.0], dtype, device)
    )
    # G = [[1, −½], [−½, 1]]: by symmetry α1 = α2 = a with a·(a − a/2) = 1 → a = √2.
    torch.testing.assert_close(
        ops.nash_mtl_weights(_t([[1.0, -0.5], [-0.5, 1.0]], dtype, device), ones), _t([math.sqrt(2)] * 2, dtype, device)
    )


@pytest.mark.parametrize("K", TASK_COUNTS)
def test_nash_mtl_solves_the_bargaining_equation(K, dtype):
    for seed in SEEDS:
        J = _random_jacobian(K, seed)
        G = _gram(J, dtype)
        start = torch.rand(K, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 10
        alpha = ops.nash_mtl_weights(G, start)
        # (G·α)·α = 1 elementwise, α > 0; the same α from any start (the solution is unique).
        assert torch.all(alpha > 0)
        torch.testing.assert_close(
            (G.double() @ alpha.double()) * alpha.double(), torch.ones(K, dtype=torch.float64), **_tolerance(dtype)
        )
        torch.testing.assert_close(ops.nash_mtl_weights(G, torch.ones(K, dtype=dtype)), alpha, **_tolerance(dtype))
        np.testing.assert_allclose(alpha.double().numpy(), reference.nash_mtl_weights(J @ J.T), **_tolerance(dtype))


def test_nash_mtl_non_positive_start_is_replaced():
    G = _gram(_random_jacobian(3, 0))
    expected = ops.nash_mtl_weights(G, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ops.nash_mtl_weights(G, _t([-1.0, 0.0, float("nan")])), expected)


# ---------------------------------------------------------------------------------------------
# FairGrad


def test_fairgrad_hand(device, dtype):
    # Orthogonal gradients: ‖g_k‖²·w_k = w_k^(−1/α), w_k = ‖g_k‖^(−2α/(1+α)); α = 0 is the mean.
    G = _t([[4.0, 0.0], [0.0, 1.0]], dtype, device)
    torch.testing.assert_close(ops.fairgrad_weights(G, alpha=2.0), _t([4.0 ** (-2 / 3), 1.0], dtype, device))
    torch.testing.assert_close(ops.fairgrad_weights(G, alpha=0.0), _t([0.5, 0.5], dtype, device))


@pytest.mark.parametrize("K", [2, 7, 32])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 2.0, 10.0])
def test_fairgrad_solves_the_fairness_equation(K, alpha, dtype):
    for seed in SEEDS[:2]:
        J = _random_jacobian(K, seed)
        w = ops.fairgrad_weights(_gram(J, dtype), alpha=alpha)
        np.testing.assert_allclose(w.double().numpy(), reference.fairgrad_weights(J @ J.T, alpha), **_tolerance(dtype))


@pytest.mark.parametrize("K", [2, 5, 16])
def test_fairgrad_at_alpha_one_is_nash_mtl_bit_for_bit(K):
    # One functor (csrc/manipulation/fairgrad.h): α = 1 runs Nash-MTL's arithmetic from the same start.
    G = _gram(_random_jacobian(K, 0))
    assert torch.equal(ops.fairgrad_weights(G, alpha=1.0), ops.nash_mtl_weights(G, torch.ones(K, dtype=G.dtype)))


def test_fairgrad_singular_gram_is_finite_and_positive():
    # A zero gradient and a duplicate: no exact solution; the δ-regularised one (as Nash-MTL's) is finite.
    J = _random_jacobian(4, 1)
    J[1] = 0
    J[3] = J[2]
    w = ops.fairgrad_weights(_gram(J), alpha=2.0)
    assert torch.isfinite(w).all() and (w > 0).all()


# ---------------------------------------------------------------------------------------------
# ConFIG


def _config_reference(J: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """The authors' / TorchJD's formula on J, float64: pinv of the unit rows (an SVD of U)."""
    units = J / np.linalg.norm(J, axis=1, keepdims=True)
    best = np.linalg.pinv(units) @ preference
    unit = best / np.linalg.norm(best)
    return (J @ unit).sum() * unit


@pytest.mark.parametrize("K", [1, 2, 7, 32])
def test_config_equals_the_pseudo_inverse_of_the_unit_rows(K, dtype):
    for seed in SEEDS[:2]:
        J = _random_jacobian(K, seed, columns=3 * K + 5)
        preference = np.random.default_rng(seed).uniform(0.5, 2.0, K)
        w = ops.config_weights(_gram(J, dtype), torch.from_numpy(preference).to(dtype))
        np.testing.assert_allclose(w.double().numpy() @ J, _config_reference(J, preference), **_tolerance(dtype))


def test_config_is_conflict_free_with_equal_unit_projections():
    # Independent rows: U b = 1, so every unit gradient has the same projection on d (ConFIG's claim).
    J = _random_jacobian(6, 3)
    d = ops.config_weights(_gram(J), torch.ones(6, dtype=torch.float64)).numpy() @ J
    projections = (J @ d) / np.linalg.norm(J, axis=1)
    assert projections.min() > 0 and np.ptp(projections) <= 1e-12 * projections.max()


# ---------------------------------------------------------------------------------------------
# PCD


def _pcd_kkt_violation(J: np.ndarray, w: np.ndarray, tau: float) -> float:
    """The QP's KKT conditions for d̃ = w/w_0 ᵀJ (unit scales): μ = w_j/w_0 ≥ 0, g_jᵀd̃ ≥ τ‖g_j‖², complementary
    slackness, relative to the largest ‖g_k‖²; and ‖wᵀJ‖ = ‖g_0‖."""
    mu, best = w[1:] / w[0], (w @ J) / w[0]
    slack = J[1:] @ best - tau * (J[1:] ** 2).sum(axis=1)
    scale = (J**2).sum(axis=1).max()
    rescaled = abs(np.linalg.norm(w @ J) - np.linalg.norm(J[0])) / np.linalg.norm(J[0])
    return max(float(-mu.min()), float(-slack.min()) / scale, float(np.abs(mu * slack).max()) / scale, rescaled)


@pytest.mark.parametrize("K", [2, 7, 32])
def test_pcd_solves_its_quadratic_program(K, dtype):
    for seed in SEEDS:
        J = _random_jacobian(K, seed)
        w = ops.pcd_weights(_gram(J, dtype), torch.ones(K, dtype=dtype), torch.full((K - 1,), 0.3, dtype=dtype))
        assert _pcd_kkt_violation(J, w.double().numpy(), 0.3) <= (1e-9 if dtype == torch.float64 else 1e-4)


def test_pcd_special_cases():
    ones = torch.ones(3, dtype=torch.float64)
    # Two opposite secondary gradients with τ > 0: infeasible, the primary's own gradient.
    J = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    torch.testing.assert_close(ops.pcd_weights(_gram(J), ones, _t([0.5, 0.5])), _t([1.0, 0.0, 0.0]))
    # A zero primary gradient: no step.
    J[0] = 0
    assert not ops.pcd_weights(_gram(J), ones, _t([0.5, 0.5])).any()


def test_config_opposite_gradients_give_zero_not_noise():
    # u_1 = −u_2: p = 1 is orthogonal to the kept eigenvector, b = 0 (normalising its rounding would give a unit d).
    J = np.array([[1.0, 2.0, 0.5], [-3.0, -6.0, -1.5]])
    assert not ops.config_weights(_gram(J), torch.ones(2, dtype=torch.float64)).any()


# ---------------------------------------------------------------------------------------------
# GradDrop


def test_graddrop_hand(device, dtype):
    seed, offset = 7, 3
    u = reference.graddrop_uniforms(seed, offset, 4)
    # Columns: all positive (purity 1: the positive sign always wins), balanced ±2 (purity ½: the sign
    # depends on U), all negative (purity 0: the negative sign always wins), all zero (d = 0).
    J = _t([[1.0, 2.0, -1.0, 0.0], [3.0, -2.0, -4.0, 0.0]], dtype, device)
    expected = [4.0, 2.0 if u[1] < 0.5 else -2.0, -5.0, 0.0]
    torch.testing.assert_close(
        ops.graddrop(J, torch.zeros(2, dtype=dtype, device=device), seed, offset), _t(expected, dtype, device)
    )
    # Leak 1 keeps everything: the plain sum; leak ½ on task 2 in column 2 (+2 vs −2): the dropped entry
    # survives at half weight.
    torch.testing.assert_close(ops.graddrop(J, torch.ones(2, dtype=dtype, device=device), seed, offset), J.sum(0))
    leaked = ops.graddrop(J, _t([0.0, 0.5], dtype, device), seed, offset)
    assert leaked[1].item() == (2.0 - 1.0 if u[1] < 0.5 else -2.0)


@pytest.mark.parametrize("K", [1, 2, 3, 8])
def test_graddrop_equals_the_readable_reference(K, device, dtype):
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        J = torch.randn(K, 3001, generator=generator, dtype=torch.float64)
        J[:, :50] = J[:, :50].abs()  # some pure columns
        leak = torch.rand(K, generator=generator, dtype=torch.float64) * (seed > 0)
        d = ops.graddrop(J.to(dtype=dtype, device=device), leak.to(dtype=dtype, device=device), seed, 1000 + seed)
        expected = reference.graddrop_update(J.to(dtype).double(), leak.to(dtype).double(), seed, 1000 + seed)
        torch.testing.assert_close(d.cpu().double(), expected, **_tolerance(dtype))


def test_graddrop_with_a_column_offset_draws_the_columns_of_the_whole_matrix(device, dtype):
    # A slice of J's columns starting at global column c draws what the whole matrix draws there: the
    # reference on J with c zero columns in front of it (a zero column does not change the others), shifted.
    generator = torch.Generator().manual_seed(4)
    J = torch.randn(3, 700, generator=generator, dtype=torch.float64)
    leak = torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64)
    for column_offset in (1, 513, 12345):
        padded = torch.cat([torch.zeros(3, column_offset, dtype=torch.float64), J], dim=1)
        expected = reference.graddrop_update(padded.to(dtype).double(), leak.to(dtype).double(), 9, 2)[column_offset:]
        d = ops.graddrop(J.to(dtype=dtype, device=device), leak.to(dtype=dtype, device=device), 9, 2, column_offset)
        torch.testing.assert_close(d.cpu().double(), expected, **_tolerance(dtype))
    # Slices with their offsets give the whole matrix's update bitwise (the FSDP2 shards of one parameter).
    whole = ops.graddrop(J.to(dtype=dtype, device=device), leak.to(dtype=dtype, device=device), 9, 2)
    pieces = [
        ops.graddrop(
            J[:, start:stop].to(dtype=dtype, device=device).contiguous(),
            leak.to(dtype=dtype, device=device),
            9,
            2,
            start,
        )
        for start, stop in [(0, 1), (1, 350), (350, 700)]
    ]
    assert torch.equal(torch.cat(pieces), whole)


def test_graddrop_uniforms_are_uniform_and_keyed():
    # The kernel's choices follow U: on columns of purity 0.3 the positive sign is kept in 30% of them.
    P = 20000
    J = torch.tensor([[0.65], [-0.35]], dtype=torch.float64).expand(2, P).contiguous()  # purity ½·(1 + 0.3) = 0.65
    for offset in range(3):
        d = ops.graddrop(J, torch.zeros(2, dtype=torch.float64), 123, offset)
        kept_positive = (d > 0).double().mean().item()
        assert abs(kept_positive - 0.65) < 0.02  # 4.5 standard deviations of a binomial mean
    first = ops.graddrop(J, torch.zeros(2, dtype=torch.float64), 123, 0)
    assert torch.equal(first, ops.graddrop(J, torch.zeros(2, dtype=torch.float64), 123, 0))
    assert not torch.equal(first, ops.graddrop(J, torch.zeros(2, dtype=torch.float64), 123, 1))
    assert not torch.equal(first, ops.graddrop(J, torch.zeros(2, dtype=torch.float64), 124, 0))
    u = reference.graddrop_uniforms(123, 0, P)
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
    assert torch.equal(first > 0, torch.from_numpy(u < 0.65))


# ---------------------------------------------------------------------------------------------
# Degenerate inputs (the conventions of selgroup_fast.ops)


@pytest.mark.parametrize("name", WEIGHT_OPS)
def test_single_task_gives_weight_one(name, device, dtype):
    assert torch.equal(_weights(name, _t([[2.5]], dtype, device)), _t([1.0], dtype, device))


def test_graddrop_single_task_is_the_identity(device, dtype):
    J = torch.randn(1, 100, dtype=dtype, device=device)
    assert torch.equal(ops.graddrop(J, torch.zeros(1, dtype=dtype, device=device), 0, 0), J[0])


@pytest.mark.parametrize("name", WEIGHT_OPS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gram_gives_nan_weights(name, bad, device, dtype):
    G = _gram(_random_jacobian(3, 0), dtype, device)
    G[1, 2] = bad
    assert torch.isnan(_weights(name, G)).all()


def test_graddrop_non_finite_column_gives_nan(dtype):
    J = torch.ones(2, 4, dtype=dtype)
    J[1, 2] = float("nan")
    J[0, 3] = float("inf")
    d = ops.graddrop(J, torch.zeros(2, dtype=dtype), 0, 0)
    assert torch.equal(torch.isnan(d), torch.tensor([False, False, True, True]))


def test_zero_gradients(dtype):
    zero = torch.zeros(3, 3, dtype=dtype)
    # Nothing to project; MGDA: the first task of least norm, optimal (G·w = 0 = wᵀGw); IMTL: the mean; Aligned: no
    # eigenvalue kept; Nash: no solution, α = 1 (d = 0 whatever α); CAGrad: finite (d = 0 anyway).
    assert torch.equal(_weights("pcgrad", zero), torch.ones(3, dtype=dtype))
    assert torch.equal(ops.mgda_weights(zero), _t([1.0, 0.0, 0.0], dtype))
    torch.testing.assert_close(ops.imtl_weights(zero), torch.full((3,), 1 / 3, dtype=dtype))
    assert torch.equal(ops.aligned_mtl_weights(zero), torch.zeros(3, dtype=dtype))
    assert torch.equal(ops.nash_mtl_weights(zero, torch.ones(3, dtype=dtype)), torch.ones(3, dtype=dtype))
    assert torch.isfinite(ops.cagrad_weights(zero)).all()


def test_one_zero_gradient_among_others(dtype):
    # g1 = (1, 0), g2 = 0, g3 = (0, 2).
    J = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    G = _gram(J, dtype)
    torch.testing.assert_close(ops.imtl_weights(G), _t([2 / 3, 0.0, 1 / 3], dtype))  # IMTL on tasks 1, 3
    assert torch.equal(ops.mgda_weights(G), _t([0.0, 1.0, 0.0], dtype))  # the zero vector is the min-norm point
    # PCGrad never projects on the zero gradient: nothing conflicts here, w = 1.
    assert torch.equal(_weights("pcgrad", G), torch.ones(3, dtype=dtype))
    torch.testing.assert_close(ops.aligned_mtl_weights(G), _t([1.0, 0.0, 0.5], dtype))  # rank 2, σ = 1


def test_singular_gram_stays_finite(dtype):
    # Two identical gradients and their opposite: G is singular (rank 1).
    g = np.array([1.0, 2.0, -1.0])
    G = _gram(np.stack([g, g, -g]), dtype)
    for name in WEIGHT_OPS:
        assert torch.isfinite(_weights(name, G)).all(), name


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_rejected():
    G = _gram(_random_jacobian(3, 0))
    order = _random_order(3, 0)
    with pytest.raises(RuntimeError, match="square"):
        ops.mgda_weights(G[:2])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.imtl_weights(G.long())
    with pytest.raises(RuntimeError, match="at least one row"):
        ops.aligned_mtl_weights(torch.zeros(0, 0, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="order must be int64"):
        ops.pcgrad_weights(G, order.int())
    with pytest.raises(RuntimeError, match="order must be K×K"):
        ops.pcgrad_weights(G, order[:2])
    with pytest.raises(RuntimeError, match="c must be"):
        ops.cagrad_weights(G, c=-1.0)
    with pytest.raises(RuntimeError, match="rescale"):
        ops.cagrad_weights(G, rescale=3)
    with pytest.raises(RuntimeError, match="max_iter"):
        ops.mgda_weights(G, max_iter=-1)
    with pytest.raises(RuntimeError, match="tol"):
        ops.cagrad_weights(G, tol=float("nan"))
    with pytest.raises(RuntimeError, match="alpha_init must have shape"):
        ops.nash_mtl_weights(G, torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="alpha_init is"):
        ops.nash_mtl_weights(G, torch.ones(3, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="alpha must be finite and >= 0, got -1"):
        ops.fairgrad_weights(G, alpha=-1.0)
    with pytest.raises(RuntimeError, match="preference must have shape"):
        ops.config_weights(G, torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"taus must have shape \[2\]"):
        ops.pcd_weights(G, torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="leak must have shape"):
        ops.graddrop(torch.ones(3, 5), torch.zeros(2), 0, 0)
    with pytest.raises(RuntimeError, match="leak is"):
        ops.graddrop(torch.ones(3, 5), torch.zeros(3, dtype=torch.float64), 0, 0)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.graddrop(torch.ones(5), torch.zeros(1), 0, 0)
    with pytest.raises(RuntimeError, match="column_offset must be >= 0"):
        ops.graddrop(torch.ones(3, 5), torch.zeros(3), 0, 0, -1)


def test_non_contiguous_inputs(dtype):
    J = _random_jacobian(4, 0)
    G = _gram(J, dtype)
    strided = torch.zeros(8, 8, dtype=dtype)
    strided[::2, ::2] = G
    strided = strided[::2, ::2]
    assert not strided.is_contiguous()
    for name in WEIGHT_OPS:
        torch.testing.assert_close(_weights(name, strided), _weights(name, G), rtol=0, atol=0, msg=name)
    jacobian = torch.from_numpy(J).to(dtype)
    transposed = jacobian.t().contiguous().t()
    assert not transposed.is_contiguous()
    leak = torch.full((4,), 0.25, dtype=dtype)
    assert torch.equal(ops.graddrop(transposed, leak, 1, 2), ops.graddrop(jacobian, leak, 1, 2))


def test_order_out_of_range_is_skipped():
    # Entries outside [0, K) are ignored (checking them would synchronise on CUDA).
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    w = ops.pcgrad_weights(_gram(J), _t([[5, 1], [-3, 0]], torch.long))
    torch.testing.assert_close(w, _t([2.0, 1.5]))


# ---------------------------------------------------------------------------------------------
# opcheck, docstrings, CUDA


def _opcheck_cases(device: str, dtype: torch.dtype) -> list:
    G = _gram(_random_jacobian(4, 0), dtype, device)
    K = G.shape[0]
    return [
        (torch.ops.selgroup_fast.pcgrad_weights.default, (G, _random_order(K, 0, device))),
        (torch.ops.selgroup_fast.mgda_weights.default, (G, 100, 1e-6)),
        (torch.ops.selgroup_fast.cagrad_weights.default, (G, 0.5, 1, 500, 1e-9)),
        (torch.ops.selgroup_fast.imtl_weights.default, (G,)),
        (torch.ops.selgroup_fast.aligned_mtl_weights.default, (G,)),
        (torch.ops.selgroup_fast.nash_mtl_weights.default, (G, torch.ones(K, dtype=dtype, device=device), 50, 1e-16)),
        (torch.ops.selgroup_fast.fairgrad_weights.default, (G, 2.0, 50, 1e-16)),
        (torch.ops.selgroup_fast.config_weights.default, (G, torch.ones(K, dtype=dtype, device=device))),
        (
            torch.ops.selgroup_fast.pcd_weights.default,
            (G, torch.ones(K, dtype=dtype, device=device), torch.full((K - 1,), 0.3, dtype=dtype, device=device)),
        ),
        (
            torch.ops.selgroup_fast.graddrop.default,
            (torch.randn(K, 64, dtype=dtype, device=device), torch.zeros(K, dtype=dtype, device=device), 3, 4, 100),
        ),
    ]


def test_opcheck(device, dtype):
    for op, args in _opcheck_cases(device, dtype):
        torch.library.opcheck(op, args)


# Every op of the library (the wrappers' list), but cuda_available, which reports the build.
@pytest.mark.parametrize("name", [name for name in ops.__all__ if name != "cuda_available"])
def test_schema_defaults_match_the_wrapper(name):
    # The defaults live in two places only, the schema (csrc/ops.cpp) and the Python wrapper: they must agree.
    schema = getattr(torch.ops.selgroup_fast, name).default._schema
    parameters = inspect.signature(getattr(ops, name)).parameters
    assert [a.name for a in schema.arguments] == list(parameters)
    for argument in schema.arguments:
        expected = parameters[argument.name].default
        if expected is inspect.Parameter.empty:
            assert argument.default_value is None and not argument.type.kind() == "OptionalType", argument.name
        else:
            assert argument.default_value == expected and type(argument.default_value) is type(expected), argument.name


def test_fakes_check_inputs_like_the_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        G = torch.empty(4, 4)
        for name in WEIGHT_OPS:
            assert _weights(name, G).shape == (4,), name
        assert ops.graddrop(torch.empty(4, 9), torch.zeros(4), 0, 0).shape == (9,)
        with pytest.raises(RuntimeError, match="square"):
            ops.imtl_weights(torch.empty(2, 3))
        with pytest.raises(RuntimeError, match="float32 or float64"):
            ops.mgda_weights(torch.empty(3, 3, dtype=torch.int64))
        with pytest.raises(RuntimeError, match="order must be int64"):
            ops.pcgrad_weights(G, torch.empty(4, 4, dtype=torch.int32))
        with pytest.raises(RuntimeError, match="alpha_init must have shape"):
            ops.nash_mtl_weights(G, torch.ones(3))
        with pytest.raises(RuntimeError, match="preference must have shape"):
            ops.config_weights(G, torch.ones(3))
        with pytest.raises(RuntimeError, match="leak must have shape"):
            ops.graddrop(torch.empty(4, 9), torch.zeros(3), 0, 0)
        with pytest.raises(RuntimeError, match="column_offset must be >= 0"):
            ops.graddrop(torch.empty(4, 9), torch.zeros(4), 0, 0, -1)


def test_docstring_examples():
    for function in (
        ops.pcgrad_weights,
        ops.mgda_weights,
        ops.cagrad_weights,
        ops.imtl_weights,
        ops.aligned_mtl_weights,
        ops.nash_mtl_weights,
        ops.fairgrad_weights,
        ops.config_weights,
        ops.pcd_weights,
        ops.graddrop,
    ):
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        for test in doctest.DocTestFinder().find(function, globs={"torch": torch, function.__name__: function}):
            runner.run(test)
        assert runner.failures == 0, function.__name__


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and ops.cuda_available()), reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("K", TASK_COUNTS)
def test_cuda_matches_cpu(K, dtype):
    for seed in SEEDS:
        G = _gram(_random_jacobian(K, seed), dtype)
        for name in WEIGHT_OPS:
            # Same code on both (csrc/manipulation), but nvcc contracts a·b + c into fused multiply-adds
            # where the host compiler does not: the iterates differ by rounding, which the stopping rules
            # (MGDA's ‖Δw‖₁ < 1e-5, CAGrad's ‖Δx‖₁ < 1e-10) can turn into a step more or less.
            torch.testing.assert_close(
                _weights(name, G.cuda(), seed).cpu(), _weights(name, G, seed), rtol=1e-5, atol=1e-6, msg=name
            )
        J = torch.randn(K, 10007, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        leak = torch.full((K,), 0.1, dtype=dtype)
        torch.testing.assert_close(ops.graddrop(J.cuda(), leak.cuda(), seed, 5).cpu(), ops.graddrop(J, leak, seed, 5))
        torch.testing.assert_close(
            ops.graddrop(J.cuda(), leak.cuda(), seed, 5, 777).cpu(), ops.graddrop(J, leak, seed, 5, 777)
        )


# ---------------------------------------------------------------------------
# The dual-cone projections of UPGrad and DualProj


@pytest.mark.parametrize("K", [1, 2, 7, 32])
@pytest.mark.parametrize("reg_eps", [1e-4, 0.0])
def test_dual_cone_projection_is_the_primal_projection_of_a_clarabel_qp(K, reg_eps):
    """Jᵀ·v, v the op's answer, is the projection of Jᵀ·u onto {d : J·d ≥ 0}, solved in the primal (on J, not G)
    by cvxpy with Clarabel, for J = [J₀/‖J₀‖_F, sqrt(reg_eps)·I] (whose Gram is TorchJD's Ĝ); J₀ with conflicting,
    badly scaled (10⁻²..10²), duplicate and zero rows."""
    cp = pytest.importorskip("cvxpy", reason="cvxpy is not installed")
    rng = np.random.default_rng(K)
    J0 = rng.standard_normal((K, 3 * K + 2)) * np.logspace(-2, 2, K)[:, None]
    if K >= 7:
        J0[3], J0[5] = J0[1], 0.0
    J = np.hstack([J0 / np.linalg.norm(J0), np.sqrt(reg_eps) * np.eye(K)])
    rows = np.vstack([np.eye(K) / K, rng.uniform(-0.5, 1.0, (2, K))])
    V = ops.dual_cone_projection(torch.from_numpy(J0 @ J0.T), torch.from_numpy(rows), reg_eps=reg_eps).numpy()
    for u, v in zip(rows, V, strict=True):
        d = cp.Variable(J.shape[1])
        scale = np.linalg.norm(J, axis=1).max() * np.abs(u).sum()
        # The op's own answer is exact: the KKT conditions of min vᵀĜv s.t. v ≥ u to double rounding.
        mu = J @ (J.T @ v)
        assert (v >= u).all() and mu.min() >= -1e-12 * scale**2
        assert np.abs(mu * (v - u)).max() <= 1e-12 * scale**2 * np.abs(v).sum()
        cp.Problem(cp.Minimize(cp.sum_squares(d - J.T @ u)), [J @ d >= 0]).solve(solver=cp.CLARABEL)
        # The interior point agrees to its own accuracy at default tolerances, relative to the problem's scale
        # (the largest row of J times ‖u‖₁): up to 2.2e-3 at K = 32, whose rows span 10⁻⁴ of it (tighter
        # tolerances report "inaccurate" there). The KKT check above is the exact one.
        assert np.linalg.norm(J.T @ v - d.value) <= 5e-3 * scale


@pytest.mark.parametrize(
    ("options", "message"),
    [({"norm_eps": -1.0}, "norm_eps must be finite and >= 0"), ({"reg_eps": math.nan}, "reg_eps must be finite")],
)
def test_dual_cone_projection_rejects_bad_options(options, message):
    with pytest.raises(RuntimeError, match=message):
        ops.dual_cone_projection(torch.eye(2), torch.eye(2), **options)
    with pytest.raises(RuntimeError, match=r"rows must have shape \[N, 2\]"):
        ops.dual_cone_projection(torch.eye(2), torch.eye(3))


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_weightings_reject_bad_options_at_construction(name):
    from selgroup_fast.methods import aggregator

    with pytest.raises(ValueError, match="reg_eps must be finite and >= 0"):
        aggregator(name, 3, reg_eps=-1.0)
    with pytest.raises(ValueError, match="pref_vector must be 3 finite weights"):
        aggregator(name, 3, pref_vector=[1.0, 2.0])
