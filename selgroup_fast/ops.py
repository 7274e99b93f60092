"""Fused ops of selgroup_fast: thin typed wrappers over ``torch.ops.selgroup_fast``.

Each op's schema is defined once in ``csrc/ops.cpp``; its binding is written once in
``csrc/bindings.h`` over a backend (``csrc/cpu/ops_cpu.cpp``, ``csrc/cuda/ops_cuda.cpp``
with the generic kernels of ``csrc/cuda/kernels.cu``); the fake (meta) kernels registered here let the
ops run under ``torch.compile`` and ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from . import _C  # type: ignore[attr-defined,unused-ignore]  # noqa: F401  (loads the library and registers the ops)

__all__ = ["affinity_propagation", "affinity_update_", "cuda_available", "group_similarity"]


def cuda_available() -> bool:
    """Whether this build of the extension contains the CUDA kernels."""
    return bool(torch.ops.selgroup_fast.cuda_available())


# ---- affinity and grouping (docs/algorithm.md §Affinity update, §Similarity, §Affinity propagation) ----


def affinity_update_(
    affinity: torch.Tensor, before: torch.Tensor, after: torch.Tensor, group_mask: torch.Tensor, decay: float
) -> None:
    """Updates the K×K proximal inter-task affinity in place (Jeong & Yoon, ICLR 2025, Def. 2).

    ``group_mask`` (bool[K]) marks the group G whose step happened between the forwards
    that measured ``before`` and ``after`` (K losses each). With ``n = |G|`` and
    ``r_t = (1 - after_t / before_t) / n``, for every source ``s`` in G and target ``t``:
    ``A[s,t] <- (1 - decay) A[s,t] + decay v`` where ``v = r_t`` for ``t`` outside G; inside
    G, ``v = r_t`` if ``s == t`` and ``r_t >= 0`` (otherwise skipped), ``v = r_t`` if
    ``r_s r_t >= 0``, else ``v = -max(r_t, r_s)``. Targets whose ``before`` is not a
    positive finite number are skipped, intra-group pairs also when ``before_s`` is not,
    and any pair whose value or result would be non-finite (NaN/inf losses never reach
    the affinity). Every pair reads the losses, never another pair's new value. An empty
    mask is a no-op. ``decay`` must be in (0, 1]. One kernel launch on CUDA, no sync.
    ``affinity`` may be any non-overlapping view (e.g. a transpose); all tensors share
    its device, the losses its dtype.

    Example::

        >>> A = torch.zeros(3, 3)
        >>> mask = torch.tensor([True, False, False])
        >>> affinity_update_(A, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 2.0, 1.0]), mask, 0.5)
        >>> A[0]
        tensor([ 0.2500, -0.5000,  0.0000])
    """
    torch.ops.selgroup_fast.affinity_update_(affinity, before, after, group_mask, float(decay))


def group_similarity(affinity: torch.Tensor) -> torch.Tensor:
    """The similarity the grouping clusters: ``S = (N + N^T) / 2`` with ``N[:, j] = A[:, j] / A[j, j]``.

    Always finite. A column whose diagonal ``A[j, j]`` is not a positive finite number
    (no measured self-improvement, e.g. the all-zero affinity at the start of training)
    is taken as a zero column, and any normalised entry that is not finite as 0; so an
    all-zero affinity gives an all-zero similarity (which ``affinity_propagation`` puts
    in a single cluster). Returns a new contiguous K×K tensor.

    Example::

        >>> group_similarity(torch.tensor([[2.0, 1.0], [-1.0, 4.0]]))  # (1/4 + -1/2) / 2
        tensor([[ 1.0000, -0.1250],
                [-0.1250,  1.0000]])
    """
    return torch.ops.selgroup_fast.group_similarity(affinity)


def affinity_propagation(
    similarity: torch.Tensor,
    preference: float | None = None,
    damping: float = 0.5,
    max_iter: int = 200,
    convergence_iter: int = 15,
) -> torch.Tensor:
    """Affinity propagation (Frey & Dueck 2007) on a precomputed K×K similarity.

    The algorithm of scikit-learn's ``AffinityPropagation(affinity="precomputed",
    random_state=0)`` step for step, including its special case of equal similarities,
    its tie-breaking noise (NumPy's RandomState(0) stream is regenerated exactly, on
    CPU and CUDA), its convergence test and final exemplar refinement. ``preference``
    defaults to the median of ``similarity``. Returns int64 labels numbered 0..M-1 by
    first appearance (scikit-learn sorts by exemplar index; the partition is the same),
    or all -1 when no exemplar emerged. Results can differ from scikit-learn only where
    two messages (or two members' summed similarities) tie to within rounding (summation
    order: from K = 128 those sums add blocks of rows). On the CPU it uses up to one of
    torch's threads per 64 rows from K = 128, with the same result on any thread count.

    Non-finite similarities: a ``ValueError`` on the CPU; on CUDA (which cannot raise
    without a host sync) all -1. Raises for damping outside [0.5, 1), max_iter < 1,
    convergence_iter < 1, a non-finite preference. On CUDA the whole loop runs in one
    launch on one block.

    Example::

        >>> S = -torch.tensor([[0.0, 1.0, 9.0], [1.0, 0.0, 8.0], [9.0, 8.0, 0.0]])
        >>> affinity_propagation(S)
        tensor([0, 0, 1])
    """
    return torch.ops.selgroup_fast.affinity_propagation(
        similarity,
        None if preference is None else float(preference),
        float(damping),
        int(max_iter),
        int(convergence_iter),
    )


@torch.library.register_fake("selgroup_fast::affinity_update_")
def _affinity_update_fake(
    affinity: torch.Tensor, before: torch.Tensor, after: torch.Tensor, group_mask: torch.Tensor, decay: float
) -> None:
    K = affinity.shape[0]
    torch._check(affinity.dim() == 2 and affinity.shape[1] == K, lambda: f"affinity must be K×K, got {affinity.shape}")
    for name, tensor in (("before", before), ("after", after), ("group_mask", group_mask)):
        message = f"{name} must have shape [{K}], got {tensor.shape}"
        torch._check(tensor.shape == (K,), lambda: message)  # noqa: B023  (checked before the next iteration)
    torch._check(group_mask.dtype == torch.bool, lambda: f"group_mask must be bool, got {group_mask.dtype}")


@torch.library.register_fake("selgroup_fast::group_similarity")
def _group_similarity_fake(affinity: torch.Tensor) -> torch.Tensor:
    torch._check(affinity.dim() == 2 and affinity.shape[0] == affinity.shape[1], lambda: "affinity must be K×K")
    return affinity.new_empty(affinity.shape)


@torch.library.register_fake("selgroup_fast::affinity_propagation")
def _affinity_propagation_fake(similarity: torch.Tensor, *solver_options: object) -> torch.Tensor:
    torch._check(similarity.dim() == 2 and similarity.shape[0] == similarity.shape[1], lambda: "similarity must be K×K")
    return similarity.new_empty(similarity.shape[:1], dtype=torch.int64)


# The fakes take the solver options (whatever of them the dispatcher passes: it drops those equal to
# the schema's defaults) as *solver_options: the output's shape does not depend on them, and their
# defaults are declared once, in csrc/ops.cpp's schema and the wrappers here.

# ---- baselines: gradient manipulation (csrc/manipulation, bound in csrc/bindings.h) ------
#
# Every weighting op maps the K×K Gram matrix G = J·Jᵀ of the task gradients (J: K×P)
# to weights w[K] such that the update is d = wᵀ·J; it returns a new tensor with G's
# device and dtype, computes in float64 internally, never synchronises the host, and
# shares these conventions: K = 1 gives [1]; a non-finite entry in G gives all-NaN
# weights (flagged, not hidden: check with ``torch.isfinite`` where it matters).

__all__ += [
    "pcgrad_weights",
    "mgda_weights",
    "cagrad_weights",
    "imtl_weights",
    "aligned_mtl_weights",
    "nash_mtl_weights",
    "fairgrad_weights",
    "config_weights",
    "pcd_weights",
    "dual_cone_projection",
    "graddrop",
]


def pcgrad_weights(gram: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

    Task i's gradient is projected, in the order ``order[i]`` (a permutation of
    0..K-1; the entry i and entries outside [0, K) are skipped), onto the normal
    plane of each ORIGINAL g_j it conflicts with (g_i·g_j < 0), as in the authors'
    code. Returns w with ``wᵀ·J = Σ_i g_i^PC``, the SUM of the projected gradients
    (the authors' and nash-mtl's default; divide by K for the mean). A zero gradient
    is never projected on.

    >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> pcgrad_weights(g @ g.T, torch.tensor([[0, 1], [1, 0]]))
    tensor([2.0000, 1.5000])
    """
    return torch.ops.selgroup_fast.pcgrad_weights(gram, order)


