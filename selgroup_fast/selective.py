"""SelectiveGroupUpdate: the paper's Algorithm 1 (Jeong & Yoon, ICLR 2025) as one training step per batch.

A composition of a grouping strategy (:mod:`selgroup_fast.grouping`), the affinity
tracker (which credits a batch's loss changes), the grad scaler's skip test and the
agreement of DDP ranks; the rules are restated in ``docs/algorithm.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .affinity import ATTRIBUTIONS, AffinityTracker
from .grouping import GroupingSpec, check_partition, make_grouping
from .losses import ClosureOutput
from .methods.amp import scaler_skipped_step
from .methods.base import MethodReport, MultiTaskMethod, detached, tensor_bytes
from .methods.nonfinite import DEFAULT_NONFINITE
from .parallel import Params, RankAgreement, TaskParams, graph_parameters, is_sharded

ORDERS = ("random", "forward", "backward")


class SelectiveGroupUpdate(MultiTaskMethod):
    """Selective task group updates (Jeong & Yoon, ICLR 2025, Algorithm 1; docs/algorithm.md §Batch loop).

    Each :meth:`step` runs one batch: every group ``G`` of the current partition, in the
    order ``order`` asks, gets a forward (all K losses), a backward of ``Σ_{k∈G} L_k`` only
    (the other heads get no gradient, the optimizer leaves them alone) and an optimizer
    step; the tracker then credits the loss changes and the grouping strategy may regroup.

    Args (the options table of docs/selective.md has the details):
        optimizer: drives every parameter of the model (shared encoder and all heads).
        num_tasks: K, the number of task losses the closure returns.
        decay: the affinity's EMA rate β (paper 1e-3; official Taskonomy config 1e-4).
        warmup_steps, regroup_every, preference, convergence_iter: build ``grouping="affinity"``.
        order: ``"random"`` (from ``generator``, the official choice), ``"forward"`` or ``"backward"``.
        grouping: a :class:`~selgroup_fast.grouping.Grouping`, ``"affinity"``, ``"joint"`` (GD),
            ``"separate"``, ``"random:M"`` or a fixed partition such as ``[[0, 2], [1]]``.
        normalize_group_loss: back-propagate the group's mean loss instead of its sum.
        attribution: ``"paper"`` or ``"reference"`` (docs/algorithm.md §Attribution).
        measure_last_group: one more forward per batch (no autograd) to measure the last step.
        grad_scaler: a ``torch.amp.GradScaler``; a step it skips is credited to no one.
        process_group: the ``torch.distributed`` group training together (default: the world
            group when initialised); build the method on every rank.
        generator: CPU ``torch.Generator`` of the order and random groupings (default: one
            seeded from the global CPU RNG, so ``torch.manual_seed`` makes runs reproducible).
        shared_params, task_params: the encoder's parameters and K iterables of each task's own
            parameters (:class:`~selgroup_fast.parallel.TaskParams`). With ``task_params`` a group
            step drops the other tasks' gradients before the optimizer step (no host sync), so their
            parameters and optimizer state stay untouched whatever the graph says. Required where the
            graph cannot tell: a ``torch.compile``d model (its backward gives every head a zero
            gradient) and FSDP2 (the graph holds unsharded copies); without it those raise.
        profile: record the phases ``forward``, ``backward``, ``optimizer``, ``affinity``.
        nonfinite: what a NaN/inf loss does (:mod:`selgroup_fast.methods.nonfinite`): ``"skip"``
            (default) skips the group step whose forward returned it, on the device, and credits
            that step to no one (the affinity is left as it was); ``"raise"``; ``"propagate"``.

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
    warmup_options = "warmup_steps="
    backpropagates_task_subsets = True
    accepts_shared_params = True
    accepts_task_params = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        decay: float = 1e-3,
        warmup_steps: int = 100,
        order: str = "random",
        grouping: GroupingSpec = "affinity",
        preference: float | None = None,
        convergence_iter: int = 50,
        normalize_group_loss: bool = False,
        attribution: str = "paper",
        measure_last_group: bool = False,
        regroup_every: int = 1,
        grad_scaler: Any = None,
        process_group: Any = None,
        generator: torch.Generator | None = None,
        shared_params: Params | None = None,
        task_params: list[Params] | None = None,
        profile: bool = False,
        nonfinite: str = DEFAULT_NONFINITE,
    ) -> None:
        super().__init__(
            optimizer,
            num_tasks,
            profile=profile,
            process_group=process_group,
            nonfinite=nonfinite,
            grad_scaler=grad_scaler,
        )
        self.grouping = make_grouping(
            grouping,
            warmup_steps=warmup_steps,
            regroup_every=regroup_every,
            preference=preference,
            convergence_iter=convergence_iter,
        )
        # The affinity grouping's singleton batches (0 for the other groupings): the groups it chooses start after.
        self.warmup_steps = self.grouping.warmup_steps
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")
        if measure_last_group and attribution == "reference":
            raise ValueError(
                "measure_last_group=True needs attribution='paper': the reference crediting gives a loss "
                "change to the group stepped next, and no group follows the last one of a batch"
            )
        if generator is None:
            # Seeded from the global CPU RNG (no device involved) so that runs are reproducible.
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
            generator = torch.Generator().manual_seed(seed)
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (the group order is drawn on the host)")

        self.order = order
        self.normalize_group_loss = bool(normalize_group_loss)
        self.attribution = attribution
        self.measure_last_group = bool(measure_last_group)
        self._generator = generator
        self._owners = TaskParams(num_tasks, shared_params, task_params)
        self._owners.check_in_optimizer(optimizer)
        self._ranks.share_generator(generator)
        dtype = torch.float64 if optimizer.param_groups[0]["params"][0].dtype == torch.float64 else torch.float32
        self._tracker = AffinityTracker(num_tasks, decay=decay, device=self.device, dtype=dtype)
        self._batches = 0
        self._parameters_checked = self._owners.known  # the graph is only walked when it is the one source
        self._groups = check_partition(self.grouping.first_groups(num_tasks, generator), num_tasks)
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
    def state_bytes(self) -> int:
        """The memory of the state, in bytes: the K×K affinity (the groups and counters are host values)."""
        return tensor_bytes(self._tracker.affinity)

    @property
    def batches(self) -> int:
        """How many batches :meth:`step` has run (warm-up included)."""
        return self._batches

    def report(self) -> MethodReport:
        """The skipped steps, the groups of the next batch (chosen by the strategy once its warm-up is over) and the affinity."""
        return dataclasses.replace(
            super().report(),
            groups=self.groups,
            groups_chosen=self._batches >= self.grouping.warmup_steps,
            affinity=self.affinity,
        )

    # ------------------------------------------------------------------ the step

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        """Runs one batch (docs/algorithm.md §Batch loop): M forwards, M group backwards, M optimizer steps.

        Returns the detached K losses of the batch's first forward.
        """
        self._begin_step()
        stepped = [self._groups[index] for index in self._visit_order()]
        measured: list[torch.Tensor] = []  # every forward's detached K losses, in order
        skipped: list[torch.Tensor] = []  # every group step: was it skipped? (a grad scaler or nonfinite="skip")
        for group in stepped:
            losses = self._forward(closure)
            if not self._parameters_checked:
                _check_graph(self.optimizer, losses)
                self._parameters_checked = True
            measured.append(detached(losses))
            self._group_step(losses, group, skipped)
            del losses  # frees this forward's graph before the next one is built
        if self.measure_last_group:
            with torch.no_grad():  # no graph, and DDP expects no backward for it
                measured.append(detached(self._forward(closure)))
        if len(measured) > 1:
            # Credited once the steps are done (nothing reads the affinity in between): one
            # move of the losses and, under DDP, one all-reduce per batch.
            with self._timer.phase("affinity"):
                batch_losses = self._ranks.mean(torch.stack(measured).to(self._tracker.dtype))
                self._tracker.credit_batch(
                    batch_losses,
                    stepped,
                    skipped=torch.stack(skipped) if skipped else None,
                    attribution=self.attribution,
                )
        self._batches += 1
        with self._timer.phase("affinity"):
            groups = self.grouping.next_groups(self._tracker, self._batches, self._generator)
        if groups is not None:
            self._groups = check_partition(groups, self.num_tasks)
        return measured[0]

    def _visit_order(self) -> list[int]:
        """Indices into ``self._groups`` in batch order, a lone group repeated (docs/algorithm.md §Groupings)."""
        count = len(self._groups)
        if self.order == "random":
            visits = torch.randperm(count, generator=self._generator).tolist()
        else:
            visits = list(range(count)) if self.order == "forward" else list(range(count - 1, -1, -1))
        return visits * self.grouping.lone_group_steps if count == 1 else visits

    def _group_step(self, losses: list[torch.Tensor], group: list[int], skipped: list[torch.Tensor]) -> None:
        """Backward of the group's losses and one optimizer step; appends its skip flag to ``skipped``.

        The flag is ``nonfinite="skip"``'s (any of the K losses of this forward non-finite; under
        DDP: on any rank) or'd with the grad scaler's (inf/NaN in the group's gradients).
        """
        self._nonfinite.check(losses)
        self.optimizer.zero_grad(set_to_none=True)
        with self._timer.phase("backward"):
            group_loss = torch.stack([losses[k] for k in group]).sum()
            if self.normalize_group_loss:
                group_loss = group_loss / len(group)
            self._scaling.loss(group_loss).backward()
            for parameter in self._owners.outside(group):
                parameter.grad = None  # the optimizer skips a parameter without a gradient
        self._scaling.unscale_optimizers(self.optimizer)
        with self._timer.phase("optimizer"):
            self._nonfinite.step(self.optimizer)
        if self._nonfinite.skip is not None:
            skipped.append(self._nonfinite.skip)
        # A GradScaler allows one unscale_ per update: update after every group step, so a
        # scale backed off after group m's overflow already applies to group m + 1.
        self._scaling.update()

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
            raise ValueError(
                f"not a SelectiveGroupUpdate state: keys {sorted(state_dict)}, expected {sorted(expected)}"
            )
        if state_dict["num_tasks"] != self.num_tasks:
            raise ValueError(f"the state is for {state_dict['num_tasks']} tasks, this method has {self.num_tasks}")
        groups = check_partition(state_dict["groups"], self.num_tasks)
        self._tracker.load_state_dict(state_dict["tracker"])
        self._groups = groups
        self._batches = int(state_dict["batches"])
        self._generator.set_state(state_dict["generator"])


