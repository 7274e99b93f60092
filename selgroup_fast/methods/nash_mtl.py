"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ..checks import check_int
from .weighting import Weighting, read_gram, validated_op_options


def clip_weights(weights: torch.Tensor, gram: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scales ``w`` so that ``‖wᵀJ‖ = sqrt(wᵀGw)`` is at most ``max_norm`` (no-op when ``max_norm <= 0``).

    The factor is ``torch.nn.utils.clip_grad_norm_``'s, ``min(1, max_norm / (‖d‖ + 1e-6))``,
    computed on the device (no host branch on the norm). ``‖d‖ = m·sqrt(ŵᵀGŵ)`` with
    ``m = max|w|`` and ``ŵ = w/m``, and the factor as ``(max_norm/m) / (sqrt(ŵᵀGŵ) + 1e-6/m)``:
    no intermediate overflows however large w is (``wᵀGw`` itself would), and a
    quadratic form that rounding makes negative counts as 0.

    >>> clip_weights(torch.tensor([3e30, 4e30]), torch.eye(2), 1.0)   # ‖d‖ = 5e30, clipped to 1
    tensor([0.6000, 0.8000])
    """
    if max_norm <= 0:
        return weights
    largest = weights.abs().amax().clamp_min(torch.finfo(weights.dtype).tiny)
    unit = weights / largest
    unit_norm = (unit @ gram @ unit).clamp_min(0).sqrt()
    return weights * ((max_norm / largest) / (unit_norm + 1e-6 / largest)).clamp(max=1.0)


class NashMTL(Weighting):  # and a ReusesWeights (selgroup_fast.methods.weighting)
    """Nash-MTL: the Nash bargaining solution ``G α = 1/α`` (elementwise), ``d = Σ_k α_k g_k``.

    A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik, E. Fetaya,
    "Multi-Task Learning as a Bargaining Game", ICML 2022 (arXiv 2202.01017); authors'
    code ``AvivNavon/nash-mtl`` (``methods/weight_methods.py``, ``NashMTL``).

    The authors solve for α > 0 with a sequence of convex problems (cvxpy, warm
    started from the previous step's α); the fused op ``ops.nash_mtl_weights`` solves
    the same fixed point on the device, warm started from :attr:`alpha` as well.

    Convention (the authors'): the training loss is ``Σ_k α_k L_k`` (so the heads get
    ``α_k ∇L_k``, unclipped), then the shared parameters' gradient is clipped to norm
    ``max_norm`` (``clip_grad_norm_``; ``max_norm <= 0`` disables it). α is recomputed
    every ``update_weights_every`` training steps; in between the step reuses α
    (:meth:`reused_weights`) and costs ONE ordinary backward of ``Σ_k α_k L_k``, as in
    the authors' code.

    Options: ``max_norm=1.0``, ``update_weights_every=1`` (the authors' names and
    defaults) and those of :func:`selgroup_fast.ops.nash_mtl_weights` (``max_iter``,
    ``tol``). State: α and the step counter.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
        >>> selgroup_fast.methods.aggregate("nash_mtl", J, max_norm=0.0)   # α_k = 1/‖g_k‖ for orthogonal g
        tensor([1., 1.])
    """

    name = "nash_mtl"
    weights_task_params = True
    saved_state = ("alpha", "steps")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.max_norm = float(max_norm)
        self.update_weights_every = check_int("update_weights_every", update_weights_every)
        self.options = validated_op_options(ops.nash_mtl_weights, torch.ones(1, dtype=torch.float64), **options)
        #: The current bargaining weights (ones before the first update, as the authors start).
        self.alpha = torch.ones(num_tasks, device=self.device, dtype=dtype)
        self.steps = 0

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        self.alpha = ops.nash_mtl_weights(gram, self.alpha.to(gram.dtype), **self.options)
        return self.alpha

    def direction_weights(
        self, gram: torch.Tensor | None, losses: torch.Tensor | None = None, cross_gram: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        gram = read_gram(gram)
        alpha = self.weights(gram)
        return clip_weights(alpha, gram, self.max_norm), alpha  # the authors clip the shared gradient only

    def reused_weights(self) -> torch.Tensor | None:
        update = self.steps % self.update_weights_every == 0
        self.steps += 1
        return None if update else self.alpha
