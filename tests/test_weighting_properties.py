"""Properties every gradient method's aggregator must have, for every method of the registry,
on every available device and both float dtypes (the model: TorchJD's shared property asserts).

The task gradients are the true per-task gradients of tests/conftest.py's tiny multi-task
problem. Properties, with their documented exceptions:

* permutation equivariance: relabelling the tasks relabels the weights, ``w(P G Pᵀ) = P w(G)``;
  GradDrop (not a weighting) gives the same direction, ``d(P J) = d(J)``. PCGrad draws a random
  projection order per task, which is not permuted with the tasks: it is equivariant only where
  the order cannot matter, K = 2 (one other task), which is where it is checked.
* scale: scaling every gradient by s (``G -> s² G``) leaves the weights unchanged (so the
  direction scales by s), except Nash-MTL (``G α = 1/α``: α scales by 1/s, the direction is
  unchanged; checked without its max_norm clipping) and GradDrop (the direction scales by s).
  CAGrad is invariant up to its solver's 1e-8 regularisers (checked where they are negligible:
  gradients of norm ~0.1 and more).
* K = 1: the direction is the task's own gradient (the ops give w = [1]; Nash-MTL's max_norm
  clipping, off here, would shorten it).
* degenerate Gram matrices (a zero gradient, a duplicated gradient, rank 1, all zero): finite
  weights and directions.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_problem

from selgroup_fast.methods import aggregator, available
from selgroup_fast.methods.jacobian import TaskJacobian
from selgroup_fast.methods.weighting import Weighting, gram

METHODS = available("gradient")
#: w(s² G) = s^(2·exponent) w(G); 0 unless listed.
SCALE_EXPONENT = {"nash_mtl": -0.5}
#: Options that make a method deterministic or switch off a step-level convention.
OPTIONS = {"pcgrad": {"seed": 0}, "graddrop": {"seed": 0}, "nash_mtl": {"max_norm": 0.0}}


def task_gradients(num_tasks: int, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """The K×P Jacobian of the shared problem's task losses w.r.t. its encoder."""
    problem = make_problem(num_tasks, seed=seed, dtype=dtype, device=device, correlated=True)
    return TaskJacobian(problem.model.encoder.parameters(), num_tasks).compute(problem.closure()()).clone()


def make(name: str, num_tasks: int, device: str, dtype: torch.dtype):
    return aggregator(name, num_tasks, device, dtype, **OPTIONS.get(name, {}))


def tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-7, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-5}


@pytest.mark.parametrize("name", METHODS)
def test_relabelling_the_tasks_relabels_the_weights(name, device, dtype):
    num_tasks = 2 if name == "pcgrad" else 5
    J = task_gradients(num_tasks, device, dtype)
    perm = torch.tensor([1, 0] if num_tasks == 2 else [3, 0, 4, 2, 1], device=device)
    method, relabelled = make(name, num_tasks, device, dtype), make(name, num_tasks, device, dtype)
    if isinstance(method, Weighting):
        G = gram(J)
        torch.testing.assert_close(relabelled.weights(G[perm][:, perm].contiguous()), method.weights(G)[perm],
                                   **tolerance(dtype))
    else:
        torch.testing.assert_close(relabelled(J[perm].contiguous()), method(J), **tolerance(dtype))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("scale", [0.1, 7.0])
def test_scaling_the_gradients(name, scale, device, dtype):
    J = task_gradients(3, device, dtype, seed=1)
    method, scaled = make(name, 3, device, dtype), make(name, 3, device, dtype)
    tol = tolerance(dtype) if name != "cagrad" else {"rtol": 1e-5, "atol": 1e-7}
    if isinstance(method, Weighting):
        G = gram(J)
        expected = method.weights(G) * scale ** (2 * SCALE_EXPONENT.get(name, 0.0))
        torch.testing.assert_close(scaled.weights((scale**2 * G).contiguous()), expected, **tol)
    else:  # GradDrop: the same signs are kept, the direction scales
        torch.testing.assert_close(scaled(scale * J), scale * method(J), **tol)


@pytest.mark.parametrize("name", METHODS)
def test_one_task_steps_along_its_own_gradient(name, device, dtype):
    J = task_gradients(1, device, dtype)
    torch.testing.assert_close(make(name, 1, device, dtype)(J), J[0], **tolerance(dtype))


def degenerate_jacobians(J: torch.Tensor) -> dict[str, torch.Tensor]:
    zero_row, duplicate, rank_one = J.clone(), J.clone(), J.clone()
    zero_row[1] = 0
    duplicate[2] = duplicate[0]
    rank_one[:] = J[0] * torch.tensor([1.0, -2.0, 0.5], dtype=J.dtype, device=J.device)[:, None]
    return {"zero_row": zero_row, "duplicate": duplicate, "rank_one": rank_one, "all_zero": torch.zeros_like(J)}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("case", ["zero_row", "duplicate", "rank_one", "all_zero"])
def test_degenerate_gradients_give_finite_results(name, case, device, dtype):
    J = degenerate_jacobians(task_gradients(3, device, dtype))[case]
    method = make(name, 3, device, dtype)
    if isinstance(method, Weighting):
        assert torch.isfinite(method.weights(gram(J))).all()
    direction = make(name, 3, device, dtype)(J)
    assert direction.shape == J.shape[1:] and torch.isfinite(direction).all()
    if case == "all_zero":
        assert torch.equal(direction, torch.zeros_like(direction))
