"""SelectiveGroupUpdate: the paper's Algorithm 1 as one training step per batch.

Jeong & Yoon, "Selective Task Group Updates for Multi-Task Optimization", ICLR 2025
(arXiv 2502.11986), Algorithm 1; the rules are restated in ``design/algorithm.md``.
Every batch updates the current task groups one after another (one forward, one
backward of the group's losses and one optimizer step per group), tracks the
proximal inter-task affinity from the loss changes between consecutive forwards
(on the device, through the fused op behind :class:`AffinityTracker`) and regroups
the tasks from that affinity after warm-up.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Callable, Union

import torch
import torch.distributed as dist

from .affinity import AffinityTracker, group_masks
from .checks import check_int
from .losses import ClosureOutput
from .methods.base import MultiTaskMethod, detached

#: What ``grouping=`` accepts: a strategy name or a fixed partition of the tasks.
Grouping = Union[str, Sequence[Sequence[int]]]

ORDERS = ("random", "forward", "backward")
ATTRIBUTIONS = ("paper", "reference")


class SelectiveGroupUpdate(MultiTaskMethod):
    """Selective task group updates (Jeong & Yoon, ICLR 2025, Algorithm 1).

    Each :meth:`step` runs one batch: for every group ``G`` of the current partition,
    in the order ``order`` asks, it runs the closure (all K losses at the current
    parameters), back-propagates ``Σ_{k∈G} L_k`` only (so the heads of the other tasks
    get no gradient, and the optimizer leaves their parameters and state alone) and
    steps the optimizer. Each loss change between consecutive forwards is credited to
    a group in the affinity tracker (on the device, once the batch's steps are done:
    the same result as crediting after every forward, with one all-reduce per batch
    under DDP). After ``warmup_steps`` batches the groups are recomputed from the
    tracked affinity every ``regroup_every`` batches; that read of the new groups is
    the step's only host synchronisation.

    Args:
        optimizer: drives every parameter of the model (shared encoder and all heads).
        num_tasks: K, the number of task losses the closure returns.
        decay: the affinity's EMA rate β (paper 1e-3; official Taskonomy config 1e-4).
        warmup_steps: batches during which every task is its own group and the affinity
            is only tracked (official ``prepos: 100``, which its ``<=`` test makes 101
            batches). Only for ``grouping="affinity"``.
        order: ``"random"`` (a permutation from ``generator`` every batch, the official
            choice), ``"forward"`` (group list order) or ``"backward"`` (reversed).
        grouping: ``"affinity"`` (the paper), ``"joint"`` (all tasks in one group updated
            once per batch: plain GD, Table 4's "Joint (GD)"), ``"separate"`` (every task
            alone), ``"random:M"`` (M random non-empty groups of near-equal size drawn
            from ``generator`` every batch, Table D.5) or a fixed partition of
            ``0..K-1`` given as a list of lists.
        preference, convergence_iter: passed to :meth:`AffinityTracker.groups`.
        normalize_group_loss: back-propagate the group's mean loss instead of its sum
            (the official ``group_norm`` option).
        attribution: ``"paper"`` credits the loss change between two forwards to the
            group stepped between them; ``"reference"`` credits it to the group stepped
            next, as the public reference code does (github.com/wooseong97/sel-update-mtl).
        measure_last_group: run one extra forward (under ``torch.no_grad``) at the end of
            every batch so that the last group's step is measured too (paper crediting
            only: the reference code has no group after the last to credit).
        regroup_every: regroup every this many batches after warm-up (1: every batch).
        grad_scaler: a ``torch.amp.GradScaler``; group losses are scaled for the backward,
            steps go through ``scaler.step`` and ``scaler.update`` after every group step
            (a GradScaler allows one step per update), the affinity sees unscaled losses,
            and a skipped step (inf/NaN gradients) is not credited to anyone.
        process_group: the ``torch.distributed`` group whose ranks train together; by
            default the world group when ``torch.distributed`` is initialised. The
            measured losses are averaged across its ranks and the order generator is
            broadcast from its first rank at construction, so every rank holds the same
            affinity and groups (construct the method on every rank).
        generator: CPU ``torch.Generator`` for the group order and random groupings;
            by default a new one seeded from the global CPU RNG (so ``torch.manual_seed``
            makes runs reproducible).
        profile: record the phases ``forward``, ``backward``, ``optimizer``, ``affinity``.

    A single group is updated twice per batch (the official rule, so that its effect is
    measured), except with ``grouping="joint"``, which is GD. Loss values are never read
    on the host: non-finite or non-positive losses are skipped by the affinity update
    (never stored); what a NaN loss does to the parameters is the optimizer's business
    (a ``grad_scaler`` skips such steps).

    Example::

        >>> import torch, selgroup_fast
        >>> encoder = torch.nn.Linear(4, 8)
        >>> heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(3))
        >>> params = [*encoder.parameters(), *heads.parameters()]
        >>> opt = torch.optim.Adam(params, lr=1e-3)
        >>> sel = selgroup_fast.SelectiveGroupUpdate(opt, num_tasks=3, warmup_steps=2)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 3)
        >>> def closure():
        ...     features = encoder(x).relu()
        ...     return [(head(features).squeeze(1) - y[:, k]).pow(2).mean() for k, head in enumerate(heads)]
        >>> for _ in range(3):
        ...     losses = sel.step(closure)
        >>> losses.shape, sel.affinity.shape, sorted(sum(sel.groups, []))
        (torch.Size([3]), torch.Size([3, 3]), [0, 1, 2])
    """

    name = "selective"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        decay: float = 1e-3,
        warmup_steps: int = 100,
        order: str = "random",
        grouping: Grouping = "affinity",
        preference: float | None = None,
        convergence_iter: int = 50,
        normalize_group_loss: bool = False,
        attribution: str = "paper",
        measure_last_group: bool = False,
        regroup_every: int = 1,
        grad_scaler: Any = None,
        process_group: Any = None,
        generator: torch.Generator | None = None,
        profile: bool = False,
    ) -> None:
        super().__init__(optimizer, num_tasks, profile=profile)
        check_int("warmup_steps", warmup_steps, minimum=0)
        check_int("regroup_every", regroup_every, minimum=1)
        check_int("convergence_iter", convergence_iter, minimum=1)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")
        if measure_last_group and attribution == "reference":
            raise ValueError(
                "measure_last_group=True needs attribution='paper': the reference crediting gives a loss "
                "change to the group stepped next, and no group follows the last one of a batch"
            )
        if grad_scaler is not None and not all(hasattr(grad_scaler, name) for name in ("scale", "step", "update")):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if generator is None:
            # Seeded from the global CPU RNG (no device involved) so that runs are reproducible.
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
            generator = torch.Generator().manual_seed(seed)
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (the group order is drawn on the host)")

        self.warmup_steps = warmup_steps
        self.order = order
        self.preference = preference
        self.convergence_iter = convergence_iter
        self.normalize_group_loss = bool(normalize_group_loss)
        self.attribution = attribution
        self.measure_last_group = bool(measure_last_group)
        self.regroup_every = regroup_every
        self.grad_scaler = grad_scaler
        self._generator = generator
        self._strategy, self._random_group_count, fixed_groups = _parse_grouping(grouping, num_tasks)

        self._process_group = process_group
        self._distributed = process_group is not None or (dist.is_available() and dist.is_initialized())
        self._world_size = dist.get_world_size(process_group) if self._distributed else 1
        if self._distributed:
            self._broadcast_generator_state()

        self._tracker = AffinityTracker(num_tasks, decay=decay, device=self.device, dtype=_affinity_dtype(optimizer))
        self._batches = 0
        self._parameters_checked = False
        self._groups: list[list[int]] = []
        self._group_masks = torch.empty(0, num_tasks, dtype=torch.bool, device=self.device)
        if self._strategy == "random":
            self._set_groups(self._random_groups())
        elif self._strategy == "fixed":
            self._set_groups(fixed_groups)
        elif self._strategy == "joint":
            self._set_groups([list(range(num_tasks))])
        else:  # "affinity" starts with the warm-up singletons, "separate" keeps them
            self._set_groups([[k] for k in range(num_tasks)])
        if len(self._groups) > 1:
            _check_partial_steps_supported(optimizer)

    # ------------------------------------------------------------------ public state

    @property
    def groups(self) -> list[list[int]]:
        """The partition of the tasks that the next :meth:`step` updates."""
        return [list(group) for group in self._groups]

    @property
    def affinity(self) -> torch.Tensor:
        """The tracked K×K proximal inter-task affinity ``A[source, target]``."""
        return self._tracker.affinity

    @property
    def tracker(self) -> AffinityTracker:
        """The :class:`AffinityTracker` holding the affinity."""
        return self._tracker

    @property
    def batches(self) -> int:
        """How many batches :meth:`step` has run (warm-up included)."""
        return self._batches

    # ------------------------------------------------------------------ the step

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        """Runs one batch (M forwards, M group backwards, M optimizer steps).

        Returns the detached K losses of the batch's first forward.
        """
        self._timer.reset()
        visits = self._visit_order()
        measured: list[torch.Tensor] = []  # every forward's detached K losses, in order
        skipped: list[torch.Tensor | None] = []  # every group step: did the grad scaler skip it?
        for group_index in visits:
            losses = self._forward(closure)
            if not self._parameters_checked:
                self._check_optimizer_covers(losses)
            measured.append(detached(losses))
            skipped.append(self._group_step(losses, self._groups[group_index]))
            del losses  # frees this forward's graph before the next one is built
        if self.measure_last_group:
            with torch.no_grad():  # no graph, and DDP expects no backward for it
                measured.append(detached(self._forward(closure)))
        self._update_affinity(visits, measured, skipped)
        self._batches += 1
        self._next_groups()
        return measured[0]

    def _visit_order(self) -> list[int]:
        """Indices into ``self._groups`` in the order this batch updates them."""
        count = len(self._groups)
        if self.order == "random":
            visits = torch.randperm(count, generator=self._generator).tolist()
        elif self.order == "forward":
            visits = list(range(count))
        else:
            visits = list(range(count - 1, -1, -1))
        if count == 1 and self._strategy != "joint":
            visits = visits * 2  # the official rule: a lone group is updated twice so its effect is measured
        return visits

    def _update_affinity(
        self, visits: list[int], measured: list[torch.Tensor], skipped: list[torch.Tensor | None]
    ) -> None:
        """Credits every loss change of the batch to a group, on the device.

        The credits are applied once the batch's steps are done: nothing reads the affinity
        in between, so the result is that of crediting after every forward, with one
        all-reduce per batch (the measured losses averaged across ranks) instead of one per
        forward. Forwards ``m - 1`` and ``m`` bracket the step of group ``visits[m - 1]``:
        the paper credits that group, the reference code the group stepped next,
        ``visits[m]``. A step the grad scaler skipped changed nothing and is credited to no
        one (its "before" losses become NaN, which the update skips).
        """
        if len(measured) < 2:
            return
        with self._timer.phase("affinity"):
            losses = torch.stack(measured).to(self._tracker.dtype)
            if self._distributed:
                dist.all_reduce(losses, op=dist.ReduceOp.SUM, group=self._process_group)
                losses = losses / self._world_size
            for m in range(1, len(measured)):
                before = losses[m - 1]
                if skipped[m - 1] is not None:
                    before = before.masked_fill(skipped[m - 1], float("nan"))
                credited = visits[m - 1] if self.attribution == "paper" else visits[m]
                self._tracker.update(self._group_masks[credited], before, losses[m])

    def _group_step(self, losses: list[torch.Tensor], group: list[int]) -> torch.Tensor | None:
        """Backward of the group's losses and one optimizer step.

        Returns a 0-d bool device tensor telling whether the grad scaler skipped the step
        (None without an enabled scaler).
        """
        self.optimizer.zero_grad(set_to_none=True)
        with self._timer.phase("backward"):
            group_loss = torch.stack([losses[k] for k in group]).sum()
            if self.normalize_group_loss:
                group_loss = group_loss / len(group)
            scaler = self.grad_scaler
            if scaler is not None:
                group_loss = scaler.scale(group_loss)
            group_loss.backward()
        with self._timer.phase("optimizer"):
            if scaler is None:
                self.optimizer.step()
                return None
            scaler.step(self.optimizer)
            skipped = _found_inf(scaler, self.optimizer, self.device)
            # A GradScaler allows one step per update: update after every group step, so a
            # scale backed off after group m's overflow already applies to group m + 1.
            scaler.update()
            return skipped

    def _next_groups(self) -> None:
        """Draws or computes the groups of the next batch (the only host sync of a batch)."""
        if self._strategy == "random":
            self._set_groups(self._random_groups())
            return
        if self._strategy != "affinity":
            return
        since_warmup = self._batches - self.warmup_steps
        if since_warmup < 0 or since_warmup % self.regroup_every:
            return
        with self._timer.phase("affinity"):
            groups = self._tracker.groups(preference=self.preference, convergence_iter=self.convergence_iter)
        if groups is not None:  # no exemplar even after the retries: keep the previous groups
            self._set_groups(groups)

    def _random_groups(self) -> list[list[int]]:
        """A random partition into M non-empty groups whose sizes differ by at most one."""
        permutation = torch.randperm(self.num_tasks, generator=self._generator).tolist()
        return [sorted(permutation[m :: self._random_group_count]) for m in range(self._random_group_count)]

    def _set_groups(self, groups: Sequence[Sequence[int]]) -> None:
        self._groups = [sorted(int(k) for k in group) for group in groups]
        self._group_masks = group_masks(self._groups, self.num_tasks, self.device)

    # ------------------------------------------------------------------ checks and setup

    def _check_optimizer_covers(self, losses: list[torch.Tensor]) -> None:
        """Raises if a parameter the losses depend on is missing from the optimizer.

        Such a parameter would get a gradient every group step but never an update. Runs
        once, on the first forward, by walking the autograd graph (no device work).
        """
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for parameter in _graph_parameters(losses):
            if id(parameter) not in in_optimizer:
                raise ValueError(
                    f"a parameter of shape {tuple(parameter.shape)} receives gradients from the task losses "
                    "but is not in the optimizer: pass every parameter of the model (shared encoder and all "
                    "task heads) to the optimizer, or set requires_grad=False on frozen ones"
                )
        self._parameters_checked = True

    def _broadcast_generator_state(self) -> None:
        """Gives every rank the first rank's generator state, so all draw the same orders."""
        state = self._generator.get_state()
        carrier = state.to(self.device) if self.device.type == "cuda" else state.clone()
        dist.broadcast(carrier, group_src=0, group=self._process_group)
        self._generator.set_state(carrier.cpu())

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The affinity, groups, batch counter and order generator (not model/optimizer/scaler)."""
        return {
            "num_tasks": self.num_tasks,
            "tracker": self._tracker.state_dict(),
            "groups": self.groups,
            "batches": self._batches,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; training then continues exactly where it stopped."""
        expected = {"num_tasks", "tracker", "groups", "batches", "generator"}
        if set(state_dict) != expected:
            raise ValueError(f"not a SelectiveGroupUpdate state: keys {sorted(state_dict)}, expected {sorted(expected)}")
        if state_dict["num_tasks"] != self.num_tasks:
            raise ValueError(f"the state is for {state_dict['num_tasks']} tasks, this method has {self.num_tasks}")
        groups = [list(group) for group in state_dict["groups"]]
        _check_partition(groups, self.num_tasks)
        self._tracker.load_state_dict(state_dict["tracker"])
        self._set_groups(groups)
        self._batches = int(state_dict["batches"])
        self._generator.set_state(state_dict["generator"])


