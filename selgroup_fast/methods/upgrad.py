"""UPGrad and DualProj: projections onto the dual cone of the task gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from .weighting import Weighting, validated_op_options


class _DualConeWeighting(Weighting):
    """The options and checks UPGrad and DualProj share (TorchJD's ``pref_vector`` and ``QuadprogProjector``'s)."""

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        pref_vector: torch.Tensor | Sequence[float] | None = None,
        norm_eps: float = 0.0001,
        reg_eps: float = 0.0001,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        if pref_vector is None:
            preference = torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=dtype, device=self.device)
        else:
            preference = torch.as_tensor(pref_vector).detach().to(dtype=dtype, device=self.device)
            if preference.shape != (self.num_tasks,) or not bool(torch.isfinite(preference).all()):
                raise ValueError(
                    f"{self.name}: pref_vector must be {self.num_tasks} finite weights, got {pref_vector!r}"
                )
        self.pref_vector = preference
        self.options = validated_op_options(
            ops.dual_cone_projection, torch.ones(1, 1, dtype=torch.float64), norm_eps=norm_eps, reg_eps=reg_eps
        )


class UPGrad(_DualConeWeighting):
    """UPGrad: every task gradient projected onto the dual cone of all of them, the projections averaged.

    P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232 (2024);
    TorchJD's ``UPGrad`` (0.18). Rule: ``d = Σ_k π_J(p_k·g_k)``, π_J the projection onto the dual cone
    ``{d : J·d ≥ 0}``; in weights (their Proposition 1) ``w = Σ_k v_k``, ``v_k = argmin vᵀĜv`` subject to
    ``v ≥ p_k·e_k``, ``Ĝ = G/tr(G) + reg_eps·I``. Non-conflicting (``J·d ≥ 0``), permutation invariant,
    linear under scaling of J (up to ``reg_eps``). The fused op :func:`selgroup_fast.ops.dual_cone_projection`
    solves the K QPs in one call, exactly, on the device, where TorchJD runs quadprog on each in turn on the
    host.

    Options (TorchJD's names and defaults): ``pref_vector`` (K weights p; default 1/K each),
    ``norm_eps=1e-4`` and ``reg_eps=1e-4`` (TorchJD's ``QuadprogProjector``: G/tr(G) is taken as 0 below
    ``norm_eps``, ``reg_eps·I`` is added to it). The heads get their own gradients (TorchJD's convention).

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("upgrad", J, reg_eps=0.0)   # (1, 1.5)/2: J·d = (0.25, 0.25)
        tensor([0.2500, 0.7500])
    """

    name = "upgrad"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.rows = torch.diag(self.pref_vector)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return ops.dual_cone_projection(gram, self.rows.to(gram.dtype), **self.options).sum(0)


class DualProj(_DualConeWeighting):
    """DualProj: the mean of the task gradients projected onto their dual cone.

    TorchJD's ``DualProj`` (0.18), after A-GEM's projection (Lopez-Paz & Ranzato, "Gradient Episodic Memory
    for Continual Learning", NeurIPS 2017, eq. 11); P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective
    Optimization", arXiv 2406.16232 (2024). Rule: ``d = π_J(Σ_k p_k·g_k)``; in weights ``w = argmin vᵀĜv``
    subject to ``v ≥ p``, ``Ĝ = G/tr(G) + reg_eps·I``, by :func:`selgroup_fast.ops.dual_cone_projection`.
    Non-conflicting, permutation invariant, linear under scaling of J (up to ``reg_eps``).

    Options: as :class:`UPGrad` (``pref_vector``, default 1/K each; ``norm_eps=1e-4``, ``reg_eps=1e-4``).

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("dualproj", J, reg_eps=0.0)   # the mean (-0.5, 0.5) conflicts with g_0
        tensor([0.0000, 0.5000])
    """

    name = "dualproj"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.rows = self.pref_vector[None, :]

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return ops.dual_cone_projection(gram, self.rows.to(gram.dtype), **self.options)[0]
