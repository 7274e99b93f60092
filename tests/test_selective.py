"""SelectiveGroupUpdate: the paper's Algorithm 1 as a training step (Jeong & Yoon, ICLR 2025)."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
from conftest import TinyMultiTask, make_problem, regression_losses
from reference import affinity_update_reference

import selgroup_fast
from selgroup_fast import SelectiveGroupUpdate

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_written_batch(model, optimizer, x, y, visits: list[list[int]], normalize: bool = False) -> list[list[float]]:
    """The M group steps of one batch, written out; returns every forward's K losses."""
    recorded = []
    for group in visits:
        losses = regression_losses(model, x, y)
        recorded.append([loss.item() for loss in losses])
        optimizer.zero_grad(set_to_none=True)
        group_loss = torch.stack([losses[k] for k in group]).sum()
        if normalize:
            group_loss = group_loss / len(group)
        group_loss.backward()
        optimizer.step()
    return recorded


def reference_affinity(
    recorded: list[list[float]], visits: list[list[int]], attribution: str, decay: float, start=None
):
    """The affinity after crediting consecutive forwards of one batch as ``attribution`` says."""
    num_tasks = len(recorded[0])
    affinity = torch.zeros(num_tasks, num_tasks, dtype=torch.float64) if start is None else start.clone()
    for m in range(1, len(recorded)):
        credited = visits[m - 1] if attribution == "paper" else visits[m]
        affinity = affinity_update_reference(affinity, recorded[m - 1], recorded[m], credited, decay)
    return affinity


def closure_for(model, x, y, calls: list | None = None):
    def closure():
        if calls is not None:
            calls.append(1)
        return regression_losses(model, x, y)

    return closure


# --------------------------------------------------------------------------- (11a) the step itself


@pytest.mark.parametrize("order", ["forward", "backward"])
@pytest.mark.parametrize("attribution", ["paper", "reference"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda params: torch.optim.Adam(params, lr=1e-2),
    ],
    ids=["sgd", "adam"],
)
def test_one_step_equals_a_hand_written_sequence_of_group_steps(order, attribution, normalize, make_optimizer):
    model, twin, x, y = make_problem(num_tasks=4)
    groups = [[0, 2], [1], [3]]
    decay = 0.1
    sel = SelectiveGroupUpdate(
        make_optimizer(model.parameters()),
        4,
        grouping=groups,
        order=order,
        attribution=attribution,
        normalize_group_loss=normalize,
        decay=decay,
    )
    twin_optimizer = make_optimizer(twin.parameters())
    affinity = None
    for _ in range(3):
        losses = sel.step(closure_for(model, x, y))
        visits = groups if order == "forward" else groups[::-1]
        recorded = hand_written_batch(twin, twin_optimizer, x, y, visits, normalize)
        affinity = reference_affinity(recorded, visits, attribution, decay, start=affinity)
        assert losses.tolist() == recorded[0]
        for ours, theirs in zip(model.parameters(), twin.parameters(), strict=False):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        torch.testing.assert_close(sel.affinity, affinity, rtol=1e-12, atol=1e-15)
    assert sel.affinity.abs().sum() > 0
    assert sel.groups == groups


def test_the_two_credit_modes_differ_exactly_by_the_group_credited():
    """Paper: the change between forwards m-1 and m belongs to group m-1; reference: to group m."""
    results = {}
    for attribution in ("paper", "reference"):
        model, _, x, y = make_problem(num_tasks=3)
        sel = SelectiveGroupUpdate(
            torch.optim.SGD(model.parameters(), lr=0.2),
            3,
            grouping=[[0], [1], [2]],
            order="forward",
            attribution=attribution,
            decay=0.5,
        )
        sel.step(closure_for(model, x, y))
        results[attribution] = sel.affinity.clone()
    # Group [2] is stepped last: never measured by the paper's crediting, so its row stays 0;
    # the reference crediting never credits the first group [0].
    assert results["paper"][2].abs().sum() == 0 and results["paper"][0].abs().sum() > 0
    assert results["reference"][0].abs().sum() == 0 and results["reference"][2].abs().sum() > 0
    # Same loss changes, credited one group later: the change of target 2 caused by group [0]'s step
    # lands in A[0, 2] (paper) and A[1, 2] (reference); target 0's change from group [1]'s step in
    # A[1, 0] (paper) and A[2, 0] (reference). Both are inter-group entries, so the values are equal.
    assert results["paper"][0, 2] != 0 and results["paper"][1, 0] != 0
    assert results["paper"][0, 2] == results["reference"][1, 2]
    assert results["paper"][1, 0] == results["reference"][2, 0]


