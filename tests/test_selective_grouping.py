"""Grouping strategies (selgroup_fast.grouping): first groups, next groups, lone-group steps, parsing."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from conftest import make_problem, regression_losses

import selgroup_fast
from selgroup_fast import (
    AffinityGrouping,
    AffinityTracker,
    FixedGrouping,
    Grouping,
    JointGrouping,
    RandomGrouping,
    SelectiveGroupUpdate,
    SeparateGrouping,
    make_grouping,
)
from selgroup_fast.grouping import check_partition

pytestmark = pytest.mark.usefixtures("one_thread")


def counted_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, calls: list) -> list[torch.Tensor]:
    calls.append(1)
    return regression_losses(model, x, y)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class RecordingTracker:
    """Stands in for AffinityTracker where a test needs to see what a strategy asks of it."""

    num_tasks = 4

    def __init__(self, answer: list[list[int]] | None) -> None:
        self.answer = answer
        self.calls: list[dict] = []

    def groups(self, **options):
        self.calls.append(options)
        return self.answer


def test_separate_and_joint_groupings():
    separate, joint = SeparateGrouping(), JointGrouping()
    assert separate.first_groups(4, generator()) == [[0], [1], [2], [3]]
    assert joint.first_groups(4, generator()) == [[0, 1, 2, 3]]
    tracker = AffinityTracker(4)
    assert separate.next_groups(tracker, 7, generator()) is None and joint.next_groups(tracker, 7, generator()) is None
    assert (separate.name, separate.lone_group_steps) == ("separate", 2)
    assert (joint.name, joint.lone_group_steps) == ("joint", 1)


def test_fixed_grouping_sorts_and_keeps_its_partition():
    fixed = FixedGrouping([[3, 0], [2], [1]])
    assert fixed.first_groups(4, generator()) == [[0, 3], [2], [1]]
    assert fixed.next_groups(AffinityTracker(4), 3, generator()) is None
    assert (fixed.name, fixed.lone_group_steps) == ("fixed", 2)
    # A one-group partition is not GD: only JointGrouping says "step a lone group once".
    assert FixedGrouping([[0, 1, 2]]).first_groups(3, generator()) == JointGrouping().first_groups(3, generator())
    assert FixedGrouping([[0, 1, 2]]).lone_group_steps == 2


@pytest.mark.parametrize(
    "groups, match",
    [
        ([[0, 1], [1, 2]], "partition"),  # a task twice
        ([[0, 1]], "partition"),  # a task missing
        ([[0, 1, 2], []], "partition"),  # an empty group
        ([[0, 1, 3]], "partition"),  # an index out of range
        ([[True, 1, 2]], "partition"),  # a bool is not a task index
        ([[0.0, 1, 2]], "partition"),  # nor is a float
        ([], "partition"),  # no group at all
        ([0, 1, 2], "list of lists"),
        ("012", "list of lists"),
        (torch.tensor([[0, 1, 2]]), "list of lists"),
    ],
)
def test_fixed_partitions_are_validated(groups, match):
    with pytest.raises(ValueError, match=match):
        FixedGrouping(groups).first_groups(3, generator())
    with pytest.raises(ValueError, match=match):
        check_partition(groups, 3)


def test_random_grouping_draws_near_equal_partitions_from_the_generator():
    random3 = RandomGrouping(3)
    assert (random3.name, random3.lone_group_steps) == ("random:3", 2)
    tracker = AffinityTracker(7)

    def draws(seed: int) -> list[list[list[int]]]:
        g = generator(seed)
        return [random3.first_groups(7, g)] + [random3.next_groups(tracker, batch, g) for batch in range(1, 20)]

    first, again, other = draws(5), draws(5), draws(6)
    assert first == again and first != other  # determined by the generator's seed, and by nothing else
    for groups in first:
        assert sorted(map(len, groups)) == [2, 2, 3] and all(group == sorted(group) for group in groups)
        assert sorted(itertools.chain(*groups)) == list(range(7))
    assert len({str(groups) for groups in first}) > 10  # redrawn every batch
    # The draw is one torch.randperm of the tasks, dealt round-robin into the groups.
    permutation = torch.randperm(7, generator=generator(5)).tolist()
    assert first[0] == [sorted(permutation[m::3]) for m in range(3)]
    assert RandomGrouping(1).first_groups(3, generator()) == [[0, 1, 2]]


@pytest.mark.parametrize("count", [0, -1, True, 1.5, "2"])
def test_random_grouping_needs_a_positive_int(count):
    with pytest.raises(ValueError, match="random:M"):
        RandomGrouping(count)


def test_random_grouping_needs_at_most_one_group_per_task():
    with pytest.raises(ValueError, match="random:M"):
        RandomGrouping(4).first_groups(3, generator())


def test_affinity_grouping_warms_up_then_regroups_on_schedule_and_keeps_groups_without_exemplar():
    grouping = AffinityGrouping(warmup_steps=3, regroup_every=2, preference=-0.5, convergence_iter=7)
    assert (grouping.name, grouping.lone_group_steps) == ("affinity", 2)
    assert grouping.first_groups(4, generator()) == [[0], [1], [2], [3]]
    tracker = RecordingTracker([[0, 2], [1, 3]])
    answers = {batches: grouping.next_groups(tracker, batches, generator()) for batches in range(1, 9)}
    assert [batches for batches, groups in answers.items() if groups is not None] == [3, 5, 7]
    assert answers[3] == [[0, 2], [1, 3]]
    assert tracker.calls == [{"preference": -0.5, "convergence_iter": 7}] * 3
    # No exemplar even after the retries: None, so the method keeps its current groups.
    assert grouping.next_groups(RecordingTracker(None), 3, generator()) is None


def test_affinity_grouping_reads_the_groups_of_a_real_tracker():
    tracker = AffinityTracker(3, decay=0.5)
    tracker.update([0], torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 0.6, 1.5]))
    tracker.update([2], torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.2, 1.3, 0.5]))
    assert AffinityGrouping(warmup_steps=0).next_groups(tracker, 1, generator()) == tracker.groups() == [[0, 1], [2]]


@pytest.mark.parametrize("option, value", [("warmup_steps", -1), ("regroup_every", 0), ("convergence_iter", 0)])
def test_affinity_options_are_checked(option, value):
    with pytest.raises(ValueError, match=option):
        AffinityGrouping(**{option: value})
    with pytest.raises(ValueError, match=option):  # whatever the grouping, as the constructor always did
        make_grouping("joint", **{option: value})


def test_make_grouping_reads_every_form():
    assert isinstance(make_grouping("affinity"), AffinityGrouping)
    assert make_grouping("affinity", warmup_steps=7, regroup_every=3).warmup_steps == 7
    assert type(make_grouping("joint")) is JointGrouping and type(make_grouping("separate")) is SeparateGrouping
    random2 = make_grouping("random:2")
    assert isinstance(random2, RandomGrouping) and random2.count == 2
    fixed = make_grouping([[1], [0, 2]])
    assert isinstance(fixed, FixedGrouping) and fixed.first_groups(3, generator()) == [[1], [0, 2]]
    given = JointGrouping()
    assert make_grouping(given) is given
    for spec in ("random:", "random:x", "random:-1", "clusters"):
        with pytest.raises(ValueError, match="grouping must be"):
            make_grouping(spec)


def test_the_method_takes_strategy_objects_and_a_lone_group_stepped_once_is_gd():
    """A user-defined strategy: a one-group fixed partition stepped once is exactly "joint" (no name test)."""

    class OneGroupOnce(FixedGrouping):
        lone_group_steps = 1

    runs = []
    for grouping in ("joint", OneGroupOnce([[0, 1, 2]]), FixedGrouping([[0, 1, 2]])):
        model, _, x, y = make_problem(num_tasks=3)
        calls: list = []
        sel = SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=0.1), 3, grouping=grouping)
        sel.step(partial(counted_losses, model, x, y, calls))
        assert isinstance(sel.grouping, Grouping)
        runs.append((len(calls), [p.detach().clone() for p in model.parameters()]))
    (joint_calls, joint_params), (once_calls, once_params), (twice_calls, twice_params) = runs
    assert (joint_calls, once_calls, twice_calls) == (1, 1, 2)
    assert all(torch.equal(p, q) for p, q in zip(joint_params, once_params, strict=False))
    assert not all(torch.equal(p, q) for p, q in zip(joint_params, twice_params, strict=False))


def test_a_strategy_returning_a_bad_partition_is_stopped():
    class Broken(SeparateGrouping):
        def next_groups(self, tracker, batches, generator):
            return [[0, 1]]  # task 2 forgotten

    model, _, x, y = make_problem(num_tasks=3)
    sel = SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=0.1), 3, grouping=Broken())
    with pytest.raises(ValueError, match="partition"):
        sel.step(partial(counted_losses, model, x, y, []))


def test_grouping_classes_are_exported():
    for name in (
        "AffinityGrouping",
        "FixedGrouping",
        "Grouping",
        "JointGrouping",
        "RandomGrouping",
        "SeparateGrouping",
        "make_grouping",
    ):
        assert name in selgroup_fast.__all__ and getattr(selgroup_fast, name) is getattr(selgroup_fast.grouping, name)


def test_a_checkpoint_with_a_bad_partition_is_refused_and_a_good_one_restored():
    model, _, _, _ = make_problem(num_tasks=3)
    sel = SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=0.1), 3, grouping=[[0, 1], [2]])
    state = sel.state_dict()
    assert state["groups"] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="partition"):
        sel.load_state_dict(state | {"groups": [[0, 1]]})
    sel.load_state_dict(state | {"groups": [[2, 0], [1]], "batches": 5})
    assert sel.groups == [[0, 2], [1]] and sel.batches == 5
