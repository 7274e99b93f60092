"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021), and its hybrid with IMTL-L."""

from __future__ import annotations

import torch

from .. import ops
from .device_adam import adam_step
from .tracked import check_decay_exponent, check_rate
from .weighting import Weighting, WeightingInputs, read_gram


class IMTL(Weighting):
    """IMTL-G: the update whose projections onto every unit task gradient are equal.

    L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021 (the gradient balancing part, IMTL-G).

    Closed form: with ``u_k = g_k / ‖g_k‖``, ``D = [g_1 - g_k]_{k>1}``,
    ``U = [u_1 - u_k]_{k>1}``, ``α_{2..K} = g_1 Uᵀ (D Uᵀ)⁻¹`` and ``α_1 = 1 - Σ α_{2..K}``;
    ``d = Σ_k α_k g_k``. The fused op ``ops.imtl_weights`` computes α from the Gram
    matrix alone, without an anchor task: on linearly dependent gradients it takes the
    least-norm (pseudo-inverse) solution, which does not depend on the task order.

    Convention: the weights sum to 1 (a scaled mean, as in the paper and the
    Nash-MTL benchmark code). As there, the training loss is ``Σ_k α_k L_k``, so the
    heads get ``α_k ∇L_k``.

    Option ``hybrid=False``: ``True`` is the paper's IMTL (§3.3) as LibMTL's ``IMTL`` runs it, IMTL-L's loss
    scales under IMTL-G's weights. The losses are ``e^{s_k} L_k − s_k`` with learned ``s`` (zeros at first), so
    the task gradients are ``e^{s_k} g_k`` (Gram ``D G D``, ``D = diag(e^s)``) and ``d = Σ_k α_k e^{s_k} g_k``,
    ``α`` IMTL-G's weights of the scaled gradients; the heads get ``e^{s_k} ∇L_k`` (LibMTL's per-task backwards).
    ``s`` then takes one Adam step (torch's, on the device) along ``∂/∂s_k = e^{s_k} L_k − 1``, with
    ``lr=1e-4`` and ``weight_decay=1e-5``, LibMTL's defaults for the optimizer that steps its ``loss_scale``
    with the model's (after d: the step's weights are the pre-update ones). It reads the K losses (:attr:`needs`);
    its state (``s``, Adam's moments and step count) is in ``state_dict``. ``lr`` and ``weight_decay`` apply to it
    only.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("imtl", J)   # equal projections on both unit gradients
        tensor([0.6667, 0.6667])
        >>> imtl = selgroup_fast.methods.aggregator("imtl", 2, hybrid=True, lr=0.1)
        >>> imtl(J, losses=torch.tensor([2.0, 0.5]))   # s = 0: IMTL-G's step; then s moves against e^s L − 1
        tensor([0.6667, 0.6667])
        >>> imtl.log_scales
        tensor([-0.1000,  0.1000])
    """

    name = "imtl"
    weights_task_params = True

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        hybrid: bool = False,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        if not isinstance(hybrid, bool):
            raise TypeError(f"hybrid must be a bool, got {type(hybrid).__name__}")
        if not hybrid and (lr is not None or weight_decay is not None):
            raise ValueError("imtl: lr and weight_decay step the hybrid's loss scales: pass hybrid=True")
        self.hybrid = hybrid
        if hybrid:
            self.lr = check_rate("lr", 1e-4 if lr is None else lr)
            self.weight_decay = check_decay_exponent("weight_decay", 1e-5 if weight_decay is None else weight_decay)
            self.needs = frozenset({"losses"})
            self.saved_state = ("log_scales", "exp_avg", "exp_avg_sq", "adam_steps")
            #: ``s``: the loss scales are ``e^s``.
            self.log_scales = torch.zeros(num_tasks, device=self.device, dtype=dtype)
            self.exp_avg = torch.zeros_like(self.log_scales)
            self.exp_avg_sq = torch.zeros_like(self.log_scales)
            self.adam_steps = torch.zeros((), device=self.device, dtype=dtype)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """IMTL-G's weights; the hybrid's of the gradients scaled by its current ``e^s``, on the raw gradients."""
        if not self.hybrid:
            return ops.imtl_weights(gram)
        scales = self.log_scales.to(gram.dtype).exp()
        return ops.imtl_weights((gram * scales[:, None] * scales[None, :]).contiguous()) * scales

    def direction_weights(
        self, gram: torch.Tensor | None, losses: torch.Tensor | None = None, cross_gram: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hybrid's heads get ``e^{s_k} ∇L_k`` (LibMTL's); IMTL-G's ``α_k ∇L_k``."""
        if not self.hybrid:
            return super().direction_weights(gram, losses, cross_gram)
        head_weights = self.log_scales.to(read_gram(gram).dtype).exp()
        return self.weights_with(WeightingInputs(gram, losses)), head_weights

    def weights_with(self, inputs: WeightingInputs) -> torch.Tensor:
        weights = self.weights(read_gram(inputs.gram))
        if self.hybrid:
            assert inputs.losses is not None, "needs declares the losses: the step provides them"
            gradient = self.log_scales.exp() * inputs.losses.to(self.log_scales.dtype) - 1  # ∂(e^s L − s)/∂s
            adam_step(
                self.log_scales,
                self.exp_avg,
                self.exp_avg_sq,
                self.adam_steps,
                gradient,
                lr=self.lr,
                weight_decay=self.weight_decay,
            )
        return weights
