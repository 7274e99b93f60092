"""``selgroup-bench``: the per-batch timing breakdown of every multi-task method.

Reproduces the measurement of Jeong & Yoon (ICLR 2025), Table E.1 / Figure 2 on this
machine: by default a timm ViT encoder shared by K tasks with one single-conv decoder
each (:func:`selgroup_fast.models.vit_bench_model`), or your own model through a factory
returning a :class:`selgroup_fast.models.BenchModel` (``--model package.module:factory``); every method of
:mod:`selgroup_fast.methods` timed phase by phase (forward, backprop, gradient
manipulation, optimizer step, clustering + affinity update) in interleaved rounds.

Run ``selgroup-bench --help`` (or ``python -m selgroup_fast.bench --help``); from
Python, ``main(["--methods", "gd", "--steps", "3", "--out", "results"])``, or with a
factory object::

    suite = run_suite(["gd", "pcgrad"], BenchConfig(), my_factory)
    write_outputs(suite, "bench_out", command="my_factory, gd and pcgrad")
"""

from .cli import main
from .report import write_outputs
from .timing import (
    BenchConfig,
    MethodResult,
    Suite,
    Workload,
    median_breakdown,
    prepare_workload,
    run_methods,
    run_suite,
)

__all__ = [
    "BenchConfig",
    "MethodResult",
    "Suite",
    "Workload",
    "main",
    "median_breakdown",
    "prepare_workload",
    "run_methods",
    "run_suite",
    "write_outputs",
]
