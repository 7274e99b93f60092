"""MoCo: multi-objective gradient correction (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, ICLR 2023)."""

from __future__ import annotations

import torch

from .tracked import EPS, TaskGradientTracker, check_decay_exponent, check_rate


class MoCo(TaskGradientTracker):
    """MoCo: tracked per-task gradients ``y`` and task weights λ updated by a projected-gradient step.

    H. D. Fernando, H. Shen, M. Liu, S. Chaudhury, K. Murugesan, T. Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023 (openreview dLAYGdKTi2);
    re-derived from LibMTL's ``LibMTL/weighting/MoCo.py`` (which follows the authors' code).

    Rule, at step ``t`` (from 1), with ``ĝ_k = L_k g_k / (‖g_k‖ + 1e-8)`` and ``y`` zeros, ``λ = 1/K`` at first::

        y ← y − β_t (y − ĝ),                       β_t = beta / t^beta_sigma
        λ ← softmax(λ − γ_t (y yᵀ + ρ I) λ),        γ_t = gamma / t^gamma_sigma
        d = yᵀ λ

    The heads get ``Σ_k ∇L_k`` (LibMTL's). State: ``y`` (:attr:`tracked`, ``K · P`` numbers in the shared
    parameters' dtype), λ (:attr:`lambdas`) and ``t``.

    Options (LibMTL's ``--MoCo_beta``, ``--MoCo_beta_sigma``, ``--MoCo_gamma``, ``--MoCo_gamma_sigma``,
    ``--MoCo_rho`` and defaults): ``beta=0.5`` (in (0, 1]), ``beta_sigma=0.5``, ``gamma=0.1`` (> 0),
    ``gamma_sigma=0.5`` (exponents ≥ 0), ``rho=0.0`` (≥ 0).

    Example::

        >>> import torch, selgroup_fast
        >>> moco = selgroup_fast.methods.aggregator("moco", 2, dtype=torch.float64)
        >>> J = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> moco(J, losses=torch.tensor([1.0, 1.0], dtype=torch.float64))   # y = ½ Î, λ = ½: d = ¼ (1, 1)
        tensor([0.2500, 0.2500], dtype=torch.float64)
    """

    name = "moco"
    saved_state = ("tracked", "lambdas", "steps")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.beta = check_rate("beta", beta, upper=1.0)
        self.beta_sigma = check_decay_exponent("beta_sigma", beta_sigma)
        self.gamma = check_rate("gamma", gamma)
        self.gamma_sigma = check_decay_exponent("gamma_sigma", gamma_sigma)
        self.rho = check_decay_exponent("rho", rho)
        #: The task weights λ (on the simplex).
        self.lambdas = torch.full((num_tasks,), 1.0 / num_tasks, device=self.device, dtype=dtype)

    def combine_losses(
        self, jacobian: torch.Tensor, losses: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tracked = self._next_step(jacobian)
        rate = self._decayed(self.beta, self.beta_sigma)
        rows = jacobian.to(tracked.dtype)
        scales = losses.to(tracked.dtype) / (torch.linalg.vector_norm(rows, dim=1) + EPS)
        # y ← (1 − β_t) y + β_t ĝ, in place: no K×P temporary (one under nonfinite="skip", :meth:`_next_value`).
        updated = torch.mul(tracked, 1.0 - rate, out=self._next_value())
        tracked = self._keep_unless_skipped(updated.addcmul_(rows, (rate * scales).unsqueeze(1)))
        coupling = tracked @ tracked.T + self.rho * torch.eye(
            self.num_tasks, device=tracked.device, dtype=tracked.dtype
        )
        step = self._decayed(self.gamma, self.gamma_sigma)
        self.lambdas = torch.softmax(self.lambdas - step * (coupling @ self.lambdas), dim=0)
        weights, state = self.lambdas.to(jacobian.dtype), tracked.to(jacobian.dtype)
        direction = weights @ state if out is None else torch.mv(state.T, weights, out=out)
        return direction, None
