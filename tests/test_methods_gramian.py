"""``jacobian="gramian"``: G = J·Jᵀ accumulated without J, then one backward of ``Σ_k w_k L_k``.

The model mixes what a real encoder has: Linear layers, a LayerNorm, softmax attention
(``scaled_dot_product_attention``), a raw parameter used outside any submodule (a positional
embedding), a weight used twice (tied), and a shared layer no loss reaches. G and every
eligible method's step are checked against a float64 reference taken the plain way: J row by
row (one ordinary backward per task), ``J·Jᵀ``, the method's direction over J
(``aggregate``; PCGrad also against the NumPy reference of its definition).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_benchmark
from manipulation_reference import pcgrad_update

from selgroup_fast.methods import Weighting, aggregate, aggregator, available, create
from selgroup_fast.methods.jacobian import DEFAULTS, TaskJacobian
from selgroup_fast.methods.pcgrad import projection_orders, seeded_generator
from selgroup_fast.parallel import graph_separates

K = 3
WEIGHTINGS = ["pcgrad", "cagrad", "mgda", "imtl", "aligned_mtl", "nash_mtl"]
SEEDED = {"pcgrad": {"seed": 5}}


class AttentionEncoder(torch.nn.Module):
    """Tokens -> embedding + position -> LayerNorm -> single-head attention -> tied projection -> mean."""

    def __init__(self, dim: int = 6, tokens: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, dim)
        self.position = torch.nn.Parameter(0.1 * torch.randn(tokens, dim))
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.unreached = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position
        q, k, v = self.qkv(self.norm(h)).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v))
        h = h + torch.tanh(F.linear(h, self.proj.weight))  # the projection's weight used a second time
        return h.mean(dim=1)


class Model(torch.nn.Module):
    def __init__(self, num_tasks: int = K) -> None:
        super().__init__()
        self.encoder = AttentionEncoder()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(num_tasks))


def task_losses(model: Model, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    z = model.encoder(x)
    return [(head(z).squeeze(-1) - y[:, k]).pow(2).mean() for k, head in enumerate(model.heads)]


def make_problem(dtype: torch.dtype = torch.float64, num_tasks: int = K):
    """The model, its training closure on one batch, and the float64 reference of both (see :func:`reference`)."""
    torch.manual_seed(0)
    model = Model(num_tasks).to(dtype)
    x = torch.randn(8, 4, 3, dtype=torch.float64)
    y = torch.tanh(x.sum(dim=(1, 2))[:, None] * torch.randn(num_tasks, dtype=torch.float64))
    return model, lambda: task_losses(model, x.to(dtype), y.to(dtype)), lambda: reference(model, x, y)


def reference(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """float64: J (K×P, one ordinary backward per task, zeros where unreached) and each head's own gradient."""
    model64 = copy.deepcopy(model).to(torch.float64)
    shared = list(model64.encoder.parameters())
    rows, heads = [], []
    for k, loss in enumerate(task_losses(model64, x, y)):
        grads = torch.autograd.grad(
            loss, shared + list(model64.heads[k].parameters()), retain_graph=True, materialize_grads=True
        )
        rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
        heads.append(list(grads[len(shared) :]))
    return torch.stack(rows), heads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gramian_equals_the_gram_matrix_of_a_row_by_row_jacobian(dtype):
    model, closure, expected = make_problem(dtype)
    jacobian, _ = expected()
    shared = list(model.encoder.parameters())
    task_jacobian = TaskJacobian(shared, K, mode="gramian")
    gram = task_jacobian.gramian(closure())
    assert task_jacobian.matrix.numel() == 0 and gram.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gram.to(torch.float64), jacobian @ jacobian.T, rtol=tol, atol=tol)
    assert all(not p._backward_hooks for p in shared)  # the hooks live for one call only


