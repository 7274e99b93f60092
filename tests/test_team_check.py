"""The team algorithms of csrc/ on CPU threads (tests/team_check.cpp): the CUDA block's barrier logic, without a GPU.

Every team solver (the weighting methods, affinity propagation) and the affinity maps run with 2..32 std::threads
as the team must give the serial team's answer bit for bit, as host teams (contiguous shares, the median by
selection) and as device-like teams (rank-strided shares, the median by bitonic sort); the serial team's AVX2
version (affinity propagation's 32-byte SIMD lanes) too, where the CPU has AVX2. A missing barrier, a bad work split
or a lane that rounds differently shows up as a mismatch. The default suite runs a fast sweep; ``-m slow`` the full one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def team_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("c++") is None:
        pytest.skip("needs a C++20 compiler")
    binary = tmp_path_factory.mktemp("team_check") / "team_check"
    # -fopenmp as the extension's CPU build: the same vectorised reductions (csrc/affinity/affinity_propagation.h).
    subprocess.run(
        [
            "c++",
            "-std=c++20",
            "-O2",
            "-fopenmp",
            "-pthread",
            "-I",
            str(ROOT / "csrc"),
            str(ROOT / "tests" / "team_check.cpp"),
            "-o",
            str(binary),
        ],
        check=True,
    )
    return binary


def _run(binary: Path, *args: str) -> str:
    result = subprocess.run(
        [str(binary), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    return result.stdout


def test_fast_sweep_matches_the_serial_team(team_check: Path) -> None:
    out = _run(team_check)
    runs = int(out.split(" team runs")[0].split()[-1])
    assert runs > 300 and "0 mismatches" in out


@pytest.mark.slow
def test_full_sweep_matches_the_serial_team(team_check: Path) -> None:
    out = _run(team_check, "--full")
    runs = int(out.split(" team runs")[0].split()[-1])
    assert runs > 4000 and "0 mismatches" in out