def test_measure_last_group_adds_one_forward_that_credits_the_last_group():
    model, twin, x, y = make_problem(num_tasks=3)
    calls: list = []
    groups = [[0, 1], [2]]
    sel = SelectiveGroupUpdate(
        torch.optim.SGD(model.parameters(), lr=0.1),
        3,
        grouping=groups,
        order="forward",
        measure_last_group=True,
        decay=0.2,
    )
    sel.step(closure_for(model, x, y, calls))
    assert len(calls) == 3
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    recorded = hand_written_batch(twin, opt, x, y, groups)
    recorded.append([loss.item() for loss in regression_losses(twin, x, y)])
    expected = reference_affinity(recorded, groups + [None], "paper", 0.2)
    torch.testing.assert_close(sel.affinity, expected, rtol=1e-12, atol=1e-15)
    assert sel.affinity[2].abs().sum() > 0  # the last group is measured
    with pytest.raises(ValueError, match="measure_last_group=True needs attribution='paper'"):
        SelectiveGroupUpdate(
            torch.optim.SGD(model.parameters(), lr=0.1), 3, attribution="reference", measure_last_group=True
        )


def test_a_single_group_is_updated_twice_and_joint_once_like_gd():
    model, twin, x, y = make_problem(num_tasks=3)
    calls: list = []
    single = SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=0.1), 3, grouping=[[0, 1, 2]], decay=0.3)
    single.step(closure_for(model, x, y, calls))
    assert len(calls) == 2  # the official rule: updated twice, the second forward measures the first step
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    recorded = hand_written_batch(twin, opt, x, y, [[0, 1, 2]] * 2)
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=False):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(
        single.affinity, reference_affinity(recorded, [[0, 1, 2]] * 2, "paper", 0.3), rtol=1e-12, atol=1e-15
    )

    # grouping="joint" is GD (Table 4's "Joint (GD)"): one forward, one step, bitwise the gd method.
    model, twin, x, y = make_problem(num_tasks=3)
    calls.clear()
    joint = SelectiveGroupUpdate(torch.optim.Adam(model.parameters(), lr=0.01), 3, grouping="joint")
    gd = selgroup_fast.methods.create("gd", torch.optim.Adam(twin.parameters(), lr=0.01), 3)
    for _ in range(3):
        torch.testing.assert_close(
            joint.step(closure_for(model, x, y, calls)), gd.step(closure_for(twin, x, y)), rtol=0, atol=0
        )
    assert len(calls) == 3
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=False):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert joint.groups == [[0, 1, 2]] and joint.affinity.abs().sum() == 0


# --------------------------------------------------------------------------- (2) masking


def _snapshot(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list:
    params = list(module.parameters())
    return [
        (p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()})
        for p in params
    ]


def _assert_bitwise_same(before: list, after: list) -> None:
    for (p0, s0), (p1, s1) in zip(before, after, strict=False):
        assert torch.equal(p0, p1)
        assert s0.keys() == s1.keys()
        for key in s0:
            assert torch.equal(torch.as_tensor(s0[key]), torch.as_tensor(s1[key])), key


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd-foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, foreach=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_heads_outside_the_group_keep_parameters_grads_and_optimizer_state(optimizer_name):
    model, _, x, y = make_problem(num_tasks=3, dtype=torch.float32)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    groups = [[0], [1, 2]]
    sel = SelectiveGroupUpdate(optimizer, 3, grouping=groups, order="forward")
    sel.step(closure_for(model, x, y))  # every head now has optimizer state (moments, step counts)
    snapshots = []

    def recording_closure():
        snapshots.append(
            {k: _snapshot(model.heads[k], optimizer) for k in range(3)}
            | {
                "grads": [[p.grad for p in head.parameters()] for head in model.heads],
                "encoder": _snapshot(model.encoder, optimizer),
            }
        )
        return regression_losses(model, x, y)

    sel.step(recording_closure)
    snapshots.append(
        {k: _snapshot(model.heads[k], optimizer) for k in range(3)}
        | {
            "grads": [[p.grad for p in head.parameters()] for head in model.heads],
            "encoder": _snapshot(model.encoder, optimizer),
        }
    )
    for m, group in enumerate(groups):  # between snapshots m and m+1 only `group` was stepped
        before, after = snapshots[m], snapshots[m + 1]
        for k in range(3):
            if k in group:
                assert not torch.equal(before[k][0][0], after[k][0][0]), "the group's head must move"
                assert all(g is not None for g in after["grads"][k])
            else:
                _assert_bitwise_same(before[k], after[k])
                assert all(g is None for g in after["grads"][k]), "heads outside the group get no gradient"
        assert not torch.equal(before["encoder"][0][0], after["encoder"][0][0]), "the shared encoder must move"


