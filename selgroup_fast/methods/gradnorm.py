"""GradNorm: gradient normalisation for adaptive loss balancing (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

from __future__ import annotations

import torch

from ..checks import check_int
from .device_adam import adam_step
from .tracked import check_decay_exponent, check_rate
from .weighting import Weighting, WeightingInputs, read_gram


class GradNorm(Weighting):
    """GradNorm: loss weights learned so that the weighted task gradients' norms follow the tasks' training rates.

    Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018 (arXiv 1711.02257); re-derived from LibMTL's
    ``LibMTL/weighting/GradNorm.py``.

    Rule: the first ``warmup_steps`` steps use ``w = 1`` and record the mean losses ``L(0)`` (LibMTL: the first
    epoch, the epoch's mean loss). Then, with learned logits ``s`` (ones at first) and ``w = K softmax(s)``::

        n_k = ‖g_k‖ = sqrt(G_kk),   G_k = w_k n_k,   r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))
        L_grad = Σ_k |G_k − mean(G) r_k^alpha|      (the target mean(G) r^alpha held constant)
        d = Σ_k w_k g_k

    and ``s`` takes one Adam step (``lr``, ``weight_decay``; torch's, run on the device) along ``∂L_grad/∂s``
    (after d: the step's weights are the pre-update ones). The norms are those of the task gradients over
    every shared parameter, as LibMTL's (the paper takes the last shared layer's). A weighting of G: every
    path of the gradient step serves it (Gramian, representation space, DDP, FSDP2). The heads get ``Σ_k ∇L_k``
    (LibMTL's). State: ``s``, Adam's moments and step count, ``L(0)`` and the step count.

    Options: ``alpha=1.5`` (LibMTL's ``--alpha``, ≥ 0), ``lr=1e-4`` and ``weight_decay=1e-5`` (LibMTL's defaults
    for the optimizer that also steps the loss scales), ``warmup_steps=1`` (LibMTL's is one epoch: pass the
    steps of an epoch).

    Example::

        >>> import torch, selgroup_fast
        >>> gn = selgroup_fast.methods.aggregator("gradnorm", 2, dtype=torch.float64)
        >>> J = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> gn(J, losses=torch.tensor([1.0, 2.0], dtype=torch.float64))   # the warm-up step: w = 1
        tensor([3., 1.], dtype=torch.float64)
        >>> gn.initial_losses
        tensor([1., 2.], dtype=torch.float64)
    """

    name = "gradnorm"
    warmup_options = "warmup_steps="  # the weights are ones until the steps after it
    needs = frozenset({"losses"})
    saved_state = ("logits", "exp_avg", "exp_avg_sq", "adam_steps", "initial_losses", "steps")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        alpha: float = 1.5,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        warmup_steps: int = 1,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.alpha = check_decay_exponent("alpha", alpha)
        self.lr = check_rate("lr", lr)
        self.weight_decay = check_decay_exponent("weight_decay", weight_decay)
        self.warmup_steps = check_int("warmup_steps", warmup_steps)
        #: The logits ``s`` of the weights ``K softmax(s)``.
        self.logits = torch.ones(num_tasks, device=self.device, dtype=dtype)
        self.exp_avg = torch.zeros_like(self.logits)
        self.exp_avg_sq = torch.zeros_like(self.logits)
        self.adam_steps = torch.zeros((), device=self.device, dtype=dtype)
        #: ``L(0)``: the losses' sum over the warm-up steps (their mean once divided by ``warmup_steps``).
        self.initial_losses = torch.zeros_like(self.logits)
        self.steps = 0

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """The current weights: ones during the warm-up, then ``K softmax(s)``."""
        if self.steps < self.warmup_steps:
            return torch.ones(self.num_tasks, device=gram.device, dtype=gram.dtype)
        return (self.num_tasks * torch.softmax(self.logits, dim=0)).to(gram.dtype)

    def weights_with(self, inputs: WeightingInputs) -> torch.Tensor:
        assert inputs.losses is not None, "needs declares the losses: the step provides them"
        gram = read_gram(inputs.gram)
        weights = self.weights(gram)
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self.initial_losses += inputs.losses.to(self.initial_losses.dtype)
            return weights
        self._learn(gram.to(self.logits.dtype), inputs.losses.to(self.logits.dtype))
        return weights

    def _learn(self, gram: torch.Tensor, losses: torch.Tensor) -> None:
        """One Adam step of ``s`` along ``∂L_grad/∂s``, derived in closed form (no autograd in the step)."""
        probabilities = torch.softmax(self.logits, dim=0)
        norms = gram.diagonal().clamp_min(0).sqrt()
        weighted = self.num_tasks * probabilities * norms
        ratios = losses / (self.initial_losses / self.warmup_steps)
        target = weighted.mean() * (ratios / ratios.mean()) ** self.alpha
        by_weight = torch.sign(weighted - target) * norms  # ∂|G_k − c_k|/∂w_k, w_k > 0
        gradient = self.num_tasks * probabilities * (by_weight - probabilities @ by_weight)  # through K softmax(s)
        adam_step(
            self.logits,
            self.exp_avg,
            self.exp_avg_sq,
            self.adam_steps,
            gradient,
            lr=self.lr,
            weight_decay=self.weight_decay,
        )
