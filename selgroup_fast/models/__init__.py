"""The multi-task models: the paper's ViT (:class:`MultiTaskViT`) and the protocol a user's own model follows.

A *model factory* ``factory(request: ModelRequest) -> BenchModel`` builds a model with its
parameters split by role and a closure over one batch (:mod:`selgroup_fast.models.factory`);
:func:`vit_bench_model` is the built-in one, :class:`MultiTaskViT` on a :func:`synthetic_batch`.
``selgroup-bench`` times a factory, ``selgroup-train`` trains :class:`MultiTaskViT`.
"""

from .factory import BenchModel, ModelError, ModelFactory, ModelRequest, build_model, factory_name, load_factory
from .vit import MultiTaskViT, SyntheticBatch, generic_tasks, parse_tasks, synthetic_batch, vit_bench_model

__all__ = [
    "BenchModel",
    "ModelError",
    "ModelFactory",
    "ModelRequest",
    "MultiTaskViT",
    "SyntheticBatch",
    "build_model",
    "factory_name",
    "generic_tasks",
    "load_factory",
    "parse_tasks",
    "synthetic_batch",
    "vit_bench_model",
]