def test_fused_sgd_with_momentum_is_refused_with_a_clear_error():
    """torch's fused SGD cannot step parameters whose momentum buffers are only partly created
    (the first batch's second group); the method says so up front instead of failing mid-batch."""
    model, _, _, _ = make_problem(num_tasks=3)
    with pytest.raises(ValueError, match="fused SGD with momentum"):
        SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True), 3)
    SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True), 3, grouping="joint")


# --------------------------------------------------------------------------- (3) grouping strategies


def test_separate_and_random_groupings():
    model, _, x, y = make_problem(num_tasks=5)
    calls: list = []
    separate = SelectiveGroupUpdate(
        torch.optim.SGD(model.parameters(), lr=0.01), 5, grouping="separate", warmup_steps=0
    )
    for _ in range(2):
        separate.step(closure_for(model, x, y, calls))
    assert len(calls) == 10 and separate.groups == [[k] for k in range(5)]

    generator = torch.Generator().manual_seed(3)
    rand = SelectiveGroupUpdate(
        torch.optim.SGD(model.parameters(), lr=0.01), 5, grouping="random:2", generator=generator
    )
    seen = set()
    for _ in range(20):
        groups = rand.groups
        assert len(groups) == 2 and sorted(map(len, groups)) == [2, 3]
        assert sorted(itertools.chain(*groups)) == list(range(5))
        seen.add(tuple(map(tuple, groups)))
        calls.clear()
        rand.step(closure_for(model, x, y, calls))
        assert len(calls) == 2
    assert len(seen) > 5  # redrawn every batch


def test_affinity_grouping_warms_up_with_singletons_then_regroups_on_schedule(monkeypatch):
    model, _, x, y = make_problem(num_tasks=3)
    sel = SelectiveGroupUpdate(
        torch.optim.SGD(model.parameters(), lr=0.05), 3, warmup_steps=3, regroup_every=2, decay=0.2
    )
    regroups = []
    original_groups = sel.tracker.groups

    def counting_groups(*args, **kwargs):
        regroups.append(sel.batches)
        return original_groups(*args, **kwargs)

    monkeypatch.setattr(sel.tracker, "groups", counting_groups)
    for _ in range(8):
        assert sel.groups == [[0], [1], [2]] or sel.batches >= 3
        sel.step(closure_for(model, x, y))
    assert regroups == [3, 5, 7]


@pytest.mark.parametrize(
    "grouping, match",
    [
        ([[0, 1], [1, 2]], "partition"),
        ([[0, 1]], "partition"),
        ([[0, 1, 2], []], "partition"),
        ([[0, 1, 3]], "partition"),
        ([[True, 1, 2]], "partition"),
        ("random:0", "random:M"),
        ("random:4", "random:M"),
        ("random:x", "random:M"),
        ("clusters", "grouping must be"),
        ([0, 1, 2], "list of lists"),
    ],
)
def test_bad_groupings_are_rejected(grouping, match):
    with pytest.raises(ValueError, match=match):
        SelectiveGroupUpdate(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 3, grouping=grouping)