def test_the_gramian_of_one_task_is_its_squared_gradient_norm():
    model, closure, expected = make_problem(num_tasks=1)
    jacobian, _ = expected()
    gram = TaskJacobian(model.encoder.parameters(), 1, mode="gramian").gramian(closure())
    torch.testing.assert_close(gram, jacobian.pow(2).sum().reshape(1, 1), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_a_gramian_step_equals_the_float64_reference_step(name):
    model, closure, expected = make_problem()
    jacobian, heads = expected()
    options = SEEDED.get(name, {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr=0 keeps the parameters: the grads are compared
    method = create(name, optimizer, K, shared_params=model.encoder.parameters(), jacobian="gramian", **options)
    method.step(closure)
    got = torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])
    # 1e-7: the iterative solvers (CAGrad's) may stop one iteration apart on a G that differs by rounding.
    torch.testing.assert_close(got, aggregate(name, jacobian, **options), rtol=1e-7, atol=1e-10)
    gram = jacobian @ jacobian.T
    weighting = aggregator(name, K, dtype=torch.float64, **options)
    head_weights = weighting.direction_weights(gram)[1] if weighting.weights_task_params else torch.ones(K)
    for k, head in enumerate(model.heads):
        for param, grad in zip(head.parameters(), heads[k], strict=True):
            torch.testing.assert_close(param.grad, head_weights[k] * grad, rtol=1e-7, atol=1e-10)
    assert method._jacobian.matrix.numel() == 0  # J was never held


def losses_and_features(model: Model, x: torch.Tensor, y: torch.Tensor, tied_head: bool = False):
    """The closure contract's ``(losses, features)``; ``tied_head``: head 0 also reads a shared weight."""
    z = model.encoder(x)
    losses = [(head(z).squeeze(-1) - y[:, k]).pow(2).mean() for k, head in enumerate(model.heads)]
    if tied_head:
        losses[0] = losses[0] + 0.1 * model.encoder.proj.weight.pow(2).sum()
    return losses, z


def test_the_gramian_through_the_features_equals_the_row_by_row_one():
    # Every path from the losses to the encoder passes through z: the vectorised backward may
    # start there, with each task's gradient of z as its cotangent (the chain rule).
    model, _, expected = make_problem()
    jacobian, _ = expected()
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, dtype=torch.float64)
    losses, z = losses_and_features(model, x, torch.zeros(8, K, dtype=torch.float64))
    shared = list(model.encoder.parameters())
    assert graph_separates(losses, [z], shared)
    direct = TaskJacobian(shared, K, mode="gramian").gramian(losses, retain_graph=True)
    through = TaskJacobian(shared, K, mode="gramian").gramian(losses, through=[z])
    torch.testing.assert_close(through, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tied_head", [False, True], ids=["separable", "head-reads-a-shared-weight"])
@pytest.mark.parametrize("name", ["mgda", "nash_mtl"])
def test_a_step_whose_closure_returns_features_starts_the_gramian_there_only_where_exact(name, tied_head, monkeypatch):
    model, _, _ = make_problem()
    torch.manual_seed(1)
    x, y = torch.randn(8, 4, 3, dtype=torch.float64), torch.randn(8, K, dtype=torch.float64)
    started_from = []
    gramian = TaskJacobian.gramian
    monkeypatch.setattr(
        TaskJacobian,
        "gramian",
        lambda self, losses, retain_graph=False, through=(): (
            started_from.append(len(through)) or gramian(self, losses, retain_graph, through)
        ),
    )
    shared = list(model.encoder.parameters())
    with_features = create(
        name, torch.optim.SGD(model.parameters(), lr=0.0), K, shared_params=shared, jacobian="gramian"
    )
    with_features.step(lambda: losses_and_features(model, x, y, tied_head))
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    plain = create(name, torch.optim.SGD(model.parameters(), lr=0.0), K, shared_params=shared, jacobian="loop")
    plain.step(lambda: losses_and_features(model, x, y, tied_head)[0])
    for param, grad in zip(model.parameters(), got, strict=True):
        torch.testing.assert_close(grad, param.grad, rtol=1e-9, atol=1e-12)
    assert started_from == [0 if tied_head else 1]


def test_pcgrad_through_the_gramian_is_the_sum_of_the_projected_gradients():
    # PCGrad's projections only take inner products of task gradients, in an order drawn on
    # the generator: the projected sum is Σ w_k g_k with w from G and the order alone.
    model, closure, expected_step = make_problem()
    jacobian, _ = expected_step()
    method = create(
        "pcgrad",
        torch.optim.SGD(model.parameters(), lr=0.0),
        K,
        shared_params=model.encoder,
        jacobian="gramian",
        seed=7,
    )
    method.step(closure)
    orders = projection_orders(K, torch.device("cpu"), seeded_generator(torch.device("cpu"), 7))
    expected = pcgrad_update(jacobian.numpy(), orders.numpy())
    got = torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_a_float32_gramian_step_matches_the_float64_reference():
    model, closure, expected = make_problem(torch.float32)
    jacobian, _ = expected()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    create("mgda", optimizer, K, shared_params=model.encoder.parameters(), jacobian="gramian").step(closure)
    got = torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()]).to(torch.float64)
    torch.testing.assert_close(got, aggregate("mgda", jacobian), rtol=1e-4, atol=1e-6)


