"""affinity_update_ and group_similarity against the float64 references of reference.py."""

from __future__ import annotations

import math

import pytest
import torch
from reference import affinity_update_reference, group_similarity_reference

from selgroup_fast import ops

cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.cuda_available()), reason="needs a GPU and the CUDA kernels"
)


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}


def _random_losses(generator: torch.Generator, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive losses whose changes have mixed signs, so that every sign rule fires."""
    before = torch.rand(K, generator=generator, dtype=torch.float64) * 2 + 0.1
    after = before * (1 + 0.5 * torch.randn(K, generator=generator, dtype=torch.float64)).clamp_min(0.05)
    return before, after


def _random_group(generator: torch.Generator, K: int) -> list[int]:
    size = int(torch.randint(1, K + 1, (1,), generator=generator))
    return sorted(torch.randperm(K, generator=generator)[:size].tolist())


def _mask(group: list[int], K: int, device: str) -> torch.Tensor:
    mask = torch.zeros(K, dtype=torch.bool)
    mask[group] = True
    return mask.to(device)


# ---- affinity_update_ ----


def test_affinity_update_hand_computed() -> None:
    # Group {0, 1} (n = 2): r = (1 - after/before) / 2 = [0.25, -0.5, 0.1].
    A = torch.zeros(3, 3, dtype=torch.float64)
    before = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    after = torch.tensor([0.5, 2.0, 0.8], dtype=torch.float64)
    ops.affinity_update_(A, before, after, torch.tensor([True, True, False]), 0.5)
    expected = torch.tensor(
        [
            [0.5 * 0.25, 0.5 * -0.25, 0.5 * 0.1],  # (0,1): opposite signs -> -max(-0.5, 0.25)
            [0.5 * -0.25, 0.0, 0.5 * 0.1],  # (1,1): r = -0.5 < 0 -> self-affinity skipped
            [0.0, 0.0, 0.0],  # task 2 is not a source
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(A, expected, rtol=0, atol=1e-15)


def test_affinity_update_matches_reference_on_random_sequences(device: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    for K in (1, 2, 3, 5, 11, 17):
        A = torch.zeros(K, K, dtype=torch.float64)
        ours = A.to(device, dtype)
        for _ in range(30):
            before, after = _random_losses(generator, K)
            group = _random_group(generator, K)
            A = affinity_update_reference(A, before, after, group, 0.3)
            ops.affinity_update_(ours, before.to(device, dtype), after.to(device, dtype), _mask(group, K, device), 0.3)
        torch.testing.assert_close(ours.cpu().double(), A, **_tolerance(dtype))
        assert (ours.diagonal() >= 0).all(), "self-affinity must never go negative"


@pytest.mark.parametrize(
    "before, after, group",
    [
        # zero, negative, NaN and inf `before`: those targets (and intra pairs with such sources) are skipped
        ([0.0, 1.0, -1.0, 1.0], [1.0, 0.5, 0.5, 2.0], [0, 1]),
        ([float("nan"), 1.0, 2.0, 1.0], [1.0, 0.5, 0.5, 2.0], [0, 1, 3]),
        ([float("inf"), 1.0, 2.0, 1.0], [1.0, 0.5, 0.5, 2.0], [0, 2]),
        # NaN / inf `after`: the pair's value would be non-finite
        ([1.0, 1.0, 2.0, 1.0], [float("nan"), 0.5, float("inf"), 2.0], [0, 1, 2]),
        # tiny `before`: the ratio overflows
        ([1e-300, 1.0, 2.0, 1.0], [1e300, 0.5, 0.5, 2.0], [0, 1]),
        # singleton and full groups, all losses falling / rising
        ([1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0], [2]),
        ([1.0, 2.0, 3.0, 4.0], [1.5, 3.0, 0.5, 2.0], [0, 1, 2, 3]),
        ([1.0, 2.0, 3.0, 4.0], [1.5, 3.0, 4.5, 6.0], [0, 1, 2, 3]),
    ],
)
def test_affinity_update_rule_branches(device: str, dtype: torch.dtype, before, after, group) -> None:
    start = torch.linspace(-0.3, 0.4, 16, dtype=torch.float64).reshape(4, 4)
    expected = affinity_update_reference(start, before, after, group, 0.25)
    A = start.to(device, dtype)
    ops.affinity_update_(
        A,
        torch.tensor(before, dtype=dtype, device=device),
        torch.tensor(after, dtype=dtype, device=device),
        _mask(group, 4, device),
        0.25,
    )
    assert torch.isfinite(A).all()
    if dtype == torch.float64 or all(math.isfinite(x) and 1e-30 < abs(x) < 1e30 for x in before + after):
        torch.testing.assert_close(A.cpu().double(), expected, **_tolerance(dtype))
    # Rows of tasks outside the group never change.
    outside = [k for k in range(4) if k not in group]
    torch.testing.assert_close(A.cpu().double()[outside], start.to(dtype).double()[outside], rtol=0, atol=0)


def test_affinity_update_empty_group_is_a_no_op(device: str) -> None:
    A = torch.randn(4, 4, device=device)
    copy = A.clone()
    ops.affinity_update_(
        A,
        torch.ones(4, device=device),
        torch.full((4,), 0.5, device=device),
        torch.zeros(4, dtype=torch.bool, device=device),
        0.1,
    )
    assert torch.equal(A, copy)


def test_affinity_update_non_contiguous(device: str) -> None:
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(5, 5, dtype=torch.float64, generator=generator)
    before, after = _random_losses(generator, 5)
    group = [1, 3]
    expected = affinity_update_reference(base, before, after, group, 0.2)
    # A transposed affinity and strided loss / mask views.
    A = base.t().contiguous().t().to(device)
    assert not A.is_contiguous()
    wide_before = torch.stack([before, before]).t().to(device)
    wide_after = torch.stack([after, after]).t().to(device)
    wide_mask = torch.stack([_mask(group, 5, "cpu")] * 2).t().to(device)
    ops.affinity_update_(A, wide_before[:, 0], wide_after[:, 1], wide_mask[:, 0], 0.2)
    torch.testing.assert_close(A.cpu(), expected, rtol=1e-12, atol=1e-14)
    # A strided sub-view updates only its own entries.
    big = torch.zeros(10, 10, dtype=torch.float64, device=device)
    ops.affinity_update_(big[::2, ::2], before.to(device), after.to(device), _mask(group, 5, device), 0.2)
    torch.testing.assert_close(
        big[::2, ::2].cpu(), affinity_update_reference(torch.zeros(5, 5), before, after, group, 0.2)
    )
    assert big[1::2].abs().sum() == 0 and big[:, 1::2].abs().sum() == 0


@pytest.mark.parametrize("decay", [0.0, -0.1, 1.5, float("nan")])
def test_affinity_update_rejects_bad_decay(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        ops.affinity_update_(torch.zeros(2, 2), torch.ones(2), torch.ones(2), torch.ones(2, dtype=torch.bool), decay)


def test_affinity_update_decay_one_replaces() -> None:
    A = torch.full((2, 2), 7.0)
    ops.affinity_update_(A, torch.ones(2), torch.tensor([0.5, 0.75]), torch.tensor([True, False]), 1.0)
    torch.testing.assert_close(A, torch.tensor([[0.5, 0.25], [7.0, 7.0]]))


@pytest.mark.parametrize(
    "affinity, before, after, mask, match",
    [
        (torch.zeros(3, 2), torch.ones(3), torch.ones(3), torch.ones(3, dtype=torch.bool), "square"),
        (torch.zeros(0, 0), torch.ones(0), torch.ones(0), torch.ones(0, dtype=torch.bool), "at least one"),
        (
            torch.zeros(3, 3, dtype=torch.int32),
            torch.ones(3),
            torch.ones(3),
            torch.ones(3, dtype=torch.bool),
            "float32",
        ),
        (torch.zeros(3, 3), torch.ones(4), torch.ones(3), torch.ones(3, dtype=torch.bool), "before"),
        (torch.zeros(3, 3), torch.ones(3), torch.ones(3, 1), torch.ones(3, dtype=torch.bool), "after"),
        (
            torch.zeros(3, 3),
            torch.ones(3, dtype=torch.float64),
            torch.ones(3),
            torch.ones(3, dtype=torch.bool),
            "before",
        ),
        (torch.zeros(3, 3), torch.ones(3), torch.ones(3), torch.ones(3), "bool"),
        (torch.zeros(3, 3), torch.ones(3), torch.ones(3), torch.ones(2, dtype=torch.bool), "group_mask"),
        (torch.zeros(1, 3).expand(3, 3), torch.ones(3), torch.ones(3), torch.ones(3, dtype=torch.bool), "overlapping"),
    ],
)
def test_affinity_update_rejects_bad_inputs(affinity, before, after, mask, match) -> None:
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.affinity_update_(affinity, before, after, mask, 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_affinity_update_rejects_mixed_devices() -> None:
    with pytest.raises(RuntimeError, match="device|cuda"):
        ops.affinity_update_(
            torch.zeros(2, 2), torch.ones(2, device="cuda"), torch.ones(2), torch.ones(2, dtype=torch.bool), 0.1
        )


def test_affinity_update_k1() -> None:
    A = torch.zeros(1, 1, dtype=torch.float64)
    ops.affinity_update_(
        A, torch.tensor([2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), torch.tensor([True]), 0.5
    )
    assert A.item() == 0.25


# ---- group_similarity ----


def test_group_similarity_hand_computed() -> None:
    A = torch.tensor([[2.0, 1.0, 3.0], [-1.0, 4.0, 0.5], [5.0, 2.0, 0.0]], dtype=torch.float64)
    # Column 2 has a zero diagonal: a zero column. N = [[1, .25, 0], [-.5, 1, 0], [2.5, .5, 0]].
    expected = torch.tensor([[1.0, -0.125, 1.25], [-0.125, 1.0, 0.25], [1.25, 0.25, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ops.group_similarity(A), expected, rtol=0, atol=1e-15)


def test_group_similarity_matches_reference(device: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    for K in (1, 2, 5, 11, 32):
        A = torch.randn(K, K, generator=generator, dtype=torch.float64) * 0.01
        A.diagonal().copy_(torch.rand(K, generator=generator, dtype=torch.float64) * 0.02)
        A[0, 0] = 0.0  # a zero diagonal
        if K > 2:
            A[1, 1] = -0.01  # a negative diagonal (a loaded state)
            A[2, 0] = float("nan")
            A[0, 2] = float("inf")
        S = ops.group_similarity(A.to(device, dtype))
        assert S.dtype == dtype and S.device.type == device and S.shape == (K, K)
        assert torch.isfinite(S).all()
        torch.testing.assert_close(S, S.t(), rtol=0, atol=0)
        torch.testing.assert_close(S.cpu().double(), group_similarity_reference(A.to(dtype)), **_tolerance(dtype))


def test_group_similarity_zero_affinity_and_extremes() -> None:
    assert torch.equal(ops.group_similarity(torch.zeros(4, 4)), torch.zeros(4, 4))
    # Ratios that overflow become 0; the halves cannot overflow when added.
    A = torch.tensor([[1e-30, 3e38], [3e38, 1e-30]])
    S = ops.group_similarity(A)
    assert torch.isfinite(S).all() and S[0, 1] == 0
    big = torch.tensor([[1.0, 3e38], [3e38, 1.0]])
    torch.testing.assert_close(ops.group_similarity(big)[0, 1], torch.tensor(3e38))


def test_group_similarity_non_contiguous(dtype: torch.dtype) -> None:
    A = torch.rand(6, 6, dtype=dtype) + torch.eye(6, dtype=dtype)
    torch.testing.assert_close(ops.group_similarity(A.t()), ops.group_similarity(A.t().contiguous()))


@pytest.mark.parametrize(
    "affinity, match",
    [
        (torch.zeros(2, 3), "square"),
        (torch.zeros(3), "2-D"),
        (torch.zeros(0, 0), "at least one"),
        (torch.zeros(2, 2, dtype=torch.half), "float32"),
    ],
)
def test_group_similarity_rejects_bad_inputs(affinity, match) -> None:
    with pytest.raises(RuntimeError, match=match):
        ops.group_similarity(affinity)


# ---- opcheck, compile, CUDA agreement ----


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_opcheck(device: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(4)
    before, after = _random_losses(generator, 5)
    torch.library.opcheck(
        torch.ops.selgroup_fast.affinity_update_.default,
        (
            torch.randn(5, 5, dtype=dtype, device=device),
            before.to(dtype).to(device),
            after.to(dtype).to(device),
            _mask([0, 2], 5, device),
            0.1,
        ),
    )
    torch.library.opcheck(
        torch.ops.selgroup_fast.group_similarity.default, (torch.rand(5, 5, dtype=dtype, device=device),)
    )


def test_group_similarity_under_torch_compile() -> None:
    A = torch.rand(6, 6) + torch.eye(6)
    compiled = torch.compile(lambda a: ops.group_similarity(a) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(A), ops.group_similarity(A) * 2)


@cuda_only
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    for K in (3, 11, 40, 300):
        A_cpu = torch.randn(K, K, generator=generator, dtype=dtype) * 0.1
        A_cuda = A_cpu.cuda()
        for _ in range(5):
            before, after = _random_losses(generator, K)
            before[0] = float("nan")
            mask = _mask(_random_group(generator, K), K, "cpu")
            ops.affinity_update_(A_cpu, before.to(dtype), after.to(dtype), mask, 0.1)
            ops.affinity_update_(A_cuda, before.to(dtype).cuda(), after.to(dtype).cuda(), mask.cuda(), 0.1)
        torch.testing.assert_close(A_cuda.cpu(), A_cpu, **_tolerance(dtype))
        torch.testing.assert_close(ops.group_similarity(A_cuda).cpu(), ops.group_similarity(A_cpu), **_tolerance(dtype))
