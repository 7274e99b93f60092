"""Shared fixtures: every device the build supports, both float dtypes."""

from __future__ import annotations

import pytest
import torch

import selgroup_fast


def _devices() -> list:
    devices = ["cpu"]
    if torch.cuda.is_available() and selgroup_fast.ops.cuda_available():
        devices.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devices


DEVICES = _devices()
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


def pytest_report_header(config) -> str:
    return (
        f"selgroup_fast: torch {torch.__version__}, CUDA kernels built: {selgroup_fast.ops.cuda_available()}, "
        f"GPU visible: {torch.cuda.is_available()}"
    )
