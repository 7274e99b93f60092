"""Gradient methods that keep a state per task over the shared parameters' coordinates (K×P): DB-MTL, MoCo.

Their direction is not a function of this step's J alone: each keeps an exponential moving average of
the K task gradients (DB-MTL: of the log losses' gradients; MoCo: of the normalised gradients scaled by
the losses), which it reads with the K losses (:attr:`Aggregator.needs`). The state is a K×P matrix in
the shared parameters' dtype on their device, allocated once, when the training step is built and binds
the shared parameters' layout (:meth:`Aggregator.bind`), updated in place, saved in ``state_dict``
(docs/baselines.md §Methods with K × P state). Under ``nonfinite="skip"`` the update is masked by the step's
final flag instead of snapshotted (:attr:`TaskGradientTracker.masked_state`): a skipped step leaves it bitwise
unchanged with no K×P copy and no host sync.
"""

from __future__ import annotations

import abc
from typing import cast

import torch

from .weighting import Aggregator, ParameterLayout

#: LibMTL's shift inside the norms' and the losses' divisions.
EPS = 1e-8


def check_rate(name: str, value: float, *, upper: float | None = None) -> float:
    """A step size or EMA rate as a float > 0 (and ≤ ``upper`` where given); else one ``ValueError`` line."""
    value = float(value)
    if not value > 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper:g}]" if upper is not None else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def check_decay_exponent(name: str, value: float) -> float:
    """The exponent σ of a rate decayed as ``rate / t^σ``: a float ≥ 0; else one ``ValueError`` line."""
    value = float(value)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


class TaskGradientTracker(Aggregator):
    """An aggregator with a K×P state over J's columns (:attr:`tracked`) that reads the K losses.

    Subclasses implement :meth:`combine_losses`, starting with :meth:`_next_step` (the step counter ``t``,
    counted from 1 as LibMTL's, and the state). Not a weighting of G: no Gramian path; J's columns must
    all be on one rank (no FSDP2) and be the same coordinates at every step (no representation space):
    :attr:`needs` names the shared parameters' layout, so the training step refuses those settings.
    """

    needs = frozenset({"losses", "parameter_layout"})
    #: The state this class keeps unchanged itself on a skipped step: :class:`~.nonfinite.NonFiniteGuard`
    #: hands it the step's flag (:attr:`skip`) instead of snapshotting it, and calls :meth:`end_masked_step`.
    masked_state: tuple[str, ...] = ("tracked",)

    def __init__(self, num_tasks: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(num_tasks, device, dtype)
        #: The per-task state, K × P (K × 0 until :meth:`allocate` or the first step).
        self.tracked = torch.zeros(num_tasks, 0, device=self.device, dtype=dtype)
        #: The steps taken (``t`` of the decayed rates ``rate / t^σ``; a host int, no device read).
        self.steps = 0
        #: The step's flag under ``nonfinite="skip"`` (a 0-d bool tensor on the device; ``None`` otherwise):
        #: set at the step's end, the state keeps its old value (:meth:`_next_value`, :meth:`end_masked_step`).
        self.skip: torch.Tensor | None = None
        #: This step's update under a flag, until :meth:`end_masked_step` writes it into the state.
        self._pending: torch.Tensor | None = None

    def bind(self, layout: ParameterLayout) -> None:
        """Allocates the K × P state over the shared parameters (the training step binds them when it is built)."""
        self.allocate(layout.numel)

    def allocate(self, width: int) -> None:
        """Allocates the K × ``width`` state (zeros) once; a later width must be the same."""
        if self.tracked.shape[1] not in (0, width):
            raise ValueError(f"{self.name} tracks {self.tracked.shape[1]} coordinates, the step has {width}")
        if self.tracked.shape[1] == 0:
            self.tracked = torch.zeros(self.num_tasks, width, device=self.device, dtype=self.dtype)

    def combine(
        self, jacobian: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise ValueError(
            f"{self.name} reads the K task losses besides the task gradients: train it with a gradient method's step, "
            "or call it with losses="
        )

    @abc.abstractmethod
    def combine_losses(
        self, jacobian: torch.Tensor, losses: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The direction from J, the K losses and the state (updated), and the heads' weights (``None``: ones)."""

    def _next_step(self, jacobian: torch.Tensor) -> torch.Tensor:
        """Counts the step and returns the K×P state (allocated here when the aggregator is used alone)."""
        self.allocate(jacobian.shape[1])
        self.steps += 1
        return self.tracked

    def _next_value(self) -> torch.Tensor:
        """Where this step's update of the state is written: the state itself (in place) when no flag can skip
        the step, else a temporary that :meth:`_keep_unless_skipped` writes into the state."""
        return self.tracked if self.skip is None else torch.empty_like(self.tracked)

    def _keep_unless_skipped(self, updated: torch.Tensor) -> torch.Tensor:
        """This step's state, ``updated``: the state itself when no flag can skip the step, else a temporary that
        :meth:`end_masked_step` writes into the state unless the step is skipped. Not here: the flag is final only
        after the optimizers' gradients are unscaled (a grad scaler's inf/NaN in the heads' gradients, another
        rank's non-finite loss), after the aggregator ran."""
        if updated is not self.tracked:
            self._pending = updated
        return updated

    def end_masked_step(self) -> None:
        """The step's end (:meth:`~.nonfinite.NonFiniteGuard.keep`'s restore): its update written into the state
        in place unless its flag is set (no K×P copy of the old value, no host sync); the flag cleared."""
        pending, self._pending = self._pending, None
        if pending is not None:
            skip = cast(torch.Tensor, self.skip).to(pending.device).expand_as(pending)  # expanded: a faster CPU where
            torch.where(skip, self.tracked, pending, out=self.tracked)
        self.skip = None

    def _decayed(self, rate: float, sigma: float) -> float:
        """LibMTL's decayed rate ``rate / t^σ`` at this step (on the host: ``t`` is an int)."""
        return rate / self.steps**sigma


__all__ = ["EPS", "TaskGradientTracker", "check_decay_exponent", "check_rate"]
