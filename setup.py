"""Build of the torch extension ``selgroup_fast._C``.

CPU kernels are always built. CUDA kernels are built when a GPU is visible and
nvcc is found (the torchvision convention), or when ``FORCE_CUDA=1``;
``FORCE_CPU=1`` turns them off. ``TORCH_CUDA_ARCH_LIST`` selects the GPU
architectures (torch's default is the visible GPU, so set it explicitly when
building without one). The decision is printed.

Build with ``pip install --no-build-isolation .`` (or ``-e .``): the extension
must be compiled against the torch that will import it.
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools refuses absolute ones in sdists and wheels.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _use_cuda() -> tuple[bool, str]:
    if _flag("FORCE_CPU"):
        return False, "FORCE_CPU=1"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA support"
    if CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    if _flag("FORCE_CUDA"):
        why = "FORCE_CUDA=1"
    elif torch.cuda.is_available():
        why = "a GPU is visible"
    else:
        return False, "no GPU visible (set FORCE_CUDA=1 to build the CUDA kernels anyway)"
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        # torch derives CUDA_HOME from `which nvcc`; a wrapper script outside the
        # toolkit (e.g. /usr/local/bin/nvcc) points it at a folder with no headers.
        raise RuntimeError(
            f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime_api.h: set CUDA_HOME to the CUDA toolkit's root "
            "(e.g. /usr/local/cuda), or FORCE_CPU=1 to build the CPU kernels only"
        )
    return True, f"{why} (CUDA_HOME={CUDA_HOME})"


def _extension():
    use_cuda, why = _use_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/**/*.cpp")
    # C++20 for the Team concept (csrc/team.h); OpenMP for the CPU teams of large problems
    # (csrc/cpu/ops_cpu.cpp) and the vectorised max reductions (csrc/affinity/affinity_propagation.h).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fdiagnostics-color=always"]
    define_macros = [("Py_LIMITED_API", "0x030A0000")]
    if use_cuda:
        sources += _sources("csrc/cuda/**/*.cpp") + _sources("csrc/cuda/**/*.cu")
        define_macros.append(("SELGROUP_WITH_CUDA", None))
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(torch default: the visible GPU)")
        print(f"selgroup_fast: building CPU + CUDA kernels: {why}; TORCH_CUDA_ARCH_LIST={arch}")
        return CUDAExtension(
            "selgroup_fast._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    print(f"selgroup_fast: building CPU kernels only: {why}")
    return CppExtension(
        "selgroup_fast._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
