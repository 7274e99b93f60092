"""``selgroup-bench``: the per-batch timing breakdown of every multi-task method.

Reproduces the measurement of Jeong & Yoon (ICLR 2025), Table E.1 / Figure 2 on this
machine: a timm ViT encoder shared by K tasks with one single-conv decoder each,
every method of :mod:`selgroup_fast.methods` timed phase by phase (forward, backprop,
gradient manipulation, optimizer step, clustering + affinity update).

Run ``selgroup-bench --help`` (or ``python -m selgroup_fast.bench --help``); from
Python, ``main(["--methods", "gd", "--steps", "3", "--out", "results"])``.
"""

from .cli import main
from .model import PRESETS, MultiTaskViT, SyntheticBatch, TaskSpec, parse_tasks, synthetic_batch, task_losses
from .timing import BenchConfig, MethodResult, Workload, median_breakdown, prepare_workload, run_method, run_suite

__all__ = [
    "PRESETS",
    "BenchConfig",
    "MethodResult",
    "MultiTaskViT",
    "SyntheticBatch",
    "TaskSpec",
    "Workload",
    "main",
    "median_breakdown",
    "parse_tasks",
    "prepare_workload",
    "run_method",
    "run_suite",
    "synthetic_batch",
    "task_losses",
]