@pytest.mark.parametrize(
    "option, value",
    [
        ("order", "sideways"),
        ("attribution", "mine"),
        ("warmup_steps", -1),
        ("regroup_every", 0),
        ("convergence_iter", 0),
        ("generator", "seed"),
    ],
)
def test_bad_options_are_rejected(option, value):
    with pytest.raises(ValueError, match=option if option != "generator" else "CPU torch.Generator"):
        SelectiveGroupUpdate(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 3, **{option: value})


def test_create_builds_it_through_the_registry():
    model, _, x, y = make_problem(num_tasks=3)
    sel = selgroup_fast.methods.create(
        "selective", torch.optim.SGD(model.parameters(), lr=0.1), 3, grouping="separate", order="forward"
    )
    assert isinstance(sel, SelectiveGroupUpdate) and "selective" in selgroup_fast.methods.available()
    assert sel.step(closure_for(model, x, y)).shape == (3,)


def test_random_order_comes_from_the_generator():
    """Same generator seed, same orders and parameters; another seed, other orders."""

    def train(seed: int):
        model, _, x, y = make_problem(num_tasks=4)
        sel = SelectiveGroupUpdate(
            torch.optim.SGD(model.parameters(), lr=0.1),
            4,
            grouping="separate",
            generator=torch.Generator().manual_seed(seed),
        )
        seen: list[tuple[bool, ...]] = []

        def closure():  # the heads holding a gradient at each forward reveal the group stepped before it
            seen.append(tuple(head.weight.grad is not None for head in model.heads))
            return regression_losses(model, x, y)

        for _ in range(4):
            sel.step(closure)
        return seen, [p.detach().clone() for p in model.parameters()]

    (seen_a, params_a), (seen_b, params_b), (seen_c, params_c) = train(5), train(5), train(6)
    assert seen_a == seen_b and all(torch.equal(p, q) for p, q in zip(params_a, params_b, strict=False))
    assert seen_a != seen_c and not all(torch.equal(p, q) for p, q in zip(params_a, params_c, strict=False))
    orders = {tuple(seen_a[i : i + 4]) for i in range(0, 16, 4)}
    assert len(orders) > 1  # redrawn every batch


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad-scaler"])
def test_gradient_clipping_in_an_optimizer_pre_hook_clips_every_group_step(scaled):
    """The README's recipe: the pre-hook sees each group's (unscaled) gradients before its step."""
    model, _, x, y = make_problem(num_tasks=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    max_norm = 1e-3
    norms: list[float] = []

    def clip(opt, args, kwargs):
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))

    optimizer.register_step_pre_hook(clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    sel = SelectiveGroupUpdate(optimizer, 3, grouping="separate", order="forward", grad_scaler=scaler)
    snapshots = []

    def closure():
        snapshots.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
        return regression_losses(model, x, y)

    sel.step(closure)
    snapshots.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    assert len(norms) == 3 and all(norm > 10 * max_norm for norm in norms)  # clipping was needed, unscaled
    moves = [float((after - before).norm()) for before, after in itertools.pairwise(snapshots)]
    assert all(max_norm * 0.99 < move <= max_norm * (1 + 1e-6) for move in moves), moves


# --------------------------------------------------------------------------- (9) bad input


def test_closure_errors_are_clear():
    model, _, x, y = make_problem(num_tasks=3)
    sel = SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=0.1), 3)
    with pytest.raises(ValueError, match="returned 2 losses, expected num_tasks=3"):
        sel.step(lambda: regression_losses(model, x, y)[:2])
    with pytest.raises(ValueError, match="loss 1 must be a scalar"):
        sel.step(lambda: [regression_losses(model, x, y)[0], torch.ones(2), torch.ones(())])


