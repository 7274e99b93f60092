"""Time and peak memory of one gradient-method step, by ``jacobian=`` mode and ``chunk_size``, next to TorchJD's engines.

On selgroup-bench's model (``MultiTaskViT``: ``vit_tiny_patch16_224`` at 32×32 with 8×8
patches, random weights; K generic tasks) every configuration runs the same training step:
forward, the task gradients of the shared parameters (J, or only G = J·Jᵀ), MGDA's weights from
G with this library's fused op, the direction in the shared parameters' ``.grad``, the heads'
``Σ w_k ∇L_k``, and an SGD step with lr=0 (the parameters stay put, so every step is the same).

* ``loop`` / ``batched`` (``chunk_size`` c) / ``gramian``: ``methods.create("mgda", ...,
  jacobian=mode, chunk_size=c)``, the library's own step, its closure returning ``(losses,
  features)`` as the built-in models' do (``"gramian"`` then starts its vectorised backward
  from the features);
* ``torchjd-autojac``: TorchJD 0.18's ``autojac.jac`` gives J (one tensor per parameter), then
  the same weights, ``wᵀJ`` into ``.grad`` and the heads' backward;
* ``torchjd-mtl``: TorchJD 0.18's multi-task route, ``autojac.mtl_backward(losses,
  features=...)`` (J through the features, in the parameters' ``.jac``; the heads' own
  gradients), then the same weights and ``wᵀJ`` into ``.grad``;
* ``torchjd-autogram``: TorchJD 0.18's ``autogram.Engine.compute_gramian`` gives G, then the same
  weights and ``losses.backward(w)`` (its documented use). The engine hooks every encoder module
  that owns parameters; the ViT module itself owns ``cls_token`` and ``pos_embed`` but the model
  calls its ``forward_features``, not its ``forward``, so its hook never fires and autogram's G
  lacks those two parameters' terms (the table reports its relative error against ours).
  Handing the engine the ViT alone would not help: it treats a module with direct parameters as
  one block, the whole encoder's K×P Jacobian at once.

On the CPU each configuration runs in its own child process, so that its peak resident memory
(``ru_maxrss``) is its own; peak = growth from after the model and the batch were built (the
method's buffers, the forward's activations, the backward's temporaries, the gradients). The
children of one K run in rounds (every configuration once per round, alternating order) so that
a load change hits all alike; the median over rounds is kept. With ``--device cuda`` all
configurations run in one process, interleaved the same way, with peak =
``torch.cuda.max_memory_allocated`` above the memory allocated before the method was built.

Usage::

    python benchmarks/bench_jacobian.py --torchjd               # K = 4, 11, 32 on the CPU: results/jacobian_cpu.md
    python benchmarks/bench_jacobian.py --torchjd --device cuda --output benchmarks/results/jacobian_cuda.md
    python benchmarks/bench_jacobian.py --tasks 4 --rounds 1 --output -
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import selgroup_fast
from selgroup_fast.checks import positive_int_arg
from selgroup_fast.cli_common import cpu_model

Config = tuple[str, int | None]


def configurations(num_tasks: int, torchjd: bool) -> list[Config]:
    """(mode, chunk_size): the loop, the whole batch, chunks of 1, 2, 4 and 8 tasks below K, the Gramian, TorchJD's."""
    chunks = [c for c in (1, 2, 4, 8) if c < num_tasks]
    theirs = [("torchjd-autojac", None), ("torchjd-mtl", None), ("torchjd-autogram", None)] if torchjd else []
    return [("loop", None), ("batched", None), *[("batched", c) for c in chunks], ("gramian", None), *theirs]


