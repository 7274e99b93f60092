"""The interface every multi-task method shares: ``step(closure)``, profiling, state, its report."""

from __future__ import annotations

import abc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypedDict

import torch

from ..checks import check_int
from ..losses import ClosureOutput, ClosureResult, parse_closure_output
from ..parallel import RankAgreement
from ..profiling import PhaseTimer
from .amp import GradScaling
from .nonfinite import DEFAULT_NONFINITE, NonFiniteGuard

# Re-exported for the methods' ``**options: Unpack[MethodOptions]`` (PEP 692).
if sys.version_info >= (3, 11):
    from typing import Unpack as Unpack
else:  # torch's own dependency
    from typing_extensions import Unpack as Unpack


class MethodOptions(TypedDict, total=False):
    """The options every method takes, :class:`MultiTaskMethod`'s: a method whose own options are its
    signature's passes these on as ``**options: Unpack[MethodOptions]``."""

    profile: bool
    process_group: Any
    nonfinite: str
    grad_scaler: Any


def optimizer_device(optimizer: torch.optim.Optimizer) -> torch.device:
    """The device of the optimizer's first parameter (where the step's work runs)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            return param.device
    raise ValueError("the optimizer has no parameters")


def _saved(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, torch.Generator):
        return value.get_state()
    return value.state_dict() if isinstance(value, torch.optim.Optimizer) else value


def tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in ``value``: a tensor, an optimizer's state, or 0 (a number, a generator)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, torch.optim.Optimizer):
        return sum(tensor_bytes(item) for state in value.state.values() for item in state.values())
    return 0


class SavedState:
    """``state_dict`` / ``load_state_dict`` over the attributes named in :attr:`saved_state`.

    Tensors are saved as detached copies and restored on the attribute's device and dtype
    (learned ones in place), optimizers and generators through their own state, other
    values converted to the attribute's type.
    """

    #: The names of the attributes that make up the state (the keys of ``state_dict()``): a class attribute, or set
    #: per instance in ``__init__`` where an option decides it (IMTL's ``hybrid``).
    saved_state: tuple[str, ...] = ()

    @property
    def state_bytes(self) -> int:
        """The memory of the state (the tensors of :attr:`saved_state`, an optimizer's included), in bytes.

        What the method keeps between steps beside the model and its optimizer (DB-MTL's and MoCo's K×P
        rows, Nash-MTL's K weights, ...); not its per-step buffers (J). ``selgroup-bench`` reports it.
        """
        return sum(tensor_bytes(getattr(self, name)) for name in self.saved_state)

    def state_dict(self) -> dict[str, Any]:
        """The method's own state (not the model's or the optimizer's)."""
        return {name: _saved(getattr(self, name)) for name in self.saved_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        if set(state_dict) != set(self.saved_state):
            raise ValueError(
                f"{type(self).__name__} state has keys {sorted(self.saved_state)}, got {sorted(state_dict)}"
            )
        for name in self.saved_state:
            current, value = getattr(self, name), state_dict[name]
            if isinstance(current, torch.Tensor) and current.requires_grad:  # learned: an optimizer holds it
                with torch.no_grad():
                    current.copy_(value)
            elif isinstance(current, torch.Tensor):
                setattr(self, name, value.to(current).clone())
            elif isinstance(current, torch.Generator):
                current.set_state(value)
            elif isinstance(current, torch.optim.Optimizer):
                current.load_state_dict(value)
            else:
                setattr(self, name, type(current)(value))


@dataclass(frozen=True)
class MethodReport:
    """What a method says about itself between two steps, for a training loop to log (:meth:`MultiTaskMethod.report`).

    Taking a report never reads the device: its tensors are the method's own (on its device), which
    the reader converts at its log points only (one host sync there). A field a method has nothing
    for is ``None``.

    Attributes:
        skipped_steps: how many optimizer steps ``nonfinite="skip"`` or the grad scaler skipped so far (0-d int64).
        weights: the K task weights the method holds now (a K tensor): a gradient method's (its
            aggregator's) of its last step; a loss-weighting method's current ones (those of its
            next step where they are known ahead, as UW's, DWA's, FAMO's; DTP without fed KPIs: its
            last step's).
        groups: the partition of the tasks that the next step updates (the selective update).
        groups_chosen: whether ``groups`` was chosen by the grouping strategy (``False`` during an
            affinity grouping's warm-up singletons, and for methods without groups).
        affinity: the tracked K×K inter-task affinity ``A[source, target]``.
    """

    skipped_steps: torch.Tensor
    weights: torch.Tensor | None = None
    groups: list[list[int]] | None = None
    groups_chosen: bool = False
    affinity: torch.Tensor | None = None


class MultiTaskMethod(SavedState, abc.ABC):
    """One training step over K task losses, with the phases of Table E.1 timed on request.

    Subclasses implement :meth:`step`; they call :meth:`_forward` to run the closure
    (timed as ``forward``) and wrap their other work in ``self._timer.phase(...)``.
    ``process_group``: the ``torch.distributed`` group training together, which every
    collective of the method goes through (default: the world group when initialised).
    ``nonfinite``: what a NaN/inf task loss does, ``"skip"`` (default: the step skipped on the
    device, counted in :attr:`skipped_steps`), ``"raise"`` or ``"propagate"``
    (:mod:`selgroup_fast.methods.nonfinite`). ``grad_scaler``: a ``torch.amp.GradScaler``
    (:mod:`selgroup_fast.methods.amp`; one ``TypeError`` line for anything else). Subclasses start each
    step with :meth:`_begin_step`, check every forward they back-propagate with ``self._nonfinite.check``,
    back-propagate ``self._scaling.losses(...)``, call ``self._scaling.unscale_optimizers`` after their
    last backward, step every optimizer through ``self._nonfinite.step`` and end with
    ``self._scaling.update()``. :meth:`report` says what the method has to log
    (by default its skipped steps only: a new method needs nothing more).
    """

    #: The registry name of the method (``selgroup_fast.methods.available()``).
    name: str = ""
    #: Whether a step back-propagates some tasks' losses only (``DistributedDataParallel`` then
    #: needs ``find_unused_parameters=True``: the other heads get no gradient).
    backpropagates_task_subsets: ClassVar[bool] = False
    #: The steps before the method's rule is in effect (STCH's, until its nadir point is known; GradNorm's and
    #: ExcessMTL's, the selective update's singleton groups): a training run must be longer (``selgroup-train``
    #: refuses one that is not). Set in ``__init__`` where an option decides it; a gradient method's is its
    #: aggregator's.
    warmup_steps: int = 0
    #: The options that set :attr:`warmup_steps` (the refusal of a run too short names them).
    warmup_options: str = ""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        profile: bool = False,
        process_group: Any = None,
        nonfinite: str = DEFAULT_NONFINITE,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_int("num_tasks", num_tasks)
        self.optimizer = optimizer
        self.num_tasks = num_tasks
        self.device = optimizer_device(optimizer)
        self._timer = PhaseTimer(enabled=profile, device=self.device)
        #: The ranks training together under torch.distributed (the world group when initialised).
        self._ranks = RankAgreement(process_group, self.device)
        self._nonfinite = NonFiniteGuard(nonfinite, self._ranks, self.device)
        self._scaling = GradScaling(grad_scaler, self._nonfinite, self.device)

    @property
    def profile(self) -> bool:
        return self._timer.enabled

    @profile.setter
    def profile(self, enabled: bool) -> None:
        self._timer.enabled = bool(enabled)

    @property
    def nonfinite(self) -> str:
        """What a NaN/inf task loss does: ``"skip"``, ``"raise"`` or ``"propagate"``."""
        return self._nonfinite.mode

    @property
    def grad_scaler(self) -> Any:
        """The ``torch.amp.GradScaler`` the method scales its losses with (``None``: none)."""
        return self._scaling.scaler

    @property
    def reads_two_batches(self) -> bool:
        """Whether each step reads two independent batches (MoDo, SDMGrad: ``step(closure, second_closure)``;
        ``selgroup-train`` and ``selgroup-bench`` give them a batch's two halves)."""
        return False

    @property
    def skipped_steps(self) -> torch.Tensor:
        """How many optimizer steps were skipped, by ``nonfinite="skip"`` or the grad scaler's inf/NaN gradients
        (a 0-d int64 tensor on the device; not saved)."""
        return self._nonfinite.skipped_steps

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent in each phase during the last :meth:`step` (empty unless profiling)."""
        return self._timer.timings

    def report(self) -> MethodReport:
        """The method's loggable state now (:class:`MethodReport`); cheap and without a host sync.

        The default reports the skipped steps; a method with weights, groups or an affinity
        overrides it, adding its own fields to this one.
        """
        return MethodReport(skipped_steps=self.skipped_steps)

    @abc.abstractmethod
    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        """Runs one batch and returns the detached K losses of its first forward."""

    def _begin_step(self) -> None:
        """Starts a step: the phase timer reset, the step counted for :class:`NonFiniteLoss`'s message."""
        self._timer.reset()
        self._nonfinite.begin_step()

    def _forward(self, closure: Callable[[], ClosureOutput]) -> list[torch.Tensor]:
        """Runs the closure (phase ``forward``) and returns its K validated losses."""
        return self._run_closure(closure).losses

    def _run_closure(self, closure: Callable[[], ClosureOutput]) -> ClosureResult:
        """Runs the closure (phase ``forward``) and returns its K validated losses and its shared features."""
        with self._timer.phase("forward"):
            return parse_closure_output(closure(), self.num_tasks)


def detached(losses: list[torch.Tensor]) -> torch.Tensor:
    """The K losses as one detached 1-D tensor (what ``step`` returns)."""
    return torch.stack([loss.detach() for loss in losses])
