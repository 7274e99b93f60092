"""Grouping strategies: which task groups each batch of :class:`SelectiveGroupUpdate` updates.

A strategy gives the first batch's partition, the partition after each batch (``None``:
keep the current one) and how often a lone group is stepped per batch
(``docs/algorithm.md §Groupings``). The generator both methods receive is the method's
own (it also draws the group order), so strategies hold no random state of their own.

Example::

    >>> import torch
    >>> generator = torch.Generator().manual_seed(0)
    >>> make_grouping("joint").first_groups(3, generator), make_grouping([[2, 0], [1]]).first_groups(3, generator)
    ([[0, 1, 2]], [[0, 2], [1]])
    >>> make_grouping("random:2").first_groups(5, torch.Generator().manual_seed(0))
    [[1, 2, 4], [0, 3]]
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Sequence
from typing import Any

import torch

from .affinity import AffinityTracker
from .checks import check_int

__all__ = [
    "AffinityGrouping",
    "FixedGrouping",
    "Grouping",
    "JointGrouping",
    "RandomGrouping",
    "SeparateGrouping",
    "check_partition",
    "make_grouping",
]

Partition = list[list[int]]


class Grouping(abc.ABC):
    """A grouping strategy (``docs/algorithm.md §Groupings``)."""

    #: The strategy's ``grouping=`` spelling.
    name: str = ""
    #: Steps of a lone group per batch: 2 (the official rule: the second forward measures
    #: the first step) or 1 (plain GD).
    lone_group_steps: int = 2
    #: The first batches, whose partition is not the strategy's choice (the affinity grouping's
    #: warm-up singletons); co-grouping statistics leave them out.
    warmup_steps: int = 0

    @abc.abstractmethod
    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        """The partition of ``0..num_tasks-1`` the first batch updates."""

    def next_groups(self, tracker: AffinityTracker, batches: int, generator: torch.Generator) -> Partition | None:
        """The partition for the next batch once ``batches`` batches ran, or ``None`` to keep the current one."""
        return None


class SeparateGrouping(Grouping):
    """Every task alone, every batch (``"separate"``)."""

    name = "separate"

    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        return [[k] for k in range(num_tasks)]


class JointGrouping(Grouping):
    """All tasks in one group stepped once per batch: plain GD (``"joint"``)."""

    name = "joint"
    lone_group_steps = 1

    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        return [list(range(num_tasks))]


class FixedGrouping(Grouping):
    """The given partition every batch (``[[0, 2], [1], ...]``, checked by :meth:`first_groups`)."""

    name = "fixed"

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        self.groups = groups

    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        return check_partition(self.groups, num_tasks)


class RandomGrouping(Grouping):
    """``count`` random non-empty groups whose sizes differ by at most one, redrawn every batch (``"random:M"``)."""

    def __init__(self, count: int) -> None:
        self.count = check_int("grouping 'random:M': M", count)
        self.name = f"random:{count}"

    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        if self.count > num_tasks:
            raise ValueError(f"grouping 'random:M' needs M <= num_tasks = {num_tasks}, got {self.name!r}")
        permutation = torch.randperm(num_tasks, generator=generator).tolist()
        return [sorted(permutation[m :: self.count]) for m in range(self.count)]

    def next_groups(self, tracker: AffinityTracker, batches: int, generator: torch.Generator) -> Partition:
        return self.first_groups(tracker.num_tasks, generator)


class AffinityGrouping(SeparateGrouping):
    """The paper's grouping (``"affinity"``; ``docs/algorithm.md §Warm-up and retries``).

    Singletons for ``warmup_steps`` batches, then :meth:`AffinityTracker.groups` after every
    ``regroup_every``-th batch (``None`` when no exemplar emerged: the groups are kept).

    Example::

        >>> grouping, tracker = AffinityGrouping(warmup_steps=2, regroup_every=3), AffinityTracker(3)
        >>> [grouping.next_groups(tracker, batches, torch.Generator()) for batches in range(1, 6)]
        [None, [[0, 1, 2]], None, None, [[0, 1, 2]]]
    """

    name = "affinity"

    def __init__(
        self,
        *,
        warmup_steps: int = 100,
        regroup_every: int = 1,
        preference: float | None = None,
        convergence_iter: int = 50,
    ) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.regroup_every = check_int("regroup_every", regroup_every)
        self.convergence_iter = check_int("convergence_iter", convergence_iter)
        self.preference = preference

    def next_groups(self, tracker: AffinityTracker, batches: int, generator: torch.Generator) -> Partition | None:
        since_warmup = batches - self.warmup_steps
        if since_warmup < 0 or since_warmup % self.regroup_every:
            return None
        return tracker.groups(preference=self.preference, convergence_iter=self.convergence_iter)


#: What ``grouping=`` accepts: a strategy, its name or a fixed partition of the tasks.
GroupingSpec = Grouping | str | Sequence[Sequence[int]]


def make_grouping(spec: GroupingSpec, **affinity_options: Any) -> Grouping:
    """The strategy ``spec`` names: a :class:`Grouping` (as is), ``"affinity"``, ``"joint"``,
    ``"separate"``, ``"random:M"`` or a partition (a :class:`FixedGrouping`).

    ``affinity_options`` (``warmup_steps``, ``regroup_every``, ``preference``,
    ``convergence_iter``) build ``"affinity"`` and are checked whatever ``spec`` is.
    """
    affinity = AffinityGrouping(**affinity_options)
    if isinstance(spec, Grouping):
        return spec
    if not isinstance(spec, str):
        return FixedGrouping(spec)
    named = {"affinity": affinity, "joint": JointGrouping(), "separate": SeparateGrouping()}
    count = spec[len("random:") :]
    if spec in named or (spec.startswith("random:") and count.isdigit()):
        return named[spec] if spec in named else RandomGrouping(int(count))
    raise ValueError(
        f"grouping must be 'affinity', 'joint', 'separate', 'random:M' (M an integer) or a list of lists, got {spec!r}"
    )


def check_partition(groups: Sequence[Sequence[Any]], num_tasks: int) -> Partition:
    """``groups`` as sorted lists of ints; raises ``ValueError`` unless they are non-empty lists
    holding every task index of ``0..num_tasks-1`` (ints, not bools) exactly once.

    Example::

        >>> check_partition([[3, 1], [0, 2]], 4)
        [[1, 3], [0, 2]]
    """
    if (
        isinstance(groups, (str, torch.Tensor))
        or not isinstance(groups, Sequence)
        or not all(isinstance(group, Sequence) and not isinstance(group, str) for group in groups)
    ):
        raise ValueError(f"groups must be a list of lists of task indices, got {groups!r}")
    flat = [k for group in groups for k in group]
    if (
        not groups
        or any(len(group) == 0 for group in groups)
        or any(isinstance(k, bool) or not hasattr(k, "__index__") for k in flat)
        or sorted(operator.index(k) for k in flat) != list(range(num_tasks))
    ):
        raise ValueError(
            f"groups must partition the tasks 0..{num_tasks - 1} into non-empty groups "
            f"(each task exactly once), got {[list(group) for group in groups]!r}"
        )
    return [sorted(operator.index(k) for k in group) for group in groups]
