"""Micro-benchmarks (pytest-benchmark) of every fused op against the reference way of doing the same work.

At K = 4, 11, 32 and 128 tasks, on the CPU (and on CUDA when a GPU and the CUDA kernels
are present), each op next to its reference:

* ``affinity_update_``: the public reference code's Python double loop that reads each
  loss with ``.item()`` (``ReferenceAffinity.update`` of ``benchmarks/reference_loop.py``);
* ``group_similarity``: the reference code's tensor expression (``ReferenceAffinity.similarity``);
* ``affinity_propagation``: scikit-learn's ``AffinityPropagation(affinity="precomputed",
  convergence_iter=50)`` (the reference code's call), on the similarity of a tracked affinity;
* the gradient-weighting ops (PCGrad, MGDA, CAGrad, IMTL-G, Aligned-MTL, Nash-MTL) and
  GradDrop: the float64 references of ``tests/manipulation_reference.py`` (NumPy/SciPy on the
  task gradients J, K × 2048), the fused op in float32 from the same J (Gram matrix included).

Not collected by the default test run (``testpaths = ["tests"]``). From a source checkout::

    python -m pytest benchmarks/test_fused_ops.py --benchmark-max-time=0.5 \\
        --benchmark-storage=benchmarks/results/pytest-benchmark --benchmark-save=cpu
    python benchmarks/summarize_micro.py --output benchmarks/results/ops_micro_cpu.md

``--benchmark-compare`` compares a new run with the saved one (benchmarks/results/README.md).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the float64 references live beside the tests

import manipulation_reference as reference  # noqa: E402
from reference_loop import CONVERGENCE_ITER, DECAY, ReferenceAffinity  # noqa: E402 (beside this file)

import selgroup_fast  # noqa: E402
from selgroup_fast import ops  # noqa: E402

pytest.importorskip("pytest_benchmark")
sklearn_cluster = pytest.importorskip("sklearn.cluster")

SIZES = [4, 11, 32, 128]
COLUMNS = 2048  # P: the width of the task gradients J for the weighting ops
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.cuda_available() else [])
#: A reference call slower than this is timed in a few single rounds instead of pytest-benchmark's calibration.
SLOW_CALL_S = 0.1
#: (op, K) whose reference is not run: scipy's SLSQP takes over a minute per call (84 s on the 2-core machine).
TOO_SLOW = {("cagrad_weights", 128)}


def _timed(benchmark, function: Callable[[], object], *, op: str, side: str, num_tasks: int, device: str) -> None:
    """Times ``function`` with pytest-benchmark, grouped by (op, K, device) and labelled for the summary."""
    benchmark.group = f"{op} K={num_tasks} {device}"
    benchmark.extra_info.update(op=op, side=side, num_tasks=num_tasks, device=device)
    if device == "cuda":
        inner = function

        def function() -> object:
            result = inner()
            torch.cuda.synchronize()
            return result

    begin = time.perf_counter()
    function()  # one untimed call: warm-up, and the cost that picks how to time
    seconds = time.perf_counter() - begin
    if seconds > SLOW_CALL_S:
        benchmark.pedantic(function, rounds=max(1, min(5, int(1.0 / seconds))), iterations=1)
    else:
        benchmark(function)


# --- the affinity ops ---------------------------------------------------------------------


def _losses(num_tasks: int, device: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A group of about K/3 tasks and the losses before and after its step."""
    generator = torch.Generator().manual_seed(num_tasks)
    group = sorted(torch.randperm(num_tasks, generator=generator)[: max(1, num_tasks // 3)].tolist())
    before = torch.rand(num_tasks, generator=generator) + 1.0
    after = before * (1 - 0.01 * torch.randn(num_tasks, generator=generator))
    return group, before.to(device), after.to(device)


def _tracked_similarity(num_tasks: int, device: str = "cpu") -> torch.Tensor:
    """The grouping similarity after 30 batches of updates by a fixed partition into 3 groups."""
    generator = torch.Generator().manual_seed(num_tasks)
    assignment = torch.randint(0, 3, (num_tasks,), generator=generator)
    groups = [torch.nonzero(assignment == c).flatten().tolist() for c in range(3)]
    tracker = selgroup_fast.AffinityTracker(num_tasks, decay=DECAY)
    losses = torch.rand(num_tasks, generator=generator) + 1.0
    for _ in range(30):
        for group in filter(None, groups):
            after = losses * (1 - 0.01 * torch.randn(num_tasks, generator=generator))
            tracker.update(group, losses, after)
            losses = after
    return tracker.similarity().to(device)


@pytest.mark.parametrize("num_tasks", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_affinity_update_fused(benchmark, num_tasks, device):
    group, before, after = _losses(num_tasks, device)
    affinity = torch.zeros(num_tasks, num_tasks, device=device)
    mask = torch.zeros(num_tasks, dtype=torch.bool, device=device)
    mask[group] = True
    _timed(
        benchmark,
        lambda: ops.affinity_update_(affinity, before, after, mask, DECAY),
        op="affinity_update_",
        side="fused",
        num_tasks=num_tasks,
        device=device,
    )


@pytest.mark.parametrize("num_tasks", SIZES)
def test_affinity_update_reference_loop(benchmark, num_tasks):
    group, before, after = _losses(num_tasks, "cpu")
    tracker = ReferenceAffinity(num_tasks, decay=DECAY)
    after_losses, before_values = list(after.unbind()), before.tolist()

    def update() -> None:
        tracker.previous = before_values
        tracker.update(group, after_losses)

    _timed(benchmark, update, op="affinity_update_", side="reference", num_tasks=num_tasks, device="cpu")


@pytest.mark.parametrize("num_tasks", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_group_similarity_fused(benchmark, num_tasks, device):
    affinity = torch.rand(num_tasks, num_tasks, device=device) - 0.3
    _timed(
        benchmark,
        lambda: ops.group_similarity(affinity),
        op="group_similarity",
        side="fused",
        num_tasks=num_tasks,
        device=device,
    )


@pytest.mark.parametrize("num_tasks", SIZES)
def test_group_similarity_reference(benchmark, num_tasks):
    tracker = ReferenceAffinity(num_tasks)
    tracker.affinity = torch.rand(num_tasks, num_tasks) - 0.3
    _timed(benchmark, tracker.similarity, op="group_similarity", side="reference", num_tasks=num_tasks, device="cpu")


@pytest.mark.parametrize("num_tasks", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_affinity_propagation_fused(benchmark, num_tasks, device):
    similarity = _tracked_similarity(num_tasks, device)
    _timed(
        benchmark,
        lambda: ops.affinity_propagation(similarity, convergence_iter=CONVERGENCE_ITER),
        op="affinity_propagation",
        side="fused",
        num_tasks=num_tasks,
        device=device,
    )


@pytest.mark.parametrize("num_tasks", SIZES)
def test_affinity_propagation_sklearn(benchmark, num_tasks):
    similarity = _tracked_similarity(num_tasks).double().numpy()

    def cluster() -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings: the reference code ignores them too
            clustering = sklearn_cluster.AffinityPropagation(
                affinity="precomputed", convergence_iter=CONVERGENCE_ITER, random_state=0
            )
            return clustering.fit(similarity).labels_

    _timed(benchmark, cluster, op="affinity_propagation", side="reference", num_tasks=num_tasks, device="cpu")


# --- the gradient-manipulation ops ------------------------------------------------------


def _jacobian(num_tasks: int) -> torch.Tensor:
    """K task gradients with a common component (so that they partly agree and partly conflict), float64."""
    generator = torch.Generator().manual_seed(num_tasks)
    common = torch.randn(1, COLUMNS, generator=generator, dtype=torch.float64)
    return 0.3 * common + torch.randn(num_tasks, COLUMNS, generator=generator, dtype=torch.float64)


def _orders(num_tasks: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(num_tasks + 1)
    return torch.stack([torch.randperm(num_tasks, generator=generator) for _ in range(num_tasks)])


# op -> (the fused call on the float32 J and the projection orders, the float64 reference on J)
WEIGHTINGS: dict[str, tuple[Callable[..., object], Callable[..., object]]] = {
    "pcgrad_weights": (
        lambda J, order: ops.pcgrad_weights(J @ J.T, order),
        lambda J, order: reference.pcgrad_update(J.numpy(), order.numpy()),
    ),
    "mgda_weights": (lambda J, order: ops.mgda_weights(J @ J.T), lambda J, order: reference.mgda_weights(J.numpy())),
    "cagrad_weights": (
        lambda J, order: ops.cagrad_weights(J @ J.T),
        lambda J, order: reference.cagrad_weights(J.numpy()),
    ),
    "imtl_weights": (lambda J, order: ops.imtl_weights(J @ J.T), lambda J, order: reference.imtl_weights(J.numpy())),
    "aligned_mtl_weights": (
        lambda J, order: ops.aligned_mtl_weights(J @ J.T),
        lambda J, order: reference.aligned_mtl_weights(J.numpy()),
    ),
    "nash_mtl_weights": (
        lambda J, order: ops.nash_mtl_weights(J @ J.T, torch.ones(J.shape[0], device=J.device, dtype=J.dtype)),
        lambda J, order: reference.nash_mtl_weights((J @ J.T).numpy()),
    ),
    "graddrop": (
        lambda J, order: ops.graddrop(J, torch.zeros(J.shape[0], device=J.device, dtype=J.dtype), 0, 0),
        lambda J, order: reference.graddrop_update(J, torch.zeros(J.shape[0], dtype=J.dtype), 0, 0),
    ),
}


@pytest.mark.parametrize("num_tasks", SIZES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(WEIGHTINGS))
def test_weighting_fused(benchmark, op, num_tasks, device):
    jacobian = _jacobian(num_tasks).to(device, torch.float32)
    order = _orders(num_tasks).to(device)
    fused, _ = WEIGHTINGS[op]
    _timed(benchmark, lambda: fused(jacobian, order), op=op, side="fused", num_tasks=num_tasks, device=device)


@pytest.mark.parametrize("num_tasks", SIZES)
@pytest.mark.parametrize("op", list(WEIGHTINGS))
def test_weighting_reference(benchmark, op, num_tasks):
    if (op, num_tasks) in TOO_SLOW:
        pytest.skip(f"the float64 reference of {op} takes over a minute per call at K = {num_tasks}")
    jacobian, order = _jacobian(num_tasks), _orders(num_tasks)
    _, slow = WEIGHTINGS[op]
    _timed(benchmark, lambda: slow(jacobian, order), op=op, side="reference", num_tasks=num_tasks, device="cpu")
