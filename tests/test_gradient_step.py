"""The parts of a gradient method's step (selgroup_fast/methods/step.py), each alone, and the composition chosen once.

References: each task's gradient by its own ordinary backward in float64 (one loss at a time),
weights re-derived from G by the weighting's rule or by hand.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_problem

from selgroup_fast.methods import aggregator, create
from selgroup_fast.methods.gradient import GradientMethod
from selgroup_fast.methods.jacobian import TaskJacobian
from selgroup_fast.methods.nash_mtl import NashMTL
from selgroup_fast.methods.step import (
    Direction,
    FeatureJacobian,
    FlatGradWriter,
    GramianSource,
    PullBackWriter,
    SharedJacobian,
    TaskGradients,
    WeightedBackwardWriter,
    combine,
    head_gradients,
    weighting_inputs,
)
from selgroup_fast.methods.weighting import Aggregator, ParameterLayout, ReusesWeights, Weighting, WeightingInputs
from selgroup_fast.parallel import RankAgreement
from selgroup_fast.profiling import PhaseTimer

K = 3
RANKS = RankAgreement(None, torch.device("cpu"))  # one process


def problem():
    setup = make_problem(K)
    return setup.model, setup.closure()


def rows_by_hand(losses: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """Row k: task k's gradient w.r.t. ``inputs`` (flattened, concatenated), by its own backward."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_the_shared_jacobian_source_gives_each_task_gradient(mode):
    model, closure = problem()
    shared = list(model.encoder.parameters())
    losses = closure()
    expected = rows_by_hand(losses, shared)
    jacobian = TaskJacobian(shared, K, mode=mode)
    got = SharedJacobian(jacobian, RANKS, keep_graph=False)(losses, ())
    torch.testing.assert_close(got.rows, expected, rtol=1e-12, atol=1e-14)
    assert got.out is jacobian.direction and got.gram is None and got.heads is None


def test_the_gramian_source_gives_g_without_rows():
    model, closure = problem()
    shared = list(model.encoder.parameters())
    losses = closure()
    expected = rows_by_hand(losses, shared)
    got = GramianSource(TaskJacobian(shared, K, mode="gramian"))(losses, ())
    assert got.rows is None
    torch.testing.assert_close(got.gram, expected @ expected.T, rtol=1e-12, atol=1e-14)