class Workload:
    """The model, one batch and the K losses of a forward, on one device."""

    def __init__(self, num_tasks: int, args: argparse.Namespace) -> None:
        from selgroup_fast.models import MultiTaskViT, parse_tasks, synthetic_batch

        torch.manual_seed(0)
        self.tasks = parse_tasks(str(num_tasks))
        self.model = MultiTaskViT(self.tasks, "vit_tiny_patch16_224", args.img_size, args.patch_size).to(args.device)
        self.batch = synthetic_batch(self.tasks, args.batch, args.img_size, args.device, torch.float32, seed=0)
        self.shared = self.model.shared_parameters()
        self.heads = [p for params in self.model.task_parameters() for p in params]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0)

    def losses(self) -> list[torch.Tensor]:
        return self.losses_and_features()[0]

    def losses_and_features(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The closure contract's ``(losses, features)``: the K losses and the encoder's output they come from."""
        from selgroup_fast.tasks import task_losses

        features = self.model.features(self.batch.images)
        return task_losses(self.model.decode(features), self.batch.targets, self.model.tasks), features


def step_function(mode: str, chunk_size: int | None, work: Workload) -> Callable[[], torch.Tensor | None]:
    """One training step of ``mode``; returns TorchJD autogram's G (else ``None``) for the accuracy check."""
    num_tasks = len(work.tasks)
    if mode == "torchjd-autojac":
        from torchjd.autojac import jac

        def autojac_step() -> None:
            work.optimizer.zero_grad(set_to_none=True)
            stacked = torch.stack(work.losses())
            blocks = jac(stacked, work.shared, retain_graph=True)
            gram = sum(block.reshape(num_tasks, -1) @ block.reshape(num_tasks, -1).T for block in blocks)
            weights = selgroup_fast.ops.mgda_weights(gram)
            for param, block in zip(work.shared, blocks, strict=True):
                param.grad = torch.tensordot(weights, block, dims=1)
            (weights * stacked).sum().backward(inputs=work.heads)
            work.optimizer.step()

        return lambda: autojac_step()
    if mode == "torchjd-mtl":
        from torchjd.autojac import mtl_backward

        def mtl_step() -> None:
            # TorchJD's multi-task route: the task Jacobian taken through the features (its .jac fields).
            work.optimizer.zero_grad(set_to_none=True)
            losses, features = work.losses_and_features()
            mtl_backward(losses, features=features)
            blocks = [param.jac.reshape(num_tasks, -1) for param in work.shared]  # type: ignore[attr-defined]
            weights = selgroup_fast.ops.mgda_weights(sum(block @ block.T for block in blocks))
            for param, block in zip(work.shared, blocks, strict=True):
                param.grad = (weights @ block).view_as(param)
                del param.jac  # type: ignore[attr-defined]
            work.optimizer.step()

        return mtl_step
    if mode == "torchjd-autogram":
        from torchjd.autogram import Engine

        owners = [m for m in work.model.encoder.modules() if any(True for _ in m.parameters(recurse=False))]
        engine = Engine(*owners, batch_dim=None)

        def autogram_step() -> torch.Tensor:
            work.optimizer.zero_grad(set_to_none=True)
            stacked = torch.stack(work.losses())
            gram = engine.compute_gramian(stacked)
            stacked.backward(selgroup_fast.ops.mgda_weights(gram))
            work.optimizer.step()
            return gram.detach()

        return autogram_step
    method = selgroup_fast.methods.create(
        "mgda", work.optimizer, num_tasks, shared_params=work.shared, jacobian=mode, chunk_size=chunk_size
    )

    def library_step() -> None:
        method.step(work.losses_and_features)  # the closure contract: "gramian" starts from the features

    return library_step


def exact_gramian(work: Workload) -> torch.Tensor:
    from selgroup_fast.methods.jacobian import TaskJacobian

    return TaskJacobian(work.shared, len(work.tasks), mode="gramian").gramian(work.losses())


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(mode: str, chunk_size: int | None, work: Workload, args: argparse.Namespace) -> dict[str, float]:
    """Median ms per step and peak memory growth (MiB) of one configuration; autogram: its G's relative error."""
    cuda = work.batch.images.is_cuda
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_bytes()
    step = step_function(mode, chunk_size, work)
    times, gram = [], None
    for index in range(args.warmup + args.steps):
        begin = time.perf_counter()
        gram = step()
        if cuda:
            torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(1000.0 * (time.perf_counter() - begin))
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss: KiB on Linux
    result = {"ms": statistics.median(times), "peak_mib": peak / 2**20}
    if gram is not None:
        exact = exact_gramian(work)
        result["gram_error"] = float((gram.double() - exact.double()).abs().max() / exact.double().abs().max())
    del step
    work.optimizer.zero_grad(set_to_none=True)
    return result


def child(args: argparse.Namespace) -> None:
    """One configuration in this process (CPU): prints a JSON line."""
    torch.set_num_threads(args.threads)
    work = Workload(args.child_tasks, args)
    print(json.dumps(measure(args.mode, args.chunk_size, work, args)))


def child_command(args: argparse.Namespace, num_tasks: int, mode: str, chunk: int | None) -> list[str]:
    command = [sys.executable, __file__, "--child-tasks", str(num_tasks), "--mode", mode]
    for flag in ("threads", "steps", "warmup", "batch", "img_size", "patch_size"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return command + (["--chunk-size", str(chunk)] if chunk is not None else [])


def results_for(num_tasks: int, args: argparse.Namespace) -> dict[Config, list[dict[str, float]]]:
    """Every configuration's measurements over the rounds, interleaved (alternating order)."""
    configs = configurations(num_tasks, args.torchjd)
    results: dict[Config, list[dict[str, float]]] = {config: [] for config in configs}
    work = Workload(num_tasks, args) if args.device == "cuda" else None
    for round_index in range(args.rounds):
        for mode, chunk in configs if round_index % 2 == 0 else configs[::-1]:
            if work is not None:
                results[(mode, chunk)].append(measure(mode, chunk, work, args))
                continue
            output = subprocess.run(
                child_command(args, num_tasks, mode, chunk), capture_output=True, text=True, check=True
            ).stdout
            results[(mode, chunk)].append(json.loads(output.strip().splitlines()[-1]))
    return results


def machine(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}; host {cpu_model()}"
    return f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} torch thread(s)"


def run(args: argparse.Namespace) -> str:
    import timm

    versions = f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}"
    if args.torchjd:
        from importlib.metadata import version

        versions += f", torchjd {version('torchjd')}"
    peak_source = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "ru_maxrss, one child per run"
    lines = [
        f"# One MGDA step on the {args.device.upper()}: time and peak memory by `jacobian=` mode, with TorchJD's engines",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine(args)}; {args.load_note}",
        f"- versions: {versions}, selgroup_fast {selgroup_fast.__version__}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model: selgroup-bench's MultiTaskViT, vit_tiny_patch16_224 (random weights, 5.5 M shared parameters) at "
        f"{args.img_size}×{args.img_size}, patch {args.patch_size}, batch {args.batch}; K generic tasks",
        f"- step: forward, task gradients (J or G), MGDA weights (the library's fused op, for every row), the "
        f"direction in `.grad`, the heads, SGD(lr=0); {args.rounds} rounds in alternating order, each "
        f"{args.warmup} warm-up and {args.steps} timed steps, median ms; peak = memory growth from after the model "
        f"and batch were built ({peak_source}): the method's buffers, activations, temporaries, gradients",
        "",
    ]
    for num_tasks in args.tasks:
        results = results_for(num_tasks, args)
        base = statistics.median(r["ms"] for r in results[("batched", None)])
        base_peak = statistics.median(r["peak_mib"] for r in results[("batched", None)])
        lines += [
            f"## K = {num_tasks}",
            "",
            "| jacobian | chunk_size | ms / step | × batched | peak MiB | × batched |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for (mode, chunk), runs in results.items():
            ms = statistics.median(r["ms"] for r in runs)
            peak = statistics.median(r["peak_mib"] for r in runs)
            chunk_text = chunk if chunk is not None else "—"
            lines.append(
                f"| {mode} | {chunk_text} | {ms:.1f} | {ms / base:.2f} | {peak:.0f} | {peak / max(base_peak, 1):.2f} |"
            )
            print(lines[-1], flush=True)
        errors = [r["gram_error"] for r in results.get(("torchjd-autogram", None), []) if "gram_error" in r]
        if errors:
            lines += [
                "",
                f"TorchJD autogram's G against `jacobian=\"gramian\"`'s: max relative error {max(errors):.1e}.",
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=positive_int_arg, nargs="+", default=[4, 11, 32], help="numbers of tasks K")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=positive_int_arg, default=3)
    parser.add_argument("--steps", type=positive_int_arg, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=positive_int_arg, default=8)
    parser.add_argument("--img-size", type=positive_int_arg, default=32)
    parser.add_argument("--patch-size", type=positive_int_arg, default=8)
    parser.add_argument("--threads", type=positive_int_arg, default=1, help="torch threads of each CPU child")
    parser.add_argument("--torchjd", action="store_true", help="also TorchJD's autojac and autogram engines")
    parser.add_argument("--load-note", default="the machine was shared with other jobs (loaded): read the ratios")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/jacobian_<device>.md; '-': print")
    parser.add_argument("--child-tasks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="batched", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"argument --warmup: expected an integer >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no usable CUDA device", file=sys.stderr)
        sys.exit(2)
    if args.torchjd:
        try:
            import torchjd  # noqa: F401
        except ImportError:
            print("error: --torchjd needs TorchJD 0.18: pip install 'torchjd>=0.18,<0.19'", file=sys.stderr)
            sys.exit(2)
    if args.child_tasks is not None:
        child(args)
        return
    report = run(args)
    print(report)
    output = args.output or str(Path(__file__).parent / "results" / f"jacobian_{args.device}.md")
    if output != "-":
        Path(output).write_text(report)
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