def mgda_weights(gram: torch.Tensor, max_iter: int = 250, tol: float = 0.0) -> torch.Tensor:
    """MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

    The min-norm point ``argmin_{w ∈ simplex} wᵀ·G·w`` by Wolfe's minimum-norm-point
    algorithm (an active-set method on the simplex; csrc/manipulation/mgda.h), exact up
    to the rounding of G: on return ``(G·w)_k ≥ wᵀ·G·w − (tol + K·ε)·m·(m + ‖g_k‖)`` for
    every task k (the simplex KKT conditions; ε = float64's epsilon, m = Σ_k w_k·‖g_k‖,
    ‖g_k‖ = sqrt(G_kk)), whatever the scale of the tasks or the rank of G. A float32 G is
    solved as given, in float64: the answer is exact for that rounded G. ``max_iter``
    bounds the major steps (each adds one task to the support, so at most max_iter + 1
    tasks get weight); ``tol`` (≥ 0) stops earlier. The authors' Frank-Wolfe solver
    (best-pair start, ``tol`` on ‖Δw‖₁) stops early on badly scaled tasks; this one does not.

    >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> mgda_weights(g @ g.T)
    tensor([0.8000, 0.2000])
    """
    return torch.ops.selgroup_fast.mgda_weights(gram, max_iter, tol)


