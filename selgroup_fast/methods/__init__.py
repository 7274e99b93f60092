"""Multi-task methods behind one interface.

Every method has a *kind* (:func:`kind`): ``"plain"`` (GD), ``"grouping"`` (selective
task group updates), ``"gradient"`` (an :class:`Aggregator` of the task gradients,
driven by the one training step :class:`GradientMethod`) or ``"loss"`` (a weighting
of the task losses). Adding a gradient method means: its solver header and op, one
line here, its aggregator object, one test row.

>>> import torch, selgroup_fast
>>> model = torch.nn.Linear(4, 3)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> method = selgroup_fast.methods.create("gd", opt, num_tasks=3)
>>> x = torch.randn(8, 4)
>>> method.step(lambda: list(model(x).pow(2).mean(0))).shape
torch.Size([3])
>>> selgroup_fast.methods.available("gradient")[:3]
['pcgrad', 'cagrad', 'mgda']
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from ..parallel import TaskParams
from .base import MethodOptions, MethodReport, MultiTaskMethod
from .gradient import GradientMethod
from .jacobian import as_parameter_list
from .nonfinite import NONFINITE_MODES, NonFiniteLoss
from .weighting import Aggregator, ParameterLayout, Weighting, check_jacobian

# name -> (kind, "module:Class"), imported on first use.
_REGISTRY: dict[str, tuple[str, str]] = {
    "gd": ("plain", "selgroup_fast.methods.gd:GD"),
    "selective": ("grouping", "selgroup_fast.selective:SelectiveGroupUpdate"),
    "pcgrad": ("gradient", "selgroup_fast.methods.pcgrad:PCGrad"),
    "cagrad": ("gradient", "selgroup_fast.methods.cagrad:CAGrad"),
    "mgda": ("gradient", "selgroup_fast.methods.mgda:MGDA"),
    "graddrop": ("gradient", "selgroup_fast.methods.graddrop:GradDrop"),
    "imtl": ("gradient", "selgroup_fast.methods.imtl:IMTL"),
    "aligned_mtl": ("gradient", "selgroup_fast.methods.aligned_mtl:AlignedMTL"),
    "nash_mtl": ("gradient", "selgroup_fast.methods.nash_mtl:NashMTL"),
    "fairgrad": ("gradient", "selgroup_fast.methods.fairgrad:FairGrad"),
    "config": ("gradient", "selgroup_fast.methods.config:ConFIG"),
    "krum": ("gradient", "selgroup_fast.methods.krum:Krum"),
    "trimmed_mean": ("gradient", "selgroup_fast.methods.trimmed_mean:TrimmedMean"),
    "pcd": ("gradient", "selgroup_fast.methods.pcd:PCD"),
    "db_mtl": ("gradient", "selgroup_fast.methods.db_mtl:DBMTL"),
    "moco": ("gradient", "selgroup_fast.methods.moco:MoCo"),
    "gradnorm": ("gradient", "selgroup_fast.methods.gradnorm:GradNorm"),
    "upgrad": ("gradient", "selgroup_fast.methods.upgrad:UPGrad"),
    "dualproj": ("gradient", "selgroup_fast.methods.upgrad:DualProj"),
    "cr_mogm": ("gradient", "selgroup_fast.methods.cr_mogm:CRMOGM"),
    "excess_mtl": ("gradient", "selgroup_fast.methods.excess_mtl:ExcessMTL"),
    "gradvac": ("gradient", "selgroup_fast.methods.gradvac:gradvac"),
    "modo": ("gradient", "selgroup_fast.methods.two_batch:MoDo"),
    "sdmgrad": ("gradient", "selgroup_fast.methods.two_batch:SDMGrad"),
    "uw": ("loss", "selgroup_fast.methods.uw:UW"),
    "dwa": ("loss", "selgroup_fast.methods.dwa:DWA"),
    "dtp": ("loss", "selgroup_fast.methods.dtp:DTP"),
    "famo": ("loss", "selgroup_fast.methods.famo:FAMO"),
    "stch": ("loss", "selgroup_fast.methods.stch:STCH"),
    "gls": ("loss", "selgroup_fast.methods.gls:GLS"),
    "imtl_l": ("loss", "selgroup_fast.methods.imtl_l:IMTLL"),
    "cosmos": ("loss", "selgroup_fast.methods.cosmos:COSMOS"),
    "pbi": ("loss", "selgroup_fast.methods.pbi:PBI"),
    "rlw": ("loss", "selgroup_fast.methods.rlw:RLW"),
}
KINDS: tuple[str, ...] = ("plain", "grouping", "gradient", "loss")

#: The options of ``create`` that belong to the training step of a gradient method, not to its aggregator.
_STEP_OPTIONS = frozenset(
    p.name for p in inspect.signature(GradientMethod.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
)


def kind(name: str) -> str:
    """The kind of method ``name``: ``"plain"``, ``"grouping"``, ``"gradient"`` or ``"loss"``."""
    try:
        return _REGISTRY[name][0]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_REGISTRY)}") from None


def _load(name: str) -> type:
    kind(name)  # an unknown name raises, naming the known ones
    module_name, class_name = _REGISTRY[name][1].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def available(kind: str | None = None) -> list[str]:
    """The names of the methods (of one kind, when given), in registry order.

    Every method is imported: a broken import raises instead of hiding the method.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    names = [name for name, (method_kind, _) in _REGISTRY.items() if kind in (None, method_kind)]
    for name in names:
        _load(name)
    return names


