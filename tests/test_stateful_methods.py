"""GradVac, ExcessMTL and CR-MOGM over several steps: their state (EMA targets, AdaGrad sums, smoothed weights)
against float64 re-derivations of their rules (tests/manipulation_reference.py) and TorchJD 0.18 directly,
its bitwise resume, the paths each serves and its bad options (the first step: tests/test_weighting_properties.py).
"""

from __future__ import annotations

import copy

import manipulation_reference as reference
import numpy as np
import pytest
import torch
from test_tracked_methods import K, Tiny, batches, shared_gradients, train

import selgroup_fast
from selgroup_fast.methods.gradvac import vaccine_orders
from selgroup_fast.methods.pcgrad import seeded_generator

STEPS = 5


def jacobians(tasks: int, seed: int = 0) -> list[torch.Tensor]:
    """Successive float64 J: random rows, every other step with the first row turned against the others."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(STEPS):
        J = torch.randn(tasks, 9, generator=generator, dtype=torch.float64) * (1 + torch.arange(tasks))[:, None]
        if step % 2 and tasks > 1:
            J[0] = -J[1:].sum(0) + 0.1 * J[0]
        out.append(J)
    return out


def directions(name: str, tasks: int, **options) -> list[np.ndarray]:
    method = selgroup_fast.methods.aggregator(name, tasks, dtype=torch.float64, **options)
    return [method(J).numpy() for J in jacobians(tasks)]


@pytest.mark.parametrize("tasks", [1, 2, 7])
def test_gradvac_follows_its_rule_over_steps(tasks: int) -> None:
    generator = seeded_generator(torch.device("cpu"), 3)
    targets = np.zeros((tasks, tasks))
    for J, ours in zip(jacobians(tasks), directions("gradvac", tasks, seed=3, beta=0.3), strict=True):
        orders = vaccine_orders(tasks, torch.device("cpu"), generator).numpy()
        expected, targets = reference.gradvac_update(J.numpy(), orders, targets, beta=0.3)
        np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)
    assert tasks == 1 or np.abs(targets).max() > 0  # the targets moved


def test_gradvac_per_block_is_gradvac_on_each_block_over_steps() -> None:
    """LibMTL's ``GradVac_group_type`` rule: each block's columns vaccinated with its own targets, the same orders."""
    sizes, generator = [2, 4, 3], seeded_generator(torch.device("cpu"), 3)
    targets = [np.zeros((5, 5)) for _ in sizes]
    ours = directions("gradvac", 5, seed=3, beta=0.3, block_sizes=sizes)
    for J, mine in zip(jacobians(5), ours, strict=True):
        orders = vaccine_orders(5, torch.device("cpu"), generator).numpy()
        expected = []
        for b, block in enumerate(np.split(J.numpy(), np.cumsum(sizes)[:-1], axis=1)):
            direction, targets[b] = reference.gradvac_update(block, orders, targets[b], beta=0.3)
            expected.append(direction)
        np.testing.assert_allclose(mine, np.concatenate(expected), rtol=1e-10, atol=1e-12)


def test_gradvac_all_matrix_takes_the_shared_parameters_as_blocks() -> None:
    model = Tiny()
    method = train("gradvac", model, [x.float() for x in batches()], group_type="all_matrix", seed=0)
    assert method.aggregator.block_sizes == [15, 5]
    assert method.aggregator.targets.shape == (2, K, K) and method.aggregator.targets.abs().sum() > 0


@pytest.mark.parametrize("warmup", [0, 2])
def test_excess_mtl_follows_its_rule_over_steps(warmup: int) -> None:
    ours = directions("excess_mtl", 4, robust_step_size=0.5, n_warmup_steps=warmup)
    expected = reference.excess_mtl_steps([J.numpy() for J in jacobians(4)], 0.5, warmup)
    np.testing.assert_allclose(np.array(ours), np.array(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("initial", [None, [0.7, 0.1, 0.1, 0.1]])
def test_cr_mogm_is_the_ema_of_its_base_weights(initial: list[float] | None) -> None:
    alpha, smoothed = 0.6, None if initial is None else np.array(initial)
    ours = directions("cr_mogm", 4, alpha=alpha, initial_weights=initial)
    for J, mine in zip(jacobians(4), ours, strict=True):
        upgrad = reference.dual_cone_weights(J.numpy(), np.diag(np.full(4, 0.25))).sum(0)
        smoothed = alpha * (upgrad if smoothed is None else smoothed) + (1 - alpha) * upgrad
        # To the BVLS reference's accuracy, relative to J's scale.
        np.testing.assert_allclose(mine, smoothed @ J.numpy(), rtol=0, atol=1e-7 * float(J.abs().max()))


def torchjd_aggregators():
    aggregation = pytest.importorskip("torchjd.aggregation", reason="the torchjd test extra is not installed")
    return {
        "gradvac": lambda: aggregation.GradVac(beta=0.3),
        "excess_mtl": lambda: aggregation.ExcessMTL(robust_step_size=0.5, n_warmup_steps=2),
        "cr_mogm": lambda: aggregation.GramianWeightedAggregator(
            aggregation.CRMOGMWeighting(aggregation.MGDAWeighting(), alpha=0.6)
        ),
    }


OURS = {
    "gradvac": {"beta": 0.3, "seed": 3},
    "excess_mtl": {"robust_step_size": 0.5, "n_warmup_steps": 2},
    # TorchJD's MGDA (Frank-Wolfe) is the exact min-norm point where two tasks leave one line search.
    "cr_mogm": {"base": "mgda", "alpha": 0.6},
}


@pytest.mark.parametrize("name", sorted(OURS))
def test_torchjd_equal_over_steps(name: str) -> None:
    tasks = 2 if name == "cr_mogm" else 5
    torch.manual_seed(3)  # TorchJD's GradVac draws its orders from torch's global RNG: ours seeded alike
    theirs_method = torchjd_aggregators()[name]()
    theirs = [theirs_method(J).numpy() for J in jacobians(tasks)]
    np.testing.assert_allclose(np.array(directions(name, tasks, **OURS[name])), np.array(theirs), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "options"),
    [(name, OURS[name]) for name in sorted(OURS)]
    + [
        ("cr_mogm", {"base": "nash_mtl", "base_options": {"max_norm": 0.0}}),
        ("gradvac", {"group_type": "all_matrix", "seed": 1}),
        ("cr_mogm", {"base": "gradnorm", "base_options": {"warmup_steps": 1, "lr": 0.1}}),
    ],
)
def test_resume_is_bitwise(name: str, options: dict) -> None:
    """Two steps, a state_dict, two more steps equal four uninterrupted steps bit for bit."""
    torch.manual_seed(0)
    straight = Tiny()
    resumed = copy.deepcopy(straight)
    xs = [x.float() for x in batches()]
    start = copy.deepcopy(straight.encoder[0].weight)
    train(name, straight, xs, **options)
    first = train(name, resumed, xs[:2], **options)
    saved = copy.deepcopy(first.state_dict())
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1)
    opt.load_state_dict(copy.deepcopy(first.optimizer.state_dict()))
    second = selgroup_fast.methods.create(name, opt, K, shared_params=resumed.encoder.parameters(), **options)
    second.load_state_dict(saved)
    for x in xs[2:]:
        second.step(lambda x=x: resumed(x))
    for mine, other in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(mine, other)
    assert not torch.equal(straight.encoder[0].weight, start)


@pytest.mark.parametrize("name", ["gradvac", "cr_mogm"])
def test_gramian_path_equals_the_jacobian(name: str) -> None:
    """Weightings of G: the Gramian path (J never held) takes the same steps as the batched Jacobian."""
    torch.manual_seed(0)
    batched, gramian = Tiny().double(), None
    gramian = copy.deepcopy(batched)
    xs = batches()
    train(name, batched, xs, jacobian="batched", **OURS[name])
    train(name, gramian, xs, jacobian="gramian", **OURS[name])
    for mine, other in zip(batched.state_dict().values(), gramian.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "options"), [("excess_mtl", {}), ("gradvac", {"group_type": "all_matrix"})])
def test_the_paths_without_every_coordinate_refuse(name: str, options: dict) -> None:
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    create = selgroup_fast.methods.create
    with pytest.raises(ValueError, match=r'space="representation" does not apply'):
        create(name, opt, K, shared_params=model.encoder.parameters(), space="representation", **options)
    with pytest.raises(ValueError, match=r'jacobian="gramian" does not apply'):
        create(name, opt, K, shared_params=model.encoder.parameters(), jacobian="gramian", **options)


def test_gradvac_per_block_alone_needs_its_blocks() -> None:
    with pytest.raises(ValueError, match=r"^gradvac: its blocks cover 0 columns, J has 4: .* or pass block_sizes=$"):
        selgroup_fast.methods.aggregate("gradvac", torch.ones(2, 4), group_type="all_matrix")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("gradvac", {"beta": 1.5}, r"^beta must be in \[0, 1\], got 1.5$"),
        ("gradvac", {"eps": -1.0}, r"^eps must be >= 0, got -1.0$"),
        ("gradvac", {"seed": 0, "generator": torch.Generator()}, r"^give seed= or generator=, not both$"),
        # per block: the same checks (BlockwiseGradVac's own)
        ("gradvac", {"group_type": "all_matrix", "beta": 1.5}, r"^beta must be in \[0, 1\], got 1.5$"),
        ("gradvac", {"block_sizes": [15, 5], "eps": -1.0}, r"^eps must be >= 0, got -1.0$"),
        ("gradvac", {"block_sizes": [15, 5], "seed": 0, "generator": torch.Generator()}, r"^give seed= or generator="),
        ("pcgrad", {"seed": 0, "generator": torch.Generator()}, r"^give seed= or generator=, not both$"),
        (
            "gradvac",
            {"group_type": "all_layer"},
            r"^gradvac: group_type must be one of \('whole_model', 'all_matrix'\)",
        ),
        ("gradvac", {"block_sizes": [3, 0]}, r"^block_sizes must be an int >= 1, got 0$"),
        ("gradvac", {"block_sizes": [3, 3]}, r"^gradvac: blocks of sizes \[3, 3\] given, the step's are \[15, 5\]$"),
        ("excess_mtl", {"robust_step_size": 0.0}, r"^robust_step_size must be > 0, got 0.0$"),
        ("excess_mtl", {"n_warmup_steps": -1}, r"^n_warmup_steps must be an int >= 0, got -1$"),
        ("cr_mogm", {"alpha": -0.1}, r"^alpha must be in \[0, 1\], got -0.1$"),
        ("cr_mogm", {"base": "sgd"}, r"^cr_mogm: base= must name a gradient method, one of pcgrad, .*; got 'sgd'$"),
        ("cr_mogm", {"base": "graddrop"}, r"^cr_mogm: base='graddrop' is not a weighting of G"),
        ("cr_mogm", {"base": "cr_mogm"}, r"^cr_mogm: base= must name a gradient method"),
        ("cr_mogm", {"initial_weights": [1.0]}, r"^cr_mogm: initial_weights must be 3 weights, got \[1.0\]$"),
    ],
)
def test_bad_options_fail_at_construction(name: str, options: dict, message: str) -> None:
    model = Tiny()
    with pytest.raises(ValueError, match=message):
        selgroup_fast.methods.create(
            name, torch.optim.SGD(model.parameters(), lr=0.1), K, shared_params=model.encoder.parameters(), **options
        )


# --------------------------------------------------------------------------- two batches: MoDo, SDMGrad


def two_batch_reference(model: Tiny, pairs: list[tuple[torch.Tensor, torch.Tensor]], name: str) -> None:
    """TorchJD's two-batch loop re-derived: the weights from A = J_1 J_2ᵀ (float64 rules of the references), then
    ONE backward of Σ_k w_k (L1_k + L2_k)/2 (the heads weighted too) and an SGD step."""
    shared = list(model.encoder.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = np.full(K, 1.0 / K)
    for first, second in pairs:
        opt.zero_grad()
        cross = (shared_gradients(model(first), shared) @ shared_gradients(model(second), shared).T).numpy()
        for p in model.parameters():
            p.grad = None
        if name == "modo":
            weights = state = reference.modo_weights(cross, state)
        else:
            weights, state = reference.sdmgrad_weights(cross, state)
        mean = [(a + b) / 2 for a, b in zip(model(first), model(second), strict=True)]
        sum(float(w) * loss for w, loss in zip(weights, mean, strict=True)).backward()
        opt.step()


@pytest.mark.parametrize("jacobian", ["batched", "loop"])
@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_two_batch_step_follows_the_rule(name: str, jacobian: str) -> None:
    torch.manual_seed(0)
    ours = Tiny().double()
    theirs = copy.deepcopy(ours)
    xs = batches()
    pairs = [(xs[i], xs[i + 1]) for i in (0, 2)]
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    method = selgroup_fast.methods.create(name, opt, K, shared_params=ours.encoder.parameters(), jacobian=jacobian)
    for first, second in pairs:
        returned = method.step(lambda x=first: ours(x), lambda x=second: ours(x))
    two_batch_reference(theirs, pairs, name)
    for (key, mine), other in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-7, atol=1e-9, msg=key)  # the bisection's simplex projection
    assert returned.shape == (K,)


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_a_closure_that_draws_a_new_batch_is_its_own_second_closure(name: str) -> None:
    """``step(closure, second_closure=closure)``: the closure called twice, each call the next batch."""
    torch.manual_seed(0)
    ours = Tiny().double()
    theirs = copy.deepcopy(ours)
    xs = batches()
    drawn = iter(xs)
    closure = lambda: ours(next(drawn))  # noqa: E731
    method = selgroup_fast.methods.create(
        name, torch.optim.SGD(ours.parameters(), lr=0.1), K, shared_params=ours.encoder.parameters()
    )
    for _ in range(2):
        method.step(closure, second_closure=closure)
    two_batch_reference(theirs, [(xs[0], xs[1]), (xs[2], xs[3])], name)
    for (key, mine), other in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-7, atol=1e-9, msg=key)


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_the_two_halves_give_their_cross_matrix_not_the_gram_matrix(name: str) -> None:
    """The matrix the weighting reads is J_1 J_2ᵀ of the halves (float64 re-derivation), not J Jᵀ of the batch."""
    torch.manual_seed(0)
    model = Tiny().double()
    x = batches()[0]
    shared = list(model.encoder.parameters())
    first, second = (shared_gradients(model(half), shared) for half in (x[:4], x[4:]))
    whole = shared_gradients(model(x), shared)
    method = selgroup_fast.methods.create(name, torch.optim.SGD(model.parameters(), lr=0.0), K, shared_params=shared)
    read = []
    weights = method.aggregator.weights
    method.aggregator.weights = lambda matrix: read.append(matrix.clone()) or weights(matrix)
    method.step(lambda: model(x[:4]), lambda: model(x[4:]))
    torch.testing.assert_close(read[0], first @ second.T, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(read[0], whole @ whole.T, rtol=0.1)
    assert not torch.allclose(read[0], read[0].T, rtol=0.1)  # A is not symmetric: two batches


def test_torchjd_two_batch_weightings_equal_over_steps() -> None:
    aggregation = pytest.importorskip("torchjd.aggregation", reason="the torchjd test extra is not installed")
    generator = torch.Generator().manual_seed(1)
    for name, theirs in [("modo", aggregation.MoDoWeighting()), ("sdmgrad", aggregation.SDMGradWeighting())]:
        ours = selgroup_fast.methods.aggregator(name, 6, dtype=torch.float64)
        for _ in range(STEPS):
            J1, J2 = (torch.randn(6, 11, generator=generator, dtype=torch.float64) for _ in range(2))
            A = J1 @ J2.T
            torch.testing.assert_close(ours.weights(A), theirs(A), rtol=1e-12, atol=1e-14)


def test_two_batch_paths_that_cannot_serve_it_refuse() -> None:
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    create = selgroup_fast.methods.create
    with pytest.raises(ValueError, match=r'^modo reads J_1 J_2ᵀ .*: space="representation" cannot serve it'):
        create("modo", opt, K, shared_params=model.encoder.parameters(), space="representation")
    with pytest.raises(ValueError, match=r'^jacobian="gramian" does not apply: sdmgrad reads J_1 J_2ᵀ of two batches'):
        create("sdmgrad", opt, K, shared_params=model.encoder.parameters(), jacobian="gramian")
    gd = create("mgda", opt, K, shared_params=model.encoder.parameters())
    x = batches()[0].float()
    with pytest.raises(ValueError, match=r"^mgda reads one batch: step takes no second_closure$"):
        gd.step(lambda: model(x), lambda: model(x))
    modo, calls = create("modo", opt, K, shared_params=model.encoder.parameters()), []
    with pytest.raises(
        ValueError,
        match=r"^modo reads two independent batches per step: call step\(closure, second_closure\) with a closure on "
        r"a second batch \(e\.g\. the two halves of one batch\), or step\(closure, second_closure=closure\) if "
        r"closure draws a new batch at each call$",
    ):
        modo.step(lambda: calls.append(x) or model(x))
    assert not calls  # refused before any forward
    with pytest.raises(ValueError, match=r"^modo reads two independent batches: pass second_jacobian="):
        selgroup_fast.methods.aggregate("modo", torch.ones(K, 2))


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_two_batch_resume_is_bitwise(name: str) -> None:
    torch.manual_seed(0)
    straight = Tiny()
    resumed = copy.deepcopy(straight)
    xs = [x.float() for x in batches()]

    def run(model: Tiny, method, pairs) -> None:
        for first, second in pairs:
            method.step(lambda x=first: model(x), lambda x=second: model(x))

    def make(model: Tiny):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return selgroup_fast.methods.create(name, opt, K, shared_params=model.encoder.parameters())

    pairs = [(xs[0], xs[1]), (xs[2], xs[3]), (xs[1], xs[2]), (xs[3], xs[0])]
    run(straight, make(straight), pairs)
    first = make(resumed)
    run(resumed, first, pairs[:2])
    second = make(resumed)
    second.optimizer.load_state_dict(copy.deepcopy(first.optimizer.state_dict()))
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    run(resumed, second, pairs[2:])
    for mine, other in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(mine, other)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("modo", {"gamma": 0.0}, r"^gamma must be > 0, got 0.0$"),
        ("modo", {"rho": -1.0}, r"^rho must be >= 0, got -1.0$"),
        ("sdmgrad", {"momentum": 1.0}, r"^momentum must be in \[0, 1\), got 1.0$"),
        ("sdmgrad", {"n_iter": 0}, r"^n_iter must be an int >= 1, got 0$"),
        ("sdmgrad", {"lambda_": -0.1}, r"^lambda_ must be >= 0, got -0.1$"),
        ("sdmgrad", {"pref_vector": [1.0]}, r"^sdmgrad: pref_vector must be 3 weights, got \[1.0\]$"),
    ],
)
def test_two_batch_bad_options_fail_at_construction(name: str, options: dict, message: str) -> None:
    test_bad_options_fail_at_construction(name, options, message)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
@pytest.mark.parametrize(
    "name, options, reads_gram",
    [
        ("modo", {}, False),
        ("sdmgrad", {}, False),
        ("cr_mogm", {"base": "modo"}, False),
        ("cr_mogm", {"base": "mgda"}, True),  # the control: a weighting of G gets it
    ],
    ids=["modo", "sdmgrad", "cr_mogm-modo", "cr_mogm-mgda"],
)
def test_the_step_computes_the_gram_matrix_only_for_a_weighting_that_reads_it(
    name: str, options: dict, reads_gram: bool, scaled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MoDo and SDMGrad read A = J_1 J_2ᵀ only: G = J Jᵀ (K²·P) is neither computed nor handed to them."""
    from selgroup_fast.methods import step as step_module

    torch.manual_seed(0)
    model = Tiny()
    x = batches()[0].float()
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if scaled else None
    method = selgroup_fast.methods.create(
        name,
        torch.optim.SGD(model.parameters(), lr=0.1),
        K,
        shared_params=model.encoder.parameters(),
        jacobian="batched",
        grad_scaler=grad_scaler,
        **options,
    )
    computed, handed = [], []
    monkeypatch.setattr(step_module, "gram", lambda rows: computed.append(rows.shape) or rows @ rows.T)
    direction_weights = method.aggregator.direction_weights
    method.aggregator.direction_weights = lambda gram, **inputs: (
        handed.append(gram) or direction_weights(gram, **inputs)
    )
    if method.reads_two_batches:
        method.step(lambda: model(x[:4]), lambda: model(x[4:]))
    else:
        method.step(lambda: model(x))
    assert method.aggregator.reads_gram is reads_gram
    assert len(computed) == int(reads_gram) and len(handed) == 1
    assert (handed[0] is not None) is reads_gram


