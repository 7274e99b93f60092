"""Float64 references of the baselines' gradient-manipulation ops, written from the
papers and the authors' code (read, not copied), on the task gradients J (K×P) where
the authors work on J, independently of the kernels' formulation through G = J·Jᵀ.

- PCGrad: an explicit loop over the rows of J (Yu et al. 2020; nash-mtl's PCGrad).
- MGDA: the authors' MinNormSolver Frank-Wolfe (isl-org/MultiObjectiveOptimization)
  in NumPy, with an exact 2-point line search (the authors' way, which
  benchmarks/test_fused_ops.py times), and the exact min-norm point as an
  interior-point QP on J (cvxpy with the Clarabel solver).
- CAGrad: scipy.optimize.minimize (SLSQP) on the authors' objective, called as they
  call it (Cranial-XIX/CAGrad, nash-mtl's CAGrad).
- IMTL-G: its conditions (equal projections on the unit gradients, Σ w = 1) solved by
  numpy's pseudo-inverse, anchor-free (the authors' closed form where it is unique).
- Aligned-MTL: the authors' ProcrustesSolver with numpy.linalg.eigh, its rank cut at
  the epsilon of the gradients' dtype.
- Nash-MTL: damped Newton in float64 on G·α = 1/α (the fixed point the authors' cvxpy
  loop approaches).
- GradDrop: a readable torch version (Chen et al. 2020), with the uniforms drawn by
  a NumPy SplitMix64 of (seed, offset, column).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.optimize
import torch


def pcgrad_update(jacobian: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Σ_i g_i^PC: each g_i projected, in the order order[i] (skipping i), on the
    normal plane of every original g_j it conflicts with."""
    K = jacobian.shape[0]
    projected = jacobian.astype(np.float64).copy()
    for i in range(K):
        for j in order[i]:
            if j == i:
                continue
            g_j = jacobian[j]
            conflict = projected[i] @ g_j
            if conflict < 0 and g_j @ g_j > 0:
                projected[i] -= conflict / (g_j @ g_j) * g_j
    return projected.sum(axis=0)


