"""Fused ops of selgroup_fast: thin typed wrappers over ``torch.ops.selgroup_fast``.

Each op's schema is defined once in ``csrc/ops.cpp``; the CPU and CUDA kernels live
in ``csrc/cpu`` and ``csrc/cuda``; the fake (meta) kernels registered here let the
ops run under ``torch.compile`` and ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library and registers the ops)

__all__ = ["cuda_available"]


def cuda_available() -> bool:
    """Whether this build of the extension contains the CUDA kernels."""
    return bool(torch.ops.selgroup_fast.cuda_available())
