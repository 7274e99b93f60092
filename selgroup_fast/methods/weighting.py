"""Aggregators and weightings: a gradient method's options and state, mapping task gradients to a direction.

As TorchJD splits a *weighting* (Gram matrix to weights) from the training step: an
:class:`Aggregator` maps the K×N task gradients J (N: shared parameters or features) to
one N-vector; a :class:`Weighting` does it as ``d = wᵀJ``, ``w`` a function of ``G = J Jᵀ``.
An op's option defaults live in its schema and wrapper only (:mod:`selgroup_fast.ops`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast, runtime_checkable

import torch

from ..checks import check_int
from .base import SavedState


def check_jacobian(jacobian: torch.Tensor) -> torch.Tensor:
    """Validates a K×N matrix of task gradients (floating point, K ≥ 1, N ≥ 1)."""
    if not isinstance(jacobian, torch.Tensor):
        raise TypeError(f"jacobian must be a torch.Tensor, got {type(jacobian).__name__}")
    if jacobian.dim() != 2 or jacobian.shape[0] < 1 or jacobian.shape[1] < 1:
        raise ValueError(f"jacobian must be a non-empty K×P matrix, got shape {tuple(jacobian.shape)}")
    if jacobian.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"jacobian must be float32 or float64, got {jacobian.dtype}")
    return jacobian


def gram(jacobian: torch.Tensor) -> torch.Tensor:
    """``G = J Jᵀ`` (K×K), contiguous, on the Jacobian's device."""
    return (jacobian @ jacobian.T).contiguous()


def validated_op_options(op: Callable[..., torch.Tensor], *args: torch.Tensor, **options: Any) -> dict[str, Any]:
    """Returns ``options`` once ``op(1×1 Gram, *args, **options)`` accepted them (a ``ValueError`` otherwise).

    The op and its wrapper are where the options are declared and checked; a probe on
    the CPU at construction turns a bad option into an error before the first step.
    """
    try:
        op(torch.ones(1, 1, dtype=torch.float64), *args, **options)
    except RuntimeError as error:
        raise ValueError(str(error).splitlines()[0]) from None
    return options


# The methods of an aggregator that compute a result (see Aggregator.__init_subclass__).
_RESULT_METHODS = ("combine", "combine_losses", "combine_columns", "weights", "weights_with", "direction_weights")

#: What an aggregator may read besides J or G (:attr:`Aggregator.needs`): at each step, the K task losses (loss-aware
#: methods) and a cross-batch Gram matrix (two batches: MoDo, SDMGrad); once, at construction, the shared parameters'
#: layout (:class:`ParameterLayout`, handed to :meth:`Aggregator.bind`: a state over J's columns, DB-MTL's, MoCo's
#: and ExcessMTL's K×P rows, or per-block GradVac's blocks).
WEIGHTING_INPUTS: tuple[str, ...] = ("losses", "cross_gram", "parameter_layout")


@dataclass(frozen=True)
class ParameterLayout:
    """The shared parameters as J's columns: each tensor's number of elements, in J's column order.

    What :meth:`Aggregator.bind` receives where :attr:`Aggregator.needs` names ``"parameter_layout"``; J's
    columns are then the same coordinates at every step, all on one rank (parameter space, no FSDP2).

    >>> encoder = torch.nn.Linear(4, 3)
    >>> layout = ParameterLayout(tuple(p.numel() for p in encoder.parameters()))
    >>> layout.block_sizes, layout.numel
    ((12, 3), 15)
    """

    block_sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        """P: J's width, the shared parameters' number of elements."""
        return sum(self.block_sizes)


