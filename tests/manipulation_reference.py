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
- IMTL-G: the authors' closed form on J with numpy.linalg.solve.
- Aligned-MTL: the authors' ProcrustesSolver with numpy.linalg.eigh, its rank cut at
  the epsilon of the gradients' dtype.
- Nash-MTL: scipy.optimize.root on G·α = 1/α (the fixed point the authors' cvxpy
  loop approaches).
- GradDrop: a readable torch version (Chen et al. 2020), with the uniforms drawn by
  a NumPy SplitMix64 of (seed, offset, column).
"""

from __future__ import annotations

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


def mgda_min_norm_point(jacobian: np.ndarray) -> np.ndarray:
    """argmin ‖wᵀ·J‖² over the simplex by Clarabel's interior-point method (via cvxpy), on J.

    Tolerances 1e-12 (the defaults, 1e-8, are too loose to judge a solver exact to 1e-9).
    """
    import cvxpy

    w = cvxpy.Variable(jacobian.shape[0])
    problem = cvxpy.Problem(cvxpy.Minimize(cvxpy.sum_squares(jacobian.T @ w)), [w >= 0, cvxpy.sum(w) == 1])
    problem.solve(solver=cvxpy.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=500)
    return np.asarray(w.value)


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


def cagrad_objective(gram: np.ndarray, x: np.ndarray, c: float) -> float:
    """The authors' CAGrad objective at x (to compare solvers by the value they reach)."""
    K = gram.shape[0]
    radius = c * np.sqrt(gram.mean() + 1e-8) + 1e-8
    return float(x @ gram @ (np.ones(K) / K) + radius * np.sqrt(x @ gram @ x + 1e-8))


def imtl_weights(jacobian: np.ndarray) -> np.ndarray:
    """IMTL-G's closed form on J: α = (g_0·Uᵀ)(D·Uᵀ)⁻¹, w = [1 − Σα, α]."""
    grads = jacobian.astype(np.float64)
    units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    D = grads[:1] - grads[1:]
    U = units[:1] - units[1:]
    # α·(D·Uᵀ) = g_0·Uᵀ  ⇔  (D·Uᵀ)ᵀ·αᵀ = (g_0·Uᵀ)ᵀ
    alpha = np.linalg.solve((D @ U.T).T, grads[0] @ U.T)
    return np.concatenate([[1 - alpha.sum()], alpha])


def aligned_mtl_weights(jacobian: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """The authors' ProcrustesSolver (scale_mode="min") with numpy.linalg.eigh: w = W·1.

    Eigenvalues up to λ_max·K·ε are dropped, ε the epsilon of ``dtype`` (the gradients'
    dtype: the authors take torch's default dtype, that of their training).
    """
    grads = jacobian.astype(np.float64)
    gram = grads @ grads.T
    eigenvalues, basis = np.linalg.eigh(gram)
    tol = eigenvalues.max() * max(gram.shape) * np.finfo(dtype).eps
    kept = eigenvalues > tol
    eigenvalues, basis = eigenvalues[kept], basis[:, kept]
    W = basis @ np.diag(np.sqrt(eigenvalues.min() / eigenvalues)) @ basis.T
    return W.sum(axis=1)


def nash_mtl_weights(gram: np.ndarray) -> np.ndarray:
    """α > 0 with G·α = 1/α, by scipy root-finding (Powell's hybrid method) on G·α − 1/α."""
    gram = gram.astype(np.float64)
    K = gram.shape[0]

    def residual(alpha: np.ndarray) -> np.ndarray:
        return gram @ alpha - 1.0 / alpha

    def jacobian(alpha: np.ndarray) -> np.ndarray:
        return gram + np.diag(1.0 / alpha**2)

    start = np.full(K, np.sqrt(K / gram.sum()))  # the best multiple of 1
    solution = scipy.optimize.root(residual, start, jac=jacobian, method="hybr", tol=1e-14)
    # hybr may report that it cannot improve further once at machine precision:
    # judge the answer by its residual instead of the flag.
    alpha = solution.x
    assert np.all(alpha > 0) and np.abs(residual(alpha) * alpha).max() < 1e-9, solution.message
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
