"""``grad_scaler=``: every method of the registry with a ``torch.amp.GradScaler`` (on the CPU), and ``selgroup-train --amp fp16``.

The reference of a scaled step is the same method without a scaler: with a power-of-two scale every
multiplication and division by it is exact, so the two runs must agree bitwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conftest import step_on_one_batch
from test_nonfinite import NAMES, NUM_TASKS, batch, optimizer_steps, snapshot
from train_helpers import TINY, load_checkpoint

from selgroup_fast import methods
from selgroup_fast.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = 2.0**10
#: A loss factor whose gradients are finite but overflow float32 once scaled by SCALE (float32's max is 3.4e38).
OVERFLOW = 1e36


def make(name: str, scaler: Any, *, fused: bool = False, **options: Any) -> tuple[Any, Any, Any]:
    from conftest import TinyMultiTask

    torch.manual_seed(0)
    model = TinyMultiTask(num_tasks=NUM_TASKS, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, fused=fused or None)
    if name == "selective":
        options.update(warmup_steps=1, generator=torch.Generator().manual_seed(0), measure_last_group=True)
    method = methods.create(
        name, optimizer, NUM_TASKS, shared_params=model.encoder.parameters(), grad_scaler=scaler, **options
    )
    return model, method, optimizer


def scaler() -> torch.amp.GradScaler:
    # growth_interval: the scale must stay a power of two known to the test (no growth within a run)
    return torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)


def closure_for(model: Any, seed: int, factor: float = 1.0, features: bool = False) -> Any:
    """The K regression losses of batch ``seed`` times ``factor`` (and the encoder's output, with ``features``)."""
    x, y = batch(seed)

    def closure() -> Any:
        encoded = model.encoder(x)
        losses = [(head(encoded).squeeze(-1) - y[:, k]).pow(2).mean() * factor for k, head in enumerate(model.heads)]
        return (losses, encoded) if features else losses

    return closure


def run(name: str, grad_scaler: Any, steps: int = 3, **options: Any) -> tuple[dict[str, torch.Tensor], Any]:
    model, method, optimizer = make(name, grad_scaler, **options)
    for seed in range(steps):
        step_on_one_batch(method, closure_for(model, seed, features=options.get("space") == "representation"))
    return snapshot(model, method, optimizer), method


def assert_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for path, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[path], rtol=0, atol=0, msg=path)


@pytest.mark.parametrize("name", NAMES)
def test_a_power_of_two_scale_changes_no_bit_of_the_step(name: str) -> None:
    """Parameters, optimizer state and method state after 3 steps equal those of the method without a scaler."""
    plain, _ = run(name, None)
    scaled, method = run(name, scaler())
    assert_equal(scaled, plain)
    assert method.grad_scaler.get_scale() == SCALE and int(method.skipped_steps) == 0


