"""Per-task gradients of the shared parameters, in one preallocated K×P buffer.

Gradient-manipulation methods need the K×P matrix ``J`` whose row k is the
gradient of task k's loss with respect to the P shared parameters (flattened in
the order the parameters were given). :class:`TaskJacobian` computes it with
either

* ``"batched"`` (the default): ONE vectorised backward,
  ``torch.autograd.grad(losses, shared, grad_outputs=eye(K), is_grads_batched=True)``,
  which runs the backward graph once under ``torch.vmap`` with a batch of K unit
  cotangents; or
* ``"loop"``: K ordinary backwards, one task at a time (what the authors'
  reference implementations do; also the fallback for layers without vmap support).

The measured trade-off between the two (the loop is 10–13 % faster on one CPU thread:
torch has no vmap rule for the CPU flash-attention backward) is in the README's
"Baselines" section. J goes into a buffer allocated once, on the parameters' device; the
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

from collections.abc import Sequence
from typing import Literal

import torch

from ..checks import check_int
from ..parallel import Params, as_parameter_list

JacobianMode = Literal["batched", "loop"]
JACOBIAN_MODES: tuple[str, ...] = ("batched", "loop")

#: What ``shared_params=`` accepts: a module or an iterable of parameters.
SharedParams = Params


class TaskJacobian:
    """The K×P Jacobian of the task losses with respect to the shared parameters.

    Args:
        shared_params: the parameters shared by all tasks (a module or an iterable).
        num_tasks: K.
        mode: ``"batched"`` (one vmapped backward, the default) or ``"loop"`` (K backwards).
        chunk_size: with ``"batched"``, vectorise over at most this many tasks per backward
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
        self.chunk_size = num_tasks if chunk_size is None else check_int("chunk_size", chunk_size)
        self.params = as_parameter_list(shared_params)
        self.num_tasks = num_tasks
        self.mode = mode
        first = self.params[0]
        self.num_params = sum(p.numel() for p in self.params)
        self.matrix = torch.zeros(num_tasks, self.num_params if allocate else 0, device=first.device, dtype=first.dtype)
        self.direction = torch.zeros(self.num_params, device=first.device, dtype=first.dtype)
        self._grad_views: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            self._grad_views.append(self.direction[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self._eye: dict[torch.dtype, torch.Tensor] = {}

    def _unit_cotangents(self, dtype: torch.dtype) -> torch.Tensor:
        # Cached per loss dtype: allocating eye(K) each step would be a (tiny) kernel per step.
        if dtype not in self._eye:
            self._eye[dtype] = torch.eye(self.num_tasks, device=self.matrix.device, dtype=dtype)
        return self._eye[dtype]

    def compute(self, losses: Sequence[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
        """Fills :attr:`matrix` with the per-task gradients of ``losses`` and returns it.

        Shared parameters that a task does not reach get zeros. ``retain_graph`` keeps
        the graph for a later backward (the task-specific parameters' one).
        """
        return self._fill(losses, self.params, retain_graph, self.matrix)

    def _fill(
        self, losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], retain_graph: bool, out: torch.Tensor
    ) -> torch.Tensor:
        """Writes into ``out`` (K×N) the gradients of every loss w.r.t. ``inputs`` (flattened, concatenated)."""
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
        last = self.num_tasks - 1
        for k, loss in enumerate(losses):  # one task's gradients alive at a time
            keep = retain_graph or k < last
            grads = torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True, materialize_grads=True)
            torch.cat([g.reshape(-1) for g in grads], out=out[k])
        return out

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
        return self._fill(losses, features, True, out)

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
        for p, view in zip(self.params, self._grad_views, strict=False):
            p.grad = view
