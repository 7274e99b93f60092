"""``selgroup-train``: multi-task training with the selective update or any baseline, over a Python API.

``fit(TrainConfig(...))`` trains selgroup-bench's ViT (one single-conv decoder per task) on the
built-in ``scenes`` dataset or NYUD-v2 from disk, or your own model, tasks, loss and data, and
returns (and writes to ``out/results.json``) the final metrics, Δm against a baseline, timings
and, for the selective method, the groups and the affinity. See docs/training.md.
"""

from __future__ import annotations

from .checkpoint import CheckpointError
from .config import TrainConfig, TrainError
from .loop import Interrupted, NonFiniteLoss, fit, fit_baseline

__all__ = ["CheckpointError", "Interrupted", "NonFiniteLoss", "TrainConfig", "TrainError", "fit", "fit_baseline"]
