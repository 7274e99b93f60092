"""``space="representation"``: the gradient methods on the task gradients of the shared features z.

Each step is checked against a float64 reference written from the definition with plain
autograd: J_z row by row (one backward per task), the method's direction d_z over those
rows, the encoder's gradient ``∂⟨z, d_z⟩/∂θ`` and each head's own (weighted) task gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import free_port, init_gloo, make_problem

from selgroup_fast.methods import aggregate, aggregator, available, create

K = 3
SEEDED = {"pcgrad": {"seed": 5}, "graddrop": {"seed": 5}}


def closure_with_features(model, x, y, split: bool = False):
    """The regression losses and the encoder's output z (as two tensors when ``split``)."""

    def closure():
        z = model.encoder(x)
        features = (z[:, :2], z[:, 2:]) if split else z
        shared = torch.cat(features, dim=1) if split else z
        losses = [(head(shared).squeeze(-1) - y[:, k]).pow(2).mean() for k, head in enumerate(model.heads)]
        return losses, features

    return closure


def reference_step(name: str, model, x, y, options: dict, split: bool):
    """(encoder gradient, per-head gradients) of one representation-space step, float64, by the definition.

    With ``split`` the columns of J_z are ordered as the method sees them (z[:, :2] then z[:, 2:]).
    """
    z = model.encoder(x)
    losses = [(head(z).squeeze(-1) - y[:, k]).pow(2).mean() for k, head in enumerate(model.heads)]
    grads = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses])
    parts = (grads[:, :, :2], grads[:, :, 2:]) if split else (grads,)
    rows = torch.cat([part.reshape(K, -1) for part in parts], dim=1)
    task_losses = torch.stack(losses).detach()  # for the methods that read them (GradNorm)
    direction = aggregate(name, rows, task_losses, **options)
    if split:
        left = direction[: z.shape[0] * 2].view(z.shape[0], 2)
        direction = torch.cat([left, direction[z.shape[0] * 2 :].view(z.shape[0], -1)], dim=1)
    encoder = torch.autograd.grad(z, list(model.encoder.parameters()), direction.reshape(z.shape), retain_graph=True)
    gram = rows @ rows.T
    if aggregator(name, K).weights_task_params:
        weights = aggregator(name, K, dtype=gram.dtype, **options).direction_weights(gram, task_losses)[1]
    else:
        weights = torch.ones(K, dtype=torch.float64)
    heads = [
        torch.autograd.grad(weights[k] * loss, list(model.heads[k].parameters()), retain_graph=True)
        for k, loss in enumerate(losses)
    ]
    return encoder, heads


#: The methods whose state or inputs are over the shared parameters: one error line in representation space.
TRACKED_STATE = r'keeps a state per task over the shared parameters\' coordinates: space="representation" does not'
REFUSE_REPRESENTATION = {
    "db_mtl": TRACKED_STATE,
    "moco": TRACKED_STATE,
    "excess_mtl": TRACKED_STATE,
    "modo": r'modo reads J_1 J_2ᵀ of two batches\' task gradients over the shared parameters: space="representation"',
    "sdmgrad": r'sdmgrad reads J_1 J_2ᵀ of two batches\' task gradients over the shared parameters: space="repre',
}


@pytest.mark.parametrize("name", available("gradient"))
@pytest.mark.parametrize("mode", ["batched", "loop"])
@pytest.mark.parametrize("split", [False, True], ids=["one_feature", "two_features"])
def test_representation_step_matches_the_float64_definition(name, mode, split, dtype):
    problem = make_problem(K, dtype=dtype, hidden=5, correlated=True)
    model = problem.model
    reference_model = copy.deepcopy(model).to(torch.float64)
    options = SEEDED.get(name, {})
    if name in REFUSE_REPRESENTATION:
        with pytest.raises(ValueError, match=REFUSE_REPRESENTATION[name]):
            create(
                name,
                torch.optim.SGD(model.parameters(), lr=0.0),
                K,
                shared_params=model.encoder.parameters(),
                space="representation",
                jacobian=mode,
                **options,
            )
        return
    method = create(
        name,
        torch.optim.SGD(model.parameters(), lr=0.0),
        K,
        shared_params=model.encoder.parameters(),
        space="representation",
        jacobian=mode,
        **options,
    )
    method.step(closure_with_features(model, problem.x, problem.y, split))
    encoder, heads = reference_step(name, reference_model, problem.x.double(), problem.y.double(), options, split)
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 1e-6}
    for p, g in zip(model.encoder.parameters(), encoder, strict=False):
        torch.testing.assert_close(p.grad.double(), g, **tol)
    for head, grads in zip(model.heads, heads, strict=False):
        for p, g in zip(head.parameters(), grads, strict=False):
            torch.testing.assert_close(p.grad.double(), g, **tol)


def test_representation_space_needs_features_from_the_closure():
    problem = make_problem(K)
    method = create(
        "pcgrad",
        torch.optim.SGD(problem.model.parameters(), lr=0.1),
        K,
        shared_params=problem.model.encoder.parameters(),
        space="representation",
    )
    with pytest.raises(ValueError, match=r"closure to return \(losses, features\)"):
        method.step(problem.closure())
    detached = lambda: (problem.closure()(), problem.model.encoder(problem.x).detach())  # noqa: E731
    with pytest.raises(ValueError, match="does not require grad"):
        method.step(detached)


def test_space_option_is_validated():
    problem = make_problem(K)
    with pytest.raises(ValueError, match="space must be one of"):
        create(
            "mgda",
            torch.optim.SGD(problem.model.parameters(), lr=0.1),
            K,
            shared_params=problem.model.encoder.parameters(),
            space="z",
        )


def test_parameter_space_accepts_a_closure_that_returns_features():
    problem = make_problem(K)
    plain, with_features = problem.model, problem.twin
    for model, closure in (
        (plain, problem.closure(plain)),
        (with_features, closure_with_features(with_features, problem.x, problem.y)),
    ):
        method = create(
            "cagrad", torch.optim.SGD(model.parameters(), lr=0.1), K, shared_params=model.encoder.parameters()
        )
        method.step(closure)
    for p, q in zip(plain.parameters(), with_features.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["db_mtl", "moco", "excess_mtl"])
def test_under_ddp_a_tracked_state_refuses_the_representation_space_for_its_own_reason(name, monkeypatch, one_thread):
    """Under torch.distributed the features' J is also split over ranks; the line says the real reason (the
    state over the shared parameters), not the generic split-columns one. A one-rank gloo group, in process."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # restored after the test (init_gloo sets it)
    init_gloo(0, free_port(), 1)
    try:
        problem = make_problem(K, hidden=5)
        model = problem.model
        with pytest.raises(ValueError, match=rf"^{name} {TRACKED_STATE}") as refused:
            create(
                name,
                torch.optim.SGD(model.parameters(), lr=0.0),
                K,
                shared_params=model.encoder.parameters(),
                space="representation",
            )
        assert "\n" not in str(refused.value) and "split over ranks" not in str(refused.value)
    finally:
        torch.distributed.destroy_process_group()
