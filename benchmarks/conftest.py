"""pytest-benchmark's record of the machine, completed with what the ops' timings depend on."""

from __future__ import annotations

import os
from importlib import metadata

import torch

from selgroup_fast.cli_common import cpu_model


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    versions = {}
    for distribution in ("torch", "numpy", "scipy", "scikit-learn", "pytest-benchmark", "selgroup_fast"):
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[distribution] = None
    machine_info.update(
        cpu_model=cpu_model(),
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        versions=versions,
    )
