"""Proximal inter-task affinity tracking and affinity-based task grouping.

Jeong & Yoon, "Selective Task Group Updates for Multi-Task Optimization", ICLR 2025:
Definition 2 (proximal inter-task affinity, tracked as an exponential moving average)
and the regrouping of the official ``next_group`` (column-normalised, symmetrised
affinity clustered by affinity propagation). The rules: ``docs/algorithm.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import ops
from .checks import check_decay, check_int

__all__ = ["ATTRIBUTIONS", "AffinityTracker"]

GroupSpec = torch.Tensor | Sequence[int]

#: Which group a loss change is credited to (docs/algorithm.md §Attribution).
ATTRIBUTIONS = ("paper", "reference")
#: The official retry rule (docs/algorithm.md §Warm-up and retries): without an
#: exemplar, retry with convergence_iter += 100, at most this many tries in all.
MAX_GROUPING_TRIES = 10
CONVERGENCE_ITER_STEP = 100
#: Distinct index lists whose device masks AffinityTracker.group_mask keeps.
MAX_CACHED_MASKS = 1024


class AffinityTracker:
    """Tracks the K×K proximal inter-task affinity and derives task groups from it.

    ``A[s, t]`` is how much updating source task ``s`` (as part of a group) lowered
    target task ``t``'s loss, an exponential moving average with rate ``decay``
    (paper: 1e-3), starting at zero. :meth:`credit_batch` (and :meth:`update`, one
    measurement) applies measurements with the fused ``ops.affinity_update_`` (no host
    sync); :meth:`groups` clusters ``group_similarity(A)`` with ``affinity_propagation``.

    Example::

        >>> import torch, selgroup_fast
        >>> tracker = selgroup_fast.AffinityTracker(3, decay=0.5)
        >>> tracker.update([0], torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 0.6, 1.5]))
        >>> tracker.update([2], torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.2, 1.3, 0.5]))
        >>> tracker.affinity[0]
        tensor([ 0.2500,  0.2000, -0.2500])
        >>> tracker.groups()
        [[0, 1], [2]]
    """

    def __init__(
        self,
        num_tasks: int,
        decay: float = 1e-3,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_int("num_tasks", num_tasks)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.num_tasks = num_tasks
        self.decay = check_decay(decay)
        self._affinity = torch.zeros(num_tasks, num_tasks, device=device, dtype=dtype)
        self._mask_cache: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def affinity(self) -> torch.Tensor:
        """The K×K affinity ``A[source, target]`` (the tracker's own tensor: do not modify)."""
        return self._affinity

    @property
    def device(self) -> torch.device:
        return self._affinity.device

    @property
    def dtype(self) -> torch.dtype:
        return self._affinity.dtype

    @property
    def cached_masks(self) -> int:
        """How many index-list masks :meth:`group_mask` holds (at most ``MAX_CACHED_MASKS``)."""
        return len(self._mask_cache)

    def group_mask(self, group: GroupSpec) -> torch.Tensor:
        """The bool[K] mask of ``group`` on the tracker's device.

        A sequence of distinct task indices becomes a mask without a device sync (built on
        the host, copied through pinned memory with ``non_blocking=True`` on CUDA) and is
        cached per distinct sequence; a bool tensor of K entries is moved to the device as is.
        """
        if isinstance(group, torch.Tensor):
            if group.dtype != torch.bool or group.shape != (self.num_tasks,):
                raise ValueError(
                    f"a group given as a tensor must be a bool mask of shape ({self.num_tasks},), "
                    f"got {group.dtype} of shape {tuple(group.shape)}"
                )
            return group.to(self.device)
        key = tuple(group)  # the cache is keyed by the group as given: no sort on the hot path
        mask = self._mask_cache.get(key)
        if mask is None:
            tasks = [int(task) for task in key]
            if len(set(tasks)) != len(tasks) or any(not 0 <= task < self.num_tasks for task in tasks):
                raise ValueError(f"group must hold distinct task indices in [0, {self.num_tasks}), got {list(key)}")
            mask = torch.zeros(self.num_tasks, dtype=torch.bool)
            mask[tasks] = True
            # The caching host allocator holds the pinned block until the copy is done.
            mask = mask.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else mask
            if len(self._mask_cache) >= MAX_CACHED_MASKS:
                self._mask_cache.clear()  # groups drawn anew every batch must not grow it forever
            self._mask_cache[key] = mask
        return mask

    def _losses(self, value: torch.Tensor, name: str, dim: int = 1) -> torch.Tensor:
        """``value`` detached, on the tracker's device and dtype (no copy when already there)."""
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        if value.dim() != dim or value.shape[-1] != self.num_tasks:
            rows = "" if dim == 1 else " per row"
            raise ValueError(f"{name} must hold {self.num_tasks} losses{rows}, got shape {tuple(value.shape)}")
        return value.detach().to(device=self.device, dtype=self.dtype)

    def update(self, group: GroupSpec, before: torch.Tensor, after: torch.Tensor) -> None:
        """Credits the loss change ``before -> after`` (K losses each) to ``group``'s step.

        ``group``: a bool mask[K] or a sequence of task indices. The losses are detached
        and moved to the tracker's device and dtype; losses that are not positive finite
        numbers are skipped by the rules of ``affinity_update_`` (docs/algorithm.md §Affinity update).
        """
        self.credit_batch(torch.stack([self._losses(before, "before"), self._losses(after, "after")]), [group])

    def credit_batch(
        self,
        losses: torch.Tensor,
        stepped: Sequence[GroupSpec],
        *,
        skipped: torch.Tensor | None = None,
        attribution: str = "paper",
    ) -> None:
        """Credits every loss change of a batch, in order (docs/algorithm.md §Attribution).

        ``losses`` (F×K): the K losses of each of the batch's F forwards; ``stepped``: the
        groups stepped, in order, forwards ``m`` and ``m + 1`` bracketing step ``m``. With
        ``attribution="paper"`` step ``m``'s group gets the change, with ``"reference"`` (the
        public reference code) the group of step ``m + 1``. ``skipped`` (bool[len(stepped)],
        optional): steps that changed nothing (a grad scaler skipped them); their change is
        credited to no one. No host sync.

        Example::

            >>> tracker = AffinityTracker(2, decay=0.5)
            >>> losses = torch.tensor([[1.0, 1.0], [0.5, 1.5], [0.5, 1.0]])
            >>> tracker.credit_batch(losses, [[0], [1]])
            >>> tracker.affinity
            tensor([[ 0.2500, -0.2500],
                    [ 0.0000,  0.1667]])
        """
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")
        losses = self._losses(losses, "losses", dim=2)
        shift = ATTRIBUTIONS.index(attribution)  # "reference": the group stepped next
        changes = len(losses) - 1
        if changes + shift > len(stepped):
            raise ValueError(
                f"{len(losses)} forwards with {attribution!r} crediting need {changes + shift} stepped groups"
            )
        before = losses[:-1]
        if skipped is not None:  # NaN "before" losses are skipped by the update rule
            before = before.masked_fill(skipped[:changes, None].to(self.device), math.nan)
        for m in range(changes):
            ops.affinity_update_(
                self._affinity, before[m], losses[m + 1], self.group_mask(stepped[m + shift]), self.decay
            )

    def similarity(self) -> torch.Tensor:
        """``group_similarity(affinity)``, what :meth:`groups` clusters (docs/algorithm.md §Similarity)."""
        return ops.group_similarity(self._affinity)

    def groups(
        self,
        preference: float | None = None,
        convergence_iter: int = 50,
        *,
        damping: float = 0.5,
        max_iter: int = 200,
    ) -> list[list[int]] | None:
        """Task groups from the tracked affinity, or ``None`` when no exemplar emerged.

        Affinity propagation on :meth:`similarity`, with the official retries (``None`` when
        all tries fail: the caller keeps its groups; docs/algorithm.md §Affinity propagation,
        §Warm-up and retries). Groups in order of their first task, each sorted; one host
        read of the labels per try.
        """
        similarity = self.similarity()
        for _ in range(MAX_GROUPING_TRIES):
            labels = ops.affinity_propagation(
                similarity, preference, damping=damping, max_iter=max_iter, convergence_iter=convergence_iter
            ).tolist()
            if labels[0] >= 0:
                return labels_to_groups(labels)
            convergence_iter += CONVERGENCE_ITER_STEP
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"affinity": self._affinity.clone(), "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` exactly (the affinity is copied in this tracker's dtype)."""
        affinity = state_dict["affinity"]
        if not isinstance(affinity, torch.Tensor) or affinity.shape != self._affinity.shape:
            shape = tuple(affinity.shape) if isinstance(affinity, torch.Tensor) else type(affinity).__name__
            raise ValueError(f"affinity must be a tensor of shape {tuple(self._affinity.shape)}, got {shape}")
        decay = check_decay(state_dict.get("decay", self.decay))
        self._affinity.copy_(affinity)
        self.decay = decay


def labels_to_groups(labels: Sequence[int]) -> list[list[int]]:
    """Cluster labels numbered 0..M-1 by first appearance -> the M groups of task indices."""
    return [[task for task, label in enumerate(labels) if label == m] for m in range(max(labels) + 1)]
