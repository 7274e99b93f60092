"""MoDo and SDMGrad: weightings of the cross-batch matrix ``A = J_1 J_2ᵀ`` of two independent batches.

Both methods' stochastic guarantees need the task weights to be updated with the gradients of one batch
against those of another, independent one. The training step provides ``A`` (:attr:`Aggregator.needs` names
``"cross_gram"``) from the closure and the second closure that ``step`` must be given
(:meth:`~.gradient.GradientMethod.step`; without one it raises): their losses are two batches' (e.g. the two
halves of one batch), J_1 and J_2 their task gradients, and the update is ``d = wᵀ (J_1 + J_2)/2``, the
gradient of their losses' mean (MoDo's eq. 2.9b; TorchJD's two-batch example). ``aggregator(J_1, second_jacobian=J_2)`` does the same on two given J.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_int
from .cr_mogm import check_unit_interval
from .tracked import check_decay_exponent, check_rate
from .weighting import Weighting, WeightingInputs


def project_onto_simplex(point: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of a K-vector onto the probability simplex, on its device (no host sync).

    With ``u`` sorted decreasing and ``c`` its cumulative sums, ``θ = (c_ρ − 1)/ρ`` for the largest ρ with
    ``u_ρ > (c_ρ − 1)/ρ`` (Held, Wolfe & Crowder 1974; Duchi et al. 2008), and the projection ``max(point − θ, 0)``.

    >>> project_onto_simplex(torch.tensor([0.5, 0.5, 1.0]))
    tensor([0.1667, 0.1667, 0.6667])
    """
    ordered = point.sort(descending=True).values
    counts = torch.arange(1, point.shape[0] + 1, device=point.device, dtype=point.dtype)
    thresholds = (ordered.cumsum(0) - 1) / counts  # θ for each candidate ρ
    support = (ordered > thresholds).sum(0, keepdim=True).clamp_min(1)  # a prefix of the sorted entries: its length ρ
    return (point - thresholds.gather(0, support - 1)).clamp_min(0)


class _CrossGramWeighting(Weighting):
    """A weighting of the cross-batch matrix A (:meth:`weights` takes A; the training step passes it as ``cross_gram``)."""

    needs = frozenset({"cross_gram"})
    reads_gram = False  # A only: the step computes no G = J Jᵀ for it

    def weights_with(self, inputs: WeightingInputs) -> torch.Tensor:
        assert inputs.cross_gram is not None, "needs declares the cross-batch matrix: the step provides it"
        return self.weights(inputs.cross_gram)


class MoDo(_CrossGramWeighting):
    """MoDo: the task weights take one projected gradient step on ``½ λᵀ A λ + ½ ρ ‖λ‖²`` per training step.

    L. Chen, H. Fernando, Y. Ying, T. Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", JMLR 25 (2024) / NeurIPS 2023; TorchJD's ``MoDoWeighting`` (0.18).
    Rule, with ``A = J_1 J_2ᵀ`` of two independent batches and λ = 1/K at first::

        λ ← Π_simplex(λ − γ (A λ + ρ λ)),      d = λᵀ (J_1 + J_2)/2

    Options (TorchJD's names and defaults): ``gamma=0.1`` (> 0), ``rho=0.1`` (≥ 0). Needs two batches per
    step (module docstring); the heads get ``λ_k``-weighted gradients of the two batches' mean losses
    (the weighted loss backed through, as TorchJD's example). State (saved, on the device): λ.

    Example::

        >>> import torch, selgroup_fast
        >>> modo = selgroup_fast.methods.aggregator("modo", 2, dtype=torch.float64, rho=0.0)
        >>> modo.weights(torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64))   # ½ − 0.1·(1, 0), projected
        tensor([0.4500, 0.5500], dtype=torch.float64)
    """

    name = "modo"
    weights_task_params = True
    saved_state = ("lambdas",)

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        gamma: float = 0.1,
        rho: float = 0.1,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.gamma = check_rate("gamma", gamma)
        self.rho = check_decay_exponent("rho", rho)
        #: λ, on the simplex.
        self.lambdas = torch.full((num_tasks,), 1.0 / num_tasks, device=self.device, dtype=dtype)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """One step of λ on the cross-batch matrix ``gram`` (A, K × K, not symmetric in general)."""
        lambdas = self.lambdas.to(gram.dtype)
        lambdas = project_onto_simplex(lambdas - self.gamma * (gram @ lambdas + self.rho * lambdas))
        self.lambdas = lambdas.to(self.lambdas.dtype)
        return lambdas


class SDMGrad(_CrossGramWeighting):
    """SDMGrad: the weights of the direction nearest the preferred one, by n_iter steps of projected SGD.

    P. Xiao, H. Ban, K. Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023 (arXiv 2305.18409); TorchJD's ``SDMGradWeighting`` (0.18). Rule, with
    ``A = J_1 J_2ᵀ`` of two independent batches, scaled to ``Â = A / ((mean_k sqrt(max(A_kk, 0)))² + 1e-8)``,
    w̃ the preference and w (1/K at first) the state::

        v ← Â (w + λ w̃) + momentum · v,   w ← Π_simplex(w − lr · v)       (n_iter times, v = 0 at first)
        weights = (w + λ w̃)/(1 + λ),   d = weightsᵀ (J_1 + J_2)/2

    Options (TorchJD's names and defaults): ``lr=10.0`` (> 0), ``momentum=0.5`` (in [0, 1)), ``n_iter=20``,
    ``lambda_=0.3`` (≥ 0; the authors' experiments'), ``pref_vector`` (K weights; default 1/K each). Needs two
    batches per step (module docstring); the heads get the weights' gradients. State (saved, on the device): w.

    Example::

        >>> import torch, selgroup_fast
        >>> sdm = selgroup_fast.methods.aggregator("sdmgrad", 2, dtype=torch.float64)
        >>> sdm.weights(torch.eye(2, dtype=torch.float64))   # symmetric: stays at the centre
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "sdmgrad"
    weights_task_params = True
    saved_state = ("inner_weights",)

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.lr = check_rate("lr", lr)
        self.momentum = check_unit_interval("momentum", momentum)
        if self.momentum == 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.n_iter = check_int("n_iter", n_iter)
        self.lambda_ = check_decay_exponent("lambda_", lambda_)
        if pref_vector is None:
            preference = torch.full((num_tasks,), 1.0 / num_tasks, device=self.device, dtype=dtype)
        else:
            preference = torch.as_tensor(pref_vector).detach().to(dtype=dtype, device=self.device)
            if preference.shape != (num_tasks,):
                raise ValueError(f"sdmgrad: pref_vector must be {num_tasks} weights, got {pref_vector!r}")
        self.pref_vector = preference
        #: w, the inner problem's weights (on the simplex), warm-starting the next step.
        self.inner_weights = torch.full((num_tasks,), 1.0 / num_tasks, device=self.device, dtype=dtype)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """The weights for the cross-batch matrix ``gram`` (A, K × K), w updated."""
        preferred = self.lambda_ * self.pref_vector.to(gram.dtype)
        scale = gram.diagonal().clamp_min(0).sqrt().mean()
        scaled = gram / (scale.square() + 1e-8)
        inner, velocity = self.inner_weights.to(gram.dtype), torch.zeros_like(preferred)
        for _ in range(self.n_iter):
            velocity = scaled @ (inner + preferred) + self.momentum * velocity
            inner = project_onto_simplex(inner - self.lr * velocity)
        self.inner_weights = inner.to(self.inner_weights.dtype)
        return (inner + preferred) / (1.0 + self.lambda_)