def options(name: str) -> frozenset[str]:
    """The keyword options ``create(name, ...)`` passes on: the method's own (a gradient method's: its
    aggregator's and those of :class:`GradientMethod`'s step).

    >>> "generator" in options("selective"), "chunk_size" in options("mgda"), "generator" in options("gd")
    (True, True, False)
    """
    own = frozenset(p.name for p in inspect.signature(_load(name)).parameters.values() if p.kind is p.KEYWORD_ONLY)
    return own | (_STEP_OPTIONS if kind(name) == "gradient" else frozenset(MethodOptions.__annotations__))


def aggregator(
    name: str, num_tasks: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **options: Any
) -> Aggregator:
    """The aggregator of gradient method ``name`` (its own ``options``) for K tasks, its state on ``device``.

    Example::

        >>> import torch, selgroup_fast
        >>> mgda = selgroup_fast.methods.aggregator("mgda", 2, dtype=torch.float64)
        >>> mgda.weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
        tensor([0.8000, 0.2000], dtype=torch.float64)
    """
    if kind(name) != "gradient":
        raise ValueError(f"method {name!r} does not combine gradients (it is not gradient-based)")
    return _load(name)(num_tasks, device, dtype, **options)


def create(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_tasks: int,
    shared_params: Any = None,
    task_params: Any = None,
    **options: Any,
) -> MultiTaskMethod:
    """Creates method ``name`` driving ``optimizer`` over ``num_tasks`` task losses.

    ``shared_params`` (the encoder's parameters) is required by the methods that
    manipulate per-task gradients of the shared parameters; the others ignore it.
    ``options`` are the method's own (see its class docstring) and, for the gradient
    methods, those of :class:`GradientMethod` (``jacobian``, ``chunk_size``, ``space``, ``profile``).
    Every method takes ``process_group=``: the ``torch.distributed`` group its collectives go
    through (default: the world group when initialised; validated, one ``ValueError`` line),
    and ``nonfinite=``: what a NaN/inf task loss does, ``"skip"`` (default), ``"raise"`` or
    ``"propagate"`` (:mod:`selgroup_fast.methods.nonfinite`).

    ``task_params`` (K iterables, each task's own parameters; checked against
    ``shared_params``) says which parameters belong to which task where the autograd
    graph cannot (a ``torch.compile``d model, FSDP2): ``selective`` masks the other tasks'
    parameters at every group step, a gradient method takes them as its task-specific
    parameters; the other methods only check them (one backward of all losses needs no mask).
    """
    cls = _load(name)
    if task_params is not None:
        if kind(name) in ("gradient", "grouping"):
            options["task_params"] = task_params  # checked by the method, which uses them
        else:
            TaskParams(num_tasks, shared_params, task_params)
    if kind(name) == "gradient":
        if shared_params is None:
            raise ValueError(f"method {name!r} needs shared_params= (the parameters shared by all tasks)")
        params = as_parameter_list(shared_params)
        step = {key: options.pop(key) for key in list(options) if key in _STEP_OPTIONS}
        method_aggregator = aggregator(name, num_tasks, params[0].device, params[0].dtype, **options)
        return GradientMethod(optimizer, num_tasks, method_aggregator, shared_params=params, **step)
    if shared_params is not None and getattr(cls, "accepts_shared_params", False):
        options["shared_params"] = shared_params  # optional use, e.g. FAMO's gradient clipping
    return cls(optimizer, num_tasks, **options)


def aggregate(
    name: str,
    jacobian: torch.Tensor,
    /,
    losses: torch.Tensor | None = None,
    second_jacobian: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Combines a K×P matrix of task gradients into one P-vector, as method ``name`` does.

    ``name`` and ``jacobian`` are positional-only, so that ``options`` can hold every
    option of ``create`` (the training step's, such as ``jacobian=``, are ignored).
    ``losses``: the K task losses, for the methods that read them (DB-MTL, MoCo: a fresh state's first step).
    ``second_jacobian``: a second, independent batch's K×P task gradients, for the methods that read two (MoDo,
    SDMGrad: the direction is ``wᵀ(J + J_2)/2``).
    """
    jacobian = check_jacobian(jacobian)
    own = {key: value for key, value in options.items() if key not in _STEP_OPTIONS}
    method = aggregator(name, jacobian.shape[0], jacobian.device, jacobian.dtype, **own)
    return method(jacobian, losses, second_jacobian)


__all__ = [
    "Aggregator",
    "GradientMethod",
    "KINDS",
    "MethodReport",
    "MultiTaskMethod",
    "NONFINITE_MODES",
    "NonFiniteLoss",
    "ParameterLayout",
    "Weighting",
    "aggregate",
    "aggregator",
    "available",
    "create",
    "kind",
    "options",
]
