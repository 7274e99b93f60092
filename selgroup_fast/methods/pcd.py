"""PCD: Priority-Constrained Descent, a primary task and guaranteed progress for the others (TMLR 2026)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from .weighting import Weighting


class PCD(Weighting):
    """PCD: follow the primary task's gradient (task 0) while every other task gets a fraction τ of its progress.

    "Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization", TMLR 2026 (arXiv 2606.29521); reference code
    ``DaraVaram/priority-constrained-descent``; TorchJD 0.18 ``PCD``.

    Rule: with ``g̃_k = s_k g_k``, ``s_k = 1/sqrt(v̂_k + eps)`` (v̂: the bias-corrected EMA of
    ``‖g_k‖²`` over the calls, decay β), ``d̃ = argmin ½‖d − g̃_0‖²`` subject to
    ``g̃_jᵀd ≥ τ_j ‖g̃_j‖²`` for j ≥ 1, and ``d = d̃ ‖g_0‖/‖d̃‖``. ``g_0 = 0``: d = 0; infeasible
    constraints (K ≥ 3, e.g. two opposite secondary gradients): d = g_0. The QP is solved exactly
    from G (:func:`selgroup_fast.ops.pcd_weights`: the dual active set of Goldfarb & Idnani, as
    TorchJD's, on the device, where TorchJD solves it on the CPU); the EMA and its step count
    are tensors on the device (no host synchronisation). A non-finite G gives NaN weights and
    leaves the EMA unchanged (TorchJD's convention).

    Not symmetric in the tasks: the first loss of the closure is the primary one.
    Convention: the heads get ``Σ_k ∇L_k``.

    Options (TorchJD's names and defaults): ``tau=0.02`` (in [0, 1]; a float or K − 1 values),
    ``beta=0.999`` (in [0, 1)), ``eps=1e-8`` (≥ 0). State: ``sq_norm_ema``, ``n_steps``.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> selgroup_fast.methods.aggregate("pcd", J, tau=0.0)   # g_1·d = 0, ‖d‖ = ‖g_0‖
        tensor([0.7071, 0.7071], dtype=torch.float64)
    """

    name = "pcd"
    saved_state = ("sq_norm_ema", "n_steps")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        tau: float | Sequence[float] | torch.Tensor = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        taus = torch.as_tensor(tau, dtype=torch.float64)
        taus = taus.expand(num_tasks - 1) if taus.dim() == 0 else taus
        if taus.shape != (num_tasks - 1,) or not bool(((taus >= 0) & (taus <= 1)).all()):
            raise ValueError(f"tau must be in [0, 1], a float or {num_tasks - 1} values, got {tau!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.taus = taus.to(self.device).contiguous()
        self.beta, self.eps = float(beta), float(eps)
        #: The EMA of the squared gradient norms (float64, as TorchJD's) and the number of calls it has seen.
        self.sq_norm_ema = torch.zeros(num_tasks, device=self.device, dtype=torch.float64)
        self.n_steps = torch.zeros((), device=self.device, dtype=torch.int64)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        finite = gram.isfinite().all()
        sq_norms = gram.diagonal().double()
        updated = self.beta * self.sq_norm_ema + (1.0 - self.beta) * sq_norms
        self.sq_norm_ema = torch.where(finite, updated, self.sq_norm_ema)
        self.n_steps = self.n_steps + finite.long()
        debiased = self.sq_norm_ema / (1.0 - torch.pow(self.beta, self.n_steps.double()))
        denominators = (debiased + self.eps).sqrt()
        # A zero EMA means a gradient that has always been zero: its scale does not matter (0 avoids 1/0).
        scales = torch.where(denominators > 0, 1.0 / denominators, 0.0).nan_to_num(0.0)
        return ops.pcd_weights(gram, scales.to(gram.dtype), self.taus.to(gram.dtype))