def cagrad_weights(
    gram: torch.Tensor, c: float = 0.4, rescale: int = 1, max_iter: int = 1000, tol: float = 1e-10
) -> torch.Tensor:
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021).

    Solves the authors' dual ``min_{x ∈ simplex} xᵀ·G·b + r·‖g_x‖`` (b = 1/K,
    r = c·‖g0‖, g0 = bᵀ·J; without their 1e-8 regularisers) exactly, and returns
    ``w = (b + λ·x) / s`` with λ = r / ‖g_x‖ and s = 1 + c² (rescale=1, the authors'
    default), 1 + c (rescale=2) or 1 (rescale=0): ``wᵀ·J`` is the authors' update, the
    maximiser of min_k g_k·d over the ball ‖d − g0‖ ≤ r. x is Wolfe's min-norm point of
    the shifted gradients g_k + s·g0 at the s where ‖g_x‖ = r·s, found by a bracketed
    root-find to ``tol`` relative in s (at most ``max_iter`` steps). Where zero lies in
    the rows' convex hull and the ball meets {d : J·d ≥ 0} (always for c ≥ 1), the
    optimum is not unique: w = (b + μ) / s with g0 + μᵀ·J the projection of g0 on that
    cone (the optimum closest to g0; 0 on strongly stationary rows). docs/algorithm.md.

    >>> cagrad_weights(torch.eye(2, dtype=torch.float64), c=0.4)  # (0.5 + 0.4·0.5) / 1.16
    tensor([0.6034, 0.6034], dtype=torch.float64)
    """
    return torch.ops.selgroup_fast.cagrad_weights(gram, c, rescale, max_iter, tol)


def imtl_weights(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

    The authors' closed form through G: weights summing to 1 such that ``d = wᵀ·J``
    has equal projections on every unit task gradient. A task with a zero gradient
    gets weight 0 (the others are solved without it); all zero: w = 1/K. Linearly
    dependent gradients get the least-norm (pseudo-inverse) solution in the unit
    gradients' weights ‖g_k‖·w_k, which permutes with the tasks (docs/algorithm.md).

    >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> imtl_weights(g @ g.T)  # d = (2/3, 2/3): equal projections on e1 and e2
    tensor([0.6667, 0.3333])
    """
    return torch.ops.selgroup_fast.imtl_weights(gram)


