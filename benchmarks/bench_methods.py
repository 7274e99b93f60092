"""Per-step time of every baseline of ``selgroup_fast.methods`` next to TorchJD's, on the CPU.

The model: selgroup-bench's (``selgroup_fast.models.MultiTaskViT``): a small timm ViT
(``vit_tiny_patch16_224`` rebuilt for 32×32 inputs with 8×8 patches; random weights,
nothing is downloaded) as the shared encoder, and K tasks of the NYUD kinds in turn,
each a 1×1-conv decoder on the grid of patch tokens with a cross-entropy or L1 loss
on a synthetic dense target. Every method starts from the same weights and batch, runs
``--warmup`` steps, then ``--steps`` timed steps (wall clock); the table reports the
median ms/step and the ratio TorchJD / ours (> 1: ours is faster). The two
libraries' steps of one method are interleaved one by one, so that a load change
on a shared machine hits both alike. The section "Jacobian" times ``TaskJacobian.compute`` alone
(forward + per-task gradients of the shared parameters) in both modes, with
``--threads`` and with all cores.

TorchJD is driven as its documentation says: ``mtl_backward(losses, features=...)``
then ``jac_to_grad(shared_params, aggregator)`` for the aggregators, and its
scalarizers (``UW``, ``DWA``, ``FAMO``) for the loss weightings, with the same options
as ours where both have them (CAGrad ``c=0.4``; MGDA ``max_iters=250, epsilon=1e-5``;
Nash-MTL ``max_norm=1, update_weights_every=1, optim_niter=20``); our FAMO runs with
``max_norm=0`` (no clipping), as TorchJD's. Each library keeps its own conventions
otherwise (e.g. TorchJD's CAGrad is not scaled by K/(1+c²)): the work per step is
the same, the step sizes may differ.

Usage::

    python benchmarks/bench_methods.py                      # K = 5 and 11, writes benchmarks/results/methods_cpu.md
    python benchmarks/bench_methods.py --tasks 5 --steps 5 --output -   # a quick look, printed only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import selgroup_fast
from selgroup_fast.cli_common import cpu_model
from selgroup_fast.methods.jacobian import TaskJacobian
from selgroup_fast.models import MultiTaskViT, SyntheticBatch, parse_tasks, synthetic_batch
from selgroup_fast.tasks import task_losses

GRADIENT_METHODS = selgroup_fast.methods.available("gradient")
LOSS_METHODS = selgroup_fast.methods.available("loss")
ALL_METHODS = [*selgroup_fast.methods.available("plain"), *GRADIENT_METHODS, *LOSS_METHODS]


def losses_from(model: MultiTaskViT, features: torch.Tensor, batch: SyntheticBatch) -> list[torch.Tensor]:
    """The K task losses from the shared features (the tensor TorchJD's ``mtl_backward`` needs)."""
    return task_losses(model.decode(features), batch.targets, model.tasks)


def median_ms(*steps_to_time: Callable[[], object] | None, warmup: int, steps: int) -> list[float | None]:
    """Median ms/step of each step function, their steps interleaved (a, b, b, a, a, b, ...).

    Interleaving step by step puts every load change of a shared machine on all of them
    alike; alternating the order removes any advantage of going first or second.
    """
    runnable = [step for step in steps_to_time if step is not None]
    for _ in range(warmup):
        for step in runnable:
            step()
    times: dict[int, list[float]] = {id(step): [] for step in runnable}
    for i in range(steps):
        for step in runnable if i % 2 == 0 else runnable[::-1]:
            begin = time.perf_counter()
            step()
            times[id(step)].append(time.perf_counter() - begin)
    return [None if step is None else 1000.0 * statistics.median(times[id(step)]) for step in steps_to_time]


def ours_step(name: str, model: MultiTaskViT, batch: SyntheticBatch, lr: float, window: int) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    # FAMO without the authors' gradient clipping: TorchJD's FAMO does not clip, so both do the same work.
    options = {
        "pcgrad": {"seed": 0},
        "graddrop": {"seed": 0},
        "dwa": {"window": window},
        "famo": {"max_norm": 0.0},
    }.get(name, {})
    method = selgroup_fast.methods.create(
        name, optimizer, len(model.tasks), shared_params=model.shared_parameters(), **options
    )
    return lambda: method.step(lambda: losses_from(model, model.features(batch.images), batch))


def torchjd_step(
    name: str, model: MultiTaskViT, batch: SyntheticBatch, lr: float, window: int
) -> Callable[[], object] | None:
    """One TorchJD training step for ``name``, or None where TorchJD has no such method."""
    from torchjd import aggregation, scalarization
    from torchjd.autojac import jac_to_grad, mtl_backward

    num_tasks = len(model.tasks)
    shared = model.shared_parameters()
    aggregators = {
        "pcgrad": lambda: aggregation.PCGrad(),
        "cagrad": lambda: aggregation.CAGrad(c=0.4),
        "mgda": lambda: aggregation.MGDA(epsilon=1e-5, max_iters=250),
        "graddrop": lambda: aggregation.GradDrop(),
        "imtl": lambda: aggregation.IMTLG(),
        "aligned_mtl": lambda: aggregation.AlignedMTL(),
        "nash_mtl": lambda: aggregation.NashMTL(
            n_tasks=num_tasks, max_norm=1.0, update_weights_every=1, optim_niter=20
        ),
    }
    if name in aggregators:
        aggregator = aggregators[name]()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def step() -> None:
            optimizer.zero_grad()
            features = model.features(batch.images)
            mtl_backward(losses_from(model, features, batch), features=features)
            jac_to_grad(shared, aggregator)
            optimizer.step()

        return step
    if name == "uw":
        scalarizer = scalarization.UW(num_tasks)
        optimizer = torch.optim.SGD([*model.parameters(), *scalarizer.parameters()], lr=lr)
    elif name == "dwa":
        scalarizer = scalarization.DWA(temperature=2.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    elif name == "famo":
        scalarizer = scalarization.FAMO(num_tasks)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        return None
    counter = [0]

    def step() -> None:
        optimizer.zero_grad()
        losses = torch.stack(losses_from(model, model.features(batch.images), batch))
        scalarizer(losses).backward()
        optimizer.step()
        if name == "famo":
            with torch.no_grad():
                scalarizer.update(torch.stack(losses_from(model, model.features(batch.images), batch)))
        if name == "dwa":
            counter[0] += 1
            if counter[0] % window == 0:
                scalarizer.step()

    return step


def jacobian_step(model: MultiTaskViT, batch: SyntheticBatch, mode: str) -> Callable[[], object]:
    jac = TaskJacobian(model.shared_parameters(), len(model.tasks), mode=mode)
    return lambda: jac.compute(losses_from(model, model.features(batch.images), batch))


def run(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lines: list[str] = []
    from importlib.metadata import version

    import timm
    import torchjd  # noqa: F401  (fail early when the bench extra is missing)

    header = [
        "# Baselines: per-step time on the CPU, selgroup_fast vs TorchJD",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); "
        "the two libraries' steps run interleaved, so read the ratios: absolute times move with the machine's load",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"torchjd {version('torchjd')}, selgroup_fast {selgroup_fast.__version__}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model: timm vit_tiny_patch16_224 (random weights) at {args.img_size}×{args.img_size}, patch {args.patch_size}, "
        f"batch {args.batch}, K tasks of selgroup-bench's model (1×1-conv decoders on the patch-token grid, "
        f"cross-entropy and L1 losses, the NYUD kinds in turn); SGD lr {args.lr}",
        f"- timing: {args.warmup} warm-up steps, then the median of {args.steps} steps (ms/step), the two libraries' steps "
        "interleaved one by one in alternating order; ratio = TorchJD / ours (> 1: ours faster)",
        "",
    ]
    lines += header
    for num_tasks in args.tasks:
        tasks = parse_tasks(str(num_tasks))
        template = MultiTaskViT(tasks, "vit_tiny_patch16_224", args.img_size, args.patch_size)
        batch = synthetic_batch(tasks, args.batch, args.img_size, "cpu", torch.float32, seed=0)
        lines += [
            f"## K = {num_tasks}",
            "",
            "| method | ours (ms/step) | TorchJD (ms/step) | ratio |",
            "|---|---:|---:|---:|",
        ]
        for name in args.methods:
            ours, theirs = median_ms(
                ours_step(name, copy.deepcopy(template), batch, args.lr, args.dwa_window),
                torchjd_step(name, copy.deepcopy(template), batch, args.lr, args.dwa_window),
                warmup=args.warmup,
                steps=args.steps,
            )
            if theirs is None:
                lines.append(f"| {name} | {ours:.1f} | — | — |")
            else:
                lines.append(f"| {name} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f} |")
            print(lines[-1], flush=True)
        model = copy.deepcopy(template)
        shared = sum(p.numel() for p in model.shared_parameters())
        lines += [
            "",
            f"Jacobian alone (forward + per-task gradients of the {shared:,} shared parameters), `jacobian=`:",
            "",
        ]
        for threads in sorted({args.threads, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            batched, loop = median_ms(
                jacobian_step(model, batch, "batched"),
                jacobian_step(model, batch, "loop"),
                warmup=args.warmup,
                steps=args.steps,
            )
            lines.append(
                f"- {threads} thread(s): batched {batched:.1f} ms, loop {loop:.1f} ms (loop / batched = {loop / batched:.2f})"
            )
            print(lines[-1], flush=True)
        torch.set_num_threads(args.threads)
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[5, 11], help="numbers of tasks K")
    parser.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 by default: on a shared CPU, more threads than idle cores make times erratic)",
    )
    parser.add_argument("--dwa-window", type=int, default=100, help="steps per DWA 'epoch' (both libraries)")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "methods_cpu.md"), help="'-': print only"
    )
    args = parser.parse_args(argv)
    report = run(args)
    if args.output != "-":
        Path(args.output).write_text(report)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
