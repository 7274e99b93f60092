"""Multi-task methods behind one interface.

>>> import torch, selgroup_fast
>>> model = torch.nn.Linear(4, 3)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> method = selgroup_fast.methods.create("gd", opt, num_tasks=3)
>>> x = torch.randn(8, 4)
>>> method.step(lambda: list(model(x).pow(2).mean(0))).shape
torch.Size([3])
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..parallel import TaskParams
from .base import MultiTaskMethod

# name -> "module:Class", imported on first use so that one method's optional
# pieces (or a method still missing from a partial install) never break the rest.
_REGISTRY: dict[str, str] = {
    "gd": "selgroup_fast.methods.gd:GD",
    "selective": "selgroup_fast.selective:SelectiveGroupUpdate",
    "pcgrad": "selgroup_fast.methods.pcgrad:PCGrad",
    "cagrad": "selgroup_fast.methods.cagrad:CAGrad",
    "mgda": "selgroup_fast.methods.mgda:MGDA",
    "graddrop": "selgroup_fast.methods.graddrop:GradDrop",
    "imtl": "selgroup_fast.methods.imtl:IMTL",
    "aligned_mtl": "selgroup_fast.methods.aligned_mtl:AlignedMTL",
    "nash_mtl": "selgroup_fast.methods.nash_mtl:NashMTL",
    "uw": "selgroup_fast.methods.uw:UW",
    "dwa": "selgroup_fast.methods.dwa:DWA",
    "dtp": "selgroup_fast.methods.dtp:DTP",
    "famo": "selgroup_fast.methods.famo:FAMO",
}


def _load(name: str) -> type:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def available() -> list[str]:
    """The names of the methods that can be created in this installation."""
    names = []
    for name in _REGISTRY:
        try:
            _load(name)
        except ImportError:
            continue
        names.append(name)
    return names


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
    ``task_params`` (K iterables, each task's own parameters; checked against
    ``shared_params``) tells the methods which parameters belong to which task where
    the autograd graph cannot (a ``torch.compile``d model, FSDP2): ``selective`` masks the
    other tasks' parameters at every group step, the gradient methods take them as the
    task-specific parameters; the loss-weighting methods need nothing (one backward of
    all losses). ``options`` are the method's own (see its class docstring).
    """
    cls = _load(name)
    owners = None if task_params is None else TaskParams(num_tasks, shared_params, task_params)
    if getattr(cls, "accepts_task_params", False):
        options["task_params"] = task_params
    if getattr(cls, "uses_shared_params", False):
        if shared_params is None:
            raise ValueError(f"method {name!r} needs shared_params= (the parameters shared by all tasks)")
        options["shared_params"] = shared_params
    elif shared_params is not None and getattr(cls, "accepts_shared_params", False):
        options["shared_params"] = shared_params  # optional use, e.g. FAMO's gradient clipping
    method = cls(optimizer, num_tasks, **options)
    if owners is not None and hasattr(method, "use_task_params"):
        method.use_task_params(owners)
    return method


def aggregate(name: str, jacobian: torch.Tensor, /, **options: Any) -> torch.Tensor:
    """Combines a K×P matrix of task gradients into one P-vector, as method ``name`` does.

    ``name`` and ``jacobian`` are positional-only, so that ``options`` can hold every
    option of ``create`` (including the ``jacobian=`` mode, which ``aggregate`` ignores).
    """
    cls = _load(name)
    if not hasattr(cls, "aggregate"):
        raise ValueError(f"method {name!r} does not combine gradients (it is not gradient-based)")
    return cls.aggregate(jacobian, **options)


__all__ = ["MultiTaskMethod", "aggregate", "available", "create"]
