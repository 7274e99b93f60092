"""What every method needs to train as one process would: ranks that agree, and knowing whose parameter is whose.

* :class:`RankAgreement`: under ``torch.distributed`` (DDP, FSDP2) the ranks average what
  a method learns from (losses, per-task gradients) with one collective and draw the same
  random numbers, so that training equals one process on the global batch.
* :class:`TaskParams`: ``shared_params=`` and ``task_params=`` (K iterables, one per task)
  validated once; where the autograd graph cannot say which parameters a task's loss
  reaches (a ``torch.compile``d region returns zero gradients instead of none; FSDP2 puts
  unsharded copies in the graph), the methods mask by these lists instead.
* :func:`graph_parameters` walks a loss's autograd graph and says whether it is hidden;
  :func:`compiled_backwards` says whether the compiled regions in it may be back-propagated twice.

Example::

    >>> import torch
    >>> encoder, heads = torch.nn.Linear(4, 8), [torch.nn.Linear(8, 1) for _ in range(2)]
    >>> owners = TaskParams(2, shared_params=encoder, task_params=[h.parameters() for h in heads])
    >>> [tuple(p.shape) for p in owners.outside([1])]
    [(1, 8), (1,)]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

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


class FSDP2Shards:
    """How FSDP2 shards a gradient method's parameters, and the per-task gradients' ONE reduce-scatter.

    FSDP2 shards each parameter by whole rows (``Shard(0)``: ``torch.chunk`` along dim 0,
    ⌈n₀/W⌉ rows per rank, the last ranks' chunks short or empty) on a 1-D mesh. FSDP2 offers
    no public link from a sharded parameter to the unsharded one its forward puts in the
    autograd graph: its records (``FSDPParam``) are reached through the modules' composable
    state (torch's private ``_module_state_mapping``, torch 2.14).

    Args:
        params: the sharded parameters, in the order of J's columns (shared first).
        process_group: the method's group (``None``: the world); it must hold the mesh's ranks.

    Raises a ``ValueError`` for a parameter no ``fully_shard`` call manages, another placement
    or mesh, or a mesh whose ranks are not ``process_group``'s.
    """

    def __init__(self, params: Sequence[torch.Tensor], process_group: Any) -> None:
        from torch.distributed import _composable_state
        from torch.distributed.tensor import Shard

        states = getattr(_composable_state, "_module_state_mapping", None)
        if states is None:  # the private registry this class reads (torch 2.14) moved or went
            raise RuntimeError(
                f"torch {torch.__version__} has no torch.distributed._composable_state._module_state_mapping: the "
                "gradient methods cannot find FSDP2's unsharded parameters; train them with DistributedDataParallel"
            )
        records: dict[int, Any] = {}
        for state_ref in list(states.values()):
            for group in getattr(state_ref(), "_fsdp_param_groups", None) or []:
                for record in group.fsdp_params:
                    records[id(record.sharded_param)] = record
        group_ranks = dist.get_process_group_ranks(dist.group.WORLD if process_group is None else process_group)
        self.params = list(params)
        self.records = []
        for param in self.params:
            sharded: Any = param  # a DTensor
            if id(param) not in records:
                raise ValueError(
                    f"a parameter of shape {tuple(param.shape)} is not sharded by FSDP2's fully_shard: under FSDP2 "
                    "every shared and task parameter must be (fully_shard each head and the encoder)"
                )
            if sharded.device_mesh.ndim != 1 or tuple(sharded.placements) != (Shard(0),):
                raise ValueError(
                    f"a parameter of shape {tuple(param.shape)} is placed {tuple(sharded.placements)} on a "
                    f"{sharded.device_mesh.ndim}-D mesh: the gradient methods support FSDP2's Shard(0) on a 1-D mesh"
                )
            mesh_ranks = sharded.device_mesh.mesh.flatten().tolist()
            if mesh_ranks != group_ranks:
                raise ValueError(
                    f"a parameter is sharded over ranks {mesh_ranks}, the method's process_group holds {group_ranks}: "
                    "give the group of the FSDP2 mesh"
                )
            self.records.append(records[id(param)])
        self.group = cast(Any, self.params[0]).device_mesh.get_group()
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        #: Per parameter: rows of a rank's chunk, this rank's first row and row count, numel of a row.
        self.chunks = [-(-p.shape[0] // self.world) for p in self.params]
        self.first_rows = [
            min(self.rank * chunk, p.shape[0]) for chunk, p in zip(self.chunks, self.params, strict=True)
        ]
        self.local_rows = [
            min(chunk, p.shape[0] - first)
            for chunk, first, p in zip(self.chunks, self.first_rows, self.params, strict=True)
        ]
        self.row_numel = [p.numel() // p.shape[0] if p.shape[0] else 0 for p in self.params]
        for param, rows in zip(self.params, self.local_rows, strict=True):
            if cast(Any, param).to_local().shape[0] != rows:
                raise ValueError(f"a parameter of shape {tuple(param.shape)} is not sharded as torch.chunk shards it")

    @property
    def unsharded(self) -> list[torch.Tensor]:
        """The unsharded parameters of the autograd graph (FSDP2 creates them at the first forward)."""
        return [record.unsharded_param for record in self.records]

    def column_runs(self, count: int) -> list[tuple[int, int]]:
        """(first global column, width) of this rank's shard of each of the first ``count`` parameters, in J's order."""
        runs, first_column = [], 0
        for param, first_row, rows, row_numel in list(
            zip(self.params, self.first_rows, self.local_rows, self.row_numel, strict=True)
        )[:count]:
            runs.append((first_column + first_row * row_numel, rows * row_numel))
            first_column += param.numel()  # the full parameter's size (a DTensor's numel is global)
        return runs

    def reduce_scatter(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """This rank's columns of the ranks' summed ``grads`` (``grads[i]``: K × ``params[i]``'s full numel, any shape).

        ONE reduce-scatter of K × Σ_i W·⌈n₀/W⌉·row_numel: the rows of every rank's chunk,
        padded to the chunk size. Returns K × Σ_i local numel, in the order of ``params``.
        """
        blocks = []
        for grad, param, chunk, row_numel in zip(grads, self.params, self.chunks, self.row_numel, strict=True):
            rows = param.shape[0]
            padded = torch.nn.functional.pad(
                grad.reshape(grad.shape[0], rows, row_numel), (0, 0, 0, chunk * self.world - rows)
            )
            blocks.append(padded.reshape(grad.shape[0], self.world, chunk * row_numel).transpose(0, 1))
        stacked = torch.cat(blocks, dim=2).contiguous()  # W × K × S: rank r's block is what it receives
        received = stacked.new_empty(stacked.shape[1:])
        dist.reduce_scatter_single(received.view(-1), stacked.view(-1), op=dist.ReduceOp.SUM, group=self.group)
        columns, start = [], 0
        for chunk, rows, row_numel in zip(self.chunks, self.local_rows, self.row_numel, strict=True):
            columns.append(received[:, start : start + rows * row_numel])
            start += chunk * row_numel
        return torch.cat(columns, dim=1)


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


def _graph_nodes(losses: Sequence[torch.Tensor], cut: Sequence[tuple[Any, int]] = ()) -> Iterator[Any]:
    """Every autograd node the losses back-propagate through, once each (host only).

    ``cut``: edges (a node, an output index of it) the walk does not cross; a node behind one
    is still visited when another edge leads to it. Python node wrappers may be created afresh
    on each access: holding every visited one alive keeps their ids unique while the walk runs.
    """
    seen: dict[int, Any] = {}
    pending: list[Any] = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        for next_node, input_nr in node.next_functions:
            if not any(next_node is grad_fn and input_nr == output_nr for grad_fn, output_nr in cut):
                pending.append(next_node)


def graph_parameters(losses: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """The parameters the losses' autograd graph accumulates into, and whether a compiled region hides part of it.

    Walks the graph on the host (no device work). In a ``torch.compile``d region AOTAutograd
    gives every parameter of the region a gradient, zero where a loss does not reach it, so
    the parameters found there do not say which task uses which.
    """
    parameters: list[torch.Tensor] = []
    compiled = False
    for node in _graph_nodes(losses):
        compiled = compiled or type(node).__name__.startswith(COMPILED_NODE_NAMES)
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if isinstance(variable, torch.nn.Parameter):
            parameters.append(variable)
    return parameters, compiled


def compiled_backwards(
    losses: Sequence[torch.Tensor], features: Sequence[torch.Tensor] = ()
) -> list[tuple[bool, bool]]:
    """Each ``torch.compile``d region the losses back-propagate through before ``features``: (compiled, donates) (host only).

    AOTAutograd compiles a region's backward at its first call. ``compiled``: that call has
    happened (or the backward came from a cache). ``donates``: the code was compiled with
    donated buffers, i.e. it may overwrite the tensors the forward saved, which is sound for
    ONE backward only: AOTAutograd (torch 2.14) donates when
    ``torch._functorch.config.donated_buffer`` was on at the forward's compilation and the
    first backward did not retain the graph, and keeps the donated indices beside the code
    (``CompiledFunction.metadata.bw_donated_idxs``, emptied when the first call retains).
    The walk does not cross the edges into ``features`` (the regions behind them, e.g. a
    separately compiled encoder, are back-propagated once).
    """
    cut = [(feature.grad_fn, feature.output_nr) for feature in features if feature.grad_fn is not None]
    regions = []
    for node in _graph_nodes(losses, cut):
        if type(node).__name__ == "CompiledFunctionBackward":
            region = node._forward_cls  # AOTAutograd's CompiledFunction (an autograd.Function)
            compiled = region.compiled_bw is not None
            regions.append((compiled, compiled and bool(region.metadata.bw_donated_idxs)))
    return regions


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
    targets = [(tensor.grad_fn, tensor.output_nr) for tensor in tensors]
    reached = [any(loss is tensor for loss in losses) for tensor in tensors]
    for node in _graph_nodes(losses):
        if all(reached):
            break
        for next_node, input_nr in node.next_functions:
            for i, (grad_fn, output_nr) in enumerate(targets):
                reached[i] = reached[i] or (next_node is grad_fn and grad_fn is not None and input_nr == output_nr)
    return reached


def graph_separates(
    losses: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> bool:
    """Whether every path of the losses' autograd graph to ``params`` passes through ``tensors`` (host only).

    The walk does not cross the edges into ``tensors`` (a node's ``grad_fn`` at the tensor's
    output index); it fails as soon as it reaches one of ``params`` another way, e.g. a weight
    tied between the encoder and a head, or a head reading a shared parameter directly.

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> z = w * 2
    >>> graph_separates([(z * 3).sum()], [z], [w]), graph_separates([(z * w).sum()], [z], [w])
    (True, False)
    """
    param_ids = {id(param) for param in params}
    if any(id(tensor) in param_ids for tensor in tensors):
        return False
    cut = [(tensor.grad_fn, tensor.output_nr) for tensor in tensors if tensor.grad_fn is not None]
    # An AccumulateGrad node's variable is the parameter it accumulates into.
    return not any(id(getattr(node, "variable", None)) in param_ids for node in _graph_nodes(losses, cut))


__all__ = [
    "FSDP2Shards",
    "RankAgreement",
    "TaskParams",
    "as_parameter_list",
    "check_process_group",
    "compiled_backwards",
    "graph_parameters",
    "graph_reaches",
    "graph_separates",
    "is_sharded",
]
