"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .. import ops
from ..checks import check_int
from ..losses import ClosureOutput
from .base import detached
from .gradient import WeightingMethod
from .jacobian import JacobianMode, SharedParams


def clip_weights(weights: torch.Tensor, gram: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scales ``w`` so that ``‖wᵀJ‖ = sqrt(wᵀGw)`` is at most ``max_norm`` (no-op when ``max_norm <= 0``).

    The factor is ``torch.nn.utils.clip_grad_norm_``'s, ``min(1, max_norm / (‖d‖ + 1e-6))``,
    computed on the device (no host branch on the norm).
    """
    if max_norm <= 0:
        return weights
    norm = (weights @ gram @ weights).clamp_min(0).sqrt()
    return weights * (max_norm / (norm + 1e-6)).clamp(max=1.0)


class NashMTL(WeightingMethod):
    """Nash-MTL: the Nash bargaining solution ``G α = 1/α`` (elementwise), ``d = Σ_k α_k g_k``.

    A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik, E. Fetaya,
    "Multi-Task Learning as a Bargaining Game", ICML 2022 (arXiv 2202.01017); authors'
    code ``AvivNavon/nash-mtl`` (``methods/weight_methods.py``, ``NashMTL``).

    The authors solve for α > 0 with a sequence of convex problems (cvxpy, warm
    started from the previous step's α); the fused op ``ops.nash_mtl_weights`` solves
    the same fixed point on the device, warm started from :attr:`alpha` as well.

    Convention (the authors'): the training loss is ``Σ_k α_k L_k`` (so the heads get
    ``α_k ∇L_k``), then the shared parameters' gradient is clipped to norm
    ``max_norm`` (``clip_grad_norm_``; ``max_norm <= 0`` disables it). α is recomputed
    every ``update_weights_every`` steps; in between, α is reused and the step costs
    ONE ordinary backward of ``Σ_k α_k L_k`` (no per-task gradients), as in the
    authors' code.

    Options (the authors' names and defaults): ``max_norm=1.0``,
    ``update_weights_every=1``, and ``jacobian``. State: α and the step counter.
    Cost per update step: 1 forward, 1 vmapped backward (K with ``jacobian="loop"``)
    + 1 for the heads, 1 optimizer step; other steps: 1 forward, 1 backward.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
        >>> selgroup_fast.methods.aggregate("nash_mtl", J, max_norm=0.0)   # α_k = 1/‖g_k‖ for orthogonal g
        tensor([1., 1.])
    """

    name = "nash_mtl"
    weights_task_params = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        shared_params: SharedParams,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        jacobian: JacobianMode = "batched",
        profile: bool = False,
    ) -> None:
        super().__init__(optimizer, num_tasks, shared_params=shared_params, jacobian=jacobian, profile=profile)
        self.max_norm = float(max_norm)
        self.update_weights_every = check_int("update_weights_every", update_weights_every)
        dtype = self._jacobian.matrix.dtype
        #: The current bargaining weights (ones before the first update, as the authors start).
        self.alpha = torch.ones(num_tasks, device=self.device, dtype=dtype)
        self.steps = 0

    @staticmethod
    def gram_weights(
        gram: torch.Tensor,
        *,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        alpha_init: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """α for ``gram`` (warm-started from ``alpha_init``, default ones), scaled down to ``max_norm``.

        ``update_weights_every`` only matters across steps; it is accepted so that
        ``aggregate`` takes the options of ``create``.
        """
        if alpha_init is None:
            alpha_init = torch.ones(gram.shape[0], device=gram.device, dtype=gram.dtype)
        return clip_weights(ops.nash_mtl_weights(gram, alpha_init), gram, max_norm)

    def _weights(self, gram: torch.Tensor) -> torch.Tensor:
        self.alpha = ops.nash_mtl_weights(gram, self.alpha)
        return clip_weights(self.alpha, gram, self.max_norm)

    def _combine(self, jacobian: torch.Tensor, out: torch.Tensor) -> Optional[torch.Tensor]:
        super()._combine(jacobian, out)
        return self.alpha  # the heads get α_k ∇L_k, unclipped (the authors clip the shared gradient only)

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        update = self.steps % self.update_weights_every == 0
        self.steps += 1
        if update:
            return super().step(closure)
        # Reuse α: one ordinary backward of Σ α_k L_k, then clip the shared gradient (the authors' path).
        self._timer.reset()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._forward(closure)
        with self._timer.phase("backward"):
            stacked = torch.stack(losses)
            (self.alpha.to(stacked.dtype) * stacked).sum().backward()
        with self._timer.phase("manipulation"):
            if self.max_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.shared_params, self.max_norm)
        with self._timer.phase("optimizer"):
            self.optimizer.step()
        return detached(losses)

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.clone(), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alpha = state_dict["alpha"].to(device=self.device, dtype=self.alpha.dtype).clone()
        self.steps = int(state_dict["steps"])
