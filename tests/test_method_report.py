"""MultiTaskMethod.report(): every method's loggable state, and the trainer logging what it is given.

The weights a method reports are checked against what it applied: the shared parameters' gradient
of a step is re-derived in float64 from the task gradients the test takes itself (``wᵀJ`` for a
gradient weighting, ``Σ_k w_k ∇L_k`` for a loss weighting).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_problem, step_on_one_batch
from train_helpers import TINY, load_checkpoint

from selgroup_fast import methods
from selgroup_fast.methods import MethodReport, Weighting
from selgroup_fast.train import TrainConfig, fit
from selgroup_fast.train.summary import TrainingSummary

K = 3


def _method(name: str, problem, lr: float = 0.0, **options) -> methods.MultiTaskMethod:
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=lr)
    return methods.create(name, optimizer, K, shared_params=problem.model.encoder.parameters(), **options)


def _task_gradients(problem) -> torch.Tensor:
    """J (K×P) of the shared parameters, one autograd.grad per task, at the model's current parameters."""
    shared = list(problem.model.encoder.parameters())
    rows = []
    for loss in problem.closure()():
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]))
    return torch.stack(rows)


def _shared_grad(problem) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in problem.model.encoder.parameters()])


@pytest.mark.parametrize("name", methods.available())
def test_every_method_reports_typed_state_on_its_device(name):
    problem = make_problem(K)
    method = _method(name, problem, lr=0.01)
    for _ in range(2):
        step_on_one_batch(method, problem.closure())
        report = method.report()
        assert isinstance(report, MethodReport)
        assert report.skipped_steps.shape == () and report.skipped_steps.dtype == torch.int64
        assert int(report.skipped_steps) == 0
        if report.weights is not None:
            assert report.weights.shape == (K,) and report.weights.device == method.device
            assert bool(torch.isfinite(report.weights).all())
        if report.affinity is not None:
            assert report.affinity.shape == (K, K) and report.affinity.device == method.device
        if report.groups is not None:
            assert sorted(t for group in report.groups for t in group) == list(range(K))
        else:
            assert not report.groups_chosen


@pytest.mark.parametrize("name", methods.available("gradient"))
def test_a_gradient_method_reports_the_weights_it_applied(name):
    problem = make_problem(K, correlated=True)
    method = _method(name, problem)
    assert method.report().weights is None  # no step yet
    jacobian = _task_gradients(problem)
    step_on_one_batch(method, problem.closure())  # lr 0: the parameters stay, their .grad is the step's direction
    weights = method.report().weights
    if not isinstance(method.aggregator, Weighting):  # GradDrop: a direction without task weights
        assert weights is None
        return
    assert weights is not None
    torch.testing.assert_close(_shared_grad(problem), weights.to(torch.float64) @ jacobian, rtol=1e-9, atol=1e-12)


def test_nash_mtl_reports_its_reused_weights_on_a_step_without_task_gradients():
    problem = make_problem(K, correlated=True)
    method = _method("nash_mtl", problem, update_weights_every=2, max_norm=0.0)
    method.step(problem.closure())
    solved = method.report().weights.clone()
    jacobian = _task_gradients(problem)
    method.step(problem.closure())  # reuses the weights: one backward of Σ w_k L_k, no clipping
    torch.testing.assert_close(method.report().weights, solved, rtol=0, atol=0)
    torch.testing.assert_close(_shared_grad(problem), solved.to(torch.float64) @ jacobian, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "options"), [("uw", {}), ("dwa", {"window": 1})])
