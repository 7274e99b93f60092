"""CR-MOGM: an exponential moving average of another weighting's weights (Zhou et al., NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .weighting import Weighting, WeightingInputs


def check_unit_interval(name: str, value: float) -> float:
    """A float in [0, 1]; else one ``ValueError`` line."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


class CRMOGM(Weighting):
    """CR-MOGM: the weights of another weighting (``base=``), smoothed by an exponential moving average.

    S. Zhou, W. Zhang, J. Jiang, W. Zhong, J. Gu, W. Zhu, "On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond", NeurIPS 2022; TorchJD's ``CRMOGMWeighting`` (0.18). Rule, with ``λ̂_t``
    the base weighting's weights at step ``t``::

        λ_t = α λ_{t−1} + (1 − α) λ̂_t,      λ_0 = initial_weights, or λ̂_1 (the first step is the base's)
        d = Σ_k λ_t,k g_k

    A weighting of G as its base: every path the base is served on serves it (Gramian, representation space,
    DDP, FSDP2); it reads what the base reads (:attr:`needs`, e.g. GradNorm's losses). The heads get what the
    base gives them, and its warm-up is the base's. State (saved, on the device): λ, the step count and the base's own state.

    Options (TorchJD's names and defaults): ``base="upgrad"`` (the registry name of a gradient method that is a
    weighting of G: ``"mgda"``, ``"upgrad"``, ...; TorchJD's has no default, its example wraps UPGrad), ``base_options`` (a dict of the base's options),
    ``alpha=0.9`` (in [0, 1]; 0: the base's weights, 1: frozen at λ_0; the paper's Corollary 1 raises it as
    the learning rate decays: set :attr:`alpha` between steps), ``initial_weights`` (K weights, or ``None``).

    Example::

        >>> import torch, selgroup_fast
        >>> cr = selgroup_fast.methods.aggregator("cr_mogm", 2, dtype=torch.float64, base="mgda", alpha=0.5)
        >>> cr.weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))   # MGDA's, the first step
        tensor([0.8000, 0.2000], dtype=torch.float64)
        >>> cr.weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))   # ½ (0.8, 0.2) + ½ (½, ½)
        tensor([0.6500, 0.3500], dtype=torch.float64)
    """

    name = "cr_mogm"
    saved_state = ("lambdas", "steps")

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        base: str = "upgrad",
        base_options: dict[str, Any] | None = None,
        alpha: float = 0.9,
        initial_weights: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        from . import aggregator, available  # the registry imports this module

        weightings = [name for name in available("gradient") if name != self.name]
        if base not in weightings:
            raise ValueError(
                f"cr_mogm: base= must name a gradient method, one of {', '.join(weightings)}; got {base!r}"
            )
        base_method = aggregator(base, num_tasks, device, dtype, **(base_options or {}))
        if not isinstance(base_method, Weighting):
            raise ValueError(f"cr_mogm: base={base!r} is not a weighting of G (it acts on J itself): nothing to smooth")
        #: The smoothed weighting.
        self.base: Weighting = base_method
        self.needs = self.base.needs  # what the base reads, the step provides
        self.reads_gram = self.base.reads_gram
        self.weights_task_params = self.base.weights_task_params  # type: ignore[misc]
        # The base's rule does not act before its warm-up ends, so neither does this smoothing of it: a run
        # not longer than that is refused by the trainer, naming the base's option inside base_options.
        self.warmup_steps = self.base.warmup_steps
        self.warmup_options = self.base.warmup_options and f"{self.base.warmup_options} in base_options"
        self.alpha = check_unit_interval("alpha", alpha)
        self.initial_weights = None
        if initial_weights is not None:
            self.initial_weights = torch.as_tensor(initial_weights).detach().to(dtype=dtype, device=self.device)
            if self.initial_weights.shape != (num_tasks,):
                raise ValueError(f"cr_mogm: initial_weights must be {num_tasks} weights, got {initial_weights!r}")
        #: λ_{t−1}: the last smoothed weights (zeros before the first step).
        self.lambdas = torch.zeros(num_tasks, device=self.device, dtype=dtype)
        #: The steps taken (a host int: the first step's λ_0 is chosen without a device read).
        self.steps = 0

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return self.weights_with(WeightingInputs(gram))

    def weights_with(self, inputs: WeightingInputs) -> torch.Tensor:
        current = self.base.weights_with(inputs).to(self.lambdas.dtype)
        if self.steps == 0:
            previous = current if self.initial_weights is None else self.initial_weights
        else:
            previous = self.lambdas
        self.lambdas = self.alpha * previous + (1.0 - self.alpha) * current
        self.steps += 1
        read = inputs.gram if inputs.gram is not None else inputs.cross_gram  # the dtype the base computes in
        assert read is not None, "the step provides G or, for a two-batch base, A"
        return self.lambdas.to(read.dtype)

    def direction_weights(
        self, gram: torch.Tensor | None, losses: torch.Tensor | None = None, cross_gram: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = self.weights_with(WeightingInputs(gram, losses, cross_gram))
        return weights, (weights if self.weights_task_params else None)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        own = dict(state_dict)
        self.base.load_state_dict(own.pop("base", {}))
        super().load_state_dict(own)
