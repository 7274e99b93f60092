"""The baselines of ``selgroup_fast.methods``: training, aggregation by hand, Jacobians, state, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.optimize
import torch
from conftest import TinyMultiTask, regression_losses, step_on_one_batch
from conftest import make_problem as shared_problem

import selgroup_fast
from selgroup_fast.methods import aggregate, aggregator, available, create
from selgroup_fast.methods.gradient import GradientMethod
from selgroup_fast.methods.jacobian import TaskJacobian
from selgroup_fast.methods.pcgrad import projection_orders

K = 3
METHOD_NAMES = available()
GRADIENT_METHODS = available("gradient")
#: Defined from K = 3 tasks on (Krum: K ≥ f + 3; the trimmed mean: K ≥ 2t + 1), at their default options.
ROBUST_METHODS = ("krum", "trimmed_mean")
LOSS_METHODS = available("loss")
#: The gradient methods whose first step is a fraction of the tracked average, not g itself for one task
#: (tests/test_tracked_methods.py follows their rules).
TRACKED = ("db_mtl", "moco")


#: The methods that read two batches (MoDo, SDMGrad): given the same J twice here (A = G; tests/test_stateful_methods.py).
TWO_BATCH = ("modo", "sdmgrad")


def inputs(name: str, J: torch.Tensor) -> dict[str, torch.Tensor]:
    """``aggregate``'s inputs besides J: unit losses, and J again as the second batch of a two-batch method."""
    return {"losses": unit_losses(J), **({"second_jacobian": J} if name in TWO_BATCH else {})}


def unit_losses(J: torch.Tensor) -> torch.Tensor:
    """K losses of 1, for the methods that read them (DB-MTL, MoCo, GradNorm; ``aggregate`` ignores them otherwise)."""
    return torch.ones(J.shape[0], dtype=J.dtype, device=J.device)


# Heads get Σ_k w_k ∇L_k for these (their authors back-propagate the weighted loss), ∇ Σ_k L_k otherwise.
WEIGHTED_HEADS = {"mgda", "imtl", "nash_mtl"}
#: STCH's gradient (TorchJD's default preference 1/K) is a convex combination of the task gradients over K: GD's
#: Σ_k ∇L_k scaled by about 1/K², so the training test gives it a K² times larger learning rate.
LEARNING_RATE_SCALE = {"stch": K**2}