def test_a_parameter_missing_from_the_optimizer_is_reported_before_any_update():
    model, _, x, y = make_problem(num_tasks=3)
    params = [p for p in model.parameters() if p is not model.heads[1].weight]
    sel = SelectiveGroupUpdate(torch.optim.SGD(params, lr=0.1), 3)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"parameter of shape \(1, 6\) .* not in the optimizer"):
        sel.step(closure_for(model, x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.heads[1].weight.requires_grad_(False)  # frozen parameters are fine
    sel.step(closure_for(model, x, y))


def test_non_finite_and_negative_losses_never_reach_the_affinity():
    """NaN/inf/negative losses are skipped by the affinity update (documented); the rest is tracked.

    nonfinite="propagate": the steps run, so that the update rule itself meets the values
    (tests/test_nonfinite.py: "skip" leaves the affinity as it was).
    """
    model, _, x, y = make_problem(num_tasks=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sel = SelectiveGroupUpdate(
        optimizer, 4, warmup_steps=2, decay=0.2, grouping="separate", order="forward", nonfinite="propagate"
    )
    for _ in range(2):
        sel.step(closure_for(model, x, y))
    clean = sel.affinity.clone()

    def poisoned():
        losses = regression_losses(model, x, y)
        # Task 1 NaN, task 3 inf (their values detached so that the parameters stay finite: what a NaN
        # gradient does to the model is the optimizer's business), task 2 negative.
        nan, inf = losses[1].detach() * math.nan, losses[3].detach() * math.inf
        return [losses[0], nan + 0 * losses[1], -losses[2], inf + 0 * losses[3]]

    for _ in range(3):
        sel.step(poisoned)
    affinity = sel.affinity
    assert torch.isfinite(affinity).all()
    # Targets 1, 2 and 3 never had a positive finite "before": their columns only saw no update.
    torch.testing.assert_close(affinity[:, 1:], clean[:, 1:], rtol=0, atol=0)
    assert not torch.equal(affinity[:, 0], clean[:, 0])  # task 0 is still tracked
    # The tracker keeps working once losses are sane again.
    sel.step(closure_for(model, x, y))
    assert torch.isfinite(sel.affinity).all() and not torch.equal(sel.affinity[:, 1], clean[:, 1])


# --------------------------------------------------------------------------- (8) checkpoints


def test_resuming_from_a_checkpoint_continues_bitwise_identically():
    def fresh(seed):
        torch.manual_seed(0)
        model = TinyMultiTask(num_tasks=4)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        sel = SelectiveGroupUpdate(
            optimizer, 4, warmup_steps=3, decay=0.05, generator=torch.Generator().manual_seed(seed)
        )
        return model, optimizer, sel

    data = [(torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)) for _ in range(12)]
    model, optimizer, sel = fresh(1)
    for x, y in data[:6]:
        sel.step(closure_for(model, x, y))
    buffer = io.BytesIO()  # through torch.save / torch.load (weights_only): plain tensors and lists only
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "sel": sel.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    history = []
    for x, y in data[6:]:
        history.append((sel.step(closure_for(model, x, y)), sel.groups))

    resumed_model, resumed_optimizer, resumed = fresh(99)  # a different order generator, overwritten by the load
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["sel"])
    assert resumed.batches == 6
    for (x, y), (losses, groups) in zip(data[6:], history, strict=False):
        torch.testing.assert_close(resumed.step(closure_for(resumed_model, x, y)), losses, rtol=0, atol=0)
        assert resumed.groups == groups
    torch.testing.assert_close(resumed.affinity, sel.affinity, rtol=0, atol=0)
    for ours, theirs in zip(resumed_model.parameters(), model.parameters(), strict=False):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="for 4 tasks, this method has 3"):
        SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=1), 3).load_state_dict(checkpoint["sel"])


# --------------------------------------------------------------------------- (10) profiling


def test_profiling_records_the_four_phases():
    model, _, x, y = make_problem(num_tasks=3)
    sel = SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=0.1), 3, warmup_steps=0, profile=True)
    sel.step(closure_for(model, x, y))
    assert list(sel.timings) == ["forward", "backward", "optimizer", "affinity"]
    assert all(seconds >= 0 for seconds in sel.timings.values())
    quiet = SelectiveGroupUpdate(torch.optim.SGD(model.parameters(), lr=0.1), 3)
    quiet.step(closure_for(model, x, y))
    assert quiet.timings == {}


# --------------------------------------------------------------------------- (11b) it finds related tasks


