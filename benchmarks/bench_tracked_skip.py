"""The step of the K×P-state methods (DB-MTL, MoCo, ExcessMTL) under ``nonfinite="skip"``: masked vs snapshotted.

Three variants of one training step, on one CPU thread, interleaved round by round:

* ``propagate``: no guard, the state updated in place (the floor);
* ``skip, snapshot``: the K×P state copied before the step and restored by ``torch.where`` after it (the
  guard's generic path, as before issue #23; forced here by ``masked_state = ()``);
* ``skip, masked``: the update written to a temporary and kept into the state by ``torch.where`` (the default).

The model is a shared MLP ``d → h → h`` with K linear heads (P = the shared parameters), batch 16, fused Adam
(it skips by ``found_inf``, copying nothing: the variants differ by the K×P state only),
``jacobian="batched"``; every step is a good one (the skip flag is down). The time is the median over
``--rounds`` rounds of the median of ``--steps`` steps.

    python benchmarks/bench_tracked_skip.py        # writes benchmarks/results/tracked_skip_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selgroup_fast import methods
from selgroup_fast.methods.nonfinite import NonFiniteGuard, tensor_state
from selgroup_fast.methods.tracked import TaskGradientTracker
from selgroup_fast.parallel import RankAgreement

NAMES = ("db_mtl", "moco", "excess_mtl")
VARIANTS = ("propagate", "skip, snapshot", "skip, masked")
SHAPES = ((8, 256, 512), (8, 512, 1024))  # (K, d, h)
BATCH = 16


class Model(nn.Module):
    def __init__(self, num_tasks: int, width_in: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(width_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [head(z).squeeze(1) for head in self.heads]


def stepper(name: str, variant: str, shape: tuple[int, int, int]):
    """One step of ``name`` in ``variant`` on its own model copy (the same seed for all)."""
    num_tasks, width_in, hidden = shape
    torch.manual_seed(0)
    model = Model(num_tasks, width_in, hidden)
    x, y = torch.randn(BATCH, width_in), torch.randn(BATCH, num_tasks)
    method = methods.create(
        name,
        torch.optim.Adam(model.parameters(), lr=1e-4, fused=True),  # skips by found_inf: no copies of its own
        num_tasks,
        shared_params=model.encoder.parameters(),
        jacobian="batched",
        nonfinite="propagate" if variant == "propagate" else "skip",
    )
    if variant == "skip, snapshot":
        method.aggregator.masked_state = ()  # the guard snapshots the K×P state as any other
    assert isinstance(method.aggregator, TaskGradientTracker)

    def step() -> None:
        method.step(lambda: [(out - y[:, k]).pow(2).mean() for k, out in enumerate(model(x))])

    return step, sum(p.numel() for p in model.encoder.parameters())


def update_alone(name: str, variant: str, num_tasks: int, width: int):
    """The state's update alone, as the step runs it: the guard's flag (down), its keep/restore, the aggregator."""
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(num_tasks, width, generator=generator)
    losses = torch.rand(num_tasks, generator=generator) + 0.5
    tracker = methods.aggregator(name, num_tasks)
    assert isinstance(tracker, TaskGradientTracker)
    tracker.allocate(width)
    if variant == "skip, snapshot":
        tracker.masked_state = ()
    guard = NonFiniteGuard(
        "propagate" if variant == "propagate" else "skip", RankAgreement(None, tracker.device), tracker.device
    )

    def update() -> None:
        guard.begin_step()
        guard.check(losses)
        restore = guard.keep(tracker, tensor_state(tracker))
        tracker.combine_losses(jacobian, losses)
        restore()

    return update


def interleaved(calls: dict[str, Any], rounds: int, steps: int) -> dict[str, float]:
    """Median ms over ``rounds`` rotated rounds of the median of ``steps`` calls of each variant (after one call)."""
    for call in calls.values():
        call()
    samples: dict[str, list[float]] = {variant: [] for variant in calls}
    names = list(calls)
    for index in range(rounds):
        for variant in names[index % len(names) :] + names[: index % len(names)]:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                calls[variant]()
                times.append(time.perf_counter() - start)
            samples[variant].append(statistics.median(times))
    return {variant: 1e3 * statistics.median(values) for variant, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tracked_skip_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, updates = [], []
    for shape in SHAPES:
        for name in NAMES:
            steps = {variant: stepper(name, variant, shape) for variant in VARIANTS}
            width = next(iter(steps.values()))[1]
            median = interleaved({variant: step for variant, (step, _) in steps.items()}, args.rounds, args.steps)
            alone = {variant: update_alone(name, variant, shape[0], width) for variant in VARIANTS}
            updates.append((name, shape[0], width, interleaved(alone, args.rounds, 3 * args.steps)))
            rows.append((name, shape[0], width, median))
            print(name, shape, {v: f"{t:.2f}" for v, t in median.items()}, flush=True)
    header = "| method | K | P | propagate | skip, snapshot | skip, masked | snapshot / masked | masked − propagate |"
    lines = [
        '# The K×P-state methods under nonfinite="skip": masked update vs snapshot (one CPU thread)',
        "",
        f"Machine: {platform.machine()}, {platform.system()} {platform.release()}; torch {version('torch')}, "
        f"one thread; median over {args.rounds} interleaved rounds of the median of {args.steps} steps "
        f"({3 * args.steps} calls for the update alone).",
        f"Command: `python benchmarks/bench_tracked_skip.py --rounds {args.rounds} --steps {args.steps}`",
    ]
    for title, table in (
        ("One training step", rows),
        ("The state's update alone (the guard and the aggregator)", updates),
    ):
        lines += ["", f"## {title}", "", header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, num_tasks, width, median in table:
            floor, before, after = (median[variant] for variant in VARIANTS)
            lines.append(
                f"| {name} | {num_tasks} | {width:,} | {floor:.2f} ms | {before:.2f} ms | {after:.2f} ms | "
                f"{before / after:.2f}× | {after - floor:+.2f} ms |"
            )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