def aligned_mtl_weights(gram: torch.Tensor, scale_mode: str = "min") -> torch.Tensor:
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023).

    With G = V·Λ·Vᵀ (eigenvalues below λ_max·K·ε dropped, ε the machine epsilon of
    G's dtype, as the authors' ProcrustesSolver and TorchJD do) and σ the smallest kept
    eigenvalue (``scale_mode="min"``; ``"median"``: their ``torch.median``, the lower middle
    one for an even count; ``"rmse"``: their mean; TorchJD 0.18's three modes), the aligned gradients ``W·J`` with
    ``W = V·diag(sqrt(σ/λ))·Vᵀ`` are orthogonal with norm sqrt(σ); with equal
    preferences ``d`` is their sum, so ``w = W·1``: K times TorchJD's ``AlignedMTLWeighting``
    (whose default preference is the mean, 1/K). In float32 the eigenvalues below
    λ_max·K·ε_float32 are lost in G's own rounding: gradient directions with singular
    values below sqrt(K·ε_float32)·σ_max get no weight (float64 keeps them down to
    sqrt(K·ε_float64)·σ_max). The eigensolver (Householder + implicit QL) runs in the
    kernel. G = 0: w = 0 (TorchJD: the preference vector; d = 0 either way).

    >>> aligned_mtl_weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))  # W = diag(1, 1/2)
    tensor([1.0000, 0.5000])
    >>> aligned_mtl_weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]]), scale_mode="rmse")  # σ = 2.5
    tensor([1.5811, 0.7906])
    """
    return torch.ops.selgroup_fast.aligned_mtl_weights(gram, scale_mode)


def nash_mtl_weights(
    gram: torch.Tensor, alpha_init: torch.Tensor, max_iter: int = 50, tol: float = 1e-16
) -> torch.Tensor:
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

    The bargaining solution α > 0 of ``G·α = 1/α`` (elementwise), the minimiser of
    ``½·αᵀ·G·α − Σ log α``, by damped Newton from ``alpha_init`` (the previous α,
    the authors' warm start; rescaled along its ray first; non-positive entries
    replaced by 1) until half the squared Newton decrement of the last step is below tol, on
    the correlation matrix diag(G)^-½·G·diag(G)^-½ (scale-free). A G singular to its
    dtype's precision, which can have no solution, gets that of the correlation matrix
    plus the least δ·I that makes it positive definite beyond rounding: α stays positive
    and finite (docs/algorithm.md); all gradients zero: α = 1.

    >>> nash_mtl_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), torch.ones(2))  # α_k = 1/‖g_k‖
    tensor([0.5000, 1.0000])
    """
    return torch.ops.selgroup_fast.nash_mtl_weights(gram, alpha_init, max_iter, tol)


