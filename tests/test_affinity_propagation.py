"""affinity_propagation against scikit-learn's AffinityPropagation(affinity="precomputed")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import group_similarity_reference, partition, sklearn_labels

from selgroup_fast import ops

cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.cuda_available()), reason="needs a GPU and the CUDA kernels"
)


def _points_similarity(rng: np.random.Generator, K: int) -> np.ndarray:
    """Negative squared distances of random points in a few blobs."""
    centres = rng.normal(scale=4.0, size=(rng.integers(1, 5), 2))
    points = centres[rng.integers(0, len(centres), K)] + rng.normal(size=(K, 2))
    return -((points[:, None] - points[None]) ** 2).sum(-1)


def _affinity_similarity(rng: np.random.Generator, K: int) -> np.ndarray:
    """group_similarity of a random affinity shaped like a tracked one (positive diagonal)."""
    A = rng.normal(scale=1e-3, size=(K, K))
    np.fill_diagonal(A, rng.uniform(1e-4, 2e-3, K))
    return group_similarity_reference(A).numpy()


def _random_similarities(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    make = (_points_similarity, _affinity_similarity)
    return [make[i % 2](rng, int(rng.integers(2, 65))) for i in range(count)]


def _check_labels(labels: torch.Tensor, K: int) -> None:
    assert labels.dtype == torch.int64 and labels.shape == (K,)
    values = labels.tolist()
    if values[0] < 0:
        assert all(v == -1 for v in values)
        return
    seen: list[int] = []
    for v in values:  # numbered 0..M-1 by first appearance
        if v not in seen:
            assert v == len(seen)
            seen.append(v)


def test_matches_sklearn_on_random_matrices(dtype: torch.dtype) -> None:
    similarities = _random_similarities(seed=10, count=220)
    mismatches = []
    for S in similarities:
        S = S.astype(np.float32) if dtype == torch.float32 else S
        ours = ops.affinity_propagation(torch.from_numpy(S.copy()))
        _check_labels(ours, len(S))
        if partition(ours) != partition(sklearn_labels(S)):
            mismatches.append(len(S))
    assert mismatches == []


@pytest.mark.parametrize(
    "options",
    [
        dict(preference=-5.0),
        dict(damping=0.9),
        dict(convergence_iter=50),
        dict(max_iter=5),
        dict(preference=-50.0, damping=0.7, convergence_iter=3),
    ],
)
def test_matches_sklearn_with_options(options: dict) -> None:
    for S in _random_similarities(seed=11, count=30):
        ours = ops.affinity_propagation(torch.from_numpy(S.copy()), **options)
        _check_labels(ours, len(S))
        assert partition(ours) == partition(sklearn_labels(S, **options)), options


def test_hand_checked_blobs() -> None:
    points = torch.tensor(
        [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0], [10.1, 10.0], [-10.0, 10.0]], dtype=torch.float64
    )
    S = -(torch.cdist(points, points) ** 2)
    assert ops.affinity_propagation(S).tolist() == [0, 0, 0, 1, 1, 2]


def test_no_exemplar_gives_all_minus_one() -> None:
    # A one-iteration run before any exemplar appears (scikit-learn agrees: no centres).
    found = 0
    for S in _random_similarities(seed=12, count=40):
        reference = sklearn_labels(S, max_iter=1, preference=float(S.min()) * 10)
        ours = ops.affinity_propagation(torch.from_numpy(S.copy()), preference=float(S.min()) * 10, max_iter=1)
        assert partition(ours) == partition(reference)
        if (reference == -1).all():
            found += 1
            assert ours.tolist() == [-1] * len(S)
    assert found > 0


@pytest.mark.parametrize("K", [2, 3, 7])
def test_equal_similarities_special_case(K: int) -> None:
    S = torch.full((K, K), -1.0, dtype=torch.float64)
    S.fill_diagonal_(0.0)
    # preference = median: -0.5 for K = 2 (above S[0, K-1] = -1: own clusters), else -1 (not above: one cluster).
    assert ops.affinity_propagation(S).tolist() == (list(range(K)) if K == 2 else [0] * K)
    # A preference above the common similarity: every sample its own cluster.
    assert ops.affinity_propagation(S, preference=0.5).tolist() == list(range(K))
    for pref in (None, 0.5, -3.0):
        assert partition(ops.affinity_propagation(S, preference=pref)) == partition(
            sklearn_labels(S.numpy(), preference=pref)
        )
    # The all-zero similarity of an untrained affinity: one group.
    assert ops.affinity_propagation(torch.zeros(K, K)).tolist() == [0] * K


def test_single_sample() -> None:
    assert ops.affinity_propagation(torch.tensor([[3.0]])).tolist() == [0]
    assert ops.affinity_propagation(torch.tensor([[3.0]], dtype=torch.float64), preference=-1.0).tolist() == [0]


def test_non_contiguous_input_is_read_correctly() -> None:
    S = _random_similarities(seed=13, count=1)[0]
    asymmetric = S + np.triu(np.ones_like(S)) * 0.5  # transposing changes the answer's input
    transposed = torch.from_numpy(asymmetric.copy()).t()
    assert not transposed.is_contiguous()
    assert partition(ops.affinity_propagation(transposed)) == partition(sklearn_labels(asymmetric.T.copy()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("K", [1, 4, 256])  # 256: the OpenMP team's path
def test_non_finite_similarity_raises_on_cpu(bad: float, K: int) -> None:
    S = torch.zeros(K, K)
    S[K - 1, K // 2] = bad
    with pytest.raises(ValueError, match=rf"similarity must be finite, got .* at \({K - 1}, {K // 2}\)"):
        ops.affinity_propagation(S)


def test_no_exemplar_answers_all_minus_one_without_raising() -> None:
    # All −1 is also the kernel's answer to a non-finite entry, which the CPU binding
    # then looks for: a finite input with no exemplar must come back as it is.
    S = -torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    assert ops.affinity_propagation(S, preference=-1e6, max_iter=1).tolist() == [-1] * 6


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(damping=0.4), "damping"),
        (dict(damping=1.0), "damping"),
        (dict(max_iter=0), "max_iter"),
        (dict(max_iter=2**31), "max_iter"),
        (dict(convergence_iter=0), "convergence_iter"),
        (dict(preference=float("nan")), "preference"),
    ],
)
def test_rejects_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.affinity_propagation(torch.zeros(3, 3), **options)


@pytest.mark.parametrize(
    "similarity, match",
    [
        (torch.zeros(2, 3), "square"),
        (torch.zeros(0, 0), "at least one"),
        (torch.zeros(3, 3, dtype=torch.int64), "float32"),
        (torch.zeros(4), "2-D"),
    ],
)
def test_rejects_bad_similarity(similarity, match) -> None:
    with pytest.raises(RuntimeError, match=match):
        ops.affinity_propagation(similarity)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_opcheck(device: str, dtype: torch.dtype) -> None:
    S = torch.from_numpy(_random_similarities(seed=14, count=1)[0]).to(dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.selgroup_fast.affinity_propagation.default, (S, None, 0.5, 200, 15))
    torch.library.opcheck(torch.ops.selgroup_fast.affinity_propagation.default, (S, -3.0, 0.7, 100, 20))


def test_under_torch_compile() -> None:
    S = torch.from_numpy(_random_similarities(seed=15, count=1)[0])
    compiled = torch.compile(
        lambda s: ops.affinity_propagation(s, convergence_iter=50), fullgraph=True, backend="eager"
    )
    assert torch.equal(compiled(S), ops.affinity_propagation(S, convergence_iter=50))


@cuda_only
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(16)
    sizes = [2, 3, 11, 33, 64, 100, 256, 300]
    for K in sizes:
        S = torch.from_numpy(_points_similarity(rng, K)).to(dtype)
        for options in (dict(), dict(preference=float(S.min()), damping=0.8, convergence_iter=50)):
            assert partition(ops.affinity_propagation(S.cuda(), **options).cpu()) == partition(
                ops.affinity_propagation(S, **options)
            ), (K, options)


@cuda_only
def test_cuda_non_finite_gives_all_minus_one() -> None:
    S = torch.zeros(5, 5, device="cuda")
    S[2, 3] = float("nan")
    assert ops.affinity_propagation(S).tolist() == [-1] * 5