# ---------------------------------------------------------------------- helpers


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


def _check_graph(optimizer: torch.optim.Optimizer, losses: list[torch.Tensor]) -> None:
    """Raises if the losses' autograd graph cannot show which heads a group's backward reaches.

    Without ``task_params=`` a group step relies on the graph: the heads of the other tasks
    get no gradient, so the optimizer leaves them alone. A ``torch.compile``d region gives
    them zero gradients instead (weight decay and Adam's moments would move them), and
    FSDP2 puts unsharded copies of the parameters in the graph; a parameter of the graph
    missing from the optimizer would get gradients but never an update.
    """
    parameters, compiled = graph_parameters(losses)
    if compiled:
        raise ValueError(
            "the task losses come from a torch.compile'd model, whose backward gives every head a gradient "
            "(zero for the tasks outside the group): pass task_params= (each task's own parameters) so that "
            "the heads outside a group are masked explicitly"
        )
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for parameter in parameters:
        if id(parameter) not in in_optimizer:
            if any(is_sharded(p) for group in optimizer.param_groups for p in group["params"]):
                raise ValueError(
                    "the optimizer holds sharded (FSDP2/DTensor) parameters, which the autograd graph does not "
                    "show: pass shared_params= and task_params= (each task's own parameters)"
                )
            raise ValueError(
                f"a parameter of shape {tuple(parameter.shape)} receives gradients from the task losses "
                "but is not in the optimizer: pass every parameter of the model (shared encoder and all "
                "task heads) to the optimizer, or set requires_grad=False on frozen ones"
            )


__all__ = ["RankAgreement", "SelectiveGroupUpdate", "scaler_skipped_step"]