# ---------------------------------------------------------------------- helpers


def _check_partition(groups: list[list[int]], num_tasks: int) -> None:
    """Raises unless ``groups`` are non-empty lists of ints covering 0..K-1 exactly once."""
    flat = [k for group in groups for k in group]
    if (
        not groups
        or any(len(group) == 0 for group in groups)
        or any(isinstance(k, bool) or not hasattr(k, "__index__") for k in flat)
        or sorted(operator.index(k) for k in flat) != list(range(num_tasks))
    ):
        raise ValueError(
            f"groups must partition the tasks 0..{num_tasks - 1} into non-empty groups "
            f"(each task exactly once), got {groups!r}"
        )


def _parse_grouping(grouping: Grouping, num_tasks: int) -> tuple[str, int, list[list[int]]]:
    """(strategy, number of random groups, fixed partition) for a ``grouping=`` value."""
    if isinstance(grouping, str):
        if grouping in ("affinity", "joint", "separate"):
            return grouping, 0, []
        if grouping.startswith("random:"):
            count = grouping[len("random:") :]
            if not count.isdigit() or not 1 <= int(count) <= num_tasks:
                raise ValueError(f"grouping 'random:M' needs an integer 1 <= M <= {num_tasks}, got {grouping!r}")
            return "random", int(count), []
        raise ValueError(
            f"grouping must be 'affinity', 'joint', 'separate', 'random:M' or a list of lists, got {grouping!r}"
        )
    if not isinstance(grouping, Sequence) or not all(isinstance(g, Sequence) and not isinstance(g, str) for g in grouping):
        raise ValueError(f"a fixed grouping must be a list of lists of task indices, got {grouping!r}")
    groups = [list(group) for group in grouping]
    _check_partition(groups, num_tasks)
    return "fixed", 0, [[operator.index(k) for k in group] for group in groups]


