"""``nonfinite=``: every method of the registry and ``SelectiveGroupUpdate`` under "raise", "skip" and "propagate"."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TinyMultiTask, free_port, init_gloo, regression_losses, step_on_one_batch

from selgroup_fast import methods
from selgroup_fast.methods import NonFiniteLoss

NUM_TASKS = 3
NAMES = methods.available()
#: State entries that are random draws or host counters: they advance on a skipped step (documented).
ADVANCING = {"generator", "batches", "steps", "offset"}


def make(name: str, mode: str | None, *, fused: bool = False, compiled: bool = False) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = TinyMultiTask(num_tasks=NUM_TASKS, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, fused=fused or None)
    options: dict[str, Any] = {} if mode is None else {"nonfinite": mode}
    if name == "selective":
        options.update(warmup_steps=1, generator=torch.Generator().manual_seed(0), measure_last_group=True)
    if compiled:
        options["task_params"] = [head.parameters() for head in model.heads]
    method = methods.create(name, optimizer, NUM_TASKS, shared_params=model.encoder.parameters(), **options)
    return (torch.compile(model, backend="aot_eager") if compiled else model), method, optimizer


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, generator=generator), torch.randn(8, NUM_TASKS, generator=generator)


def closure_for(model: Any, seed: int, poisoned_task: int | None = None) -> Any:
    x, y = batch(seed)

    def closure() -> list[torch.Tensor]:
        losses = regression_losses(model, x, y)
        if poisoned_task is not None:  # a log of zero: -inf, and a NaN beside it
            losses[poisoned_task] = losses[poisoned_task] * torch.log(torch.zeros(()))
        return losses

    return closure


def tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a (nested) state dict, by path, those of :data:`ADVANCING` keys left out."""
    if isinstance(value, torch.Tensor):
        return {prefix: value.detach().clone()}
    if isinstance(value, dict):
        return {
            path: tensor
            for key, item in value.items()
            if key not in ADVANCING
            for path, tensor in tensors(item, f"{prefix}/{key}").items()
        }
    if isinstance(value, (list, tuple)):
        return {path: t for i, item in enumerate(value) for path, t in tensors(item, f"{prefix}/{i}").items()}
    return {}


def snapshot(model: Any, method: Any, optimizer: Any) -> dict[str, torch.Tensor]:
    return {
        **tensors([p for p in model.parameters()], "params"),
        **tensors(optimizer.state_dict()["state"], "optimizer"),
        **tensors(method.state_dict(), "method"),
    }


def optimizer_steps(name: str, method: Any) -> int:
    """How many optimizer steps the next ``step`` takes (the selective update: one per group)."""
    if name != "selective":
        return 1
    return len(method.groups) if len(method.groups) > 1 else method.grouping.lone_group_steps


def assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for path, tensor in before.items():
        assert torch.equal(tensor, after[path]), path


def test_the_default_is_skip_and_a_wrong_mode_is_one_error_line() -> None:
    model, method, optimizer = make("gd", None)
    assert method.nonfinite == "skip"
    with pytest.raises(ValueError, match=r"^nonfinite must be one of \('raise', 'skip', 'propagate'\), got 'ignore'$"):
        methods.create("pcgrad", optimizer, NUM_TASKS, shared_params=model.encoder.parameters(), nonfinite="ignore")


@pytest.mark.parametrize("fused", [False, True], ids=["masked", "found_inf"])
@pytest.mark.parametrize("name", NAMES)
def test_skip_leaves_parameters_optimizer_and_method_state_untouched(name: str, fused: bool) -> None:
    model, method, optimizer = make(name, "skip", fused=fused)
    step_on_one_batch(method, closure_for(model, 1))  # the optimizer's state exists from here on
    before, steps = snapshot(model, method, optimizer), optimizer_steps(name, method)
    losses = step_on_one_batch(method, closure_for(model, 2, poisoned_task=1))
    assert not torch.isfinite(losses[1])  # the step returns the losses it saw
    assert_same(before, snapshot(model, method, optimizer))  # Adam's moments, its step count, the affinity
    assert method.skipped_steps.dtype == torch.int64 and int(method.skipped_steps) == steps
    step_on_one_batch(method, closure_for(model, 3))  # training goes on, finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(method.skipped_steps) == steps


@pytest.mark.parametrize("name", NAMES)
def test_skip_changes_nothing_while_the_losses_are_finite(name: str) -> None:
    runs = []
    for mode in ("skip", "propagate"):
        model, method, optimizer = make(name, mode)
        for seed in range(3):
            step_on_one_batch(method, closure_for(model, seed))
        runs.append(snapshot(model, method, optimizer))
        assert int(method.skipped_steps) == 0
    assert_same(*runs)  # bitwise: the masked update keeps the step's own values


@pytest.mark.parametrize("name", NAMES)
def test_raise_names_the_task_and_the_step_before_any_update(name: str) -> None:
    model, method, optimizer = make(name, "raise")
    step_on_one_batch(method, closure_for(model, 1))
    before = snapshot(model, method, optimizer)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss -?(nan|inf) for task 2 at step 2 ") as error:
        step_on_one_batch(method, closure_for(model, 2, poisoned_task=2))
    assert (error.value.task, error.value.step) == (2, 2)
    assert_same(before, snapshot(model, method, optimizer))