def test_related_task_pairs_get_positive_affinity_and_are_grouped_together():
    """Tasks 0/1 regress near-copies of one target, tasks 2/3 near-copies of another; a 3-unit
    encoder makes the two pairs compete. After warm-up the affinity is clearly positive within
    the pairs and negative across them, and the grouping keeps each pair together."""
    torch.manual_seed(0)
    num_tasks, in_features, warmup, steps = 4, 8, 30, 120
    model = TinyMultiTask(in_features=in_features, hidden=3, num_tasks=num_tasks, dtype=torch.float32)
    directions = torch.randn(4, in_features)
    sel = SelectiveGroupUpdate(
        torch.optim.SGD(model.parameters(), lr=0.02),
        num_tasks,
        warmup_steps=warmup,
        decay=0.05,
        generator=torch.Generator().manual_seed(0),
    )
    together = torch.zeros(num_tasks, num_tasks)
    for step in range(steps):
        x = torch.randn(32, in_features)
        a, b, a_detail, b_detail = (x @ directions.T).unbind(1)
        y = torch.stack([a, a + 0.2 * a_detail, b, b + 0.2 * b_detail], 1)
        sel.step(closure_for(model, x, y))
        if step >= warmup:
            for group in sel.groups:
                for s, t in itertools.product(group, group):
                    together[s, t] += 1
    share = together / (steps - warmup)
    affinity = sel.affinity
    within, across = [(0, 1), (1, 0), (2, 3), (3, 2)], [(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (3, 1)]
    assert all(affinity[s, t] > 0.02 for s, t in within), affinity
    assert all(affinity[s, t] < -0.01 for s, t in across), affinity
    assert share[0, 1] > 0.9 and share[2, 3] > 0.9, share
    assert all(share[s, t] < 0.1 for s, t in across), share


# --------------------------------------------------------------------------- (5) no host syncs (GPU only)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_in_a_step_except_reading_the_new_groups(monkeypatch):
    if not selgroup_fast.ops.cuda_available():
        pytest.skip("the CUDA kernels are not built")
    torch.manual_seed(0)
    model = TinyMultiTask(num_tasks=4, dtype=torch.float32).cuda()
    x, y = torch.randn(16, 5, device="cuda"), torch.randn(16, 4, device="cuda")
    sel = SelectiveGroupUpdate(
        torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), 4, warmup_steps=2, regroup_every=4, decay=0.1
    )
    sel.step(closure_for(model, x, y))  # first step: the optimizer's lazy state and the parameter check
    groups_calls = []
    original_groups = sel.tracker.groups

    def groups_outside_the_check(*args, **kwargs):  # the one allowed sync: reading the new groups
        groups_calls.append(1)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return original_groups(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(sel.tracker, "groups", groups_outside_the_check)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            sel.step(closure_for(model, x, y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(groups_calls) == 2  # batches 2 and 6 regroup; the other batches read nothing


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attribution", ["paper", "reference"])
def test_cuda_training_matches_the_cpu(attribution):
    if not selgroup_fast.ops.cuda_available():
        pytest.skip("the CUDA kernels are not built")
    runs = {}
    for device in ("cpu", "cuda"):
        model, _, x, y = make_problem(num_tasks=4)
        model, x, y = model.to(device), x.to(device), y.to(device)
        sel = SelectiveGroupUpdate(
            torch.optim.Adam(model.parameters(), lr=0.01),
            4,
            warmup_steps=3,
            decay=0.1,
            attribution=attribution,
            generator=torch.Generator().manual_seed(0),
        )
        groups = []
        for _ in range(8):
            sel.step(closure_for(model, x, y))
            groups.append(sel.groups)
        runs[device] = ([p.detach().cpu() for p in model.parameters()], sel.affinity.cpu(), groups)
    (cpu_params, cpu_affinity, cpu_groups), (cuda_params, cuda_affinity, cuda_groups) = runs["cpu"], runs["cuda"]
    assert cpu_groups == cuda_groups
    torch.testing.assert_close(cuda_affinity, cpu_affinity, rtol=1e-9, atol=1e-12)
    for ours, theirs in zip(cuda_params, cpu_params, strict=False):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_rank_agreement_is_a_no_op_without_torch_distributed():
    """The distributed path is tested in test_selective_ddp.py (2 processes)."""
    from selgroup_fast.selective import RankAgreement

    ranks = RankAgreement(None, torch.device("cpu"))
    assert not ranks.enabled and ranks.world_size == 1
    losses = torch.tensor([[1.0, 2.0]])
    assert ranks.mean(losses) is losses
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    ranks.share_generator(generator)
    assert torch.equal(generator.get_state(), state)