@pytest.mark.parametrize(
    "name, options, rule_state",
    [("gradnorm", {"warmup_steps": 2}, "logits"), ("excess_mtl", {"n_warmup_steps": 2}, "task_weights")],
)
def test_the_declared_warmup_is_the_steps_before_the_rule_acts(name: str, options: dict, rule_state: str) -> None:
    """``warmup_steps`` (what ``selgroup-train`` refuses a run not longer than): the rule's state stays as it
    starts through those steps and moves at the next one."""
    torch.manual_seed(0)
    model = Tiny().double()
    method = selgroup_fast.methods.create(
        name, torch.optim.SGD(model.parameters(), lr=0.01), K, shared_params=model.encoder.parameters(), **options
    )
    assert method.warmup_steps == 2 and method.warmup_options == f"{next(iter(options))}="
    start = getattr(method.aggregator, rule_state).clone()
    for x in batches(3)[:2]:
        method.step(lambda x=x: model(x))
        assert torch.equal(getattr(method.aggregator, rule_state), start)
    method.step(lambda: model(batches(3)[2]))
    assert not torch.equal(getattr(method.aggregator, rule_state), start)


def test_the_selective_update_declares_the_affinity_groupings_warmup_only() -> None:
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    assert selgroup_fast.methods.create("selective", optimizer, K, warmup_steps=7).warmup_steps == 7
    for grouping in ("joint", "separate", "random:2", [[0, 1], [2]]):  # no warm-up: the groups from the first batch
        assert (
            selgroup_fast.methods.create("selective", optimizer, K, warmup_steps=7, grouping=grouping).warmup_steps == 0
        )
    assert (
        selgroup_fast.methods.create("mgda", optimizer, K, shared_params=model.encoder.parameters()).warmup_steps == 0
    )
