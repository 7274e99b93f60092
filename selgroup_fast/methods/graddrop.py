"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from .. import ops
from .gradient import GradientMethod, STEP_ONLY_OPTIONS, check_jacobian
from .jacobian import JacobianMode, SharedParams

Leak = Union[float, Sequence[float], torch.Tensor, None]


def leak_tensor(leak: Leak, num_tasks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The per-task leak as a float[K] tensor on ``device`` (``None`` means 0: the paper's default)."""
    if leak is None:
        leak = 0.0
    values = torch.as_tensor(leak, dtype=dtype).to(device)
    if values.dim() == 0:
        values = values.expand(num_tasks)
    if values.shape != (num_tasks,):
        raise ValueError(f"leak must be a float or {num_tasks} floats, got shape {tuple(values.shape)}")
    return values.contiguous()


class GradDrop(GradientMethod):
    """GradDrop: per coordinate, keep only the task gradients of one sign, drawn by sign purity.

    Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov,
    "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020 (arXiv 2010.06808).

    For every coordinate p of the shared parameters: purity
    ``P = ½ (1 + Σ_k g_kp / Σ_k |g_kp|)``, a uniform ``U``; keep the positive entries
    if ``U < P``, else the negative ones; ``d_p = Σ_k (leak_k + (1-leak_k) mask_kp) g_kp``.
    The fused op ``ops.graddrop`` does it in ONE pass over J (one read, one write)
    with a counter-based RNG keyed by ``(seed, offset, p)``: the CPU and CUDA kernels
    draw the same U, and the method advances ``offset`` by one per step.

    Convention: the **sum** over tasks of the kept gradients (as the paper and the
    LibMTL/TorchJD implementations: with no sign conflict GradDrop equals GD on
    ``Σ_k L_k``), applied to the gradients of the shared parameters (the paper applies it
    at the last shared activation; the common benchmark code applies it to the shared
    parameters, as here). The heads get ``∇ Σ_k L_k``. Not a weighting of the task
    gradients, so no Gram matrix.

    Options: ``leak=0.0`` (a float or K floats), ``seed`` (default: drawn from torch's
    global RNG), ``jacobian``. State: ``seed`` and ``offset``.
    Cost per step: 1 forward, 1 vmapped backward (K with ``jacobian="loop"``) + 1 for
    the heads, 1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, -2.0], [3.0, -1.0]])   # no sign conflict: the sum
        >>> selgroup_fast.methods.aggregate("graddrop", J, seed=0)
        tensor([ 4., -3.])
    """

    name = "graddrop"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        shared_params: SharedParams,
        leak: Leak = None,
        seed: Optional[int] = None,
        jacobian: JacobianMode = "batched",
        profile: bool = False,
    ) -> None:
        super().__init__(optimizer, num_tasks, shared_params=shared_params, jacobian=jacobian, profile=profile)
        self.leak = leak_tensor(leak, num_tasks, self.device, self._jacobian.matrix.dtype)
        self.seed = self._ranks.seed(seed)  # drawn from torch's global RNG if None; rank 0's on every rank
        self.offset = 0

    @classmethod
    def aggregate(cls, jacobian: torch.Tensor, /, *, leak: Leak = None, seed: int = 0, offset: int = 0, **options: Any) -> torch.Tensor:
        """The GradDrop direction of a K×P matrix (random draw keyed by ``seed`` and ``offset``)."""
        jacobian = check_jacobian(jacobian)
        unknown = set(options) - STEP_ONLY_OPTIONS
        if unknown:
            raise TypeError(f"unexpected options for graddrop: {sorted(unknown)}")
        leaks = leak_tensor(leak, jacobian.shape[0], jacobian.device, jacobian.dtype)
        return ops.graddrop(jacobian.contiguous(), leaks, seed, offset)

    def _combine(self, jacobian: torch.Tensor, out: torch.Tensor) -> Optional[torch.Tensor]:
        out.copy_(ops.graddrop(jacobian, self.leak, self.seed, self.offset))
        self.offset += 1
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "offset": self.offset}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict["seed"])
        self.offset = int(state_dict["offset"])
