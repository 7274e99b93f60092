"""affinity_propagation at large K (128, 256: the CPU's vectorised loops, selection median and OpenMP team) against
scikit-learn's partition, and the OpenMP team against the serial one bit for bit. The default suite runs a few
matrices; ``-m slow`` many more."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import group_similarity_reference, partition, sklearn_labels
from selgroup_fast import ops


def _blobs_similarity(rng: np.random.Generator, K: int) -> np.ndarray:
    """Negative squared distances of K points in a few Gaussian blobs."""
    centres = rng.normal(scale=6.0, size=(rng.integers(2, 8), 2))
    points = centres[rng.integers(0, len(centres), K)] + rng.normal(size=(K, 2))
    return -((points[:, None] - points[None]) ** 2).sum(-1)


def _affinity_similarity(rng: np.random.Generator, K: int) -> np.ndarray:
    """group_similarity of a random affinity shaped like a tracked one (positive diagonal)."""
    A = rng.normal(scale=1e-3, size=(K, K))
    np.fill_diagonal(A, rng.uniform(1e-4, 2e-3, K))
    return group_similarity_reference(A).numpy()


def _similarities(seed: int, K: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(_blobs_similarity, _affinity_similarity)[i % 2](rng, K) for i in range(count)]


def _check_against_sklearn(K: int, count: int, seed: int) -> None:
    for S in _similarities(seed, K, count):
        for options in ({}, {"convergence_iter": 50}):
            ours = ops.affinity_propagation(torch.from_numpy(S.copy()), **options)
            assert partition(ours) == partition(sklearn_labels(S, **options)), (K, options)


@pytest.mark.parametrize("K", [128, 256])
def test_large_k_matches_sklearn(K: int) -> None:
    _check_against_sklearn(K, count=1, seed=K)


@pytest.mark.slow
@pytest.mark.parametrize("K", [100, 128, 200, 256])
def test_large_k_matches_sklearn_many(K: int) -> None:
    _check_against_sklearn(K, count=12, seed=1000 + K)


@pytest.mark.parametrize("K", [256, 384])
def test_openmp_team_matches_the_serial_one(K: int, dtype: torch.dtype) -> None:
    # From K = 256 the CPU runs affinity propagation on an OpenMP team when torch has threads for it; the labels
    # must be those of the one-thread run, for both median paths (median and given preference).
    similarities = [torch.from_numpy(S).to(dtype) for S in _similarities(7, K, 2)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = [ops.affinity_propagation(S, preference=p) for S in similarities for p in (None, -40.0)]
        torch.set_num_threads(2)
        team = [ops.affinity_propagation(S, preference=p) for S in similarities for p in (None, -40.0)]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, team):
        assert torch.equal(a, b)
