"""The user-model protocol: a model factory and the :class:`BenchModel` it returns (what selgroup-bench times).

A *model factory* is any callable ``factory(request: ModelRequest) -> BenchModel``.
``selgroup-bench --model package.module:factory`` imports it (the current directory
is searched first, as ``python -m`` does); the default is the built-in ViT,
:func:`selgroup_fast.models.vit_bench_model`. Example of a factory::

    def my_bench(request):
        torch.manual_seed(request.seed)
        model = MyMultiTaskNet().to(request.device, request.dtype)
        x, ys = load_one_batch(request.batch_size, request.device, request.dtype)
        return BenchModel(
            model=model,
            shared_params=list(model.encoder.parameters()),
            task_params=list(model.heads.parameters()),
            closure=lambda: [loss(head_out, y) for head_out, y in zip(model(x), ys)],
            task_names=["depth", "semseg"],
        )

Every problem with the spec or with what the factory returns is a :class:`ModelError`
naming it (the command prints it as ``error: ...`` and exits with status 2).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..losses import ClosureOutput, parse_closure_output


class ModelError(ValueError):
    """The model spec, the factory or what it returned cannot be benchmarked (the message says why)."""


@dataclass(frozen=True)
class ModelRequest:
    """What the bench asks a model factory for.

    ``tasks`` is the ``--tasks`` value as given (a number K, or a name the factory
    knows such as the built-in presets), or ``None`` for the factory's own default.
    The factory builds its model on ``device`` in ``dtype`` and its batch of
    ``batch_size`` examples, deterministically from ``seed``.
    """

    tasks: str | None = None
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0


@dataclass
class BenchModel:
    """A model to benchmark: the module, its parameters split by role, and a closure over one batch.

    ``closure()`` runs the forward pass on the batch and returns the K task losses in
    the order of ``task_names`` (anything :func:`selgroup_fast.losses.parse_closure_output`
    reads: a list of scalar tensors, a dict or a 1-D tensor). ``shared_params`` are
    the parameters every task's loss depends on (what the gradient-manipulation
    methods operate on), ``task_params`` the task-specific ones (the heads); both
    must be parameters of ``model`` and the optimizer trains both. ``description``
    is the model's one-line name in the reports. ``halves``, where given, are two
    closures like ``closure`` on the two halves of its batch: the two independent
    batches per step that MoDo and SDMGrad read (``selgroup-train`` gives them the
    halves too); without them the bench refuses those methods.
    """

    model: nn.Module
    shared_params: list[nn.Parameter]
    task_params: list[nn.Parameter]
    closure: Callable[[], ClosureOutput]
    task_names: list[str]
    description: str = ""
    halves: tuple[Callable[[], ClosureOutput], Callable[[], ClosureOutput]] | None = None


ModelFactory = Callable[[ModelRequest], BenchModel]


def load_factory(spec: str) -> ModelFactory:
    """The factory named by ``package.module:attribute`` (``attribute`` may be dotted, e.g. ``Class.method``).

    >>> load_factory("selgroup_fast.models:vit_bench_model").__name__
    'vit_bench_model'
    >>> load_factory("selgroup_fast.models")
    Traceback (most recent call last):
        ...
    selgroup_fast.models.factory.ModelError: --model must be 'package.module:factory', got 'selgroup_fast.models'
    """
    module_name, _, attribute = spec.partition(":")
    names = [*module_name.split("."), *attribute.split(".")]
    if not module_name or not attribute or not all(name.isidentifier() for name in names):
        raise ModelError(f"--model must be 'package.module:factory', got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a console script does not search the current directory; python -m does
    try:
        target: object = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 (an import fails in any way: syntax, a dependency, its code)
        raise ModelError(f"cannot import {module_name!r} for --model {spec}: {type(error).__name__}: {error}") from None
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise ModelError(f"{module_name!r} has no attribute {attribute!r} (--model {spec})")
        target = getattr(target, name)
    if not callable(target):
        raise ModelError(f"--model {spec} is a {type(target).__name__}, not a callable factory")
    return target


def factory_name(factory: ModelFactory) -> str:
    """``module:qualname`` of a factory (of the function under a ``functools.partial``), as ``--model`` spells it."""
    factory = getattr(factory, "func", factory)
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', type(factory).__name__)}"


def build_model(factory: ModelFactory, request: ModelRequest) -> BenchModel:
    """Calls ``factory(request)`` and checks what it returned, including one call of its closure."""
    name = factory_name(factory)
    built = factory(request)
    if not isinstance(built, BenchModel):
        raise ModelError(
            f"the factory {name} returned a {type(built).__name__}, expected a selgroup_fast.models.BenchModel"
        )
    if not isinstance(built.model, nn.Module):
        raise ModelError(f"{name}: BenchModel.model must be a torch.nn.Module, got {type(built.model).__name__}")
    if not callable(built.closure):
        raise ModelError(f"{name}: BenchModel.closure must be callable, got {type(built.closure).__name__}")
    if built.halves is not None and (len(built.halves) != 2 or not all(callable(half) for half in built.halves)):
        raise ModelError(f"{name}: BenchModel.halves must be None or two closures, got {built.halves!r}")
    names = built.task_names
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise ModelError(f"{name}: BenchModel.task_names must be a non-empty list of strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ModelError(f"{name}: BenchModel.task_names has duplicates: {list(names)}")
    if request.tasks is not None and request.tasks.strip().isdigit() and int(request.tasks) != len(names):
        raise ModelError(f"{name} built {len(names)} tasks, but {request.tasks} were asked for (--tasks)")
    owned = {id(p) for p in built.model.parameters()}
    groups = {"shared_params": built.shared_params, "task_params": built.task_params}
    for role, params in groups.items():
        if not isinstance(params, Sequence) or not all(isinstance(p, torch.Tensor) for p in params):
            raise ModelError(f"{name}: BenchModel.{role} must be a list of parameters")
        if any(id(p) not in owned or not p.requires_grad for p in params):
            raise ModelError(f"{name}: BenchModel.{role} must hold trainable parameters of BenchModel.model")
        if any(p.device.type != request.device.type or p.dtype != request.dtype for p in params):
            raise ModelError(f"{name}: BenchModel.{role} must be on {request.device} in {request.dtype}")
    if not built.shared_params:
        raise ModelError(f"{name}: BenchModel.shared_params is empty")
    if {id(p) for p in built.shared_params} & {id(p) for p in built.task_params}:
        raise ModelError(f"{name}: a parameter is in both shared_params and task_params")
    try:
        losses = parse_closure_output(built.closure(), len(names)).losses
    except (TypeError, ValueError) as error:
        raise ModelError(f"{name}: its closure: {error}") from None
    if not all(loss.requires_grad for loss in losses):
        raise ModelError(f"{name}: its closure returned a loss that depends on no trainable parameter")
    built.description = built.description or name
    return built