class Closure:
    """The training closure of a model on one fixed batch (conftest's regression losses)."""

    def __init__(self, model: TinyMultiTask, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y

    def __call__(self) -> list[torch.Tensor]:
        return regression_losses(self.model, self.x, self.y)

    def on(self, model: TinyMultiTask) -> Closure:
        dtype = next(model.parameters()).dtype
        return Closure(model, self.x.to(dtype), self.y.to(dtype))


def make_problem(device: str = "cpu", dtype: torch.dtype = torch.float64, num_tasks: int = K, seed: int = 0):
    """conftest's problem with a two-layer encoder (4 -> 8 -> 8) and partly conflicting targets."""
    problem = shared_problem(
        num_tasks, seed, dtype, batch=32, device=device, in_features=4, hidden=8, layers=2, correlated=True
    )
    return problem.model, Closure(problem.model, problem.x, problem.y)


def build(name: str, model: TinyMultiTask, lr: float = 0.1, **options) -> selgroup_fast.methods.MultiTaskMethod:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return create(name, opt, len(model.heads), shared_params=model.encoder.parameters(), **options)


def jacobian_reference(model: TinyMultiTask, closure) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Per-task float64 gradients, one plain backward per task: (K×P shared, per-task head grads)."""
    rows, heads = [], []
    shared = list(model.encoder.parameters())
    for k, loss in enumerate(closure()):
        grads = torch.autograd.grad(loss, shared + list(model.heads[k].parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
        heads.append([g.clone() for g in grads[len(shared) :]])
    return torch.stack(rows), heads


def shared_grad(model: TinyMultiTask) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_decreases_the_loss_of_a_tiny_three_task_model(name, device, dtype):
    model, closure = make_problem(device, dtype)
    method = build(name, model, lr=0.1 * LEARNING_RATE_SCALE.get(name, 1))
    first = step_on_one_batch(method, closure)
    assert first.shape == (K,) and first.dtype == dtype and not first.requires_grad
    for _ in range(20):
        last = step_on_one_batch(method, closure)
    assert torch.isfinite(last).all()
    assert last.sum() < 0.8 * first.sum(), f"{name}: {first.tolist()} -> {last.tolist()}"


@pytest.mark.parametrize("name", GRADIENT_METHODS + LOSS_METHODS)
def test_profiling_records_the_four_phases(name):
    model, closure = make_problem()
    method = build(name, model, profile=True)
    step_on_one_batch(method, closure)
    assert set(method.timings) == {"forward", "backward", "manipulation", "optimizer"}


# --------------------------------------------------------------------------- Jacobian


@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_jacobian_matches_a_float64_autograd_reference(mode, device, dtype):
    model, closure = make_problem(device, dtype)
    model64 = copy.deepcopy(model).to(torch.float64)
    reference, _ = jacobian_reference(model64, closure.on(model64))
    jac = TaskJacobian(model.encoder.parameters(), K, mode=mode)
    got = jac.compute(closure())
    assert got.shape == (K, sum(p.numel() for p in model.encoder.parameters()))
    assert got.data_ptr() == jac.matrix.data_ptr()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.to(torch.float64), reference, rtol=tol, atol=tol)
    # The buffer is reused: a second step writes into the same storage.
    assert jac.compute(closure()).data_ptr() == got.data_ptr()


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunked_batched_jacobian_equals_the_whole_batch(chunk_size):
    model, closure = make_problem(num_tasks=5)
    whole = TaskJacobian(model.encoder.parameters(), 5).compute(closure()).clone()
    chunked = TaskJacobian(model.encoder.parameters(), 5, chunk_size=chunk_size)
    torch.testing.assert_close(chunked.compute(closure()), whole, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        TaskJacobian(model.encoder.parameters(), 5, chunk_size=0)
    # The step takes the option too: the same update as the unchunked one.
    twin = copy.deepcopy(model)
    build("mgda", model, chunk_size=chunk_size).step(closure)
    build("mgda", twin).step(closure.on(twin))
    for p, q in zip(model.parameters(), twin.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_jacobian_gives_zeros_to_a_shared_parameter_a_task_does_not_reach():
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    for mode in ("batched", "loop"):
        jac = TaskJacobian([a, b], 2, mode=mode)
        got = jac.compute([(a * a).sum(), (a * b).sum()])
        torch.testing.assert_close(got, torch.tensor([[2.0, 4.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.float64))


def test_jacobian_option_is_validated():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="jacobian must be one of"):
        TaskJacobian([p], 2, mode="vmap")
    with pytest.raises(ValueError, match="must require grad"):
        TaskJacobian([torch.ones(2)], 2)
    with pytest.raises(ValueError, match="is empty"):
        TaskJacobian([], 2)


# --------------------------------------------------------------------------- one step, end to end


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_a_step_writes_aggregate_into_the_shared_grads_and_the_own_task_gradient_into_each_head(name, mode):
    model, closure = make_problem()
    seeds = {"graddrop": {"seed": 5}, "pcgrad": {"seed": 5}, "gradvac": {"seed": 5}}.get(name, {})
    method = build(name, model, lr=0.0, jacobian=mode, **seeds)  # lr=0 keeps the parameters, so grads can be compared
    reference_jacobian, reference_heads = jacobian_reference(model, closure)
    losses = step_on_one_batch(method, closure)  # read only by the methods that declare them (DB-MTL, MoCo, GradNorm)
    # A two-batch method is given the one closure twice: the same batch, so J_2 = J.
    second = {"second_jacobian": reference_jacobian} if name in TWO_BATCH else {}
    expected = aggregate(name, reference_jacobian, losses=losses, **second, **seeds)
    torch.testing.assert_close(shared_grad(model), expected, rtol=1e-9, atol=1e-12)
    gram = reference_jacobian @ reference_jacobian.T
    if name == "db_mtl":  # LibMTL back-propagates the log losses through the heads
        weights = 1.0 / (losses + 1e-8)
    elif name == "nash_mtl":  # the heads get α unclipped (the authors clip the shared gradient only)
        weights = selgroup_fast.ops.nash_mtl_weights(gram, torch.ones(K, dtype=gram.dtype))
    elif name in WEIGHTED_HEADS or name in TWO_BATCH:  # (A = G for the two-batch methods here)
        weights = aggregator(name, K, dtype=gram.dtype).weights(gram)
    else:
        weights = torch.ones(K, dtype=torch.float64)
    for k, head in enumerate(model.heads):
        for p, g in zip(head.parameters(), reference_heads[k], strict=False):
            torch.testing.assert_close(p.grad, weights[k] * g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_shared_grads_are_views_of_one_flat_buffer(mode):
    model, closure = make_problem()
    method = build("cagrad", model, jacobian=mode)  # the modes that form J ("gramian": one ordinary backward)
    method.step(closure)
    flat = method._jacobian.direction
    for p in model.encoder.parameters():
        assert p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- aggregate by hand


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_pcgrad_projects_two_conflicting_gradients_by_hand():
    # g1·g2 = -1: g1 -> g1 + ½ g2 = (½, ½), g2 -> g2 + g1 = (0, 1); the sum is (½, 3/2).
    torch.testing.assert_close(aggregate("pcgrad", t([[1.0, 0.0], [-1.0, 1.0]])), t([0.5, 1.5]))
    # No conflict: the plain sum.
    torch.testing.assert_close(aggregate("pcgrad", t([[1.0, 1.0], [2.0, 0.0]])), t([3.0, 1.0]))


def test_pcgrad_three_tasks_by_hand():
    # Only g1 and g2 conflict; g3 is orthogonal to both, so the order does not matter.
    J = t([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(aggregate("pcgrad", J, seed=3), t([0.5, 1.5, 1.0]))


def pcgrad_reference(J: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the paper on the gradients themselves, in the given orders."""
    out = torch.zeros(J.shape[1], dtype=torch.float64)
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in order[i].tolist():
            if j == i:
                continue
            dot = g @ J[j]
            if dot < 0:
                g = g - dot / (J[j] @ J[j]) * J[j]
        out += g
    return out


def test_pcgrad_matches_the_algorithm_in_the_drawn_order():
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    order = projection_orders(5, J.device, torch.Generator().manual_seed(11))
    torch.testing.assert_close(aggregate("pcgrad", J, seed=11), pcgrad_reference(J, order))


def test_cagrad_with_c_zero_is_the_sum_and_matches_the_authors_problem():
    J = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(aggregate("cagrad", J, c=0.0), J.sum(0))
    # Two orthogonal unit gradients: x = (½, ½), λ = c, d = K (1 + c)/(1 + c²) g0.
    c = 0.4
    torch.testing.assert_close(
        aggregate("cagrad", t([[1.0, 0.0], [0.0, 1.0]]), c=c), t([1.0, 1.0]) * (1 + c) / (1 + c * c)
    )
    # Random 3 tasks against the authors' problem solved by scipy (float64, SLSQP).
    G = (J @ J.T).numpy()
    g0_norm = np.sqrt(G.mean())
    b = np.ones(3) / 3
    res = scipy.optimize.minimize(
        lambda x: x @ G @ b + c * g0_norm * np.sqrt(x @ G @ x),
        b,
        bounds=[(0, 1)] * 3,
        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
        tol=1e-14,
    )
    gx = torch.from_numpy(res.x) @ J
    expected = 3 * (J.mean(0) + c * g0_norm / gx.norm() * gx) / (1 + c * c)
    torch.testing.assert_close(aggregate("cagrad", J, c=c), expected, rtol=1e-4, atol=1e-6)


def test_mgda_by_hand_and_against_a_min_norm_solve():
    # min_γ ‖γ g1 + (1-γ) g2‖ for g1 = (1, 0), g2 = (0, 2): γ = 0.8, d = (0.8, 0.4).
    torch.testing.assert_close(aggregate("mgda", t([[1.0, 0.0], [0.0, 2.0]])), t([0.8, 0.4]), rtol=1e-6, atol=1e-7)
    J = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    G = (J @ J.T).numpy()
    res = scipy.optimize.minimize(
        lambda w: w @ G @ w,
        np.ones(3) / 3,
        bounds=[(0, 1)] * 3,
        constraints={"type": "eq", "fun": lambda w: 1 - w.sum()},
        tol=1e-15,
    )
    torch.testing.assert_close(aggregate("mgda", J), torch.from_numpy(res.x) @ J, rtol=1e-3, atol=1e-5)


def test_mgda_l2_normalization_solves_on_unit_gradients():
    J = t([[1.0, 0.0], [0.0, 2.0]])
    # Unit gradients (1,0), (0,1): w' = (½, ½); on the raw gradients w = (½, ¼): d = (½, ½).
    torch.testing.assert_close(aggregate("mgda", J, normalization="l2"), t([0.5, 0.5]), rtol=1e-6, atol=1e-7)


def test_imtl_by_hand_and_equal_projections():
    torch.testing.assert_close(aggregate("imtl", t([[2.0, 0.0], [0.0, 1.0]])), t([2 / 3, 2 / 3]))
    J = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = aggregate("imtl", J)
    projections = (J / J.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections[0].expand(3))
    weights = aggregator("imtl", 3, dtype=J.dtype).weights(J @ J.T)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_aligned_mtl_by_hand_and_against_an_eigendecomposition():
    torch.testing.assert_close(aggregate("aligned_mtl", t([[2.0, 0.0], [0.0, 1.0]])), t([1.0, 1.0]))
    J = torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eigenvalues, eigenvectors = np.linalg.eigh((J @ J.T).numpy())
    B = np.sqrt(eigenvalues.min()) * eigenvectors @ np.diag(eigenvalues**-0.5) @ eigenvectors.T
    torch.testing.assert_close(aggregate("aligned_mtl", J), torch.from_numpy(B.sum(1)) @ J, rtol=1e-6, atol=1e-8)


def test_nash_mtl_by_hand_fixed_point_and_max_norm():
    # Orthogonal gradients: α_k = 1/‖g_k‖, d = Σ g_k/‖g_k‖.
    torch.testing.assert_close(
        aggregate("nash_mtl", t([[2.0, 0.0], [0.0, 0.5]]), max_norm=0.0), t([1.0, 1.0]), rtol=1e-6, atol=1e-7
    )
    J = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    G = J @ J.T
    alpha = aggregator("nash_mtl", 3, dtype=G.dtype).weights(G)
    assert (alpha > 0).all()
    torch.testing.assert_close(G @ alpha, 1 / alpha, rtol=1e-5, atol=1e-6)
    clipped = aggregate("nash_mtl", J, max_norm=0.5)
    torch.testing.assert_close(clipped.norm(), torch.tensor(0.5, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(clipped, 0.5 * (alpha @ J) / (alpha @ J).norm(), rtol=1e-5, atol=1e-7)


def test_graddrop_keeps_one_sign_per_coordinate():
    # No sign conflict anywhere: the sum.
    torch.testing.assert_close(aggregate("graddrop", t([[1.0, -2.0], [3.0, -1.0]]), seed=0), t([4.0, -3.0]))
    J = torch.randn(3, 4000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    d = aggregate("graddrop", J, seed=1, offset=2)
    positive, negative = J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)
    assert torch.all((d == positive) | (d == negative))
    # The sign is drawn by purity: coordinates with mostly positive mass keep the positive part more often.
    purity = 0.5 * (1 + J.sum(0) / J.abs().sum(0))
    kept_positive = (d == positive).double()
    assert abs(kept_positive.mean().item() - purity.mean().item()) < 0.03
    # Reproducible for a (seed, offset) key, different for another; leak = 1 keeps everything.
    torch.testing.assert_close(aggregate("graddrop", J, seed=1, offset=2), d, rtol=0, atol=0)
    assert not torch.equal(aggregate("graddrop", J, seed=1, offset=3), d)
    torch.testing.assert_close(aggregate("graddrop", J, leak=1.0, seed=1), J.sum(0))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_aggregate_returns_a_p_vector_on_the_inputs_device_and_dtype(name, device, dtype):
    J = torch.randn(4, 9, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(
        device=device, dtype=dtype
    )
    d = aggregate(name, J, **inputs(name, J))
    assert d.shape == (9,) and d.dtype == dtype and d.device.type == device
    assert torch.isfinite(d).all()
    # aggregate takes the options of create (the step-only ones are ignored); fix the seed of the random ones.
    seeded = {"seed": 0} if name in ("pcgrad", "graddrop", "gradvac") else {}
    torch.testing.assert_close(
        aggregate(name, J, **inputs(name, J), jacobian="loop", **seeded),
        aggregate(name, J, **inputs(name, J), **seeded),
    )


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_aggregators_say_they_are_not_differentiable(name):
    # The fused solvers have no backward: a result that required grad would back-propagate silently wrong
    # gradients (the weights as constants, GradDrop's J.grad None). Like TorchJD's aggregators, ours return
    # results that do not require grad, so a backward raises; the values are those of the detached input.
    J = torch.randn(4, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    seeded = {"seed": 0} if name in ("pcgrad", "graddrop", "gradvac") else {}
    losses = unit_losses(J)
    d = aggregate(name, J, **inputs(name, J), **seeded)
    assert not d.requires_grad and d.grad_fn is None
    torch.testing.assert_close(d, aggregate(name, J.detach(), **inputs(name, J.detach()), **seeded), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="does not require grad"):
        d.sum().backward()
    method = aggregator(name, 4, dtype=torch.float64, **seeded)
    if name in TWO_BATCH:  # a weighting of J_1 J_2ᵀ: its direction only through the two-batch call, tested above
        direction, head_weights = d, None
    elif "losses" in method.needs:
        direction, head_weights = method.combine_losses(J, losses)
    else:
        direction, head_weights = method.combine(J)
    assert not direction.requires_grad and (head_weights is None or not head_weights.requires_grad)
    if isinstance(method, selgroup_fast.methods.Weighting):
        gram = (J @ J.T).detach().requires_grad_()
        assert not method.weights(gram).requires_grad
        cross = {"cross_gram": gram} if name in TWO_BATCH else {}
        assert not any(w is not None and w.requires_grad for w in method.direction_weights(gram, losses, **cross))


# --------------------------------------------------------------------------- degenerate and bad input


@pytest.mark.parametrize("name", [name for name in GRADIENT_METHODS if name not in TRACKED])
def test_one_task_is_its_own_gradient(name):
    g = t([[1.0, -2.0, 0.5]])
    if name in ROBUST_METHODS:
        with pytest.raises(ValueError, match=f"^{name} needs num_tasks >= "):
            aggregate(name, g)
        return
    expected = g[0]  # the ops give w = [1] for K = 1 (CAGrad included: no conflict to avert)
    if name in ("nash_mtl", "fairgrad"):  # w = 1 (Nash-MTL: α = 1/‖g‖), then clipped to max_norm = 1: the unit vector
        expected = g[0] / g[0].norm()
    torch.testing.assert_close(aggregate(name, g, **inputs(name, g)), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_zero_gradients_give_a_finite_direction(name):
    zero = torch.zeros(3, 5, dtype=torch.float64)
    torch.testing.assert_close(aggregate(name, zero, **inputs(name, zero)), torch.zeros(5, dtype=torch.float64))
    J = torch.randn(3, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    J[1] = 0
    assert torch.isfinite(aggregate(name, J, **inputs(name, J))).all()


@pytest.mark.parametrize("name", GRADIENT_METHODS + LOSS_METHODS)
def test_a_nan_loss_is_not_hidden(name):
    """nonfinite="propagate": no check; the NaN reaches the parameters, as with plain GD (tests/test_nonfinite.py: the others)."""
    model, closure = make_problem()
    method = build(name, model, nonfinite="propagate")
    nan_closure = lambda: [loss * float("nan") if k == 0 else loss for k, loss in enumerate(closure())]  # noqa: E731
    losses = step_on_one_batch(method, nan_closure)
    assert torch.isnan(losses[0]) and torch.isfinite(losses[1:]).all()
    assert not all(torch.isfinite(p).all() for p in model.encoder.parameters())


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_require_shared_params(name):
    model, _ = make_problem()
    with pytest.raises(ValueError, match="needs shared_params"):
        create(name, torch.optim.SGD(model.parameters(), lr=0.1), K)


def test_bad_options_and_inputs_get_clear_errors():
    model, _ = make_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shared = model.encoder.parameters
    with pytest.raises(ValueError, match="jacobian must be one of"):
        create("cagrad", opt, K, shared_params=shared(), jacobian="fast")
    with pytest.raises(ValueError, match="c must be finite and >= 0"):
        create("cagrad", opt, K, shared_params=shared(), c=-1.0)
    with pytest.raises(ValueError, match="update_weights_every"):
        create("nash_mtl", opt, K, shared_params=shared(), update_weights_every=0)
    with pytest.raises(ValueError, match="window"):
        create("dwa", opt, K, window=0)
    with pytest.raises(ValueError, match="leak"):
        create("graddrop", opt, K, shared_params=shared(), leak=[0.1, 0.2])
    with pytest.raises(ValueError, match="K×P matrix"):
        aggregate("cagrad", torch.ones(3))
    with pytest.raises(TypeError, match="float32 or float64"):
        aggregate("mgda", torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="not gradient-based"):
        aggregate("uw", torch.ones(2, 3))
    with pytest.raises(ValueError, match="expected 3 KPIs"):
        create("dtp", opt, K).update_kpis([0.5, 0.5])


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("name", ["pcgrad", "graddrop", "nash_mtl", "uw", "dwa", "dtp", "famo"])
def test_state_dict_round_trip_resumes_identically(name):
    options = {"dwa": {"window": 2}, "nash_mtl": {"update_weights_every": 2}}.get(name, {})
    model, closure = make_problem()
    method = build(name, model, **options)
    for _ in range(5):
        method.step(closure)
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(method.optimizer.state_dict())
    saved_method = copy.deepcopy(method.state_dict())
    assert saved_method, f"{name} keeps state"
    continued = [method.step(closure) for _ in range(3)]

    twin, _ = make_problem(seed=1)  # other initial weights, then restored
    twin.load_state_dict(saved_model)
    resumed = build(name, twin, **options)
    resumed.optimizer.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved_method)
    again = [resumed.step(closure.on(twin)) for _ in range(3)]
    for a, b in zip(continued, again, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, q in zip(model.parameters(), twin.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# --------------------------------------------------------------------------- loss-weighting specifics


def test_uw_loss_and_log_variance_gradient():
    model, closure = make_problem()
    uw = build("uw", model, lr=0.0)
    uw.log_vars_optimizer.param_groups[0]["lr"] = 0.0  # keep s = 0 to read its gradient
    losses = uw.step(closure)
    # d/ds ½(e^{-s} L + s) at s = 0 is ½(1 - L).
    torch.testing.assert_close(uw.log_vars.grad, 0.5 * (1 - losses))
    torch.testing.assert_close(uw.weights, torch.full((K,), 0.5, dtype=torch.float64))


def test_dwa_weights_from_the_last_two_windows():
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    dwa = create("dwa", torch.optim.SGD([param], lr=0.0), 3, window=2, temp=2.0)
    window_losses = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 2.0, 2.0], [1.0, 4.0, 2.0]]
    for step, values in enumerate(window_losses):
        dwa.step(lambda: torch.tensor(values, dtype=torch.float64) * param)
        if step < 3:
            torch.testing.assert_close(dwa.weights, torch.ones(3, dtype=torch.float64))
    # Window means: (2, 2, 2) then (1.5, 3, 2): r = (0.75, 1.5, 1); w = 3 softmax(r / 2).
    expected = 3 * torch.softmax(torch.tensor([0.75, 1.5, 1.0], dtype=torch.float64) / 2, 0)
    torch.testing.assert_close(dwa.weights, expected)


def test_dtp_focal_weights_from_kpis_and_from_losses():
    param = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    dtp = create("dtp", torch.optim.SGD([param], lr=0.0), 2, gamma=2.0, alpha=1.0)
    dtp.update_kpis([0.9, 0.5])
    kpi = torch.tensor([0.9, 0.5], dtype=torch.float64)
    torch.testing.assert_close(dtp.weights, -((1 - kpi) ** 2) * kpi.log())
    # Without user KPIs, κ = exp(-L) of the step's losses.
    fresh = create("dtp", torch.optim.SGD([param], lr=0.0), 2, gamma=1.0, alpha=1.0)
    fresh.step(lambda: torch.tensor([0.1, 2.0], dtype=torch.float64) * param)
    kappa = torch.exp(-torch.tensor([0.1, 2.0], dtype=torch.float64))
    torch.testing.assert_close(fresh.weights, -(1 - kappa) * kappa.log())


def test_famo_matches_the_authors_update_written_out():
    model, closure = make_problem()
    famo = build("famo", model, lr=0.05)
    twin = copy.deepcopy(model)
    x, y = closure.x, closure.y
    # The authors' algorithm, written from the paper/README, on the twin.
    logits = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    logits_opt = torch.optim.Adam([logits], lr=0.025, weight_decay=0.01)
    opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    for _ in range(3):
        famo.step(closure)
        losses = torch.stack(regression_losses(twin, x, y))
        z = torch.softmax(logits.detach(), 0)
        shifted = losses + 1e-8
        opt.zero_grad()
        ((shifted.log() * z).sum() / (z / shifted.detach()).sum()).backward()
        torch.nn.utils.clip_grad_norm_(list(twin.encoder.parameters()), 1.0)
        opt.step()
        with torch.no_grad():
            after = torch.stack(regression_losses(twin, x, y))
        delta = shifted.detach().log() - (after + 1e-8).log()
        logits_opt.zero_grad()
        logits.grad = torch.autograd.grad(torch.softmax(logits, 0), logits, grad_outputs=delta)[0]
        logits_opt.step()
    torch.testing.assert_close(famo.logits.detach(), logits.detach(), rtol=1e-12, atol=1e-14)
    for p, q in zip(model.parameters(), twin.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_famo_costs_one_extra_forward():
    model, closure = make_problem()
    calls = []
    famo = build("famo", model)
    famo.step(lambda: calls.append(1) or closure())
    assert len(calls) == 2


@pytest.mark.parametrize(("mode", "task_gradients"), [("batched", "compute"), ("gramian", "gramian")])
def test_nash_mtl_reuses_alpha_between_updates_with_one_backward(mode, task_gradients):
    model, closure = make_problem()
    nash = build("nash_mtl", model, update_weights_every=3, jacobian=mode)
    nash.step(closure)
    alpha = nash.aggregator.alpha.clone()
    calls = []
    original = getattr(nash._jacobian, task_gradients)
    setattr(nash._jacobian, task_gradients, lambda *a, **k: calls.append(1) or original(*a, **k))
    nash.step(closure)
    nash.step(closure)
    assert calls == [] and torch.equal(nash.aggregator.alpha, alpha)
    nash.step(closure)
    assert calls == [1] and not torch.equal(nash.aggregator.alpha, alpha)


def test_gradient_methods_are_gradient_methods():
    for name in GRADIENT_METHODS:
        method = build(name, make_problem()[0])
        assert isinstance(method, GradientMethod) and method.uses_shared_params and method.name == name


@pytest.mark.parametrize("name", [name for name in GRADIENT_METHODS if name not in (*ROBUST_METHODS, *TRACKED)])
def test_a_single_task_steps_along_its_own_gradient(name):
    model, closure = make_problem(num_tasks=1)
    method = build(name, model, lr=0.0, **({"max_norm": 0.0} if name in ("nash_mtl", "fairgrad") else {}))
    reference, _ = jacobian_reference(model, closure)
    step_on_one_batch(method, closure)
    torch.testing.assert_close(shared_grad(model), reference[0], rtol=1e-9, atol=1e-12)


def test_a_state_with_other_keys_is_refused():
    model, _ = make_problem()
    with pytest.raises(ValueError, match=r"state has keys \['alpha', 'steps'\], got \['alpha'\]"):
        build("nash_mtl", model).load_state_dict({"alpha": torch.ones(K)})
    with pytest.raises(ValueError, match=r"state has keys \[\], got \['x'\]"):
        build("gd", model).load_state_dict({"x": 1})


@pytest.mark.parametrize(
    ("name", "num_tasks", "options", "message"),
    [
        ("fairgrad", 3, {"alpha": -1.0}, r"^fairgrad_weights: alpha must be finite and >= 0, got -1$"),
        ("fairgrad", 3, {"alpha": float("inf")}, r"^fairgrad_weights: alpha must be finite and >= 0, got inf$"),
        ("config", 3, {"pref_vector": [1.0, 2.0]}, r"^pref_vector must hold 3 finite values, got \[1.0, 2.0\]$"),
        ("krum", 4, {"n_byzantine": 2}, r"^krum needs num_tasks >= n_byzantine \+ 3, got 4 for n_byzantine=2$"),
        ("krum", 4, {"n_byzantine": -1}, r"^n_byzantine must be an int >= 0, got -1$"),
        ("krum", 4, {"n_selected": 5}, r"^krum: n_selected must be at most num_tasks=4, got 5$"),
        ("trimmed_mean", 4, {"trim_number": 2}, r"^trimmed_mean needs num_tasks >= 2 \* trim_number \+ 1, got 4 for "),
        ("trimmed_mean", 4, {"trim_number": -1}, r"^trim_number must be an int >= 0, got -1$"),
        ("pcd", 3, {"tau": 1.5}, r"^tau must be in \[0, 1\], a float or 2 values, got 1.5$"),
        ("pcd", 3, {"tau": [0.1]}, r"^tau must be in \[0, 1\], a float or 2 values, got \[0.1\]$"),
        ("pcd", 3, {"beta": 1.0}, r"^beta must be in \[0, 1\), got 1.0$"),
        ("pcd", 3, {"eps": -1.0}, r"^eps must be >= 0, got -1.0$"),
    ],
)
def test_robust_and_fair_methods_refuse_bad_options_at_construction(name, num_tasks, options, message):
    with pytest.raises(ValueError, match=message):
        aggregator(name, num_tasks, **options)


def test_trimmed_mean_under_the_gramian_path_names_why():
    model, _ = make_problem()
    with pytest.raises(ValueError, match='trimmed_mean needs J itself .*; use "batched" or "loop"'):
        build("trimmed_mean", model, jacobian="gramian")


def test_pcd_follows_torchjd_over_calls_through_a_nan_and_a_resume():
    """PCD's EMA of the squared norms across calls, a non-finite call that leaves it unchanged, and its state_dict."""
    torchjd = pytest.importorskip("torchjd.aggregation", reason="the torchjd test extra is not installed")
    theirs = torchjd.PCD(tau=0.2, beta=0.9)
    ours = aggregator("pcd", 4, dtype=torch.float64, tau=0.2, beta=0.9)
    generator = torch.Generator().manual_seed(3)
    for call in range(6):
        J = torch.randn(4, 9, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [3.0], [0.1], [2.0]])
        if call == 3:
            J[2, 0] = float("nan")
            assert torch.isnan(ours(J)).all() and torch.isnan(theirs(J)).all()
            continue
        if call == 4:
            resumed = aggregator("pcd", 4, dtype=torch.float64, tau=0.2, beta=0.9)
            resumed.load_state_dict(ours.state_dict())
            ours = resumed
        torch.testing.assert_close(ours(J), theirs(J), rtol=1e-10, atol=1e-12)
