"""SelectiveGroupUpdate with a torch.amp.GradScaler (on the CPU) and bf16 autocast."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import TinyMultiTask, make_problem, regression_losses
from reference import affinity_update_reference

from selgroup_fast import SelectiveGroupUpdate

pytestmark = pytest.mark.usefixtures("one_thread")


def cpu_scaler(**options) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", **options)


def test_power_of_two_scaling_changes_nothing_and_the_affinity_sees_unscaled_losses():
    """Scaling by 2**k is exact: the scaled run must match the unscaled one bitwise."""
    runs = []
    for scaler in (None, cpu_scaler(init_scale=2.0**12)):
        model, _, x, y = make_problem(num_tasks=3, dtype=torch.float32)
        sel = SelectiveGroupUpdate(
            torch.optim.SGD(model.parameters(), lr=0.1),
            3,
            warmup_steps=2,
            decay=0.2,
            grad_scaler=scaler,
            generator=torch.Generator().manual_seed(0),
        )
        losses = [sel.step(partial(regression_losses, model, x, y)) for _ in range(5)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()], sel.affinity.clone(), sel.groups))
    (plain_losses, plain_params, plain_affinity, plain_groups), (losses, params, affinity, groups) = runs
    for ours, theirs in zip(losses + params, plain_losses + plain_params, strict=False):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(affinity, plain_affinity, rtol=0, atol=0)
    assert groups == plain_groups and affinity.abs().sum() > 0


def test_a_skipped_step_is_not_credited_and_the_others_are():
    model, _, x, y = make_problem(num_tasks=3, dtype=torch.float32)
    scaler = cpu_scaler(init_scale=2.0**10)
    groups = [[0], [1], [2]]
    sel = SelectiveGroupUpdate(
        torch.optim.SGD(model.parameters(), lr=0.1),
        3,
        grouping=groups,
        order="forward",
        decay=0.3,
        grad_scaler=scaler,
        measure_last_group=True,
    )
    recorded: list[list[float]] = []
    poison_step: list[int] = []  # the group steps (0-based within the batch) whose gradients become inf
    backward_count = [0]

    def poison(grad: torch.Tensor) -> torch.Tensor:
        backward_count[0] += 1
        return grad * math.inf if backward_count[0] - 1 in poison_step else grad

    model.encoder[0].weight.register_hook(poison)

    def closure():
        losses = regression_losses(model, x, y)
        recorded.append([loss.item() for loss in losses])
        return losses

    sel.step(closure)  # a clean batch: the affinity now holds something to protect
    start = sel.affinity.clone().double()
    recorded.clear()
    backward_count[0] = 0
    poison_step.append(1)  # group [1]'s step overflows and is skipped
    params_before = [p.detach().clone() for p in model.parameters()]
    sel.step(closure)
    assert scaler.get_scale() == 2.0**9  # backed off once, for the one overflow
    # Group [1]'s step did nothing: forwards 1 and 2 saw the same parameters.
    assert recorded[1] == recorded[2]
    expected = start
    for m, group in enumerate(groups):  # forwards m -> m+1 bracket group m's step
        if m != 1:
            expected = affinity_update_reference(expected, recorded[m], recorded[m + 1], group, 0.3)
    torch.testing.assert_close(sel.affinity.double(), expected, rtol=1e-5, atol=1e-7)  # float32 tracker
    # The naive crediting (r = 0 for the skipped step) would have decayed row 1 towards 0.
    assert sel.affinity[1].abs().sum() > 0
    torch.testing.assert_close(sel.affinity[1], start[1].float(), rtol=0, atol=0)
    assert not torch.equal(model.encoder[0].weight, params_before[0])  # the other steps happened


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "adam-fused"])
def test_a_batch_of_only_skipped_steps_leaves_everything_unchanged(fused):
    """Fused Adam takes the scaler's inf check inside its kernel: the skip must be seen too."""
    model, _, x, y = make_problem(num_tasks=3, dtype=torch.float32)
    scaler = cpu_scaler(init_scale=2.0**10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
    sel = SelectiveGroupUpdate(
        optimizer, 3, warmup_steps=0, decay=0.3, grad_scaler=scaler, generator=torch.Generator().manual_seed(1)
    )
    for _ in range(3):
        sel.step(lambda: regression_losses(model, x, y))
    affinity, params = sel.affinity.clone(), [p.detach().clone() for p in model.parameters()]
    handle = model.encoder[0].bias.register_hook(lambda grad: grad * math.nan)
    steps = len(sel.groups) if len(sel.groups) > 1 else 2
    sel.step(lambda: regression_losses(model, x, y))
    handle.remove()
    assert scaler.get_scale() == 2.0 ** (10 - steps)
    torch.testing.assert_close(sel.affinity, affinity, rtol=0, atol=0)
    for ours, theirs in zip(model.parameters(), params, strict=False):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_bf16_autocast_training_with_a_scaler():
    torch.manual_seed(0)
    model = TinyMultiTask(num_tasks=4, dtype=torch.float32)
    directions = torch.randn(2, 5)
    scaler = cpu_scaler(init_scale=2.0**8)
    sel = SelectiveGroupUpdate(
        torch.optim.Adam(model.parameters(), lr=0.02),
        4,
        warmup_steps=5,
        decay=0.1,
        grad_scaler=scaler,
        generator=torch.Generator().manual_seed(0),
    )
    x = torch.randn(64, 5)
    a, b = (x @ directions.T).unbind(1)
    y = torch.stack([a, 1.1 * a, b, -b], 1)
    outputs_dtypes = set()

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(x)
        outputs_dtypes.update(out.dtype for out in outputs)
        return [(out.float() - y[:, k]).pow(2).mean() for k, out in enumerate(outputs)]

    first = sel.step(closure)
    for _ in range(40):
        last = sel.step(closure)
    assert outputs_dtypes == {torch.bfloat16}
    assert (last < 0.5 * first).all(), (first, last)
    assert sel.affinity.dtype == torch.float32 and torch.isfinite(sel.affinity).all()
    assert (sel.affinity.diagonal() > 0).all()
    assert sorted(k for group in sel.groups for k in group) == [0, 1, 2, 3]


def test_a_disabled_scaler_is_plain_training():
    model, twin, x, y = make_problem(num_tasks=3, dtype=torch.float32)
    scaled = SelectiveGroupUpdate(
        torch.optim.SGD(model.parameters(), lr=0.1),
        3,
        grouping="separate",
        order="forward",
        grad_scaler=cpu_scaler(enabled=False),
    )
    plain = SelectiveGroupUpdate(torch.optim.SGD(twin.parameters(), lr=0.1), 3, grouping="separate", order="forward")
    for _ in range(2):
        scaled.step(lambda: regression_losses(model, x, y))
        plain.step(lambda: regression_losses(twin, x, y))
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=False):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(scaled.affinity, plain.affinity, rtol=0, atol=0)


def test_something_that_is_not_a_scaler_is_refused():
    with pytest.raises(TypeError, match="GradScaler"):
        SelectiveGroupUpdate(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 2, grad_scaler=2.0)


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "adam-fused"])
def test_scaler_skipped_step_reads_the_skip_between_step_and_update(fused):
    from selgroup_fast.selective import scaler_skipped_step

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=fused)
    scaler = cpu_scaler(init_scale=4.0)
    for poison, expected in ((1.0, False), (math.inf, True), (math.nan, True), (1.0, False)):
        optimizer.zero_grad()
        before = weight.detach().clone()
        scaler.scale((weight * poison).sum()).backward()
        scaler.step(optimizer)
        skipped = scaler_skipped_step(scaler, optimizer, weight.device)
        assert skipped.shape == () and skipped.dtype == torch.bool and bool(skipped) is expected
        assert torch.equal(weight.detach(), before) is expected  # a skipped step left the weight alone
        scaler.update()
