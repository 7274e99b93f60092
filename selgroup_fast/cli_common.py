"""What both command lines (``selgroup-bench``, ``selgroup-train``) need: the device, the defaults per machine,
the machine and versions record of a run, tables and the matplotlib handle.

>>> print(markdown_table(["method", "s"], [["gd", "0.1"]]), end="")
| method | s |
|---|---|
| gd | 0.1 |
>>> print(text_table(["method", "s"], [["gd", "0.10"], ["pcgrad", "1.5"]]), end="")
method     s
------  ----
gd      0.10
pcgrad   1.5
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import torch

from . import ops


class UsageError(ValueError):
    """Options that cannot run together or on this machine (the commands print ``error: ...`` and exit 2)."""


@dataclass(frozen=True)
class MachineDefaults:
    """The model size a command takes on one kind of machine (CPU or GPU) when its options leave it open.

    Each command extends it with its own run length; ``note`` says why these are the defaults.
    """

    backbone: str
    img_size: int
    patch_size: int
    note: str


def resolve_device(text: str | None) -> torch.device:
    """``--device``: cpu or a usable CUDA device with this build's CUDA kernels (default: that GPU, else cpu)."""
    usable_gpu = torch.cuda.is_available() and ops.cuda_available()
    if text is None:
        return torch.device("cuda" if usable_gpu else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {text}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no usable GPU here (torch.cuda.is_available() is False); use --device cpu")
    if not ops.cuda_available():
        raise UsageError(
            f"--device {text}: this build of selgroup_fast has no CUDA kernels; rebuild it where nvcc is present"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and versions, for the record of a run."""
    from . import __version__

    return {
        "machine": {
            "cpu": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "platform": platform.platform(),
            # other jobs on the machine: read the paired ratios, not the absolute times, when this exceeds the cores
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "timm": _version("timm"),
            "selgroup_fast": __version__,
        },
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A fixed-width table for the terminal (first column left-aligned, the rest right)."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=False))
        )

    return "\n".join([render(header), "  ".join("-" * w for w in widths), *(render(row) for row in rows)]) + "\n"


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display); imported here, as the plots need it alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
