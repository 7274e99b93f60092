"""What every method needs to train as one process would: ranks that agree, and knowing whose parameter is whose.

* :class:`RankAgreement`: under ``torch.distributed`` (DDP, FSDP2) the ranks average what
  a method learns from (losses, per-task gradients) with one collective and draw the same
  random numbers, so that training equals one process on the global batch.
* :class:`TaskParams`: ``shared_params=`` and ``task_params=`` (K iterables, one per task)
  validated once; where the autograd graph cannot say which parameters a task's loss
  reaches (a ``torch.compile``d region returns zero gradients instead of none; FSDP2 puts
  unsharded copies in the graph), the methods mask by these lists instead.
* :func:`graph_parameters` walks a loss's autograd graph and says whether it is hidden.

Example::

    >>> import torch
    >>> encoder, heads = torch.nn.Linear(4, 8), [torch.nn.Linear(8, 1) for _ in range(2)]
    >>> owners = TaskParams(2, shared_params=encoder, task_params=[h.parameters() for h in heads])
    >>> [tuple(p.shape) for p in owners.outside([1])]
    [(1, 8), (1,)]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

#: What ``shared_params=`` accepts: a module, a tensor or an iterable of tensors.
Params = torch.nn.Module | torch.Tensor | Iterable[torch.Tensor]


class RankAgreement:
    """Keeps the ranks of a ``torch.distributed`` group on the same method state and random draws.

    ``process_group=None`` means the world group when ``torch.distributed`` is initialised;
    without it every method is a no-op (one process). Construct the method on every rank
    of ``process_group``; every collective of the method goes through it. Anything but a
    ``torch.distributed.ProcessGroup`` holding this rank raises a ``ValueError``.
    """

    def __init__(self, process_group: Any, device: torch.device) -> None:
        if process_group is not None:
            check_process_group(process_group)
        self.process_group = process_group
        self.enabled = process_group is not None or (dist.is_available() and dist.is_initialized())
        self.world_size = dist.get_world_size(process_group) if self.enabled else 1
        self.rank = dist.get_rank(process_group) if self.enabled else 0
        self.device = device

    def share_generator(self, generator: torch.Generator) -> None:
        """Gives ``generator`` the first rank's state on every rank."""
        if not self.enabled:
            return
        state = generator.get_state()
        carrier = state.to(self.device) if self.device.type == "cuda" else state.clone()
        dist.broadcast(carrier, group_src=0, group=self.process_group)
        generator.set_state(carrier.cpu())

    def first_rank(self, value: Any) -> Any:
        """The first rank's ``value`` (any picklable object, e.g. a random state) on every rank.

        For construction time: ``broadcast_object_list`` pickles and moves the value through the host.
        """
        if not self.enabled:
            return value
        carrier = [value]
        dist.broadcast_object_list(
            carrier, group_src=0, group=self.process_group, device=self.device if self.device.type == "cuda" else None
        )
        return carrier[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed across the ranks (one all-reduce, in place)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged across the ranks (one all-reduce, in place)."""
        return self.sum(tensor).div_(self.world_size) if self.enabled else tensor

    def global_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """The K losses with the ranks' mean as value and this rank's graph for gradients.

        ``losses + (mean - losses).detach()``: what a loss-weighting method learns from (its
        weights, its state) is the global batch's loss, while the backward still sends this
        rank's gradient to DDP/FSDP, which average it. One all-reduce of K numbers.
        """
        if not self.enabled:
            return losses
        average = self.mean(losses.detach().clone())
        return losses + (average - losses).detach()


def check_process_group(process_group: Any) -> None:
    """Raises a one-line ``ValueError`` unless ``process_group`` is a group of ``torch.distributed`` holding this rank."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group= needs torch.distributed initialised (torch.distributed.init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        # torch.distributed.new_group gives the ranks outside the group GroupMember.NON_GROUP_MEMBER
        raise ValueError(
            "process_group must be a torch.distributed.ProcessGroup holding this rank (build the method on the "
            f"group's ranks only), got {process_group!r}"
        )


def flat_column_start(param: torch.Tensor) -> int:
    """Where this rank's local part of ``param`` starts in ``param``'s flattened full tensor (0 unsharded).

    A gradient method concatenates the flattened shared parameters into the columns of J;
    a rank holding a shard (FSDP2: a block of dim-0 rows) holds a contiguous run of them.
    Raises a ``ValueError`` for a shard that is not one run (sharded along another dim).
    """
    if not is_sharded(param):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    full_shape = tuple(param.shape)
    sharded: Any = param  # a DTensor
    local_shape, global_offset = compute_local_shape_and_global_offset(
        full_shape, sharded.device_mesh, sharded.placements
    )
    if math.prod(local_shape) > 0 and tuple(local_shape[1:]) != full_shape[1:]:
        raise ValueError(
            f"a parameter of shape {full_shape} is sharded into {tuple(local_shape)} blocks: a rank's shard must be "
            "whole rows of dim 0 (FSDP2's default Shard(0)) for its columns of J to be one run"
        )
    return global_offset[0] * math.prod(full_shape[1:]) if full_shape else 0


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 / tensor-parallel parameter)."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def as_parameter_list(params: Params, what: str = "shared_params") -> list[torch.Tensor]:
    """The distinct tensors of ``params`` (a module's parameters or an iterable), validated."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    elif isinstance(params, torch.Tensor):
        params = [params]
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what} must contain tensors, got a {type(p).__name__}")
        if id(p) not in seen:
            seen.add(id(p))
            tensors.append(p)
    if not tensors:
        raise ValueError(f"{what} is empty")
    for p in tensors:
        if not p.requires_grad:
            raise ValueError(f"every tensor of {what} must require grad (got a frozen one of shape {tuple(p.shape)})")
        if not p.is_floating_point():
            raise TypeError(f"{what} must be floating-point, got {p.dtype}")
        if p.device != tensors[0].device or p.dtype != tensors[0].dtype:
            raise ValueError(
                f"every tensor of {what} must share one device and dtype, got {tensors[0].device}/{tensors[0].dtype} "
                f"and {p.device}/{p.dtype}"
            )
    return tensors


class TaskParams:
    """Which parameters are shared and which belong to each task (``shared_params=``, ``task_params=``).

    Args:
        num_tasks: K.
        shared_params: the parameters every task uses (optional).
        task_params: K iterables (or modules), task k's own parameters (optional); a task
            may own none (an empty iterable).

    Raises ``ValueError`` for the wrong number of tasks, a parameter in two tasks, or one
    that is both shared and a task's.
    """

    def __init__(
        self, num_tasks: int, shared_params: Params | None = None, task_params: Sequence[Params] | None = None
    ) -> None:
        self.num_tasks = num_tasks
        self.shared: list[torch.Tensor] = [] if shared_params is None else as_parameter_list(shared_params)
        self.per_task: list[list[torch.Tensor]] | None = None
        if task_params is None:
            return
        if isinstance(task_params, (torch.nn.Module, torch.Tensor)) or not isinstance(task_params, Sequence):
            raise TypeError(
                "task_params must be a list of K iterables of parameters (one per task), "
                f"got a {type(task_params).__name__}"
            )
        if len(task_params) != num_tasks:
            raise ValueError(
                f"task_params must hold one iterable of parameters per task: got {len(task_params)} "
                f"for num_tasks={num_tasks}"
            )
        owner: dict[int, str] = {id(p): "shared_params" for p in self.shared}
        self.per_task = []
        for k, params in enumerate(task_params):
            own = (
                []
                if isinstance(params, Sequence) and len(params) == 0
                else as_parameter_list(params, f"task_params[{k}]")
            )
            for p in own:
                if id(p) in owner:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in task_params[{k}] and in "
                        f"{owner[id(p)]}: each parameter is shared or one task's, not both"
                    )
                owner[id(p)] = f"task_params[{k}]"
            self.per_task.append(own)

    @property
    def known(self) -> bool:
        """Whether ``task_params=`` was given."""
        return self.per_task is not None

    def all_task_params(self) -> list[torch.Tensor]:
        """Every task's parameters, in task order (empty without ``task_params=``)."""
        return [p for own in self.per_task or [] for p in own]

    def outside(self, group: Sequence[int]) -> list[torch.Tensor]:
        """The parameters of the tasks not in ``group`` (those a step of ``group`` must leave alone)."""
        members = set(group)
        return [p for k, own in enumerate(self.per_task or []) if k not in members for p in own]

    def check_in_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raises if a shared or task parameter is not driven by ``optimizer``."""
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for p in [*self.shared, *self.all_task_params()]:
            if id(p) not in in_optimizer:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} from shared_params/task_params is not in "
                    "the optimizer: give the optimizer every parameter of the model"
                )


#: The autograd node types behind which a ``torch.compile``d region hides its graph.
COMPILED_NODE_NAMES = ("CompiledFunctionBackward", "CompiledFunction")


def graph_parameters(losses: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """The parameters the losses' autograd graph accumulates into, and whether a compiled region hides part of it.

    Walks the graph on the host (no device work). In a ``torch.compile``d region AOTAutograd
    gives every parameter of the region a gradient, zero where a loss does not reach it, so
    the parameters found there do not say which task uses which.
    """
    # Python node wrappers may be created afresh on each access: holding every visited
    # one alive keeps their ids unique while the walk runs.
    seen: dict[int, Any] = {}
    pending: list[Any] = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    parameters: list[torch.Tensor] = []
    compiled = False
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        compiled = compiled or type(node).__name__.startswith(COMPILED_NODE_NAMES)
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if isinstance(variable, torch.nn.Parameter):
            parameters.append(variable)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return parameters, compiled


def graph_reaches(losses: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Whether the losses' autograd graph back-propagates into each of ``tensors`` (host only).

    A tensor is reached when some node's edge leads to its ``grad_fn`` at its output index. A
    ``torch.compile``d region that computes both a tensor and, from it, the losses returns
    them as separate outputs of one node: the losses then do not reach the tensor.

    >>> x = torch.ones(2, requires_grad=True)
    >>> z, other = x * 2, x * 3
    >>> graph_reaches([z.sum()], [z, other])
    [True, False]
    """
    # Hold every visited node wrapper alive (as graph_parameters does) so that identity checks are valid.
    targets = [(tensor.grad_fn, tensor.output_nr) for tensor in tensors]
    reached = [any(loss is tensor for loss in losses) for tensor in tensors]
    seen: dict[int, Any] = {}
    pending: list[Any] = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    while pending and not all(reached):
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        for next_node, input_nr in node.next_functions:
            for i, (grad_fn, output_nr) in enumerate(targets):
                reached[i] = reached[i] or (next_node is grad_fn and grad_fn is not None and input_nr == output_nr)
            pending.append(next_node)
    return reached


__all__ = [
    "RankAgreement",
    "TaskParams",
    "as_parameter_list",
    "check_process_group",
    "flat_column_start",
    "graph_parameters",
    "graph_reaches",
    "is_sharded",
]
