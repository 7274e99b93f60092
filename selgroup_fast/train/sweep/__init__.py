"""``selgroup-train sweep PLAN``: the evidence sweep, single-task baselines and methods over seeds, tabulated.

A plan (:mod:`.plan`; built-in ones in ``plans/*.json``, e.g. ``issue12``, the sweep behind
``benchmarks/results/train_sweep/``) lists presets, method variants and seeds, and a selective
method's ablations. :mod:`.runs` runs each run through ``selgroup-train`` in its own subprocess
and folder, resumably; :mod:`.table` reads the finished runs back into ``table.md``, ``table.csv``
and ``table.json``. See docs/training.md, "Evidence sweeps".
"""

from __future__ import annotations

from .plan import Ablation, Plan, PlanError, Run, Size, Variant, builtin_plans, load_plan, plan_from_data
from .runs import Outcome, execute
from .table import summarize, tabulate, write_reports

__all__ = [
    "Ablation",
    "Outcome",
    "Plan",
    "PlanError",
    "Run",
    "Size",
    "Variant",
    "builtin_plans",
    "execute",
    "load_plan",
    "plan_from_data",
    "summarize",
    "tabulate",
    "write_reports",
]
