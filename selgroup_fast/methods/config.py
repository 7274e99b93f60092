"""ConFIG: conflict-free gradient updates (Liu, Chu & Thuerey, ICLR 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from .weighting import Weighting


class ConFIG(Weighting):
    """ConFIG: the direction equally aligned with every unit task gradient, of length ``Σ_k g_kᵀ d̂``.

    Q. Liu, M. Chu, N. Thuerey, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025 (arXiv 2408.11104, Eq. 2); authors' code
    ``tum-pbs/ConFIG`` (``conflictfree``); TorchJD 0.18 ``ConFIG``.

    Rule: with the unit gradients ``u_k = g_k/‖g_k‖`` (0 for a zero gradient), ``b = U⁺ p``
    (p: the preference vector) and ``b̂ = b/‖b‖``, ``d = (Σ_k g_kᵀ b̂) b̂``. The authors and
    TorchJD take ``pinv`` of the K×P matrix U (an SVD of J); here ``U⁺ = Jᵀ D (D G D)⁺``
    (``D = diag(1/‖g_k‖)``), so d = wᵀJ with w from G alone
    (:func:`selgroup_fast.ops.config_weights`: one K×K eigenproblem on the device), and the
    Gramian path applies. The pseudo-inverse keeps the eigenvalues above G's rounding
    (``K·ε·λ_max``) where ``torch.linalg.pinv`` keeps singular values above ``max(K, P)·ε·σ_max``:
    the same d unless U is singular to within those precisions.

    Convention: the heads get ``Σ_k ∇L_k``. Options: ``pref_vector=None`` (TorchJD's name:
    K preference weights; ``None``: all ones, the authors' and TorchJD's default). Stateless.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("config", J)   # b̂ = (1, 1)/√2, length 3/√2
        tensor([1.5000, 1.5000])
    """

    name = "config"

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        pref_vector: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        preference = torch.ones(num_tasks) if pref_vector is None else torch.as_tensor(pref_vector)
        if preference.shape != (num_tasks,) or not bool(preference.isfinite().all()):
            raise ValueError(f"pref_vector must hold {num_tasks} finite values, got {pref_vector!r}")
        self.pref_vector = preference.to(device=self.device, dtype=dtype)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return ops.config_weights(gram, self.pref_vector.to(gram.dtype))