def _check_partial_steps_supported(optimizer: torch.optim.Optimizer) -> None:
    """Raises for optimizers that cannot step a subset of their parameters.

    torch's fused SGD with momentum creates momentum buffers only when none exists yet, so
    the second group step of the first batch (some buffers created, the new heads' not)
    fails inside torch; refuse it up front instead of failing mid-batch.
    """
    if isinstance(optimizer, torch.optim.SGD) and any(
        group.get("fused") and group["momentum"] != 0 for group in optimizer.param_groups
    ):
        raise ValueError(
            "torch's fused SGD with momentum cannot step a subset of the parameters (it fails when only "
            "some momentum buffers exist); use SGD(..., foreach=True) or grouping='joint'"
        )


def _affinity_dtype(optimizer: torch.optim.Optimizer) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise (half-precision models included)."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            return torch.float64 if parameter.dtype == torch.float64 else torch.float32
    return torch.float32


def _found_inf(scaler: Any, optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor | None:
    """Whether ``scaler.step`` just skipped the step, as a 0-d device bool tensor (no sync).

    Reads the scaler's per-optimizer record, which ``update()`` clears, so call it between
    ``step`` and ``update``.
    """
    if not scaler.is_enabled():
        return None
    found = scaler._found_inf_per_device(optimizer)
    return torch.stack([value.to(device, non_blocking=True).reshape(()) for value in found.values()]).sum() > 0


def _graph_parameters(roots: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """The ``nn.Parameter`` leaves that the autograd graphs of ``roots`` accumulate into."""
    # Python node wrappers may be created afresh on each access: holding every visited
    # one alive keeps their ids unique while the walk runs.
    seen: dict[int, Any] = {}
    pending = [root.grad_fn for root in roots if root.grad_fn is not None]
    parameters: list[torch.nn.Parameter] = []
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if isinstance(variable, torch.nn.Parameter):
            parameters.append(variable)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return parameters


__all__ = ["SelectiveGroupUpdate"]