def test_the_feature_source_gives_the_jacobian_of_the_features_and_refuses_none():
    setup = make_problem(K)
    features = setup.model.encoder(setup.x)
    losses = [(head(features).squeeze(-1) - setup.y[:, k]).pow(2).mean() for k, head in enumerate(setup.model.heads)]
    source = FeatureJacobian(TaskJacobian(list(setup.model.encoder.parameters()), K), RANKS, columns=False)
    torch.testing.assert_close(source(losses, [features]).rows, rows_by_hand(losses, [features]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"needs the closure to return \(losses, features\)"):
        source(losses, ())


def test_combine_writes_a_weightings_direction_into_the_buffer():
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(K, 7, dtype=torch.float64, generator=generator)
    mgda = aggregator("mgda", K, dtype=torch.float64)
    out = torch.empty(7, dtype=torch.float64)
    direction = combine(mgda, TaskGradients(rows, out=out), {})
    weights = aggregator("mgda", K, dtype=torch.float64).weights(rows @ rows.T)
    assert direction.vector is out
    torch.testing.assert_close(out, weights @ rows, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(direction.head_weights, weights, rtol=0, atol=0)  # MGDA weights the heads
    # A Gram matrix the source gave (the global batch's) is used instead of rows·rowsᵀ.
    given = combine(mgda, TaskGradients(rows, gram=torch.eye(K, dtype=torch.float64)), {})
    torch.testing.assert_close(given.weights, torch.full((K,), 1 / K, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    gramian = combine(mgda, TaskGradients(None, gram=rows @ rows.T), {})
    assert gramian.vector is None
    torch.testing.assert_close(gramian.weights, weights, rtol=1e-12, atol=1e-14)


def test_the_head_gradients_are_the_weighted_sum_of_their_rows():
    heads = [torch.zeros(2, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    rows = torch.arange(K * 5, dtype=torch.float64).reshape(K, 5)
    head_gradients(heads, rows, torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64))
    flat = rows[0] - 2 * rows[2]
    torch.testing.assert_close(heads[0].grad, flat[:2].reshape(2, 1), rtol=0, atol=0)
    torch.testing.assert_close(heads[1].grad, flat[2:], rtol=0, atol=0)
    head_gradients(heads, rows, None)
    torch.testing.assert_close(heads[1].grad, rows.sum(0)[2:], rtol=0, atol=0)


def test_the_flat_writer_makes_the_buffer_the_shared_grad_and_the_heads_get_their_weighted_losses():
    model, closure = problem()
    shared, heads = list(model.encoder.parameters()), list(model.heads.parameters())
    losses = closure()
    head_rows = rows_by_hand(losses, heads)
    jacobian = TaskJacobian(shared, K)
    jacobian.direction.copy_(torch.arange(jacobian.num_params, dtype=torch.float64))
    weights = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    writer = FlatGradWriter(jacobian, heads, PhaseTimer())
    writer(losses, (), TaskGradients(None), Direction(jacobian.direction, None, weights))
    assert all(p.grad.untyped_storage().data_ptr() == jacobian.direction.untyped_storage().data_ptr() for p in shared)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in heads]), weights @ head_rows, rtol=1e-12, atol=0)


@pytest.mark.parametrize("heads_weighted", [True, False])
def test_the_weighted_backward_writer_gives_the_weighted_gradients(heads_weighted):
    model, closure = problem()
    shared, heads = list(model.encoder.parameters()), list(model.heads.parameters())
    losses = closure()
    expected = rows_by_hand(losses, [*shared, *heads])
    weights = torch.tensor([0.25, 1.5, 0.75], dtype=torch.float64)
    head_weights = weights if heads_weighted else None
    WeightedBackwardWriter(shared, heads, PhaseTimer())(
        losses, (), TaskGradients(None), Direction(None, weights, head_weights)
    )
    width = sum(p.numel() for p in shared)
    got = torch.cat([p.grad.reshape(-1) for p in [*shared, *heads]])
    torch.testing.assert_close(got[:width], weights @ expected[:, :width], rtol=1e-12, atol=1e-14)
    on_heads = weights if heads_weighted else torch.ones(K, dtype=torch.float64)
    torch.testing.assert_close(got[width:], on_heads @ expected[:, width:], rtol=1e-12, atol=1e-14)


def test_the_pull_back_writer_gives_the_encoder_the_feature_direction_pulled_back():
    setup = make_problem(K)
    shared = list(setup.model.encoder.parameters())
    features = setup.model.encoder(setup.x)
    losses = [(head(features).squeeze(-1) - setup.y[:, k]).pow(2).mean() for k, head in enumerate(setup.model.heads)]
    cotangent = torch.randn(features.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(features, shared, cotangent.view_as(features), retain_graph=True)
    writer = PullBackWriter(TaskJacobian(shared, K), list(setup.model.heads.parameters()), PhaseTimer())
    writer(losses, [features], TaskGradients(None), Direction(cotangent, None, None))
    for p, g in zip(shared, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_the_step_is_composed_once_from_the_setting():
    model, _ = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def parts(**options):
        method = create("mgda", optimizer, K, shared_params=model.encoder.parameters(), **options)
        return type(method._source).__name__, type(method._writer).__name__

    assert parts(jacobian="loop") == ("SharedJacobian", "FlatGradWriter")
    assert parts(jacobian="gramian") == ("GramianSource", "WeightedBackwardWriter")
    assert parts(space="representation") == ("FeatureJacobian", "PullBackWriter")


def test_only_nash_mtl_reuses_weights_and_the_aggregator_base_carries_no_such_hook():
    assert not hasattr(Aggregator, "reused_weights") and not hasattr(Aggregator, "max_norm")
    assert isinstance(NashMTL(K), ReusesWeights)
    assert not isinstance(aggregator("mgda", K), ReusesWeights)


class LossShares(Weighting):
    """A test weighting that reads the losses: ``w_k = L_k / Σ_j L_j`` (G unused)."""

    name = "loss_shares"
    needs = frozenset({"losses"})

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a weighting that needs the losses is called with them")

    def weights_with(self, inputs: WeightingInputs) -> torch.Tensor:
        assert inputs.losses is not None
        return inputs.losses / inputs.losses.sum()


def test_a_weighting_that_needs_the_losses_gets_them_from_the_step():
    model, closure = problem()
    shared = list(model.encoder.parameters())
    with torch.no_grad():
        values = torch.stack(closure())
    expected_weights = values / values.sum()
    expected = expected_weights @ rows_by_hand(closure(), shared)
    for mode in ("loop", "gramian"):
        for p in model.parameters():
            p.grad = None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        method = GradientMethod(optimizer, K, LossShares(K, dtype=torch.float64), shared_params=shared, jacobian=mode)
        method.step(closure)
        got = torch.cat([p.grad.reshape(-1) for p in shared])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14, msg=mode)
    with pytest.raises(ValueError, match="loss_shares reads the K = 3 task losses: pass losses="):
        LossShares(K, dtype=torch.float64)(torch.eye(K, dtype=torch.float64))


class BlockScaled(Aggregator):
    """A test aggregator that reads the shared parameters' layout: block b of the direction is ``(b + 1) Σ_k J_k,b``."""

    name = "block_scaled"
    needs = frozenset({"parameter_layout"})

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks, dtype=torch.float64)
        self.layouts: list[ParameterLayout] = []

    def bind(self, layout: ParameterLayout) -> None:
        self.layouts.append(layout)

    def combine(self, jacobian, out=None):
        blocks = jacobian.sum(dim=0).split(self.layouts[-1].block_sizes)
        direction = torch.cat([(b + 1) * block for b, block in enumerate(blocks)])
        return (direction if out is None else out.copy_(direction)), None


class LayoutWeighting(LossShares):
    """A weighting that declares the layout too (bind a no-op): the Gramian path cannot serve it."""

    name = "layout_weighting"
    needs = frozenset({"losses", "parameter_layout"})

    def bind(self, layout: ParameterLayout) -> None:
        pass


def test_a_g_only_weighting_gets_nothing_but_g_and_is_never_bound():
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)]
    assert weighting_inputs(aggregator("mgda", K), RANKS)(losses) == {}  # no work for G-only methods
    assert weighting_inputs(BlockScaled(K), RANKS)(losses) == {}  # the layout is bound once, not handed each step
    provided = weighting_inputs(LossShares(K), RANKS)(losses)
    torch.testing.assert_close(provided["losses"], torch.tensor([1.0, 2.0, 3.0]), rtol=0, atol=0)
    model, _ = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    undeclared = type("Undeclared", (BlockScaled,), {"needs": frozenset()})(K)
    GradientMethod(optimizer, K, undeclared, shared_params=model.encoder.parameters())
    assert undeclared.layouts == []  # what it does not declare, the step does not hand it
    with pytest.raises(NotImplementedError, match="mgda does not read the shared parameters' layout"):
        aggregator("mgda", K).bind(ParameterLayout((1,)))


