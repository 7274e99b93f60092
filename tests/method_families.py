"""The input families of the gradient methods' property harness (tests/test_weighting_properties.py) and of
benchmarks/method_exactness.py: seeded K×P task-gradient matrices J in float64, named by what makes them hard.

Stationarity is TorchJD's vocabulary (its aggregation tests): J is *strongly stationary* when some w > 0 has
wᵀJ = 0 (zero in the relative interior of the rows' convex hull), *weakly stationary* when some w ≥ 0, w ≠ 0
does, *non-weakly stationary* when none does (then a direction d with J d > 0 exists). The matrices are built
here so that they have the property by construction (not by chance):

* ``typical``: a random rank-r matrix (r = min(K, P): full rank), singular values in [0.5, 2];
* ``rank_deficient``: rank 1 and rank 3 with K = 20 > P = 10 (more tasks than directions; built strongly
  stationary, as 20 random rows in three dimensions almost always are);
* ``strong_stationary``: every column orthogonal to a positive v, so vᵀJ = 0;
* ``weak_stationary``: a strongly stationary block of tasks S and the others with a positive component along a
  direction S does not touch (so w ≥ 0 with wᵀJ = 0 must vanish outside S: weakly, not strongly stationary);
* ``non_weak_stationary``: the left singular vector of the largest singular value positive, so that wᵀJ ≠ 0
  for every w ≥ 0, w ≠ 0 (rank r ≤ K may still be below K);
* ``duplicate_rows`` (row 1 and the last equal row 0), ``zero_row`` (row 1 zero), ``all_zero``;
* ``norm_ratio``: the issue's badly scaled input, a full-rank J with row 0 scaled by s and row 1 by 1/√s
  (κ(G) grows like s³).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


def _orthonormal(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """A random rows×columns matrix with orthonormal columns (columns ≤ rows)."""
    q, r = np.linalg.qr(rng.standard_normal((rows, columns)))
    return q * np.sign(np.diagonal(r))


def _complement(rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    """Random orthonormal columns spanning the orthogonal complement of ``basis``'s (orthonormal) columns."""
    rows, known = basis.shape
    draws = rng.standard_normal((rows, rows - known))
    return _orthonormal(rng, rows, rows - known) if known == 0 else np.linalg.qr(draws - basis @ (basis.T @ draws))[0]


def _with_left_basis(rng: np.random.Generator, left: np.ndarray, columns: int) -> np.ndarray:
    """U S Vᵀ with the given orthonormal U (K×r), random singular values in [0.5, 2] and random V (P×r)."""
    rank = left.shape[1]
    return left @ np.diag(rng.uniform(0.5, 2.0, rank)) @ _orthonormal(rng, columns, rank).T


def typical(rng: np.random.Generator, tasks: int, columns: int, rank: int) -> np.ndarray:
    return _with_left_basis(rng, _orthonormal(rng, tasks, rank), columns)


def strong_stationary(rng: np.random.Generator, tasks: int, columns: int, rank: int) -> np.ndarray:
    positive = rng.uniform(0.2, 1.0, (tasks, 1))
    positive /= np.linalg.norm(positive)
    return _with_left_basis(rng, _complement(rng, positive)[:, :rank], columns)


def non_weak_stationary(rng: np.random.Generator, tasks: int, columns: int, rank: int) -> np.ndarray:
    positive = rng.uniform(0.2, 1.0, (tasks, 1))
    positive /= np.linalg.norm(positive)
    left = np.hstack([positive, _complement(rng, positive)])[:, :rank]
    # The positive left vector gets the largest singular value: wᵀJ has a non-zero component along it.
    return left @ np.diag(np.r_[2.0, rng.uniform(0.5, 1.5, rank - 1)]) @ _orthonormal(rng, columns, rank).T