@pytest.mark.parametrize("name", NAMES)
def test_propagate_lets_the_nan_reach_the_parameters(name: str) -> None:
    model, method, _ = make(name, "propagate")
    step_on_one_batch(method, closure_for(model, 2, poisoned_task=0))
    assert not all(torch.isfinite(p).all() for p in model.encoder.parameters())
    assert int(method.skipped_steps) == 0


def test_dwa_leaves_a_skipped_step_out_of_its_window() -> None:
    param = torch.nn.Parameter(torch.zeros(()))
    dwa = methods.create("dwa", torch.optim.SGD([param], lr=0.0), 2, window=2)
    values = [[1.0, 2.0], [float("nan"), 5.0], [3.0, 4.0], [5.0, 8.0]]
    for value in values:
        dwa.step(lambda value=value: [param + value[0], param + value[1]])
    # window 1 counted its first step only, window 2 both: r = (4, 6) / (1, 2), w = K softmax(r / 2)
    ratios = torch.tensor([4.0 / 1.0, 6.0 / 2.0], dtype=torch.float64)
    torch.testing.assert_close(dwa.weights.double(), 2 * torch.softmax(ratios / 2.0, dim=0))
    assert int(dwa.skipped_steps) == 1


@pytest.mark.parametrize("name", ["gd", "pcgrad"])
def test_skip_on_a_compiled_model(name: str) -> None:
    compiled_case(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_skip_on_a_compiled_model_every_method(name: str) -> None:
    compiled_case(name)


def compiled_case(name: str) -> None:
    torch._dynamo.reset()
    model, method, optimizer = make(name, "skip", compiled=True)
    step_on_one_batch(method, closure_for(model, 1))
    before = snapshot(model, method, optimizer)
    step_on_one_batch(method, closure_for(model, 2, poisoned_task=0))
    assert_same(before, snapshot(model, method, optimizer))
    assert int(method.skipped_steps) >= 1


#: The methods run under DDP: one of each kind (the guard is shared by the rest of their kind).
DDP_METHODS = ["gd", "selective", "pcgrad", "uw"]


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, 2)
    try:
        results: dict[str, Any] = {}
        for name in DDP_METHODS:
            for mode in ("skip", "raise") if name == "gd" else ("skip",):  # "raise" shares check() with every method
                model, method, optimizer = make(name, mode)
                ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=name == "selective")
                step_on_one_batch(method, closure_for(ddp, 10 + rank))
                before, steps = snapshot(model, method, optimizer), optimizer_steps(name, method)
                # Only rank 1 sees the non-finite loss: rank 0 must skip (or raise) with it.
                poisoned = closure_for(ddp, 20 + rank, poisoned_task=1 if rank == 1 else None)
                try:
                    step_on_one_batch(method, poisoned)
                    outcome = f"skipped {int(method.skipped_steps)} of {steps}"
                except NonFiniteLoss as error:
                    outcome = f"raised task {error.task} step {error.step}"
                after = snapshot(model, method, optimizer)
                unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
                results[f"{name}/{mode}"] = (outcome, unchanged, [p.detach().clone() for p in model.parameters()])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_every_rank_skips_or_raises_together_under_ddp(tmp_path) -> None:
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=ddp_worker, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=200)
        if process.is_alive():
            process.kill()
            process.join()
    assert [process.exitcode for process in processes] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key in ranks[0]:
        name, mode = key.split("/")
        steps = int(ranks[0][key][0].split()[-1]) if mode == "skip" else 0  # every group step of the batch
        expected = f"skipped {steps} of {steps}" if mode == "skip" else "raised task 1 step 2"
        assert ranks[0][key][:2] == ranks[1][key][:2] == (expected, True), key
        for ours, theirs in zip(ranks[0][key][2], ranks[1][key][2], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


if __name__ == "__main__":  # pragma: no cover - debugging aid
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("name", ["db_mtl", "moco", "excess_mtl"])
def test_skip_masks_the_k_by_p_state_in_place_without_a_snapshot(name: str) -> None:
    """The K×P state under "skip": no clone of it on a skipped step, bitwise kept, in the same storage; on good
    steps bitwise what the in-place update of "propagate" gives."""
    model, method, _ = make(name, "skip")
    twin, unguarded, _ = make(name, "propagate")
    for seed in (1, 2):
        step_on_one_batch(method, closure_for(model, seed))
        step_on_one_batch(unguarded, closure_for(twin, seed))
    tracked = method.aggregator.tracked
    assert torch.equal(tracked, unguarded.aggregator.tracked) and tracked.abs().sum() > 0
    before, storage = tracked.clone(), tracked.data_ptr()
    with torch.profiler.profile(record_shapes=True) as profile:
        step_on_one_batch(method, closure_for(model, 3, poisoned_task=1))
    copies = [e for e in profile.events() if e.name == "aten::clone" and list(tracked.shape) in e.input_shapes]
    assert not copies, [e.input_shapes for e in copies]
    assert method.aggregator.tracked.data_ptr() == storage and torch.equal(method.aggregator.tracked, before)
    assert method.aggregator.skip is None  # the flag is the step's only
    step_on_one_batch(method, closure_for(model, 4))
    assert not torch.equal(method.aggregator.tracked, before)  # a good step advances it
