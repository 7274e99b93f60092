"""SelectiveGroupUpdate under torch.distributed: 2 CPU processes (gloo over 127.0.0.1), different
data on each rank, DistributedDataParallel(find_unused_parameters=True)."""

from __future__ import annotations

import os
import sys
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TinyMultiTask, free_port, init_gloo, regression_losses

from selgroup_fast import SelectiveGroupUpdate

WORLD_SIZE = 2
WARMUP = 5
STEPS = 45
NUM_TASKS = 4


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s own data: four tasks in two related pairs, different inputs per rank."""
    generator = torch.Generator().manual_seed(1000 + rank)
    directions = torch.randn(2, 5, generator=torch.Generator().manual_seed(7))
    batches = []
    for _ in range(STEPS):
        x = torch.randn(16, 5, generator=generator)
        a, b = (x @ directions.T).unbind(1)
        batches.append((x, torch.stack([a, 1.1 * a, b, 0.9 * b + 0.3 * a], 1)))
    return batches


def make_model_and_method(module_wrapper=lambda m: m, **options):
    torch.manual_seed(0)  # the same initial parameters everywhere
    model = module_wrapper(TinyMultiTask(num_tasks=NUM_TASKS, dtype=torch.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    # Seeds the default order generator from the global RNG: different on every rank on
    # purpose, the method must broadcast rank 0's generator state.
    torch.manual_seed(100 + int(dist.get_rank() if dist.is_initialized() else 0))
    sel = SelectiveGroupUpdate(optimizer, NUM_TASKS, warmup_steps=WARMUP, decay=0.1, measure_last_group=True, **options)
    return model, sel


def recording_closure(model, heads, x, y, grads_seen: list[list[bool]]):
    """The closure, noting at each forward which heads hold a gradient (the previous group's only)."""

    def closure():
        grads_seen.append([all(p.grad is not None for p in head.parameters()) for head in heads])
        return regression_losses(model, x, y)

    return closure


def worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD_SIZE)
    try:

        def wrap(m):
            return torch.nn.parallel.DistributedDataParallel(m, find_unused_parameters=True)

        model, sel = make_model_and_method(wrap)
        grads_seen: list[list[bool]] = []
        groups_history = []
        for x, y in rank_batches(rank):
            sel.step(recording_closure(model, model.module.heads, x, y, grads_seen))
            groups_history.append(sel.groups)
        # The same with an explicit process_group= (a new group of both ranks), a shorter run.
        explicit_model, explicit = make_model_and_method(wrap, process_group=dist.new_group(ranks=[0, 1]))
        for x, y in rank_batches(rank)[: WARMUP + 10]:
            explicit.step(partial(regression_losses, explicit_model, x, y))
        torch.save(
            {
                "params": [p.detach().clone() for p in model.module.parameters()],
                "affinity": sel.affinity.clone(),
                "groups": groups_history,
                "grads_seen": grads_seen,
                "explicit": [explicit.affinity.clone(), explicit.groups, *explicit_model.module.parameters()],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_ranks_with_different_data_agree_on_affinity_groups_and_parameters(tmp_path):
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, port, str(tmp_path))) for rank in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=150)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert [process.exitcode for process in processes] == [0] * WORLD_SIZE

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    assert ranks[0]["groups"] == ranks[1]["groups"]
    torch.testing.assert_close(ranks[0]["affinity"], ranks[1]["affinity"], rtol=0, atol=0)
    for ours, theirs in zip(ranks[0]["params"], ranks[1]["params"], strict=False):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert any(len(groups) < NUM_TASKS for groups in ranks[0]["groups"][WARMUP:])  # it did regroup
    explicit_0, explicit_1 = ranks[0]["explicit"], ranks[1]["explicit"]
    assert explicit_0[1] == explicit_1[1] and explicit_0[0].abs().sum() > 0
    for ours, theirs in zip(explicit_0[:1] + explicit_0[2:], explicit_1[:1] + explicit_1[2:], strict=False):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    # The distributed run is the single-process run on both ranks' data: DDP averages the
    # gradients, the method averages the measured losses, rank 0's generator orders the groups.
    model, sel = make_model_and_method()
    grads_seen: list[list[bool]] = []
    for (x0, y0), (x1, y1) in zip(rank_batches(0), rank_batches(1), strict=False):
        sel.step(recording_closure(model, model.heads, torch.cat([x0, x1]), torch.cat([y0, y1]), grads_seen))
    # DDP left the heads outside each group without gradient, as a single process does.
    assert ranks[0]["grads_seen"] == ranks[1]["grads_seen"] == grads_seen
    assert any(not all(seen) for seen in grads_seen) and any(any(seen) for seen in grads_seen)
    torch.testing.assert_close(ranks[0]["affinity"], sel.affinity, rtol=1e-4, atol=1e-6)
    assert ranks[0]["groups"][-1] == sel.groups
    for ours, theirs in zip(ranks[0]["params"], model.parameters(), strict=False):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":  # pragma: no cover - debugging aid: python tests/test_selective_ddp.py
    sys.exit(pytest.main([__file__, "-q"]))
