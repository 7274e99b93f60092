"""Per-task gradients of the shared parameters, in one preallocated K×P buffer.

Gradient-manipulation methods need the K×P matrix ``J`` whose row k is the
gradient of task k's loss with respect to the P shared parameters (flattened in
the order the parameters were given). :class:`TaskJacobian` computes it with
either

* ``"batched"``: ONE vectorised backward,
  ``torch.autograd.grad(losses, shared, grad_outputs=eye(K), is_grads_batched=True)``,
  which runs the backward graph once under ``torch.vmap`` with a batch of K unit
  cotangents; or
* ``"loop"``: K ordinary backwards, one task at a time (what the authors'
  reference implementations do; also the fallback for layers without vmap support);

or, for the methods that need only ``G = J·Jᵀ`` (the weightings), never holds J:

* ``"gramian"``: :meth:`TaskJacobian.gramian` runs ONE backward vectorised over the K tasks
  (``torch.vmap`` of ``torch.autograd.grad``) with a hook on every shared parameter that
  receives the parameter's K×|p| gradient block as the backward produces it (the total over
  every use of the parameter: shared weights, parameters used outside their module), adds
  ``block·blockᵀ`` to G and hands autograd a zero-stride zero instead, so the block is freed at
  once. G is exact (J·Jᵀ up to float rounding) for any model whose backward vmap supports,
  with no per-layer special case and no re-forward; peak memory is the vectorised backward's
  K copies of the activation gradients plus one parameter's K×|p| block, never K×P. The idea
  is TorchJD's ``autogram`` engine (which hooks modules and re-runs each one's vjp);
  :class:`~selgroup_fast.methods.gradient.GradientMethod` then does one ordinary backward of
  ``Σ_k w_k L_k``.

The modes' measured time and memory (selgroup-bench's model, K = 4, 11, 32, next to TorchJD's
engines) and the per-device defaults chosen from them (:data:`DEFAULTS`) are in docs/baselines.md,
"Defaults, measured". J goes into a buffer allocated once, on the parameters' device; the
direction ``d`` into a flat buffer whose slices are the shared parameters' ``.grad``.

Example::

    >>> import torch
    >>> from selgroup_fast.methods.jacobian import TaskJacobian
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> jac = TaskJacobian([w], num_tasks=2)
    >>> jac.compute([w.sum(), (w * w).sum()])
    tensor([[1., 1.],
            [2., 4.]])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..checks import check_int
from ..parallel import Params, as_parameter_list

JacobianMode = Literal["batched", "loop", "gramian"]
JACOBIAN_MODES: tuple[str, ...] = ("batched", "loop", "gramian")


@dataclass(frozen=True)
class JacobianDefaults:
    """What a gradient method uses on one device type when ``jacobian=`` is not given."""

    #: The weightings' mode in parameter space (``"gramian"`` allowed) in one process, from
    #: ``weighting_from_tasks`` tasks on; below, and where J itself is needed (GradDrop,
    #: representation space, torch.distributed), ``jacobian``.
    weighting: JacobianMode
    jacobian: JacobianMode
    #: ``chunk_size`` with ``"batched"`` (``None``: all K tasks at once).
    chunk_size: int | None
    weighting_from_tasks: int = 1


#: The defaults per device type, chosen from measurements (docs/baselines.md, "Defaults, measured"); one line each.
#: Other accelerators take CUDA's. CPU: one MGDA step on selgroup-bench's model was faster with
#: the loop at K = 4 (0.90× the Gramian) and with the Gramian at K = 11 and 32 (0.91×, 0.98× the
#: loop, and about half its memory; benchmarks/results/jacobian_cpu.md): the Gramian
#: from K = 8, between the two measured sizes.
DEFAULTS: dict[str, JacobianDefaults] = {
    "cpu": JacobianDefaults(weighting="gramian", jacobian="loop", chunk_size=None, weighting_from_tasks=8),
    "cuda": JacobianDefaults(weighting="batched", jacobian="batched", chunk_size=None),
}


def jacobian_defaults(device: torch.device) -> JacobianDefaults:
    """The ``jacobian=`` and ``chunk_size`` defaults for ``device``'s type.

    >>> jacobian_defaults(torch.device("cuda")).weighting
    'batched'
    """
    return DEFAULTS.get(device.type, DEFAULTS["cuda"])


#: What ``shared_params=`` accepts: a module or an iterable of parameters.
SharedParams = Params


class TaskJacobian:
    """The K×P Jacobian of the task losses with respect to the shared parameters.

    Args:
        shared_params: the parameters shared by all tasks (a module or an iterable).
        num_tasks: K.
        mode: ``"batched"`` (one vmapped backward, the default), ``"loop"`` (K backwards) or
            ``"gramian"`` (:meth:`gramian` only: neither J nor the direction buffer is allocated).
        chunk_size: with ``"batched"`` only (else ``ValueError``), vectorise over at most this many tasks per backward
            (``ceil(K / chunk_size)`` backwards): the batched backward holds one copy of the
            activation gradients per task of a chunk, so this bounds its peak memory for any K.
            ``None``: all K at once.
        allocate: allocate the K×P buffer (not needed when only :meth:`of_features` is used).

    Attributes:
        matrix: the K×P buffer :meth:`compute` fills (reused across steps; empty unless ``allocate``).
        direction: the P-vector whose slices :meth:`assign_grads` makes the ``.grad``
            of the shared parameters; methods write their update direction into it.
    """

    def __init__(
        self,
        shared_params: SharedParams,
        num_tasks: int,
        mode: JacobianMode = "batched",
        chunk_size: int | None = None,
        allocate: bool = True,
    ) -> None:
        if mode not in JACOBIAN_MODES:
            raise ValueError(f"jacobian must be one of {JACOBIAN_MODES}, got {mode!r}")
        if mode != "batched" and chunk_size is not None:  # it would be silently ignored
            why = (
                "the Gramian needs all K tasks in one backward"
                if mode == "gramian"
                else "the loop runs one task at a time"
            )
            raise ValueError(f'chunk_size applies to jacobian="batched": {why}')
        self.chunk_size = num_tasks if chunk_size is None else check_int("chunk_size", chunk_size)
        self.params = as_parameter_list(shared_params)
        self.num_tasks = num_tasks
        self.mode = mode
        self.num_params = sum(p.numel() for p in self.params)
        # The Gramian mode holds neither J nor the flat direction (its step is one ordinary backward).
        self.matrix = self._zeros(num_tasks, self.num_params if allocate and mode != "gramian" else 0)
        self.direction = self._zeros(self.num_params if mode != "gramian" else 0)
        self._grad_views: list[torch.Tensor] = []
        self._eye: dict[torch.dtype, torch.Tensor] = {}

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=self.params[0].device, dtype=self.params[0].dtype)

    def use_loop(self) -> None:
        """Switches to ``"loop"`` (a compiled backward cannot run under vmap), allocating what the loop needs."""
        if self.mode == "gramian":
            self.matrix = self._zeros(self.num_tasks, self.num_params)
            self.direction = self._zeros(self.num_params)
        self.mode = "loop"

    def _unit_cotangents(self, dtype: torch.dtype) -> torch.Tensor:
        # Cached per loss dtype: allocating eye(K) each step would be a (tiny) kernel per step.
        if dtype not in self._eye:
            self._eye[dtype] = torch.eye(self.num_tasks, device=self.params[0].device, dtype=dtype)
        return self._eye[dtype]

    def compute(self, losses: Sequence[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
        """Fills :attr:`matrix` with the per-task gradients of ``losses`` and returns it.

        Shared parameters that a task does not reach get zeros. ``retain_graph`` keeps
        the graph for a later backward (the task-specific parameters' one).
        """
        if self.mode == "gramian":
            raise ValueError('jacobian="gramian" never forms J: call gramian(), or use "batched" or "loop"')
        return self.gradients(losses, self.params, retain_graph, self.matrix)

    def gradients(
        self, losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], retain_graph: bool, out: torch.Tensor
    ) -> torch.Tensor:
        """Writes into ``out`` (K×N) the gradients of every loss w.r.t. ``inputs`` (flattened, concatenated).

        In this Jacobian's mode (``"batched"`` in chunks of ``chunk_size`` tasks, else K backwards);
        inputs a loss does not reach get zeros. Returns ``out``.
        """
        if len(losses) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {len(losses)}")
        if self.mode == "batched":
            stacked = torch.stack(list(losses))
            cotangents = self._unit_cotangents(stacked.dtype)
            for start in range(0, self.num_tasks, self.chunk_size):
                rows = cotangents[start : start + self.chunk_size]
                keep = retain_graph or start + self.chunk_size < self.num_tasks
                # A chunk of one task is an ordinary backward: vmap over a batch of one only adds overhead.
                single = rows.shape[0] == 1
                grads = torch.autograd.grad(
                    stacked,
                    inputs,
                    grad_outputs=rows[0] if single else rows,
                    is_grads_batched=not single,
                    retain_graph=keep,
                    allow_unused=True,
                    materialize_grads=True,
                )
                torch.cat([g.reshape(rows.shape[0], -1) for g in grads], dim=1, out=out[start : start + rows.shape[0]])
            return out
        return gradients_task_by_task(losses, inputs, retain_graph, out)

    def of_features(self, losses: Sequence[torch.Tensor], features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The K×Z Jacobian of the losses w.r.t. the shared features (flattened, concatenated in order).

        The graph is kept for the heads' backward and :meth:`pull_back`.
        """
        for i, feature in enumerate(features):
            if not feature.requires_grad:
                raise ValueError(
                    f"features {i} does not require grad: return the encoder's output, not a detached copy"
                )
        size = sum(feature.numel() for feature in features)
        out = torch.empty(self.num_tasks, size, device=features[0].device, dtype=features[0].dtype)
        return self.gradients(losses, features, True, out)

    def pull_back(self, features: Sequence[torch.Tensor], direction: torch.Tensor) -> None:
        """Writes into :attr:`direction` the gradient of ``Σ_i ⟨features_i, d_i⟩`` w.r.t. the shared parameters.

        ONE backward through the encoder, with ``direction`` (a Z-vector) split over the features.
        """
        cotangents, offset = [], 0
        for feature in features:
            cotangents.append(direction[offset : offset + feature.numel()].view_as(feature).to(feature.dtype))
            offset += feature.numel()
        grads = torch.autograd.grad(features, self.params, cotangents, allow_unused=True, materialize_grads=True)
        torch.cat([g.reshape(-1) for g in grads], out=self.direction)

    def assign_grads(self) -> None:
        """Makes the shared parameters' ``.grad`` the slices of :attr:`direction`."""
        if not self._grad_views:  # views made once, on first use
            offset = 0
            for p in self.params:
                self._grad_views.append(self.direction[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        for p, view in zip(self.params, self._grad_views, strict=True):
            p.grad = view

    def gramian(
        self, losses: Sequence[torch.Tensor], retain_graph: bool = False, through: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:
        """``G = J·Jᵀ`` (K×K) of the losses w.r.t. the shared parameters, accumulated without holding J.

        One backward vectorised over the K tasks (``torch.vmap``); a hook on every shared
        parameter turns its K×|p| gradient block into ``block·blockᵀ`` as soon as the backward
        has summed it, and gives autograd a zero-stride zero in its place. G is float32 for
        half-precision parameters (the weighting ops' precision), else the parameters' dtype.

        ``through``: tensors every path from the losses to the shared parameters passes through
        (the shared features; the caller checks it, e.g. with
        :func:`~selgroup_fast.parallel.graph_separates`). Then the vectorised backward starts
        from them, with each task's gradient of them (K ordinary backwards, each through its own
        head only) as cotangents: by the chain rule the same rows of J, without back-propagating
        every head for all K tasks (K² head passes) as a backward from the losses does.

        Example::

            >>> import torch
            >>> from selgroup_fast.methods.jacobian import TaskJacobian
            >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
            >>> TaskJacobian([w], 2, mode="gramian").gramian([w.sum(), (w * w).sum()])
            tensor([[ 2.,  6.],
                    [ 6., 20.]])
        """
        if len(losses) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {len(losses)}")
        stacked = torch.stack(list(losses))
        accumulator = torch.zeros(
            self.num_tasks,
            self.num_tasks,
            device=stacked.device,
            dtype=torch.promote_types(self.params[0].dtype, torch.float32),
        )

        level = -1  # torch.vmap's level of the cotangents, set when the vectorised backward starts

        def reduce_block(grad: torch.Tensor) -> torch.Tensor:
            # Inside the vectorised backward ``grad`` looks like one task's; its K rows are the batched
            # tensor's value. Unwrapping it here costs a quarter of what an autograd.Function with a
            # vmap rule (the public route) costs per parameter (~0.3 against ~1.4 ms on the CPU).
            value, batch_dim = torch._C._functorch._unwrap_batched(grad, level)
            if batch_dim is None:  # the same gradient for every task
                block = value.reshape(1, -1).expand(self.num_tasks, -1)
            else:
                block = value.movedim(batch_dim, 0).reshape(self.num_tasks, -1)
            block = block.to(accumulator.dtype)
            accumulator.addmm_(block, block.T)
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

        if through:
            outputs = list(through)
            width = sum(t.numel() for t in outputs)
            # K ordinary backwards (this mode is not "batched"): each reaches its own head only.
            rows = self.gradients(
                losses, outputs, True, torch.empty(self.num_tasks, width, device=stacked.device, dtype=outputs[0].dtype)
            )
            cotangents = [
                block.reshape(self.num_tasks, *t.shape).to(t.dtype)
                for block, t in zip(rows.split([t.numel() for t in outputs], dim=1), outputs, strict=True)
            ]
        else:
            outputs, cotangents = [stacked], [self._unit_cotangents(stacked.dtype)]

        def backward(*cotangent: torch.Tensor) -> torch.Tensor:
            nonlocal level
            level = torch._C._functorch.maybe_get_level(cotangent[0])
            # The gradients returned are the hooks' zeros (or None where unreached): only G is kept.
            torch.autograd.grad(outputs, self.params, cotangent, retain_graph=retain_graph, allow_unused=True)
            return cotangent[0]

        handles = [p.register_hook(reduce_block) for p in self.params]
        try:
            with warnings.catch_warnings():
                # torch's vmap warns once per op without a batching rule (on the CPU: the flash-attention
                # backward) that it loops over the tasks there: the documented cost, not news to the user.
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                torch.vmap(backward)(*cotangents)
        finally:
            for handle in handles:
                handle.remove()
        return accumulator


def gradients_task_by_task(
    losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], retain_graph: bool, out: torch.Tensor
) -> torch.Tensor:
    """Writes into ``out`` (K×N) each loss's gradient w.r.t. ``inputs`` (flattened, concatenated), by K backwards.

    One task's gradients alive at a time; inputs a loss does not reach get zeros. Returns ``out``.
    """
    last = len(losses) - 1
    for k, loss in enumerate(losses):
        keep = retain_graph or k < last
        grads = torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True, materialize_grads=True)
        torch.cat([g.reshape(-1) for g in grads], out=out[k])
    return out