def test_a_loss_weighting_reports_the_weights_of_its_next_step(name, options):
    problem = make_problem(K, correlated=True)
    method = _method(name, problem, lr=0.05, **options)
    for _ in range(4):  # DWA's weights leave 1 from its third window on
        weights = method.report().weights.to(torch.float64)
        jacobian = _task_gradients(problem)
        method.step(problem.closure())
        torch.testing.assert_close(_shared_grad(problem), weights @ jacobian, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(weights, method.report().weights.to(torch.float64))  # they moved


def test_dtp_reports_the_weights_of_its_last_step_from_its_own_kpis():
    """Without fed KPIs DTP smooths each step's own losses first (κ = exp(-L)): its weights are known after the step."""
    problem = make_problem(K, correlated=True)
    method = _method("dtp", problem, lr=0.05)
    for _ in range(3):
        jacobian = _task_gradients(problem)
        method.step(problem.closure())
        weights = method.report().weights.to(torch.float64)
        torch.testing.assert_close(_shared_grad(problem), weights @ jacobian, rtol=1e-9, atol=1e-12)
    kpis = method.state_dict()["kpis"].to(torch.float64)  # Guo et al. 2018: w = -(1 - κ̄)^γ log κ̄, γ = 1
    torch.testing.assert_close(weights, -(1 - kpis) * torch.log(kpis))


def test_famo_reports_the_softmax_of_its_logits():
    """FAMO's reported weights are its task weights z = softmax(ξ) (Liu et al. 2023, Alg. 1), summing to 1."""
    problem = make_problem(K, correlated=True)
    method = _method("famo", problem, lr=0.05)
    for _ in range(3):
        method.step(problem.closure())
    logits = method.state_dict()["logits"].to(torch.float64)
    expected = torch.exp(logits) / torch.exp(logits).sum()
    torch.testing.assert_close(method.report().weights.to(torch.float64), expected)
    assert not torch.allclose(expected, torch.full((K,), 1 / K, dtype=torch.float64))


#: Optimizer steps of one batch: the selective update's first batch steps each of the K singletons.
@pytest.mark.parametrize(("name", "steps_per_batch"), [("gd", 1), ("selective", K), ("mgda", 1), ("uw", 1)])
def test_skipped_steps_are_reported(name, steps_per_batch):
    problem = make_problem(K)
    method = _method(name, problem, lr=0.01)
    good = problem.closure()

    def nan_closure():
        losses = good()
        return [losses[0] * math.nan, *losses[1:]]

    for closure in (good, nan_closure, good):
        method.step(closure)
    assert int(method.report().skipped_steps) == steps_per_batch


def test_selective_reports_the_groups_of_its_next_step_and_when_they_were_chosen():
    problem = make_problem(K, correlated=True)
    method = _method("selective", problem, lr=0.05, warmup_steps=2, generator=torch.Generator().manual_seed(0))
    forwards = 0
    counting = problem.closure()

    def closure():
        nonlocal forwards
        forwards += 1
        return counting()

    for batch in range(1, 6):
        report = method.report()
        assert report.groups_chosen == (batch > 2)  # the batches after the 2 warm-up batches
        if batch <= 2:
            assert report.groups == [[0], [1], [2]]
        forwards = 0
        method.step(closure)
        lone = method.grouping.lone_group_steps
        assert forwards == (lone if len(report.groups) == 1 else len(report.groups))
    assert method.report().affinity is method.tracker.affinity
    assert bool(method.report().affinity.abs().sum() > 0)


def test_the_summary_counts_the_chosen_groups_only(tmp_path):
    summary = TrainingSummary(["a", "b", "c"], tmp_path, main=False)
    skipped = torch.zeros((), dtype=torch.int64)
    batches = [([[0], [1], [2]], False), ([[0, 1], [2]], True), ([[0, 2], [1]], True), ([[0, 1, 2]], True)]
    for groups, chosen in batches:
        summary.iteration(MethodReport(skipped, groups=groups, groups_chosen=chosen))
    # by hand: s and t share a group in batches 2 (01), 3 (02), 4 (012) out of the 3 chosen ones
    expected = [[3, 2, 2], [2, 3, 1], [2, 1, 3]]
    assert summary.history["cogrouped"] == expected and summary.history["groups"] == [3, 2, 2, 1]
    final = summary.method_results(MethodReport(skipped, groups=[[0, 1, 2]], groups_chosen=True))
    assert final["cogrouping"] == [[c / 3 for c in row] for row in expected]
    assert final["groups_mean"] == 2.0 and final["groups_final"] == [[0, 1, 2]]
    assert "affinity" not in final and "plots" not in final  # no affinity reported: nothing to draw
    assert summary.method_results(MethodReport(skipped)) == {}


def test_the_trainer_logs_the_weights_a_method_reports(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(method="uw", iters=2, eval_every=2, out=str(tmp_path), **{**TINY, "log_every": 1})
    results = fit(config)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # the last log point's weights are those of the next step: ½·exp(-s) of the checkpointed s (Kendall et al.)
    log_vars = load_checkpoint(tmp_path / "checkpoint.pt")["method"]["log_vars"].to(torch.float64)
    for k, task in enumerate(results["tasks"]):
        scalars = events.Scalars(f"weights/{task}")
        assert [event.step for event in scalars] == [1, 2]
        assert scalars[-1].value == pytest.approx(float(0.5 * torch.exp(-log_vars[k])), rel=1e-6)
    assert "groups_mean" not in results and "affinity" not in results