def test_the_default_mode_follows_the_device_table():
    model, _, _ = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cpu = DEFAULTS["cpu"]
    assert K < cpu.weighting_from_tasks  # below the size where the Gramian pays: the loop's mode
    for name in available("gradient"):
        method = create(name, optimizer, K, shared_params=model.encoder.parameters(), **SEEDED.get(name, {}))
        assert method._jacobian.mode == cpu.jacobian, name
        many = cpu.weighting_from_tasks
        method = create(name, optimizer, many, shared_params=model.encoder.parameters(), **SEEDED.get(name, {}))
        # A weighting (a function of G) takes the Gramian; an aggregator that needs J itself (GradDrop, the tracked
        # DB-MTL and MoCo) keeps the device's Jacobian mode.
        expected = cpu.weighting if isinstance(method.aggregator, Weighting) else cpu.jacobian
        assert method._jacobian.mode == expected, name
    chunked = create("mgda", optimizer, K, shared_params=model.encoder.parameters(), chunk_size=2)
    assert (chunked._jacobian.mode, chunked._jacobian.chunk_size) == ("batched", 2)


def test_what_the_gramian_cannot_do_is_refused_in_one_line():
    model, closure, _ = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shared = list(model.encoder.parameters())
    with pytest.raises(ValueError, match=r'jacobian="gramian" does not apply: graddrop needs J itself') as error:
        create("graddrop", optimizer, K, shared_params=shared, jacobian="gramian")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match='space="representation" takes the small J'):
        create("mgda", optimizer, K, shared_params=shared, jacobian="gramian", space="representation")
    with pytest.raises(ValueError, match='chunk_size applies to jacobian="batched"'):
        create("mgda", optimizer, K, shared_params=shared, jacobian="gramian", chunk_size=2)
    with pytest.raises(ValueError, match='chunk_size applies to jacobian="batched": the loop runs one task'):
        create("mgda", optimizer, K, shared_params=shared, jacobian="loop", chunk_size=2)
    task_jacobian = TaskJacobian(shared, K, mode="gramian")
    with pytest.raises(ValueError, match="expected 3 losses, got 2"):
        task_jacobian.gramian(closure()[:2])
    with pytest.raises(ValueError, match='jacobian="gramian" never forms J'):
        task_jacobian.compute(closure())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_jacobian_benchmark_refuses_cuda_without_a_gpu_in_one_line(capsys):
    bench = load_benchmark("bench_jacobian")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --device cuda: no usable CUDA device\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "argument --rounds: expected a positive integer, got '0'"),
        (["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    ],
)
def test_the_jacobian_benchmark_refuses_bad_counts(capsys, argv, message):
    bench = load_benchmark("bench_jacobian")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
