"""DB-MTL: dual-balancing multi-task learning (Lin, Ye, Xu, Shi & Zhang, 2023)."""

from __future__ import annotations

import torch

from .tracked import EPS, TaskGradientTracker, check_decay_exponent, check_rate


class DBMTL(TaskGradientTracker):
    """DB-MTL: gradients of the log losses, averaged over steps, each rescaled to the largest average's norm.

    B. Lin, W. Jiang, F. Ye, Y. Zhang, P. Chen, Y.-C. Chen, S. Liu, J. T. Kwok, "Dual-Balancing for
    Multi-Task Learning", 2023 (arXiv 2308.12029); re-derived from LibMTL's ``LibMTL/weighting/DB_MTL.py``.

    Rule, at step ``t`` (from 1), with ``g_k = ∇ log(L_k + 1e-8) = ∇L_k / (L_k + 1e-8)`` (the task gradient's row
    scaled: the chain rule, without LibMTL's K backwards of the log losses) and the tracked ``m_k`` (zeros at first)::

        m_k ← g_k + β_t (m_k − g_k),   β_t = beta / t^beta_sigma
        d   = Σ_k (max_j ‖m_j‖ / (‖m_k‖ + 1e-8)) m_k

    The heads get ``Σ_k ∇L_k / (L_k + 1e-8)`` (LibMTL back-propagates the log losses through them).
    State: the K×P averages ``m`` (:attr:`tracked`, ``K · P`` numbers in the shared parameters' dtype) and ``t``.

    Options (LibMTL's ``--DB_beta``, ``--DB_beta_sigma`` and defaults): ``beta=0.9`` (in (0, 1]),
    ``beta_sigma=0.0`` (≥ 0).

    Example::

        >>> import torch, selgroup_fast
        >>> db = selgroup_fast.methods.aggregator("db_mtl", 2, dtype=torch.float64)
        >>> J = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> db(J, losses=torch.tensor([1.0, 0.5], dtype=torch.float64))   # m = 0.1·[[3, 0], [0, 2]]: both to norm 0.3
        tensor([0.3000, 0.3000], dtype=torch.float64)
    """

    name = "db_mtl"
    saved_state = ("tracked", "steps")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.beta = check_rate("beta", beta, upper=1.0)
        self.beta_sigma = check_decay_exponent("beta_sigma", beta_sigma)

    def combine_losses(
        self, jacobian: torch.Tensor, losses: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        averages = self._next_step(jacobian)
        rate = self._decayed(self.beta, self.beta_sigma)
        log_scale = 1.0 / (losses.to(averages.dtype) + EPS)  # ∇ log(L + ε) = ∇L / (L + ε)
        # m ← β_t m + (1 − β_t) g, in place: no K×P temporary (one under nonfinite="skip", :meth:`_next_value`).
        updated = torch.mul(averages, rate, out=self._next_value())
        updated.addcmul_(jacobian.to(averages.dtype), ((1.0 - rate) * log_scale).unsqueeze(1))
        averages = self._keep_unless_skipped(updated)
        norms = torch.linalg.vector_norm(averages, dim=1)
        scales = (norms.amax() / (norms + EPS)).to(jacobian.dtype)
        rows = averages.to(jacobian.dtype)
        direction = scales @ rows if out is None else torch.mv(rows.T, scales, out=out)
        return direction, log_scale.to(jacobian.dtype)
