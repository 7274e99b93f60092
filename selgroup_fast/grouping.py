"""Grouping strategies: which task groups each batch of :class:`SelectiveGroupUpdate` updates.

A strategy states the partition of the first batch (:meth:`Grouping.first_groups`),
the partition after each batch (:meth:`Grouping.next_groups`, ``None`` to keep the
current one) and how many times a lone group is stepped per batch
(:attr:`Grouping.lone_group_steps`); see ``docs/algorithm.md §Groupings``.
:func:`make_grouping` turns the ``grouping=`` values of :class:`SelectiveGroupUpdate`
into strategies, and :func:`check_partition` is the one check of a partition.

Example::

    >>> import torch
    >>> from selgroup_fast.grouping import make_grouping
    >>> make_grouping("joint").first_groups(3, torch.Generator())
    [[0, 1, 2]]
    >>> make_grouping([[2, 0], [1]]).first_groups(3, torch.Generator())
    [[0, 2], [1]]
    >>> make_grouping("random:2").first_groups(5, torch.Generator().manual_seed(0))
    [[1, 2, 4], [0, 3]]
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Sequence
from typing import Any, Union

import torch

from .affinity import AffinityTracker
from .checks import check_int

__all__ = [
    "AffinityGrouping", "FixedGrouping", "Grouping", "JointGrouping", "RandomGrouping", "SeparateGrouping",
    "check_partition", "make_grouping",
]

Partition = list[list[int]]


class Grouping(abc.ABC):
    """A grouping strategy (``docs/algorithm.md §Groupings``).

    The generator passed to both methods is the method's CPU ``torch.Generator``, the
    one that also draws the group order: strategies keep no random state of their own,
    so the method's checkpoint restores them.
    """

    #: The strategy's ``grouping=`` spelling.
    name: str = ""
    #: Optimizer steps of a lone group per batch: 2 (the official rule, so that the
    #: second forward measures the first step) or 1 (plain GD).
    lone_group_steps: int = 2

    @abc.abstractmethod
    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        """The partition of ``0..num_tasks-1`` the first batch updates (each group sorted)."""

    def next_groups(self, tracker: AffinityTracker, batches: int, generator: torch.Generator) -> Partition | None:
        """The partition for the next batch once ``batches`` batches ran, or ``None`` to keep the current one."""
        return None


class SeparateGrouping(Grouping):
    """Every task alone, every batch (``grouping="separate"``)."""

    name = "separate"

    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        return [[k] for k in range(num_tasks)]


class JointGrouping(Grouping):
    """All tasks in one group stepped once per batch: plain GD (``grouping="joint"``)."""

    name = "joint"
    lone_group_steps = 1

    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        return [list(range(num_tasks))]


class FixedGrouping(Grouping):
    """The same given partition every batch (``grouping=[[0, 2], [1], ...]``).

    Example::

        >>> FixedGrouping([[0, 1], [1, 2]])
        Traceback (most recent call last):
        ...
        ValueError: groups must partition the tasks 0..3 into non-empty groups (each task exactly once), got [[0, 1], [1, 2]]
    """

    name = "fixed"

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        if isinstance(groups, (str, torch.Tensor)) or not isinstance(groups, Sequence) or not all(
            isinstance(group, Sequence) and not isinstance(group, str) for group in groups
        ):
            raise ValueError(f"a fixed grouping must be a list of lists of task indices, got {groups!r}")
        self.groups = check_partition(groups, sum(map(len, groups)))

    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        return check_partition(self.groups, num_tasks)


class RandomGrouping(Grouping):
    """``count`` random non-empty groups of near-equal size, redrawn every batch (``grouping="random:M"``)."""

    def __init__(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"grouping 'random:M' needs an integer M >= 1, got M={count!r}")
        self.count = count
        self.name = f"random:{count}"

    def first_groups(self, num_tasks: int, generator: torch.Generator) -> Partition:
        if self.count > num_tasks:
            raise ValueError(f"grouping 'random:M' needs M <= num_tasks = {num_tasks}, got {self.name!r}")
        permutation = torch.randperm(num_tasks, generator=generator).tolist()
        return [sorted(permutation[m :: self.count]) for m in range(self.count)]

    def next_groups(self, tracker: AffinityTracker, batches: int, generator: torch.Generator) -> Partition:
        return self.first_groups(tracker.num_tasks, generator)


class AffinityGrouping(SeparateGrouping):
    """The paper's grouping (``grouping="affinity"``): singletons during warm-up, then affinity propagation.

    After ``warmup_steps`` batches, and then after every ``regroup_every``-th batch, the
    groups are read from :meth:`AffinityTracker.groups` (the step's only host sync); when
    no exemplar emerges the current groups are kept (``docs/algorithm.md §Warm-up and retries``).

    Example::

        >>> grouping = AffinityGrouping(warmup_steps=2, regroup_every=3)
        >>> tracker = AffinityTracker(3)
        >>> [grouping.next_groups(tracker, batches, torch.Generator()) for batches in range(1, 6)]
        [None, [[0, 1, 2]], None, None, [[0, 1, 2]]]
    """

    name = "affinity"

    def __init__(
        self, *, warmup_steps: int = 100, regroup_every: int = 1, preference: float | None = None,
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
GroupingSpec = Union[Grouping, str, Sequence[Sequence[int]]]


def make_grouping(spec: GroupingSpec, **affinity_options: Any) -> Grouping:
    """The strategy a ``grouping=`` value names.

    ``"affinity"`` (built with ``affinity_options``: ``warmup_steps``, ``regroup_every``,
    ``preference``, ``convergence_iter``), ``"joint"``, ``"separate"``, ``"random:M"``, a
    list of lists (a :class:`FixedGrouping`) or a :class:`Grouping`, returned as is. The
    affinity options are checked whatever ``spec`` is.
    """
    affinity = AffinityGrouping(**affinity_options)
    if isinstance(spec, Grouping):
        return spec
    if not isinstance(spec, str):
        return FixedGrouping(spec)
    named = {"affinity": affinity, "joint": JointGrouping(), "separate": SeparateGrouping()}
    if spec in named:
        return named[spec]
    count = spec[len("random:") :]
    if spec.startswith("random:") and count.isdigit():
        return RandomGrouping(int(count))
    raise ValueError(
        f"grouping must be 'affinity', 'joint', 'separate', 'random:M' (M an integer) or a list of lists, got {spec!r}"
    )


def check_partition(groups: Sequence[Sequence[Any]], num_tasks: int) -> Partition:
    """``groups`` as sorted lists of ints, after checking that they partition ``0..num_tasks-1``.

    Raises ``ValueError`` unless the groups are non-empty and every task index (an int,
    not a bool) appears exactly once.

    Example::

        >>> check_partition([[3, 1], [0, 2]], 4)
        [[1, 3], [0, 2]]
    """
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
