"""affinity_propagation at large K (from 128: the CPU's vectorised loops, selection median, column sums by blocks of
rows and its OpenMP team) against scikit-learn's partition, and the OpenMP team against the serial one bit for bit.
The default suite runs a few matrices; ``-m slow`` many more."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import partition, sklearn_labels
from test_affinity_propagation import _affinity_similarity, _points_similarity

from selgroup_fast import ops


def _similarities(seed: int, K: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(_points_similarity, _affinity_similarity)[i % 2](rng, K) for i in range(count)]


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


def _check_openmp_team(K: int, dtype: torch.dtype, count: int, max_iter: int) -> None:
    similarities = [torch.from_numpy(S).to(dtype) for S in _similarities(7, K, count)]
    threads = torch.get_num_threads()

    def labels() -> list[torch.Tensor]:
        return [
            ops.affinity_propagation(S, preference=p, max_iter=max_iter, convergence_iter=2)
            for S in similarities
            for p in (None, -40.0)
        ]

    try:
        torch.set_num_threads(1)
        serial = labels()
        torch.set_num_threads(2)
        team = labels()
    finally:
        torch.set_num_threads(threads)
    assert any(len(set(s.tolist())) > 1 for s in serial)  # real clusterings, not only the all −1 answer
    for a, b in zip(serial, team, strict=False):
        assert torch.equal(a, b)


def test_openmp_team_matches_the_serial_one() -> None:
    # From K = 128 the CPU runs affinity propagation on an OpenMP team (a worker per block of 64 rows) when torch has
    # threads for it; the labels must be those of the one-thread run, for both median paths (median and given
    # preference). With few iterations the labels come from unconverged messages, which must agree all the same.
    _check_openmp_team(256, torch.float64, count=1, max_iter=30)


@pytest.mark.slow
@pytest.mark.parametrize("K", [128, 512, 1024])
def test_openmp_team_matches_the_serial_one_many(K: int, dtype: torch.dtype) -> None:
    _check_openmp_team(K, dtype, count=2, max_iter=60)