class Aggregator(SavedState, abc.ABC):
    """One gradient method's options and state: maps J (K×N) to the update direction (an N-vector).

    Args:
        num_tasks: K.
        device: where the method's state lives (the shared parameters').
        dtype: the dtype of its state (the shared parameters').

    Subclasses implement :meth:`combine`; :meth:`__call__` returns its direction.

    Not differentiable, as TorchJD's aggregators: the solvers (the fused ops) have no
    backward, so a result that required grad would back-propagate wrong gradients
    silently (the weights taken as constants; GradDrop's ``J.grad`` left ``None``).
    Every result (the direction, the weights) is computed under ``torch.no_grad`` and
    does not require grad, whatever the input: a backward through it raises.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _RESULT_METHODS:
            if name in vars(cls):
                setattr(cls, name, torch.no_grad()(vars(cls)[name]))
        unknown = sorted(set(cls.needs) - set(WEIGHTING_INPUTS))
        if unknown:
            raise TypeError(f"{cls.__name__}.needs names unknown inputs {unknown}; known: {list(WEIGHTING_INPUTS)}")

    #: The one place an aggregator says what it reads besides J or G (names of :data:`WEIGHTING_INPUTS`); the
    #: training step provides exactly these (nothing, at no cost, for the others) and refuses, with one line, a
    #: setting that cannot (``"parameter_layout"``: the representation space, the Gramian path, FSDP2;
    #: ``"cross_gram"``: the same). A class attribute, or set per instance in ``__init__`` where an option decides
    #: it (MGDA's loss normalisations).
    needs: frozenset[str] = frozenset()

    #: The registry name of the method.
    name: ClassVar[str] = ""
    #: The steps before the aggregator's rule is in effect, and the options that set them: its gradient method's
    #: (:attr:`~.base.MultiTaskMethod.warmup_steps`, :attr:`~.base.MultiTaskMethod.warmup_options`).
    warmup_steps: int = 0
    warmup_options: str = ""
    #: Whether the heads get ``Σ_k w_k ∇L_k`` (the authors back-propagate the weighted loss)
    #: instead of ``Σ_k ∇L_k``.
    weights_task_params: ClassVar[bool] = False

    def __init__(self, num_tasks: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.num_tasks = check_int("num_tasks", num_tasks)
        self.device = torch.device(device)
        self.dtype = dtype

    @abc.abstractmethod
    def combine(
        self, jacobian: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The direction (written into ``out`` when given) and the heads' task weights (``None``: all ones)."""

    def combine_losses(
        self, jacobian: torch.Tensor, losses: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`combine` for an aggregator whose :attr:`needs` names ``"losses"`` (the K detached losses)."""
        raise NotImplementedError(f"{self.name} does not read the losses")

    def bind(self, layout: ParameterLayout) -> None:
        """Takes the shared parameters' layout, for an aggregator whose :attr:`needs` names ``"parameter_layout"``:
        the training step calls it once, when it is built, and the aggregator allocates its state over J's columns."""
        raise NotImplementedError(f"{self.name} does not read the shared parameters' layout")

    def __call__(
        self, jacobian: torch.Tensor, losses: torch.Tensor | None = None, second_jacobian: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The update direction of a K×N matrix of task gradients (and of the K losses, where :attr:`needs` says;
        of a second batch's K×N task gradients for the two-batch methods, whose direction is ``wᵀ(J + J_2)/2``)."""
        jacobian = check_jacobian(jacobian)
        if jacobian.shape[0] != self.num_tasks:
            raise ValueError(f"{self.name}: expected {self.num_tasks} rows of task gradients, got {jacobian.shape[0]}")
        if "cross_gram" in self.needs:
            if second_jacobian is None or second_jacobian.shape != jacobian.shape:
                shape = None if second_jacobian is None else tuple(second_jacobian.shape)
                raise ValueError(
                    f"{self.name} reads two independent batches: pass second_jacobian= of shape "
                    f"{tuple(jacobian.shape)} (got {shape})"
                )
            with torch.no_grad():  # as every result (the class docstring)
                second = check_jacobian(second_jacobian).to(jacobian)
                mean = (jacobian + second) / 2
                weighting = cast(Weighting, self)
                total = gram(mean) if weighting.reads_gram else None
                weights, _ = weighting.direction_weights(total, cross_gram=jacobian @ second.T)
                return weights.to(mean.dtype) @ mean
        if "losses" not in self.needs:
            return self.combine(jacobian)[0]
        if losses is None or losses.shape != (self.num_tasks,):
            shape = None if losses is None else tuple(losses.shape)
            raise ValueError(f"{self.name} reads the K = {self.num_tasks} task losses: pass losses= (got {shape})")
        return self.combine_losses(jacobian, losses.detach().to(jacobian))[0]


@runtime_checkable
class ReusesWeights(Protocol):
    """An aggregator that some training steps skip: it hands back its last weights instead (Nash-MTL).

    The gradient step checks for it once, at construction (:class:`~.gradient.GradientMethod`):
    on a reused step it does ONE ordinary backward of ``Σ_k w_k L_k`` and clips the shared
    gradient to :attr:`max_norm`, with no task gradients.
    """

    #: The norm the shared gradient is clipped to on a reused step (0: never).
    max_norm: float

    def reused_weights(self) -> torch.Tensor | None:
        """Called once per training step: weights to reuse without task gradients, or ``None`` (compute them)."""


@runtime_checkable
class CombinesColumns(Protocol):
    """An aggregator whose direction's columns each depend on that column of J only (GradDrop, TrimmedMean).

    Where J's columns are split over ranks (FSDP2 shards, features split over ranks) each rank combines
    its own columns; the training step checks for it once, at construction (:class:`~.gradient.GradientMethod`).
    """

    def combine_columns(self, jacobian: torch.Tensor, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The direction of ``jacobian``'s columns, which are ``runs`` (first global column, width) of the global J."""


def read_gram(gram: torch.Tensor | None) -> torch.Tensor:
    """G, in a weighting that reads it (:attr:`Weighting.reads_gram`: the step computes it for those only)."""
    assert gram is not None, "reads_gram: the step provides G"
    return gram


@dataclass(frozen=True)
class WeightingInputs:
    """What a weighting reads: G where it reads it (:attr:`Weighting.reads_gram`), the rest as its
    :attr:`Weighting.needs` declares (``None`` otherwise).

    ``losses``: the K detached losses of the (global) batch. ``cross_gram``: ``J_1 J_2ᵀ`` of two independent
    batches (K × K, not symmetric in general; :mod:`~.two_batch`).
    """

    gram: torch.Tensor | None
    losses: torch.Tensor | None = None
    cross_gram: torch.Tensor | None = None


class Weighting(Aggregator):
    """An aggregator whose direction is ``d = wᵀJ``, ``w`` a function of ``G = J Jᵀ`` (and what :attr:`needs` names).

    Subclasses implement :meth:`weights` (G only) or, declaring :attr:`needs`, :meth:`weights_with`;
    the Gramian path of the training step calls :meth:`direction_weights` on a Gram matrix
    accumulated without ``J``.
    """

    #: Whether the weights read ``G = J Jᵀ``: the step computes it only then (not for MoDo and SDMGrad, which read
    #: the cross-batch matrix only: G would be K²·P of wasted work per step). Set per instance where the weighting
    #: wraps another (CR-MOGM).
    reads_gram: bool = True

    @abc.abstractmethod
    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """The K task weights for the Gram matrix ``gram`` (K×K), with this object's options and state."""

    def weights_with(self, inputs: WeightingInputs) -> torch.Tensor:
        """The K task weights from what :attr:`needs` declares; by default :meth:`weights` of G."""
        return self.weights(read_gram(inputs.gram))

    def direction_weights(
        self, gram: torch.Tensor | None, losses: torch.Tensor | None = None, cross_gram: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights of the direction and those of the heads (``None``: all ones); ``gram`` is ``None`` where
        the weighting does not read G (:attr:`reads_gram`)."""
        weights = self.weights_with(WeightingInputs(gram, losses, cross_gram))
        return weights, (weights if self.weights_task_params else None)

    def combine(
        self, jacobian: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.needs:
            raise ValueError(
                f"{self.name} reads {', '.join(sorted(self.needs))} besides the task gradients: "
                "train it with a gradient method's step, or call direction_weights"
            )
        return self._combine(jacobian, None, out)

    def combine_losses(
        self, jacobian: torch.Tensor, losses: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._combine(jacobian, losses, out)

    def _combine(
        self, jacobian: torch.Tensor, losses: torch.Tensor | None, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        direction_weights, head_weights = self.direction_weights(gram(jacobian), losses)
        direction_weights = direction_weights.to(jacobian.dtype)
        if out is None:
            return direction_weights @ jacobian, head_weights
        torch.mv(jacobian.T, direction_weights, out=out)
        return out, head_weights