def weak_stationary(rng: np.random.Generator, tasks: int, columns: int, rank: int) -> np.ndarray:
    stationary = max(2, tasks // 2)  # |S| ≥ 2 (a strongly stationary block), at least one task outside S
    inner = strong_stationary(rng, stationary, columns - 1, min(rank, stationary - 1))
    outside = typical(rng, tasks - stationary, columns - 1, min(tasks - stationary, columns - 1))
    lifted = rng.uniform(0.5, 1.5, (tasks - stationary, 1))  # > 0 along the last column, which S leaves at 0
    J = np.block([[inner, np.zeros((stationary, 1))], [outside, lifted]])
    return J[rng.permutation(tasks)] @ _orthonormal(rng, columns, columns).T


@dataclass(frozen=True)
class Case:
    """One input: a family, K, a seed and the family's parameter (a rank or a norm ratio)."""

    family: str
    tasks: int
    seed: int = 0
    parameter: float = 0.0

    @property
    def id(self) -> str:
        parameter = f"-{self.parameter:g}" if self.parameter else ""
        return f"{self.family}{parameter}-K{self.tasks}-seed{self.seed}"

    @property
    def well_conditioned(self) -> bool:
        """Whether float32 resolves it: norm ratios up to 10 (κ(G) ≈ 1e3 at most)."""
        return self.family != "norm_ratio" or self.parameter <= 10

    def jacobian(self) -> np.ndarray:
        """The float64 K×P matrix (a fresh copy of a cached one)."""
        return _jacobian(self).copy()


def _columns(tasks: int) -> int:
    return 2 * tasks + 3  # P > K: full rank is possible


def _build(case: Case, rng: np.random.Generator) -> np.ndarray:
    K, P = case.tasks, _columns(case.tasks)
    family = case.family
    if family == "typical":
        return typical(rng, K, P, K)
    if family == "rank_deficient":
        return strong_stationary(rng, K, K // 2, int(case.parameter))
    if family == "strong_stationary":
        return strong_stationary(rng, K, P, K - 1)
    if family == "weak_stationary":
        return weak_stationary(rng, K, P, K - 1)
    if family == "non_weak_stationary":
        return non_weak_stationary(rng, K, P, max(1, K // 2))
    if family == "duplicate_rows":
        J = typical(rng, K, P, K)
        J[1] = J[-1] = J[0]
        return J
    if family == "zero_row":
        J = typical(rng, K, P, K)
        J[1] = 0
        return J
    if family == "all_zero":
        return np.zeros((K, P))
    if family == "norm_ratio":
        J = typical(rng, K, P, K)
        J[0] *= case.parameter
        J[1] /= np.sqrt(case.parameter)
        return J
    raise ValueError(f"unknown family {family!r}")


#: The smallest K of each family (a K = 1 matrix is typical or zero; stationarity needs two tasks, weak three).
MIN_TASKS: dict[str, int] = {
    "typical": 1,
    "all_zero": 1,
    "rank_deficient": 20,
    "strong_stationary": 2,
    "weak_stationary": 3,
    "non_weak_stationary": 2,
    "duplicate_rows": 3,
    "zero_row": 2,
    "norm_ratio": 2,
}
#: Families whose rows admit no w ≥ 0, w ≠ 0 with wᵀJ = 0 (a direction improving every task exists).
NON_STATIONARY: frozenset[str] = frozenset({"typical", "non_weak_stationary", "duplicate_rows", "norm_ratio"})
#: Families with zero in the rows' convex hull.
STATIONARY: frozenset[str] = frozenset(
    {"rank_deficient", "strong_stationary", "weak_stationary", "zero_row", "all_zero"}
)


@functools.cache
def _jacobian(case: Case) -> np.ndarray:
    rng = np.random.default_rng([case.seed, case.tasks, sorted(MIN_TASKS).index(case.family)])
    J = _build(case, rng)
    J.setflags(write=False)
    return J


def cases(tasks: tuple[int, ...], seeds: tuple[int, ...], ratios: tuple[float, ...]) -> list[Case]:
    """Every family at every K it exists for (``rank_deficient`` at its own K = 20, ranks 1 and 3), every seed."""
    out: list[Case] = []
    for family, smallest in MIN_TASKS.items():
        if family == "rank_deficient":
            out += [Case(family, 20, seed, rank) for rank in (1.0, 3.0) for seed in seeds]
            continue
        for K in tasks:
            if K < smallest:
                continue
            parameters = ratios if family == "norm_ratio" else (0.0,)
            out += [Case(family, K, seed, parameter) for parameter in parameters for seed in seeds]
    return out