@pytest.mark.parametrize(
    "name, options",
    [
        ("mgda", {"space": "representation"}),  # a weighting on the features' J
        ("graddrop", {"space": "representation"}),  # J / s, the direction scaled back, pulled back
        ("imtl", {"jacobian": "gramian"}),  # G of the scaled losses only, J never held
        ("nash_mtl", {"jacobian": "loop", "update_weights_every": 2}),  # its reused weights' clipped step
        ("pcgrad", {"jacobian": "loop"}),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(map(str, value.values())),
)
def test_every_path_of_the_gradient_step_is_unscaled_exactly(name: str, options: dict[str, Any]) -> None:
    plain, _ = run(name, None, **options)
    scaled, _ = run(name, scaler(), **options)
    assert_equal(scaled, plain)


@pytest.mark.parametrize("fused", [False, True], ids=["masked", "found_inf"])
@pytest.mark.parametrize("name", NAMES)
def test_an_overflow_skips_the_step_leaves_every_state_and_halves_the_scale(name: str, fused: bool) -> None:
    grad_scaler = scaler()
    model, method, optimizer = make(name, grad_scaler, fused=fused)
    step_on_one_batch(method, closure_for(model, 1))  # the optimizer's and the method's state exist from here on
    before, steps = snapshot(model, method, optimizer), optimizer_steps(name, method)
    losses = step_on_one_batch(
        method, closure_for(model, 2, factor=OVERFLOW)
    )  # finite losses, scaled gradients overflow
    assert torch.isfinite(losses).all()
    assert_equal(snapshot(model, method, optimizer), before)
    assert grad_scaler.get_scale() == SCALE / 2**steps  # backed off once per optimizer step
    assert int(method.skipped_steps) == steps
    step_on_one_batch(method, closure_for(model, 3))  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(method.skipped_steps) == steps


@pytest.mark.parametrize("name", ["moco", "excess_mtl"])
def test_an_overflow_in_the_heads_gradients_alone_leaves_the_k_by_p_state(name: str) -> None:
    """The shared parameters' J is finite, a head's gradient overflows: the skip is known only once the optimizer's
    gradients are unscaled, after the aggregator updated its K×P state; that update must not be kept."""
    grad_scaler = scaler()
    model, method, optimizer = make(name, grad_scaler)
    step_on_one_batch(method, closure_for(model, 1))
    before = snapshot(model, method, optimizer)
    x, y = batch(2)

    def closure() -> list[torch.Tensor]:
        encoded = model.encoder(x)
        losses = [(head(encoded).squeeze(-1) - y[:, k]).pow(2).mean() for k, head in enumerate(model.heads)]
        losses[0] = losses[0] + model.heads[0].weight.sum() * OVERFLOW  # its scaled gradient is head 0's only
        return losses

    step_on_one_batch(method, closure)
    assert int(method.skipped_steps) == 1 and grad_scaler.get_scale() == SCALE / 2
    assert_equal(snapshot(model, method, optimizer), before)
    step_on_one_batch(method, closure_for(model, 3))  # a good step still advances it
    assert not torch.equal(method.aggregator.tracked, before["method/tracked"])


@pytest.mark.parametrize("mode", ["raise", "propagate"])
@pytest.mark.parametrize("name", ["gd", "selective", "mgda", "graddrop", "uw", "famo"])
def test_the_scaler_skips_an_overflow_whatever_nonfinite_says(name: str, mode: str) -> None:
    grad_scaler = scaler()
    model, method, optimizer = make(name, grad_scaler, nonfinite=mode)
    step_on_one_batch(method, closure_for(model, 1))
    before, steps = snapshot(model, method, optimizer), optimizer_steps(name, method)
    step_on_one_batch(method, closure_for(model, 2, factor=OVERFLOW))
    assert_equal(snapshot(model, method, optimizer), before)
    assert grad_scaler.get_scale() == SCALE / 2**steps and int(method.skipped_steps) == steps


@pytest.mark.parametrize("name", NAMES)
def test_something_that_is_not_a_scaler_is_one_type_error_line(name: str) -> None:
    with pytest.raises(TypeError, match=r"^grad_scaler must be a torch\.amp\.GradScaler, got float$"):
        make(name, 2.0)


@pytest.mark.parametrize("name", ["gd", "pcgrad", "uw"])
def test_a_disabled_scaler_is_no_scaler(name: str) -> None:
    plain, _ = run(name, None)
    disabled, method = run(name, torch.amp.GradScaler("cpu", enabled=False))
    assert_equal(disabled, plain)


@pytest.mark.parametrize(
    "method",
    [
        "gd",
        "famo",  # loss weighting with its extra forward and its own optimizer
        "uw",  # learned scales: a second optimizer the scaler unscales
        "mgda",  # a weighting of G
        "pcgrad",  # J itself
        pytest.param("db_mtl", marks=pytest.mark.slow),  # K×P tracked state
        pytest.param("modo", marks=pytest.mark.slow),  # two batches
        pytest.param("nash_mtl", marks=pytest.mark.slow),
        pytest.param("stch", marks=pytest.mark.slow),
    ],
)
def test_selgroup_train_amp_fp16_runs_every_kind_of_method(method: str, tmp_path) -> None:
    config = TrainConfig(method=method, amp="fp16", iters=2, out=str(tmp_path), **TINY)
    results = fit(config)
    assert results["iterations"] == 2 and results["config"]["amp"] == "fp16"
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0


def test_an_fp16_run_resumed_from_its_checkpoint_continues_with_the_scaler_state(tmp_path) -> None:
    """UW (learned scales, a second optimizer): 4 iterations straight equal 2, then 2 more resumed, bitwise
    (a constant schedule: --iters changes between the legs)."""
    runs = {}
    for name, legs in (("straight", [4]), ("resumed", [2, 4])):
        for iters in legs:
            config = TrainConfig(
                method="uw", amp="fp16", iters=iters, schedule="constant", out=str(tmp_path / name), **TINY
            )
            fit(dataclasses.replace(config, resume="auto") if iters != legs[0] else config)
        runs[name] = load_checkpoint(tmp_path / name / "checkpoint.pt")
    straight, resumed = runs["straight"], runs["resumed"]
    assert straight["iteration"] == resumed["iteration"] == 4
    assert straight["scaler"] == resumed["scaler"] and straight["scaler"]["scale"] > 0
    for part in ("model", "method"):
        for key, value in straight[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, resumed[part][key]), (part, key)
