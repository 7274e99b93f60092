"""AffinityTracker: updates, grouping with the official retry rule, state."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import (
    affinity_update_reference,
    group_similarity_reference,
    partition,
    sklearn_labels,
)

import selgroup_fast
from selgroup_fast import affinity as affinity_module
from selgroup_fast import ops


def test_update_matches_reference_for_masks_and_index_lists(device: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(20)
    K = 6
    tracker = selgroup_fast.AffinityTracker(K, decay=0.05, device=device, dtype=dtype)
    expected = torch.zeros(K, K, dtype=torch.float64)
    groups = [[0, 1], [2], [3, 4, 5], [5, 3, 4], [1, 4]]
    for step in range(25):
        group = groups[step % len(groups)]
        before = torch.rand(K, generator=generator, dtype=torch.float64) + 0.5
        after = before * (1 + 0.3 * torch.randn(K, generator=generator, dtype=torch.float64))
        expected = affinity_update_reference(expected, before, after, group, 0.05)
        spec = group if step % 2 else torch.isin(torch.arange(K), torch.tensor(group))
        # Losses arrive as float64 CPU tensors with grad history: the tracker detaches and moves them.
        tracker.update(spec, before.clone().requires_grad_(), after)
    assert tracker.affinity.device.type == device and tracker.affinity.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(tracker.affinity.cpu().double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(
        tracker.similarity().cpu().double(), group_similarity_reference(expected), rtol=10 * tol, atol=10 * tol
    )
    # Repeated groups reuse one cached mask; orderings of the same group give the same mask.
    assert tracker.group_mask([5, 3, 4]) is tracker.group_mask([5, 3, 4])
    assert torch.equal(tracker.group_mask([5, 3, 4]), tracker.group_mask([3, 4, 5]))


def test_groups_match_sklearn_on_tracked_affinity() -> None:
    generator = torch.Generator().manual_seed(21)
    K = 9
    tracker = selgroup_fast.AffinityTracker(K, decay=0.1, dtype=torch.float64)
    # Two families of tasks that help each other and hurt the other family.
    family = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    for step in range(200):
        source = step % K
        before = torch.ones(K, dtype=torch.float64)
        helped = torch.where(family == family[source], -0.2, 0.1)
        after = before * (1 + helped + 0.02 * torch.randn(K, generator=generator, dtype=torch.float64))
        tracker.update([source], before, after)
    groups = tracker.groups()
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    expected = sklearn_labels(tracker.similarity(), convergence_iter=50)
    assert partition([next(i for i, g in enumerate(groups) if t in g) for t in range(K)]) == partition(expected)


def test_groups_at_start_of_training_is_one_group() -> None:
    # The all-zero affinity gives an all-zero (finite) similarity: scikit-learn's equal-similarity case.
    assert selgroup_fast.AffinityTracker(5).groups() == [[0, 1, 2, 3, 4]]
    assert selgroup_fast.AffinityTracker(1).groups() == [[0]]


def test_retry_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def never_converges(similarity, preference=None, damping=0.5, max_iter=200, convergence_iter=15):
        calls.append(
            {"preference": preference, "damping": damping, "max_iter": max_iter, "convergence_iter": convergence_iter}
        )
        return torch.full((similarity.shape[0],), -1, dtype=torch.int64)

    monkeypatch.setattr(selgroup_fast.ops, "affinity_propagation", never_converges)
    tracker = selgroup_fast.AffinityTracker(4)
    assert tracker.groups(preference=-1.0, convergence_iter=50, damping=0.8, max_iter=300) is None
    assert [c["convergence_iter"] for c in calls] == [50 + 100 * i for i in range(10)]
    assert all(c["preference"] == -1.0 and c["damping"] == 0.8 and c["max_iter"] == 300 for c in calls)

    # Success on the third try stops the retries.
    calls.clear()
    answers = iter([[-1] * 4, [-1] * 4, [0, 1, 0, 1]])
    monkeypatch.setattr(
        selgroup_fast.ops,
        "affinity_propagation",
        lambda s, p=None, **kw: calls.append(kw) or torch.tensor(next(answers)),
    )
    assert tracker.groups() == [[0, 2], [1, 3]]
    assert [c["convergence_iter"] for c in calls] == [50, 150, 250]


def test_state_dict_round_trip(device: str) -> None:
    tracker = selgroup_fast.AffinityTracker(4, decay=0.2, device=device, dtype=torch.float64)
    tracker.update([0, 1], torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.9, 2.5, 2.0, 4.1]))
    state = tracker.state_dict()
    restored = selgroup_fast.AffinityTracker(4, device=device, dtype=torch.float64)
    restored.load_state_dict(state)
    assert torch.equal(restored.affinity, tracker.affinity) and restored.decay == 0.2
    tracker.update([2], torch.ones(4), torch.full((4,), 0.5))
    assert not torch.equal(restored.affinity, tracker.affinity), "the state must be a copy"
    with pytest.raises(ValueError, match="shape"):
        restored.load_state_dict({"affinity": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="decay"):
        restored.load_state_dict({"affinity": torch.zeros(4, 4), "decay": 2.0})


@pytest.mark.parametrize(
    "group, match",
    [
        ([0, 0], "distinct"),
        ([4], r"\[0, 4\)"),
        ([-1], r"\[0, 4\)"),
        (torch.ones(3, dtype=torch.bool), "shape"),
        (torch.ones(4), "bool"),
    ],
)
def test_rejects_bad_groups(group, match) -> None:
    with pytest.raises(ValueError, match=match):
        selgroup_fast.AffinityTracker(4).update(group, torch.ones(4), torch.ones(4))


def test_rejects_bad_construction_and_losses() -> None:
    with pytest.raises(ValueError, match="num_tasks"):
        selgroup_fast.AffinityTracker(0)
    with pytest.raises(ValueError, match="decay"):
        selgroup_fast.AffinityTracker(3, decay=0.0)
    with pytest.raises(ValueError, match="dtype"):
        selgroup_fast.AffinityTracker(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="before"):
        selgroup_fast.AffinityTracker(3).update([0], torch.ones(4), torch.ones(3))


def test_non_finite_losses_never_reach_the_affinity() -> None:
    tracker = selgroup_fast.AffinityTracker(3, decay=0.5)
    tracker.update([0, 1], torch.tensor([float("nan"), 1.0, 0.0]), torch.tensor([1.0, float("inf"), 1.0]))
    assert torch.equal(tracker.affinity, torch.zeros(3, 3))
    assert ops.group_similarity(tracker.affinity).isfinite().all()


def test_group_mask_cache_stays_bounded_and_masks_stay_right() -> None:
    tracker = selgroup_fast.AffinityTracker(11)
    groups = [g for size in range(1, 12) for g in itertools.combinations(range(11), size)][:1100]
    for group in groups:
        mask = tracker.group_mask(group)
        assert mask.tolist() == [k in group for k in range(11)]
    assert len(groups) > affinity_module.MAX_CACHED_MASKS >= tracker.cached_masks > 0


@pytest.mark.parametrize("attribution, forwards", [("paper", 4), ("paper", 5), ("reference", 4)])
def test_credit_batch_credits_each_change_to_the_right_group(device, dtype, attribution, forwards) -> None:
    """Forwards m and m+1 bracket step m: "paper" credits step m's group, "reference" step m+1's."""
    generator = torch.Generator().manual_seed(22)
    K, decay = 5, 0.3
    stepped = [[0, 3], [1], [2, 4], [1, 0]]  # groups as given: unsorted is fine
    losses = torch.rand(forwards, K, generator=generator, dtype=torch.float64) + 0.5
    tracker = selgroup_fast.AffinityTracker(K, decay=decay, device=device, dtype=dtype)
    tracker.credit_batch(losses.to(device), stepped, attribution=attribution)
    expected = torch.zeros(K, K, dtype=torch.float64)
    shift = 0 if attribution == "paper" else 1
    for m in range(forwards - 1):
        expected = affinity_update_reference(expected, losses[m], losses[m + 1], stepped[m + shift], decay)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(tracker.affinity.cpu().double(), expected, rtol=tol, atol=tol)
    assert expected.abs().sum() > 0


def test_credit_batch_skips_the_changes_of_skipped_steps(device) -> None:
    generator = torch.Generator().manual_seed(23)
    K, decay = 4, 0.5
    stepped = [[0], [1], [2, 3]]
    losses = torch.rand(4, K, generator=generator, dtype=torch.float64) + 0.5
    tracker = selgroup_fast.AffinityTracker(K, decay=decay, device=device, dtype=torch.float64)
    tracker.credit_batch(losses.to(device), stepped, skipped=torch.tensor([False, True, False], device=device))
    expected = torch.zeros(K, K, dtype=torch.float64)
    for m in (0, 2):
        expected = affinity_update_reference(expected, losses[m], losses[m + 1], stepped[m], decay)
    torch.testing.assert_close(tracker.affinity.cpu(), expected, rtol=1e-12, atol=1e-15)
    assert tracker.affinity[1].abs().sum() == 0  # group [1]'s step was skipped: its row saw nothing


def test_update_is_a_one_change_batch() -> None:
    before, after = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.5, 2.0])
    one, batch = selgroup_fast.AffinityTracker(3, decay=0.4), selgroup_fast.AffinityTracker(3, decay=0.4)
    one.update([0, 2], before, after)
    batch.credit_batch(torch.stack([before, after]), [[0, 2]])
    assert torch.equal(one.affinity, batch.affinity) and one.affinity.abs().sum() > 0


@pytest.mark.parametrize(
    "losses, stepped, options, match",
    [
        (torch.ones(3), [[0]], {}, "losses must hold 3 losses per row"),
        (torch.ones(2, 4), [[0]], {}, "losses must hold 3 losses per row"),
        (torch.ones(3, 3), [[0]], {}, "3 forwards with 'paper' crediting need 2 stepped groups"),
        (torch.ones(2, 3), [[0]], {"attribution": "reference"}, "need 2 stepped groups"),
        (torch.ones(2, 3), [[0], [1]], {"attribution": "mine"}, "attribution must be one of"),
    ],
)
def test_credit_batch_rejects_bad_input(losses, stepped, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        selgroup_fast.AffinityTracker(3).credit_batch(losses, stepped, **options)
