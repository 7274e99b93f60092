"""ExcessMTL: robust multi-task learning with excess risks (He, Zhang, Wang & Zhao, ICML 2024)."""

from __future__ import annotations

import torch

from ..checks import check_int
from .tracked import TaskGradientTracker, check_rate

#: The shift inside the AdaGrad square root and the baseline's division (the authors', LibMTL's, TorchJD's).
EXCESS_EPS = 1e-7


class ExcessMTL(TaskGradientTracker):
    """ExcessMTL: task weights moved by an exponentiated-gradient step on each task's estimated excess risk.

    Y. He, S. Zhang, Y. Wang, H. Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024 (PMLR 235);
    TorchJD's ``ExcessMTL`` (0.18), which follows the authors' code (``uiuctml/ExcessMTL``) and LibMTL but
    starts from ``w = 1/K`` (the paper's simplex) where they start from ones. Rule, at every step::

        S ← S + J ⊙ J                             (K × P: AdaGrad's diagonal Hessian, eq. 7)
        e_k = Σ_p J_kp² / sqrt(S_kp + 1e-7)        (the excess risk g_kᵀ H_k⁻¹ g_k, eq. 6)
        e ← e / (e₀ + 1e-7)                        (the baseline e₀: the first step's e, which itself is not divided;
                                                    with warm-up: the warm-up's mean e)
        w ← softmax(log w + robust_step_size · e)   (eq. 9)
        d = Σ_k w_k g_k

    During the ``n_warmup_steps`` first steps w stays 1/K and e is summed. It reads J's every coordinate: no
    Gramian path, no representation space, no FSDP2 (as DB-MTL's and MoCo's K × P state,
    docs/baselines.md). The heads get their own gradients (TorchJD's convention). State (saved, on the
    device): S (:attr:`tracked`, K · P numbers), w, e₀, the warm-up's sum and the step count.

    Options (TorchJD's names and defaults): ``robust_step_size=1.0`` (> 0), ``n_warmup_steps=0`` (≥ 0; the
    paper's appendix C.1 suggests 3 epochs of steps).

    Example::

        >>> import torch, selgroup_fast
        >>> excess = selgroup_fast.methods.aggregator("excess_mtl", 2, dtype=torch.float64)
        >>> J = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> d = excess(J)   # e ≈ (|3|, |1|): w = softmax(3, 1)
        >>> torch.allclose(d, torch.softmax(torch.tensor([3.0, 1.0], dtype=torch.float64), 0) * torch.tensor([3.0, 1.0]))
        True
    """

    name = "excess_mtl"
    warmup_options = "n_warmup_steps="  # w stays 1/K until the steps after it
    needs = frozenset({"parameter_layout"})  # not the losses
    saved_state = ("tracked", "task_weights", "baseline", "warmup_sum", "steps")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        robust_step_size: float = 1.0,
        n_warmup_steps: int = 0,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.robust_step_size = check_rate("robust_step_size", robust_step_size)
        self.n_warmup_steps = check_int("n_warmup_steps", n_warmup_steps, minimum=0)
        self.warmup_steps = self.n_warmup_steps
        #: The task weights w (on the simplex).
        self.task_weights = torch.full((num_tasks,), 1.0 / num_tasks, device=self.device, dtype=dtype)
        #: e₀, the excess risks the later ones are divided by (set at the first step after the warm-up).
        self.baseline = torch.zeros(num_tasks, device=self.device, dtype=dtype)
        #: The warm-up steps' summed excess risks.
        self.warmup_sum = torch.zeros(num_tasks, device=self.device, dtype=dtype)

    def combine(
        self, jacobian: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        squares = self._next_step(jacobian)  # S, updated in place (masked under nonfinite="skip": _next_value)
        rows = jacobian.to(squares.dtype)
        squares = self._keep_unless_skipped(torch.addcmul(squares, rows, rows, out=self._next_value()))
        excess = (rows.square() / (squares + EXCESS_EPS).sqrt()).sum(dim=1)
        if self.steps <= self.n_warmup_steps:
            self.warmup_sum += excess
        else:
            if self.steps == self.n_warmup_steps + 1:  # the baseline: a host int decides, no device read
                if self.n_warmup_steps == 0:
                    self.baseline = excess.clone()
                else:
                    self.baseline = self.warmup_sum / self.n_warmup_steps
            if self.steps > 1:  # the official code's first step uses e itself
                excess = excess / (self.baseline + EXCESS_EPS)
            self.task_weights = torch.softmax(self.task_weights.log() + self.robust_step_size * excess, dim=0)
        weights = self.task_weights.to(jacobian.dtype)
        return (weights @ jacobian if out is None else torch.mv(jacobian.T, weights, out=out)), None

    def combine_losses(
        self, jacobian: torch.Tensor, losses: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`combine`: the losses are not read."""
        return self.combine(jacobian, out)