def fairgrad_weights(gram: torch.Tensor, alpha: float = 1.0, max_iter: int = 50, tol: float = 1e-16) -> torch.Tensor:
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    The α-fair weights w > 0 of ``G·w = w^(−1/α)`` (elementwise), the minimiser of
    ``½·wᵀ·G·w − Σ H(w_k)`` with ``H' = x^(−1/α)``, by damped Newton from all ones (rescaled
    along their ray first) until half the squared Newton decrement of the last step is
    below tol, on the correlation matrix diag(G)^-½·G·diag(G)^-½. ``alpha = 1`` is
    Nash-MTL's bargaining solution (:func:`nash_mtl_weights` from ones); ``alpha = 0``
    the authors' linear scalarisation ``w = 1/K``; ``alpha`` must be finite and ≥ 0.
    A G singular to its dtype's precision gets the least δ·I regularisation that
    Nash-MTL's does (docs/algorithm.md); all gradients zero: w = 1.

    >>> fairgrad_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), alpha=0.5)  # diagonal G: G_kk·w_k = w_k^-2
    tensor([0.6300, 1.0000])
    """
    return torch.ops.selgroup_fast.fairgrad_weights(gram, alpha, max_iter, tol)


def config_weights(gram: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """ConFIG (Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of PINNs", ICLR 2025, Eq. 2), from G.

    With unit gradients ``U = D·J`` (``D = diag(1/‖g_k‖)``, 0 for a zero gradient) and
    ``b = U⁺·p`` (p: ``preference``, K values), the direction is ``d = (Σ_k g_kᵀ·b̂)·b̂``.
    ``U⁺ = Jᵀ·D·(D·G·D)⁺``, so ``d = wᵀ·J`` with ``v = D·(D·G·D)⁺·p`` and
    ``w = (1ᵀ·G·v / vᵀ·G·v)·v``: one K×K eigenproblem, no SVD of J. The pseudo-inverse
    drops the eigenvalues at or below ``K·ε·λ_max`` (G's rounding; ε of G's dtype);
    ``b = 0`` gives w = 0.

    >>> config_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), torch.ones(2))  # b̂ = (1, 1)/√2, d = (3/√2)·b̂ = (1.5, 1.5)
    tensor([0.7500, 1.5000])
    """
    return torch.ops.selgroup_fast.config_weights(gram, preference)


def pcd_weights(gram: torch.Tensor, scales: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """PCD, Priority-Constrained Descent (TMLR 2026): task 0 primary, the others guaranteed a fraction of progress.

    With ``g̃_k = s_k·g_k`` (``scales`` s, K values), ``d̃ = argmin ½‖d − g̃_0‖²`` subject to
    ``g̃_jᵀd ≥ τ_j‖g̃_j‖²`` (``taus``: K − 1 values), solved exactly from G by the dual active-set
    method of Goldfarb & Idnani; infeasible constraints are dropped (``d̃ = g̃_0``). Returns w with
    ``wᵀ·J = d̃·‖g_0‖/‖d̃‖``; zero where ``g_0 = 0`` or d̃ is zero up to rounding.

    >>> pcd_weights(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), torch.ones(2), torch.tensor([0.0]))
    tensor([1.1547, 0.5774])
    """
    return torch.ops.selgroup_fast.pcd_weights(gram, scales, taus)


def dual_cone_projection(
    gram: torch.Tensor, rows: torch.Tensor, norm_eps: float = 0.0001, reg_eps: float = 0.0001
) -> torch.Tensor:
    """The projections onto the dual cone of the task gradients, in weights (Quinton & Rey, "Jacobian Descent
    for Multi-Objective Optimization", arXiv 2406.16232, Proposition 1).

    For each row u of ``rows`` (N×K), ``v = argmin_v vᵀ·Ĝ·v`` subject to ``v ≥ u``, with
    ``Ĝ = G / tr(G) + reg_eps·I`` (``G / tr(G)`` taken as 0 when ``tr(G) < norm_eps``), as TorchJD's
    ``QuadprogProjector(norm_eps, reg_eps)``: then ``Jᵀ·v`` is ``Jᵀ·u`` projected onto
    ``{d : J·d ≥ 0}`` (for the Gram matrix of ``[J/sqrt(tr G), sqrt(reg_eps)·I]``). All N box-constrained
    QPs in one call, each solved exactly by an active-set method (Lawson & Hanson's, with block additions;
    csrc/manipulation/dual_cone.h): on return ``Ĝ·v ≥ 0`` off the bound and ``= 0`` on it, to the rounding of
    G. With ``reg_eps = 0`` an index whose gradient is a combination of the free ones to rounding (duplicate or
    zero rows) stays on its bound. Returns N×K, G's dtype and device; all-NaN for a non-finite G.

    >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> dual_cone_projection(g @ g.T, torch.eye(2), reg_eps=0.0)  # g_0 + g_1/2 ⟂ g_1, g_0 + g_1 ⟂ g_0
    tensor([[1.0000, 0.5000],
            [1.0000, 1.0000]])
    """
    return torch.ops.selgroup_fast.dual_cone_projection(gram, rows, norm_eps, reg_eps)


def graddrop(
    jacobian: torch.Tensor, leak: torch.Tensor, seed: int, offset: int, column_offset: int = 0
) -> torch.Tensor:
    """GradDrop (Chen et al., "Just Pick a Sign", NeurIPS 2020), fused over the K×P matrix J.

    Per column p: purity ``P = ½(1 + Σ_k J_kp / Σ_k |J_kp|)`` (½ for a zero column),
    a uniform U from a counter-based generator of (seed, offset, column_offset + p) that the CPU
    and CUDA kernels compute identically (SplitMix64, csrc/manipulation/graddrop.h),
    keep the positive entries when U < P and the negative ones otherwise, and sum:
    ``d_p = Σ_k (ℓ_k + (1 − ℓ_k)·M_kp)·J_kp`` with ``leak`` ℓ[K] (0 = the paper's
    default; its values are not checked). A column with a non-finite entry gives NaN.
    ``column_offset`` (≥ 0) is the global index of J's first column when J holds a slice
    of the columns (an FSDP2 rank's shard): the slice draws what the whole matrix would.

    >>> J = torch.tensor([[1.0, 2.0, -1.0], [3.0, -2.0, 1.0]])
    >>> graddrop(J, torch.zeros(2), seed=0, offset=0)[0]
    tensor(4.)
    >>> whole = graddrop(J, torch.zeros(2), seed=0, offset=0)
    >>> torch.equal(graddrop(J[:, 1:].contiguous(), torch.zeros(2), 0, 0, column_offset=1), whole[1:])
    True
    """
    return torch.ops.selgroup_fast.graddrop(jacobian, leak, seed, offset, column_offset)


def _check_gram(gram: torch.Tensor) -> torch.Tensor:
    """The kernels' checks of a Gram matrix (square, float32/64, K ≥ 1), then an empty weight vector like it."""
    torch._check(
        gram.dim() == 2 and gram.shape[0] == gram.shape[1], lambda: f"gram must be square (K×K), got {gram.shape}"
    )
    torch._check(gram.shape[0] >= 1, lambda: "gram must have at least one row")
    torch._check(
        gram.dtype in (torch.float32, torch.float64), lambda: f"gram must be float32 or float64, got {gram.dtype}"
    )
    return gram.new_empty(gram.shape[:1])


def _gram_weights_fake(gram: torch.Tensor, *solver_options: object) -> torch.Tensor:
    return _check_gram(gram)


for _op in ("mgda_weights", "cagrad_weights", "imtl_weights", "aligned_mtl_weights", "fairgrad_weights"):
    torch.library.register_fake(f"selgroup_fast::{_op}")(_gram_weights_fake)


@torch.library.register_fake("selgroup_fast::pcgrad_weights")
def _pcgrad_weights_fake(gram: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    torch._check(order.dtype == torch.int64, lambda: f"order must be int64, got {order.dtype}")
    torch._check(order.shape == gram.shape, lambda: f"order must be K×K, got {order.shape}")
    return _check_gram(gram)


@torch.library.register_fake("selgroup_fast::config_weights")
def _config_weights_fake(gram: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    torch._check(preference.shape == gram.shape[:1], lambda: f"preference must have shape [K], got {preference.shape}")
    torch._check(preference.dtype == gram.dtype, lambda: f"preference is {preference.dtype}, gram {gram.dtype}")
    return _check_gram(gram)


@torch.library.register_fake("selgroup_fast::pcd_weights")
def _pcd_weights_fake(gram: torch.Tensor, scales: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    torch._check(scales.shape == gram.shape[:1], lambda: f"scales must have shape [K], got {scales.shape}")
    torch._check(taus.shape[0] == gram.shape[0] - 1, lambda: f"taus must have shape [K - 1], got {taus.shape}")
    return _check_gram(gram)


@torch.library.register_fake("selgroup_fast::dual_cone_projection")
def _dual_cone_projection_fake(gram: torch.Tensor, rows: torch.Tensor, *solver_options: object) -> torch.Tensor:
    _check_gram(gram)
    torch._check(
        rows.dim() == 2 and rows.shape[1] == gram.shape[0],
        lambda: f"dual_cone_projection: rows must have shape [N, {gram.shape[0]}], got {rows.shape}",
    )
    torch._check(rows.dtype == gram.dtype, lambda: f"rows is {rows.dtype} but gram is {gram.dtype}")
    return rows.new_empty(rows.shape)


@torch.library.register_fake("selgroup_fast::nash_mtl_weights")
def _nash_mtl_weights_fake(gram: torch.Tensor, alpha_init: torch.Tensor, *solver_options: object) -> torch.Tensor:
    torch._check(alpha_init.shape == gram.shape[:1], lambda: f"alpha_init must have shape [K], got {alpha_init.shape}")
    torch._check(alpha_init.dtype == gram.dtype, lambda: f"alpha_init is {alpha_init.dtype}, gram {gram.dtype}")
    return _check_gram(gram)


@torch.library.register_fake("selgroup_fast::graddrop")
def _graddrop_fake(
    jacobian: torch.Tensor, leak: torch.Tensor, seed: int, offset: int, column_offset: int = 0
) -> torch.Tensor:
    torch._check(column_offset >= 0, lambda: f"column_offset must be >= 0, got {column_offset}")
    torch._check(jacobian.dim() == 2, lambda: f"jacobian must be 2-D, got shape {jacobian.shape}")
    torch._check(
        jacobian.dtype in (torch.float32, torch.float64),
        lambda: f"jacobian must be float32 or float64, got {jacobian.dtype}",
    )
    torch._check(leak.shape == jacobian.shape[:1], lambda: f"leak must have shape [K], got {leak.shape}")
    torch._check(leak.dtype == jacobian.dtype, lambda: f"leak is {leak.dtype}, jacobian {jacobian.dtype}")
    return jacobian.new_empty(jacobian.shape[1:])
