"""``grad_scaler=``: mixed precision with a ``torch.amp.GradScaler``, the same for every method (docs/training.md §Mixed precision).

Every method back-propagates the scaled losses ``s·L_k`` (so that float16 gradients do not
underflow) and unscales what it reads before reading it, recording an inf/NaN on the device:

* the optimizers' ``.grad`` by ``scaler.unscale_(optimizer)``, after the method's last backward
  and before anything else reads them (gradient clipping, the optimizer step);
* a gradient method's task gradients before its aggregator (:func:`~.step.combine_scaled`):
  a weighting reads ``G / s²`` (and ``A / s²``), the others ``J / s`` (in place), so that the
  direction is the unscaled method's, whatever its dependence on the gradients' scale.

What any of these found, or'd into the step's skip flag of ``nonfinite=``
(:class:`~.nonfinite.NonFiniteGuard`), skips the step as ``nonfinite="skip"`` does, on the
device: the optimizer steps are skipped (a fused optimizer takes the flag as its ``found_inf``,
any other gets the masked update), the method's state stays as it was, the step is counted
in ``skipped_steps``; the scaler's ``update()`` sees it (the found-inf of the task gradients is
written into the scaler's per-optimizer record) and backs the scale off. Under ``torch.distributed``
the found-inf is every rank's (one all-reduce, shared with ``nonfinite="skip"``'s loss flags):
under FSDP2 a rank reads only its columns of J, and the ranks must skip together. No host sync,
not even ``GradScaler.step``'s: the optimizers are stepped by the method, not by ``scaler.step``.

Example::

    >>> import torch, selgroup_fast
    >>> model = torch.nn.Linear(2, 2)
    >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    >>> gd = selgroup_fast.methods.create("gd", torch.optim.SGD(model.parameters(), lr=0.1), 2, grad_scaler=scaler)
    >>> before = model.weight.detach().clone()
    >>> losses = gd.step(lambda: [model.weight.sum() * 1e36, model.bias.sum()])  # 1e36 · 2**10 overflows
    >>> torch.equal(model.weight, before), scaler.get_scale(), int(gd.skipped_steps)
    (True, 512.0, 1)
"""

from __future__ import annotations

from typing import Any

import torch

from .nonfinite import NonFiniteGuard

#: What ``grad_scaler=`` must provide (``_found_inf_per_device``: see :func:`scaler_skipped_step`).
SCALER_METHODS = ("scale", "unscale_", "update", "is_enabled", "_found_inf_per_device")


def check_grad_scaler(grad_scaler: Any) -> Any:
    """``grad_scaler`` if it is ``None`` or a ``torch.amp.GradScaler`` (duck-typed); one ``TypeError`` line otherwise."""
    if grad_scaler is not None and not all(hasattr(grad_scaler, name) for name in SCALER_METHODS):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    return grad_scaler


