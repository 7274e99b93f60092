"""``nonfinite=``: what every method does with a NaN or infinite task loss (docs/training.md §Non-finite losses).

* ``"skip"`` (the library's default): the step is skipped on the device, without a host sync,
  as ``torch.amp.GradScaler`` skips a step with inf gradients. An optimizer that takes a
  ``found_inf`` tensor (torch's ``_step_supports_amp_scaling``: the fused optimizers) gets the
  flag; any other optimizer steps and the step is undone by a masked update of its parameters
  and tensor state (``torch.where(skip, before, after)``). The method's own state (loss
  weights, Nash-MTL's α, the selective update's affinity) stays as it was; the skipped steps
  are counted on the device (``method.skipped_steps``).
* ``"raise"``: one host sync per step; a non-finite loss raises :class:`NonFiniteLoss` naming
  the task and the step, before anything is back-propagated.
* ``"propagate"``: nothing is checked (the behaviour before this option): the NaN reaches the
  gradients and the parameters as in any PyTorch loop.

Under ``torch.distributed`` the flags are all-reduced (one collective of K numbers), so every
rank skips, or raises, together when any rank sees a non-finite loss. With a grad scaler
(:mod:`.amp`) ``"skip"``'s flag crosses the ranks later, in ONE all-reduce with the scaler's
found-inf (:meth:`NonFiniteGuard.skip_also`), which may be this rank's only (FSDP2's columns of J).

Example::

    >>> import torch, selgroup_fast
    >>> model = torch.nn.Linear(2, 2)
    >>> gd = selgroup_fast.methods.create("gd", torch.optim.Adam(model.parameters()), 2)
    >>> before = model.weight.detach().clone()
    >>> losses = gd.step(lambda: [model.weight.sum() * float("nan"), model.bias.sum()])
    >>> int(gd.skipped_steps), torch.equal(model.weight, before)
    (1, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import torch
import torch.distributed as dist

from ..parallel import RankAgreement

NonFiniteMode = Literal["raise", "skip", "propagate"]
NONFINITE_MODES: tuple[str, ...] = ("raise", "skip", "propagate")
#: The library's default (every method, ``SelectiveGroupUpdate``); ``selgroup-train`` stops instead.
DEFAULT_NONFINITE: NonFiniteMode = "skip"


class NonFiniteLoss(FloatingPointError):
    """A task loss was NaN or infinite with ``nonfinite="raise"`` (raised before any backward).

    ``task``: its index; ``step``: the method's step (1 for the first call of ``step``);
    ``value``: this rank's value of the loss (finite where only another rank saw the non-finite one).
    """

    def __init__(self, task: int, step: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} for task {task} at step {step} (nonfinite='raise')")
        self.task, self.step, self.value = task, step, value


class NonFiniteGuard:
    """The ``nonfinite=`` option of one method: checks the losses, steps or skips its optimizers.

    A method calls :meth:`check` with the losses of each forward it back-propagates; the
    flag it sets (:attr:`skip`) then governs every :meth:`step` of an optimizer and every
    :meth:`keep` of the method's own state until the next :meth:`check`.
    """

    def __init__(self, mode: str, ranks: RankAgreement, device: torch.device) -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
        self.mode = mode
        self._ranks = ranks
        self._device = device
        #: The current forward's flag (a 0-d bool tensor on the device; ``None`` unless ``"skip"``).
        self.skip: torch.Tensor | None = None
        #: How many optimizer steps were skipped (a 0-d int64 tensor on the device).
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        #: The method's steps so far (host), for the error's message.
        self.steps = 0
        #: Whether a grad scaler may skip the step too (:class:`~.amp.GradScaling`): the flag then exists in every mode.
        self.scaled = False

    def begin_step(self) -> None:
        """Called at the start of every method step: counts it and clears the last flag."""
        self.steps += 1
        self.skip = None

    def check(self, losses: torch.Tensor | list[torch.Tensor]) -> None:
        """Reads the K losses of a forward: sets :attr:`skip` (``"skip"``) or raises (``"raise"``).

        With a grad scaler (:attr:`scaled`) :attr:`skip` is a flag in every mode, which the scaler's
        found-inf joins (:meth:`skip_also`, which then counts the step; under ``torch.distributed`` it also
        makes ``"skip"``'s flag every rank's, in its one all-reduce)."""
        self.skip = torch.zeros((), dtype=torch.bool, device=self._device) if self.scaled else None
        if self.mode == "propagate":
            return
        values = torch.stack(list(losses)).detach() if isinstance(losses, list) else losses.detach()
        finite = torch.isfinite(values).to(torch.int32)
        # Every rank takes the same branch: a task is finite only if it is on every rank ("raise" must know
        # before the backward; "skip" with a scaler learns it with the scaler's flag, after the backward).
        if self._ranks.enabled and not (self.scaled and self.mode == "skip"):
            finite = self._across_ranks(finite, dist.ReduceOp.MIN)
        if self.mode == "raise":
            bad = (finite == 0).nonzero().flatten().tolist()  # the host sync of "raise"
            if bad:
                raise NonFiniteLoss(bad[0], self.steps, float(values[bad[0]]))
            return
        self.skip = (finite == 0).any().to(self._device, non_blocking=True)
        if not self.scaled:
            self.skipped_steps += self.skip

    def skip_also(self, flag: torch.Tensor) -> torch.Tensor:
        """Or's ``flag`` (0-d bool on the device: a grad scaler's found inf/NaN on this rank) into :attr:`skip`, in
        place (what :meth:`keep` returned sees it), and counts the step if skipped. Only with :attr:`scaled` (then
        :meth:`check` made a flag). Returns the scaler's flag of every rank, which the scaler's records take.

        Under ``torch.distributed`` the two flags cross the ranks in ONE all-reduce (of 2 numbers; with ``"skip"``
        it replaces :meth:`check`'s), so that every rank skips, and backs its scale off, together: the found-inf
        may be this rank's alone (FSDP2's columns of J, the features of this rank's samples)."""
        skip = self.skip
        assert skip is not None, "check() runs before the gradients it flags"
        if self._ranks.enabled:
            both = self._across_ranks(torch.stack([skip, flag]).to(torch.int32), dist.ReduceOp.MAX) > 0
            skip.copy_(both[0])
            flag = both[1]
        skip.logical_or_(flag)
        self.skipped_steps += skip
        return flag

    def _across_ranks(self, flags: torch.Tensor, op: Any) -> torch.Tensor:
        """``flags`` (int32) reduced with ``op`` across the ranks (one all-reduce), on the device of ``flags``."""
        carrier = flags.to(self._ranks.device) if self._ranks.device.type == "cuda" else flags.cpu()
        dist.all_reduce(carrier, op=op, group=self._ranks.process_group)
        return carrier.to(flags.device)

    def step(self, optimizer: torch.optim.Optimizer, run: Callable[[], Any] | None = None) -> None:
        """``run()`` (default ``optimizer.step()``), skipped when :attr:`skip` is set.

        An optimizer with ``_step_supports_amp_scaling`` stepped by ``optimizer.step`` gets
        the flag as its ``found_inf`` (it then leaves its parameters, state and step counts
        alone); otherwise the step runs and a masked update restores the parameters with a
        gradient and their tensor state (``run`` may be e.g. a ``GradScaler``'s step).
        """
        skip = self.skip
        if skip is None:
            (run or optimizer.step)()
            return
        if run is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # GradScaler's convention (torch 2.14, torch.amp.GradScaler.step): attributes read by the step.
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        before = [p.detach().clone() for p in params]
        states = [{key: _clone(value) for key, value in optimizer.state.get(p, {}).items()} for p in params]
        (run or optimizer.step)()
        with torch.no_grad():
            for param, old, state in zip(params, before, states, strict=True):
                param.copy_(torch.where(skip.to(param.device), old, param))
                for key, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor):
                        # A state born in this step (Adam's moments, its step count) goes back to zeros.
                        old_value = state.get(key, torch.zeros_like(value))
                        # Host-held state (a non-capturable Adam's step count beside CUDA parameters)
                        # needs the flag on the host: the one device-to-host copy of this path.
                        value.copy_(torch.where(skip.to(value.device), old_value, value))

    def keep(self, owner: object, names: Iterable[str]) -> Callable[[], None]:
        """Snapshots ``owner``'s tensor attributes ``names``; the returned call restores them if :attr:`skip` is set.

        An owner that masks a large state's update itself (its ``masked_state`` names it: the K×P state of
        :class:`~.tracked.TaskGradientTracker`) gets the flag as its ``skip`` instead of a snapshot of it, and
        the returned call ends its step (``end_masked_step``), when the flag is final.
        """
        skip = self.skip
        masked = getattr(owner, "masked_state", ())
        if masked:
            cast(Any, owner).skip = skip
        if skip is None:
            return lambda: None
        saved = {name: getattr(owner, name).detach().clone() for name in names if name not in masked}

        def restore() -> None:
            if masked:  # the flag is final: the owner keeps or drops its update, and updates in place when called alone
                cast(Any, owner).end_masked_step()
            for name, old in saved.items():
                current = getattr(owner, name)
                kept = torch.where(skip.to(old.device), old, current.detach())
                if current.requires_grad:  # a learned tensor: its optimizer holds this object
                    with torch.no_grad():
                        current.copy_(kept)
                else:
                    setattr(owner, name, kept)

        return restore


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def tensor_state(owner: Any) -> list[str]:
    """The names in ``owner.saved_state`` that hold tensors (what :meth:`NonFiniteGuard.keep` restores)."""
    return [name for name in getattr(owner, "saved_state", ()) if isinstance(getattr(owner, name), torch.Tensor)]


__all__ = ["DEFAULT_NONFINITE", "NONFINITE_MODES", "NonFiniteGuard", "NonFiniteLoss", "NonFiniteMode"]