def _min_norm_of_two(v1v1: float, v1v2: float, v2v2: float) -> tuple[float, float]:
    """argmin_γ ‖γ·v1 + (1 − γ)·v2‖² over [0, 1] and its value (exact at the ends)."""
    if v1v2 >= v1v1:
        return 1.0, v1v1
    if v1v2 >= v2v2:
        return 0.0, v2v2
    gamma = (v2v2 - v1v2) / (v1v1 + v2v2 - 2 * v1v2)
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def mgda_weights(jacobian: np.ndarray, max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """MinNormSolver.find_min_norm_element_FW: best pair, then Frank-Wolfe steps."""
    grads = jacobian.astype(np.float64)
    K = grads.shape[0]
    if K == 1:
        return np.ones(1)
    gram = grads @ grads.T
    best = None
    for i in range(K):
        for j in range(i + 1, K):
            gamma, cost = _min_norm_of_two(gram[i, i], gram[i, j], gram[j, j])
            if best is None or cost < best[3]:
                best = (i, j, gamma, cost)
    w = np.zeros(K)
    w[best[0]], w[best[1]] = best[2], 1 - best[2]
    if K == 2:
        return w
    for _ in range(max_iter):
        t = int(np.argmin(gram @ w))
        gamma, _ = _min_norm_of_two(w @ gram @ w, (gram @ w)[t], gram[t, t])
        new_w = gamma * w
        new_w[t] += 1 - gamma
        change = np.abs(new_w - w).sum()
        w = new_w
        if change < tol:
            break
    return w


def cagrad_weights(jacobian: np.ndarray, c: float = 0.4, rescale: int = 1, ftol: float | None = None) -> np.ndarray:
    """The authors' CAGrad: SLSQP from x = 1/K on their objective (their 1e-8 terms
    included), then w with d = wᵀ·J = (g0 + λ·g_x) / s. ``ftol=None`` is their call
    (scipy's default tolerance)."""
    grads = jacobian.astype(np.float64)
    K = grads.shape[0]
    gram = grads @ grads.T
    g0_norm = np.sqrt(gram.mean() + 1e-8)
    x_start = np.ones(K) / K
    b = x_start.copy()
    radius = c * g0_norm + 1e-8

    def objective(x: np.ndarray) -> float:
        return float(x @ gram @ b + radius * np.sqrt(x @ gram @ x + 1e-8))

    options = {} if ftol is None else {"ftol": ftol, "maxiter": 1000}
    result = scipy.optimize.minimize(
        objective,
        x_start,
        bounds=tuple((0, 1) for _ in range(K)),
        constraints={"type": "eq", "fun": lambda x: 1 - sum(x)},
        options=options,
    )
    x = result.x
    lam = radius / (np.linalg.norm(x @ grads) + 1e-8)
    scale = {0: 1.0, 1: 1 + c**2, 2: 1 + c}[rescale]
    return (b + lam * x) / scale


def cagrad_dual_point(jacobian: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """The authors' inner problem (their 1e-8 terms included) by Clarabel and their formula, rescale=0, in
    float64: the weights 1/K + λ·x and the simplex point x."""
    import cvxpy as cp

    grads = jacobian.astype(np.float64)
    K = grads.shape[0]
    gram = grads @ grads.T
    radius = c * np.sqrt(gram.mean() + 1e-8) + 1e-8
    x = cp.Variable(K)
    objective = x @ (gram.sum(axis=1) / K) + radius * cp.norm(cp.hstack([grads.T @ x, np.array([1e-4])]))
    cp.Problem(cp.Minimize(objective), [x >= 0, cp.sum(x) == 1]).solve(solver=cp.CLARABEL)
    point = np.clip(x.value, 0.0, None)
    point /= point.sum()
    return 1.0 / K + radius / (np.linalg.norm(point @ grads) + 1e-8) * point, point


def cagrad_objective(gram: np.ndarray, x: np.ndarray, c: float) -> float:
    """The authors' CAGrad objective at x (to compare solvers by the value they reach)."""
    K = gram.shape[0]
    radius = c * np.sqrt(gram.mean() + 1e-8) + 1e-8
    return float(x @ gram @ (np.ones(K) / K) + radius * np.sqrt(x @ gram @ x + 1e-8))


def imtl_weights(jacobian: np.ndarray) -> np.ndarray:
    """IMTL-G's conditions, u_k·d equal for all k and Σ w = 1, solved by numpy's pseudo-inverse in the unit
    gradients' weights ŵ = ‖g_k‖·w_k (least ‖ŵ‖ where they do not fix the solution: anchor-free, so it permutes
    with the tasks; the authors' closed form where it is unique); zero gradients get 0."""
    grads = jacobian.astype(np.float64)
    norms = np.linalg.norm(grads, axis=1)
    active = norms > 0
    if not active.any():  # J = 0: every direction is zero, the weights 1/K (the op's)
        return np.full(len(grads), 1.0 / len(grads))
    units = grads[active] / norms[active, None]
    m = len(units)
    cosines = units @ units.T
    system = np.vstack([(np.eye(m) - 1.0 / m) @ cosines, 1.0 / norms[active][None]])
    rhs = np.zeros(m + 1)
    rhs[-1] = 1.0
    weights = np.zeros(len(grads))
    weights[active] = np.linalg.pinv(system, rcond=1e-10) @ rhs / norms[active]
    return weights


def aligned_mtl_weights(jacobian: np.ndarray, dtype: type = np.float64, scale_mode: str = "min") -> np.ndarray:
    """The authors' ProcrustesSolver with numpy.linalg.eigh: w = W·1, σ of ``scale_mode`` over the kept eigenvalues
    (TorchJD 0.18's: ``"min"``, ``"median"`` as ``torch.median``, the lower middle one, ``"rmse"`` their mean).

    Eigenvalues up to λ_max·K·ε are dropped, ε the epsilon of ``dtype`` (the gradients'
    dtype: the authors take torch's default dtype, that of their training).
    """
    grads = jacobian.astype(np.float64)
    gram = grads @ grads.T
    eigenvalues, basis = np.linalg.eigh(gram)
    tol = eigenvalues.max() * max(gram.shape) * np.finfo(dtype).eps
    kept = eigenvalues > tol
    if not kept.any():  # G = 0: every direction is zero
        return np.zeros(gram.shape[0])
    eigenvalues, basis = eigenvalues[kept], basis[:, kept]
    scale = {
        "min": eigenvalues.min(),
        "median": np.sort(eigenvalues)[(eigenvalues.size - 1) // 2],
        "rmse": eigenvalues.mean(),
    }[scale_mode]
    W = basis @ np.diag(np.sqrt(scale / eigenvalues)) @ basis.T
    return W.sum(axis=1)


def nash_mtl_weights(gram: np.ndarray) -> np.ndarray:
    """α > 0 with G·α = 1/α: damped Newton in float64 on the strictly convex ½αᵀGα − Σ log α, whose stationary
    point that is, from α = 1/√diag(G) (the answer for orthogonal gradients), steps halved until α stays positive
    and the objective decreases. Exists where no w ≥ 0, w ≠ 0 has wᵀJ = 0 (asserted by the residual)."""
    gram = gram.astype(np.float64)
    alpha = 1.0 / np.sqrt(gram.diagonal())

    def objective(a: np.ndarray) -> float:
        return float(0.5 * a @ gram @ a - np.log(a).sum())

    for _ in range(200):
        gradient = gram @ alpha - 1.0 / alpha
        step = np.linalg.solve(gram + np.diag(1.0 / alpha**2), -gradient)
        length = 1.0
        while np.any(alpha + length * step <= 0) or objective(alpha + length * step) > objective(alpha):
            length /= 2
            if length < 1e-30:
                break
        alpha = alpha + length * step
        if np.abs((gram @ alpha) * alpha - 1).max() < 1e-13:
            break
    assert np.all(alpha > 0) and np.abs((gram @ alpha) * alpha - 1).max() < 1e-9, "no bargaining solution"
    return alpha


_MASK64 = (1 << 64) - 1


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def graddrop_uniforms(seed: int, offset: int, columns: int) -> np.ndarray:
    """U[p] = (h >> 11)·2⁻⁵³, h = mix(mix(mix(seed) ^ offset) ^ p), as the kernels draw them."""
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64)) ^ np.uint64(offset & _MASK64)
    key = _splitmix64(key)
    h = _splitmix64(key ^ np.arange(columns, dtype=np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def graddrop_update(jacobian: torch.Tensor, leak: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """GradDrop, readable: purity per column, a sign chosen per column, leak per task."""
    grads = jacobian.double()
    uniforms = torch.from_numpy(graddrop_uniforms(seed, offset, grads.shape[1]))
    total, total_abs = grads.sum(0), grads.abs().sum(0)
    purity = torch.where(total_abs > 0, 0.5 * (1 + total / total_abs), torch.full_like(total, 0.5))
    keep_positive = uniforms < purity  # per column
    mask = torch.where(keep_positive, grads > 0, grads < 0).double()  # K×P
    leak = leak.double()[:, None]
    return ((leak + (1 - leak) * mask) * grads).sum(0)


# Exact references: the methods' own problems solved to float64 precision by other means than the kernels'
# (an interior-point solver, Clarabel through cvxpy, polished on its active set; pinv; eigh). Clarabel is asked
# for 1e-12 gaps; where it stops short of them on a badly scaled input it says "inaccurate" (a cvxpy warning,
# silenced: the tests judge the answer, MGDA's after its polish).


def _solve(problem: Any) -> None:
    import cvxpy as cp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=500)
    assert problem.status in ("optimal", "optimal_inaccurate"), problem.status


def min_norm_point(jacobian: np.ndarray) -> np.ndarray:
    """MGDA's direction: the minimum-norm point d* = Jᵀw* of the rows' convex hull (unique even where w* is not).

    Clarabel solves min ‖Jᵀw‖ over the simplex (the norm, not its square: the solver sees the rows' scale, not
    its square); the answer is then polished on its support S, where the KKT conditions are the linear system
    G_SS w_S = μ·1, Σ w_S = 1 (least squares: G_SS may be singular, d is not). The polished point is kept when
    it is feasible and violates the KKT conditions g_k·d ≥ ‖d‖² no more (their lengths agree to rounding).
    """
    import cvxpy as cp

    grads = np.asarray(jacobian, dtype=np.float64)
    K = grads.shape[0]
    scale = max(np.abs(grads).max(), np.finfo(np.float64).tiny)
    w = cp.Variable(K)
    problem = cp.Problem(cp.Minimize(cp.norm(grads.T @ w / scale, 2)), [w >= 0, cp.sum(w) == 1])
    _solve(problem)
    weights = np.clip(np.asarray(w.value, dtype=np.float64), 0, None)
    weights /= weights.sum()
    best = grads.T @ weights
    support = weights > 1e-6 * weights.max()
    gram = grads[support] @ grads[support].T
    size = int(support.sum())
    system = np.block([[gram, -np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
    solution = np.linalg.lstsq(system, np.concatenate([np.zeros(size), [1.0]]), rcond=None)[0]
    if np.all(solution[:size] >= 0):
        polished = np.zeros(K)
        polished[support] = solution[:size]
        direction = grads.T @ polished

        def violation(d: np.ndarray) -> float:  # of the simplex KKT conditions g_k·d ≥ ‖d‖²
            return max(0.0, float(d @ d - (grads @ d).min()))

        if violation(direction) <= violation(best):
            best = direction
    return best


def cagrad_optimum(jacobian: np.ndarray, c: float) -> float:
    """CAGrad's primal value max_d min_k g_k·d over the ball ‖d − g0‖ ≤ c‖g0‖ (g0 the mean gradient), by Clarabel."""
    import cvxpy as cp

    grads = np.asarray(jacobian, dtype=np.float64)
    scale = max(np.abs(grads).max(), np.finfo(np.float64).tiny)
    grads = grads / scale
    g0 = grads.mean(axis=0)
    d, t = cp.Variable(grads.shape[1]), cp.Variable()
    problem = cp.Problem(cp.Maximize(t), [grads @ d >= t, cp.norm(d - g0, 2) <= c * np.linalg.norm(g0)])
    _solve(problem)
    return float(problem.value) * scale**2


def fairgrad_weights(gram: np.ndarray, alpha: float) -> np.ndarray:
    """w > 0 with G·w = w^(−1/α) (Ban & Ji 2024, Eq. 4): damped Newton in float64 on the strictly convex
    ½wᵀGw − Σ w^(1−p)/(1−p) (p = 1/α ≠ 1), whose stationary point that is, from w = diag(G)^(−1/(1+p)) (the answer
    for orthogonal gradients), steps halved until w stays positive and the objective decreases, or the residual
    does (near the solution the objective's differences are below its rounding; Nash-MTL's reference at p = 1).
    Exists where no w ≥ 0, w ≠ 0 has wᵀJ = 0 (asserted by the residual)."""
    gram, p = gram.astype(np.float64), 1.0 / alpha
    weights = gram.diagonal() ** (-1 / (1 + p))

    def objective(w: np.ndarray) -> float:
        return float(0.5 * w @ gram @ w - (w ** (1 - p)).sum() / (1 - p))

    def residual(w: np.ndarray) -> float:
        return float(np.abs((gram @ w) * w**p - 1).max())

    for _ in range(200):
        step = np.linalg.solve(gram + np.diag(p * weights ** (-p - 1)), weights**-p - gram @ weights)
        length = 1.0
        while np.any(weights + length * step <= 0) or (
            objective(weights + length * step) > objective(weights)
            and residual(weights + length * step) >= residual(weights)
        ):
            length /= 2
            if length < 1e-30:
                break
        weights = weights + length * step
        if residual(weights) < 1e-13:
            break
    assert np.all(weights > 0) and residual(weights) < 1e-9, "no α-fair solution"
    return weights


def config_direction(jacobian: np.ndarray, preference: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """ConFIG (Liu et al., ICLR 2025, Eq. 2) as the authors and TorchJD compute it, on J itself: the unit rows U
    (0 for a zero row), b = pinv(U)·p by an SVD of U, d = (Σ_k g_k·b̂)·b̂. The pseudo-inverse at the precision of
    an input of ``dtype`` (its ε): singular values with σ² ≤ K·ε·σ_max² are dropped (G's rounding), and so are
    the components of p along the kept left singular vectors up to K·ε·Σ|p_k| (p ⟂ them, up to rounding)."""
    K, eps = jacobian.shape[0], float(np.finfo(dtype).eps)
    norms = np.linalg.norm(jacobian, axis=1, keepdims=True)
    units = np.divide(jacobian, norms, out=np.zeros_like(jacobian), where=norms > 0)
    left, singular, right = np.linalg.svd(units, full_matrices=False)
    along = left.T @ preference
    kept = (singular**2 > K * eps * singular.max() ** 2) & (np.abs(along) > K * eps * np.abs(preference).sum())
    best = right[kept].T @ (along[kept] / singular[kept])
    if not kept.any():
        return np.zeros(jacobian.shape[1])
    unit = best / np.linalg.norm(best)
    return float((jacobian @ unit).sum()) * unit


def krum_direction(jacobian: np.ndarray, n_byzantine: int, n_selected: int) -> np.ndarray:
    """Multi-Krum (Blanchard et al., NeurIPS 2017) with TorchJD's score: for each row, the sum of its distances to
    its K − f − 2 nearest other rows (distances from J directly, not from G); the mean of the n_selected rows of
    least score (a stable sort: ties to the lower index)."""
    K = jacobian.shape[0]
    distances = np.linalg.norm(jacobian[:, None, :] - jacobian[None, :, :], axis=2)
    others = [np.sort(np.delete(distances[i], i))[: K - n_byzantine - 2].sum() for i in range(K)]
    selected = np.argsort(np.array(others), kind="stable")[:n_selected]
    return jacobian[selected].mean(axis=0)


def trimmed_mean_direction(jacobian: np.ndarray, trim_number: int) -> np.ndarray:
    """Yin et al. (ICML 2018), Definition 2: per column, the mean of the values left once the trim_number largest
    and the trim_number smallest are removed."""
    K = jacobian.shape[0]
    return np.sort(jacobian, axis=0)[trim_number : K - trim_number].mean(axis=0)


def pcd_direction(jacobian: np.ndarray, tau: float, eps: float) -> np.ndarray:
    """PCD (TMLR 2026) at its first call (the debiased EMA of ‖g_k‖² is ‖g_k‖² itself), from its definition on J:
    g̃_k = g_k/sqrt(‖g_k‖² + eps); d̃ = argmin ½‖d − g̃_0‖² s.t. g̃_jᵀd ≥ τ‖g̃_j‖² by Clarabel on the primal
    (infeasible: d̃ = g̃_0), polished on the constraints Clarabel leaves active (their KKT system
    G̃_AA μ = b_A, kept when μ ≥ 0 and every constraint holds); d = d̃·‖g_0‖/‖d̃‖, 0 for g_0 = 0."""
    import cvxpy as cp

    K = jacobian.shape[0]
    squared = (jacobian**2).sum(axis=1)
    if squared[0] == 0:
        return np.zeros(jacobian.shape[1])
    units = jacobian / np.sqrt(squared + eps)[:, None]
    primary, secondary = units[0], units[1:]
    bounds = tau * (secondary**2).sum(axis=1)
    best = primary
    if K > 1 and np.any(secondary @ primary < bounds):
        d = cp.Variable(jacobian.shape[1])
        problem = cp.Problem(cp.Minimize(cp.sum_squares(d - primary)), [secondary @ d >= bounds])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=500)
        if problem.status in ("optimal", "optimal_inaccurate"):
            best = np.asarray(d.value, dtype=np.float64)
            active = secondary @ best - bounds <= 1e-6 * max(1.0, float(np.abs(bounds).max()))
            gram = secondary[active] @ secondary[active].T
            mu = np.linalg.lstsq(gram, bounds[active] - secondary[active] @ primary, rcond=None)[0]
            polished = primary + secondary[active].T @ mu
            if np.all(mu >= 0) and np.all(secondary @ polished - bounds >= -1e-12 * max(1.0, bounds.max())):
                best = polished
    size = float(np.linalg.norm(best))
    return best * np.sqrt(squared[0]) / size if size > 0 else best


def db_mtl_first_step(jacobian: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """DB-MTL's direction at its first step (LibMTL ``DB_MTL.py``) with unit losses: ``m = (1 − β) g``, each ``m_k``
    rescaled by ``max_j ‖m_j‖ / (‖m_k‖ + 1e-8)`` and summed."""
    averages = (1.0 - beta) * jacobian / (1.0 + 1e-8)
    norms = np.linalg.norm(averages, axis=1)
    return (norms.max() / (norms + 1e-8)) @ averages


def moco_first_step(jacobian: np.ndarray, beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0) -> np.ndarray:
    """MoCo's direction at its first step (LibMTL ``MoCo.py``) with unit losses: ``y = β ĝ`` (``ĝ_k = g_k/(‖g_k‖ +
    1e-8)``), ``λ = softmax(1/K − γ (y yᵀ + ρ I) 1/K)``, ``d = yᵀ λ``."""
    tasks = jacobian.shape[0]
    tracked = beta * jacobian / (np.linalg.norm(jacobian, axis=1, keepdims=True) + 1e-8)
    start = np.full(tasks, 1.0 / tasks)
    logits = start - gamma * (tracked @ tracked.T + rho * np.eye(tasks)) @ start
    weights = np.exp(logits - logits.max())
    return tracked.T @ (weights / weights.sum())


def dual_cone_weights(
    jacobian: np.ndarray, rows: np.ndarray, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> np.ndarray:
    """UPGrad's and DualProj's projections onto the dual cone (Quinton & Rey 2024, Proposition 1), in weights:
    for each row u, v = argmin ‖Aᵀv‖² subject to v ≥ u, A = [J/sqrt(tr G), sqrt(reg_eps)·I] (Aᵀ's Gram is
    TorchJD's Ĝ = G/tr(G) + reg_eps·I), as a bounded least-squares problem solved by scipy's BVLS (Stark &
    Parker's active-set method, independent of the kernel's)."""
    J = jacobian.astype(np.float64)
    K = J.shape[0]
    trace = float(np.einsum("kp,kp->", J, J))
    scaled = np.zeros_like(J) if trace < norm_eps else J / np.sqrt(trace)
    A = np.hstack([scaled, np.sqrt(reg_eps) * np.eye(K)]).T
    solutions = []
    for u in rows.astype(np.float64):
        result = scipy.optimize.lsq_linear(
            A, np.zeros(A.shape[0]), bounds=(u, np.full(K, np.inf)), method="bvls", tol=1e-15, lsmr_tol=None
        )
        solutions.append(np.maximum(result.x, u))
    return np.array(solutions)


def gradvac_update(
    jacobian: np.ndarray, orders: np.ndarray, targets: np.ndarray, beta: float = 0.5, eps: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """GradVac's step on the rows of J (Wang et al. 2021, Algorithm 1; TorchJD's ``GradVac`` rule): each g_i^PC,
    visiting the other tasks j in the order ``orders[i]``, gets ``a·g_j`` added where its cosine with g_j is below
    the target φ̂_ij (after which it equals it), and φ̂_ij follows the cosine's EMA. Returns Σ_i g_i^PC and the
    new targets (``targets`` is not changed)."""
    J = jacobian.astype(np.float64)
    targets = targets.astype(np.float64).copy()
    vaccinated = J.copy()
    for i, order in enumerate(orders):
        for j in order:
            norm_i, norm_j = np.linalg.norm(vaccinated[i]), np.linalg.norm(J[j])
            cosine = vaccinated[i] @ J[j] / (norm_i * norm_j + eps)
            target = targets[i, j]
            if cosine < target:
                sine, target_sine = np.sqrt(max(0.0, 1 - cosine**2)), np.sqrt(max(0.0, 1 - target**2))
                vaccinated[i] += norm_i * (target * sine - cosine * target_sine) / (norm_j * target_sine + eps) * J[j]
            targets[i, j] = (1 - beta) * target + beta * cosine
    return vaccinated.sum(axis=0), targets


def excess_mtl_steps(
    jacobians: list[np.ndarray], robust_step_size: float = 1.0, n_warmup_steps: int = 0
) -> list[np.ndarray]:
    """ExcessMTL's directions over successive J (He et al. 2024, eq. 6, 7, 9; TorchJD's ``ExcessMTL``): AdaGrad's
    sums S of g², the excess risks e_k = Σ g_k²/sqrt(S_k + 1e-7), divided by the baseline (the warm-up's mean, or
    the first step's e, which is itself used undivided), w ← w·exp(η e) normalised, from 1/K."""
    tasks = jacobians[0].shape[0]
    squares, weights, warmup, baseline = 0.0, np.full(tasks, 1.0 / tasks), np.zeros(tasks), None
    directions = []
    for step, J in enumerate(jacobians, start=1):
        J = J.astype(np.float64)
        squares = squares + J**2
        excess = (J**2 / np.sqrt(squares + 1e-7)).sum(axis=1)
        if step <= n_warmup_steps:
            warmup += excess
        else:
            if baseline is None:
                baseline = warmup / n_warmup_steps if n_warmup_steps else excess
            if step > 1:
                excess = excess / (baseline + 1e-7)
            logits = np.log(weights) + robust_step_size * excess
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
        directions.append(weights @ J)
    return directions


def simplex_projection(point: np.ndarray) -> np.ndarray:
    """argmin ‖w − point‖ over the simplex: ``max(point − θ, 0)`` with Σ = 1, θ found by bisection (no sort)."""
    low, high = point.min() - 1.0, point.max()
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if np.maximum(point - middle, 0).sum() > 1 else (low, middle)
    return np.maximum(point - (low + high) / 2, 0)


def modo_weights(cross: np.ndarray, lambdas: np.ndarray, gamma: float = 0.1, rho: float = 0.1) -> np.ndarray:
    """MoDo's step of λ (Chen et al. 2023, eq. 2.9a; TorchJD's ``MoDoWeighting``): Π(λ − γ(Aλ + ρλ)), A = J_1 J_2ᵀ."""
    return simplex_projection(lambdas - gamma * (cross @ lambdas + rho * lambdas))


def sdmgrad_weights(
    cross: np.ndarray,
    inner: np.ndarray,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """SDMGrad's weights and new inner weights (Xiao et al. 2023, Algorithm 1; the authors' and TorchJD's scaling of
    A by the squared mean gradient norm): n_iter heavy-ball steps of w on ``(w + λ w̃)ᵀ Â (w + λ w̃)/2``, projected."""
    preferred = lambda_ * np.full(len(inner), 1.0 / len(inner))
    scaled = cross / (np.sqrt(np.maximum(np.diag(cross), 0)).mean() ** 2 + 1e-8)
    velocity = np.zeros_like(inner)
    for _ in range(n_iter):
        velocity = scaled @ (inner + preferred) + momentum * velocity
        inner = simplex_projection(inner - lr * velocity)
    return (inner + preferred) / (1 + lambda_), inner