def test_an_unknown_input_is_refused_when_its_class_is_defined():
    with pytest.raises(TypeError, match=r"needs names unknown inputs \['block_grams'\]"):
        type("PerBlock", (LossShares,), {"needs": frozenset({"block_grams"})})


def test_an_aggregator_that_declares_the_layout_is_bound_once_with_the_shared_blocks_in_column_order():
    model, closure = problem()
    shared = list(model.encoder.parameters())
    blocks = BlockScaled(K)
    method = GradientMethod(torch.optim.SGD(model.parameters(), lr=0.0), K, blocks, shared_params=shared)
    assert blocks.layouts == [ParameterLayout(tuple(p.numel() for p in shared))]
    assert blocks.layouts[0].numel == sum(p.numel() for p in shared)
    expected = rows_by_hand(closure(), shared).sum(dim=0).split(blocks.layouts[0].block_sizes)
    method.step(closure)
    method.step(closure)
    assert len(blocks.layouts) == 1  # once, at construction
    for b, (p, block) in enumerate(zip(shared, expected, strict=True)):
        torch.testing.assert_close(p.grad.reshape(-1), (b + 1) * block, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("declared", [BlockScaled, LayoutWeighting])
def test_a_declared_layout_refuses_the_representation_space_and_the_gramian_path(declared):
    model, _ = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    shared = model.encoder.parameters()
    with pytest.raises(ValueError, match=r"^layout_\w+|^block_scaled keeps a state per task over the shared param"):
        GradientMethod(optimizer, K, declared(K), shared_params=shared, space="representation")
    refusal = "needs J itself" if declared is BlockScaled else "keeps a state over J's columns, which G = J·Jᵀ does"
    with pytest.raises(ValueError, match=rf'^jacobian="gramian" does not apply: {declared.name} {refusal}'):
        GradientMethod(optimizer, K, declared(K), shared_params=model.encoder.parameters(), jacobian="gramian")


def test_a_tracked_aggregator_gets_its_k_by_p_state_allocated_once_at_construction():
    model, closure = problem()
    shared = list(model.encoder.parameters())
    width = sum(p.numel() for p in shared)
    tracker = aggregator("db_mtl", K, dtype=torch.float64)
    method = GradientMethod(torch.optim.SGD(model.parameters(), lr=0.0), K, tracker, shared_params=shared)
    state = tracker.tracked
    assert state.shape == (K, width) and state.dtype == torch.float64 and not state.any()
    method.step(closure)
    assert tracker.tracked.shape == (K, width) and tracker.tracked.any()
    with pytest.raises(ValueError, match=rf"^db_mtl tracks {width} coordinates, the step has 7$"):
        tracker.bind(ParameterLayout((3, 4)))
