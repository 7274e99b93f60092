"""Fused ops of selgroup_fast: thin typed wrappers over ``torch.ops.selgroup_fast``.

Each op's schema is defined once in ``csrc/ops.cpp``; the CPU and CUDA kernels live
in ``csrc/cpu`` and ``csrc/cuda``; the fake (meta) kernels registered here let the
ops run under ``torch.compile`` and ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library and registers the ops)

__all__ = ["affinity_propagation", "affinity_update_", "cuda_available", "group_similarity"]


def cuda_available() -> bool:
    """Whether this build of the extension contains the CUDA kernels."""
    return bool(torch.ops.selgroup_fast.cuda_available())


# ---- proximal inter-task affinity and grouping (algorithm.md) ----


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
    two messages tie to within rounding (summation order differs).

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
        similarity, None if preference is None else float(preference), float(damping), int(max_iter),
        int(convergence_iter)
    )


@torch.library.register_fake("selgroup_fast::affinity_update_")
def _affinity_update_fake(
    affinity: torch.Tensor, before: torch.Tensor, after: torch.Tensor, group_mask: torch.Tensor, decay: float
) -> None:
    return None


@torch.library.register_fake("selgroup_fast::group_similarity")
def _group_similarity_fake(affinity: torch.Tensor) -> torch.Tensor:
    torch._check(affinity.dim() == 2 and affinity.shape[0] == affinity.shape[1], lambda: "affinity must be K×K")
    return affinity.new_empty(affinity.shape)


@torch.library.register_fake("selgroup_fast::affinity_propagation")
def _affinity_propagation_fake(
    similarity: torch.Tensor,
    preference: float | None = None,
    damping: float = 0.5,
    max_iter: int = 200,
    convergence_iter: int = 15,
) -> torch.Tensor:
    torch._check(similarity.dim() == 2 and similarity.shape[0] == similarity.shape[1], lambda: "similarity must be K×K")
    return similarity.new_empty(similarity.shape[:1], dtype=torch.int64)
