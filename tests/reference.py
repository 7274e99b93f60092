"""Float64 pure-Python references of the affinity rules, written from docs/algorithm.md.

Independent of the extension: plain loops over Python floats, the way the paper and
the public reference code state the rules. Other test files may import these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def _positive_finite(x: float) -> bool:
    return math.isfinite(x) and x > 0.0


def affinity_update_reference(
    affinity: Sequence[Sequence[float]] | torch.Tensor,
    before: Sequence[float] | torch.Tensor,
    after: Sequence[float] | torch.Tensor,
    group: Sequence[int],
    decay: float,
) -> torch.Tensor:
    """One proximal-affinity update (docs/algorithm.md §Affinity update) as a float64 K×K tensor (input untouched)."""
    A = torch.as_tensor(affinity, dtype=torch.float64).tolist()
    before = [float(x) for x in torch.as_tensor(before, dtype=torch.float64).tolist()]
    after = [float(x) for x in torch.as_tensor(after, dtype=torch.float64).tolist()]
    members = set(int(g) for g in group)
    n = len(members)
    K = len(before)

    def rate(task: int) -> float:
        with np.errstate(all="ignore"):
            return float((1.0 - np.float64(after[task]) / np.float64(before[task])) / n)

    for s in sorted(members):
        for t in range(K):
            if not _positive_finite(before[t]):
                continue
            r_t = rate(t)
            if t in members:
                if not _positive_finite(before[s]):
                    continue
                r_s = rate(s)
                if not (math.isfinite(r_t) and math.isfinite(r_s)):
                    continue
                if s == t:
                    if r_t < 0:
                        continue
                    value = r_t
                elif r_t * r_s >= 0:
                    value = r_t
                else:
                    value = -max(r_t, r_s)
            else:
                if not math.isfinite(r_t):
                    continue
                value = r_t
            updated = (1.0 - decay) * A[s][t] + decay * value
            if math.isfinite(updated):
                A[s][t] = updated
    return torch.tensor(A, dtype=torch.float64)


def group_similarity_reference(affinity: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    """(N + Nᵀ)/2 with N[i, j] = A[i, j] / A[j, j]; a column with a diagonal that is not
    positive finite is a zero column, a non-finite ratio is 0 (docs/algorithm.md §Similarity)."""
    A = torch.as_tensor(affinity, dtype=torch.float64).tolist()
    K = len(A)
    N = [[0.0] * K for _ in range(K)]
    for j in range(K):
        if not _positive_finite(A[j][j]):
            continue
        for i in range(K):
            with np.errstate(all="ignore"):
                ratio = float(np.float64(A[i][j]) / np.float64(A[j][j]))
            N[i][j] = ratio if math.isfinite(ratio) else 0.0
    return torch.tensor([[0.5 * N[i][j] + 0.5 * N[j][i] for j in range(K)] for i in range(K)], dtype=torch.float64)


def sklearn_labels(similarity: np.ndarray | torch.Tensor, **options) -> np.ndarray:
    """scikit-learn's AffinityPropagation(affinity="precomputed", random_state=0) labels."""
    import warnings

    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    S = similarity.detach().cpu().numpy() if isinstance(similarity, torch.Tensor) else np.asarray(similarity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        return AffinityPropagation(affinity="precomputed", random_state=0, **options).fit(S).labels_


def partition(labels: Sequence[int] | np.ndarray | torch.Tensor) -> frozenset[frozenset[int]]:
    """The set of clusters a labelling describes (labels compared up to renaming)."""
    labels = [int(x) for x in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    return frozenset(frozenset(i for i, x in enumerate(labels) if x == value) for value in set(labels))