def scaler_skipped_step(scaler: Any, optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """Whether the scaler found inf/NaN gradients for ``optimizer`` (``unscale_`` or ``step`` since the last ``update``),
    as a 0-d bool tensor on ``device``.

    No host sync. torch has no public query for this (``scaler.get_scale()`` after
    ``update`` reads the device): it relies on the private
    ``GradScaler._found_inf_per_device(optimizer)``, the per-device found-inf flags that
    ``unscale_`` and ``step`` record for the optimizer (fused optimizers included) and ``update``
    clears, so call it between the two. That method exists in ``torch.amp.GradScaler`` since the
    class appeared (torch 2.3; earlier in ``torch.cuda.amp.GradScaler``); this package is
    tested with torch 2.14 only.

    Example::

        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu")
        >>> scaler.scale((w * float("inf")).sum()).backward()
        >>> scaler.step(opt)
        >>> scaler_skipped_step(scaler, opt, w.device)
        tensor(True)
    """
    found = scaler._found_inf_per_device(optimizer)
    return torch.stack([value.to(device, non_blocking=True).reshape(()) for value in found.values()]).sum() > 0


class GradScaling:
    """The ``grad_scaler=`` of one method (every :class:`~.base.MultiTaskMethod` holds one; inert without a scaler).

    Per step: :meth:`losses` before each backward, :meth:`unscale_` on what the method reads
    besides ``.grad`` (J, G), :meth:`unscale_optimizers` once after the last backward (before
    clipping and the optimizer steps, which go through ``nonfinite=``'s guard), :meth:`update`
    at the end. A disabled scaler (``GradScaler(enabled=False)``) is no scaler.
    """

    def __init__(self, grad_scaler: Any, guard: NonFiniteGuard, device: torch.device) -> None:
        self.scaler = check_grad_scaler(grad_scaler)
        self.enabled = grad_scaler is not None and bool(grad_scaler.is_enabled())
        guard.scaled = self.enabled
        self._guard = guard
        self._device = device
        #: The inf/NaN found in this step's gradients unscaled outside the optimizers (float32 0-d), until recorded.
        self._found: torch.Tensor | None = None

    def losses(self, losses: list[torch.Tensor]) -> list[torch.Tensor]:
        """The K losses times the scale ``s`` (as they are without a scaler)."""
        return [self.scaler.scale(loss) for loss in losses] if self.enabled else losses

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """One loss times ``s`` (as it is without a scaler)."""
        return self.scaler.scale(loss) if self.enabled else loss

    def _scale(self) -> torch.Tensor:
        """``s`` as a 0-d float32 tensor on the device, without a host sync (``scale`` of a one)."""
        return self.scaler.scale(torch.ones((), dtype=torch.float32, device=self._device))

    def unscale_(self, gradients: torch.Tensor, power: int = 1) -> None:
        """Divides ``gradients`` by ``s**power`` in place (J: 1, a Gram matrix: 2), recording an inf/NaN in them."""
        if not self.enabled:
            return
        if self._found is None:
            self._found = torch.zeros((), dtype=torch.float32, device=self._device)
        # GradScaler's own reciprocal (in float64, then float32) and its fused check-and-multiply.
        inverse = self._scale().double().reciprocal().pow(power).float().to(gradients.device)
        torch._amp_foreach_non_finite_check_and_unscale_([gradients], self._found, inverse)

    def rescale_(self, direction: torch.Tensor) -> None:
        """Multiplies ``direction`` by ``s`` in place: an aggregator's direction of ``J / s`` made a scaled gradient."""
        if self.enabled:
            direction.mul_(self._scale().to(direction.dtype))

    def unscale_optimizers(self, *optimizers: torch.optim.Optimizer) -> None:
        """``scaler.unscale_`` of each optimizer whose ``.grad`` comes from a scaled backward, after the step's last
        backward: what they and :meth:`unscale_` found is or'd into the step's skip flag (the optimizer steps and the
        method's state) and written into every optimizer's record (the scaler's ``update`` backs off); under
        ``torch.distributed`` what any rank found (:meth:`~.nonfinite.NonFiniteGuard.skip_also`), so that the ranks
        skip and scale together."""
        if not self.enabled:
            return
        found = self._found if self._found is not None else torch.zeros((), device=self._device)
        self._found = None
        records = []
        for optimizer in optimizers:
            self.scaler.unscale_(optimizer)
            records.extend(self.scaler._found_inf_per_device(optimizer).values())
        for record in records:
            found = torch.maximum(found, record.to(found.device, non_blocking=True))
        everywhere = self._guard.skip_also(found > 0)
        for record in records:
            record.copy_(everywhere)

    def update(self) -> None:
        """``scaler.update()``: the scale backed off after a found inf/NaN, grown after enough clean steps."""
        if self.enabled:
            self.scaler.update()


__all__ = ["SCALER_METHODS", "GradScaling", "check_grad_scaler", "scaler_skipped_step"]
