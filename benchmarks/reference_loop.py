"""Selective group updates run the way the public reference code runs them, next to ``SelectiveGroupUpdate``.

The reference implementation of Jeong & Yoon (ICLR 2025), github.com/wooseong97/
sel-update-mtl (``utils/train_utils.py``: ``train_phase_affinity`` and
``form_task_affinity``), runs every batch as:

* the groups: during the warm-up one group per task in random order; afterwards
  scikit-learn's ``AffinityPropagation`` on the CPU, every batch, on the
  column-normalised, symmetrised affinity (up to 10 tries, ``convergence_iter``
  50, +100 per try), keeping the previous groups when no exemplar emerges;
* one group alone is updated twice;
* per group: forward, backward of the group's summed loss, optimizer step, then the
  affinity update: a Python double loop over (source in the group) × (every target)
  that reads the losses with ``.item()`` (one host synchronisation per read on a
  GPU) and updates a CPU tensor entry by entry; the change since the previous
  forward is credited to the group that was just updated after it (the reference's
  crediting; ``docs/algorithm.md`` §Attribution).

:class:`ReferenceLoop` restates that loop (written from ``docs/algorithm.md`` and a reading
of the reference code) behind the library's method interface, so the bench's timing
loop times both the same way. The library side is ``SelectiveGroupUpdate`` with
``attribution="reference"`` (the same crediting, hence the same work). The script
reports the clustering + affinity phase and the total per batch of both, and their
ratios, as a Markdown table.

    python benchmarks/reference_loop.py                       # both, machine defaults
    python benchmarks/reference_loop.py --only reference      # the reference loop alone
"""

from __future__ import annotations

import argparse
import datetime
import random
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from sklearn.cluster import AffinityPropagation

from selgroup_fast.bench import MethodResult, prepare_workload, run_methods
from selgroup_fast.bench.cli import add_run_arguments, describe, run_settings
from selgroup_fast.cli_common import UsageError, environment, markdown_table
from selgroup_fast.losses import ClosureOutput
from selgroup_fast.methods import MultiTaskMethod
from selgroup_fast.methods.base import detached
from selgroup_fast.models import ModelError

#: The reference code's settings: affinity decay (paper default), AP convergence_iter.
DECAY = 1e-3
CONVERGENCE_ITER = 50
MAX_TRIES = 10


class ReferenceAffinity:
    """The reference code's affinity bookkeeping: a CPU K×K tensor updated entry by entry.

    Rules of ``docs/algorithm.md`` §Affinity update, with the losses read
    one ``.item()`` at a time inside the double loop, as the reference does.
    """

    def __init__(self, num_tasks: int, decay: float = DECAY) -> None:
        self.num_tasks = num_tasks
        self.decay = decay
        self.affinity = torch.zeros(num_tasks, num_tasks)
        self.previous = [-1.0] * num_tasks  # losses of the previous forward; -1: none yet this batch

    def start_batch(self) -> None:
        self.previous = [-1.0] * self.num_tasks

    def _blend(self, value: float, source: int, target: int) -> None:
        self.affinity[source, target] = (1 - self.decay) * self.affinity[source, target] + self.decay * value

    def update(self, group: list[int], losses: Sequence[torch.Tensor]) -> None:
        """Credits the change from the previous forward's losses to ``losses`` to ``group``."""
        size = len(group)
        for source in group:
            for target in range(self.num_tasks):
                if self.previous[target] <= 0:
                    continue
                ratio_target = (1 - losses[target].item() / self.previous[target]) / size
                if target not in group:
                    self._blend(ratio_target, source, target)
                    continue
                if self.previous[source] <= 0:
                    continue
                ratio_source = (1 - losses[source].item() / self.previous[source]) / size
                if source == target:
                    if ratio_target >= 0:
                        self._blend(ratio_target, source, target)
                elif ratio_target * ratio_source >= 0:
                    self._blend(ratio_target, source, target)
                else:
                    self._blend(-max(ratio_target, ratio_source), source, target)
        self.previous = [loss.item() for loss in losses]

    def similarity(self) -> torch.Tensor:
        """Columns divided by the diagonal, symmetrised.

        A zero diagonal entry (a task whose self-affinity was never credited, as after
        a short warm-up) makes the reference pass NaN/inf to scikit-learn, which
        rejects it; those entries are zeroed here so that the loop keeps running.
        """
        normalised = self.affinity / torch.diagonal(self.affinity).unsqueeze(0)
        return torch.nan_to_num((normalised + normalised.T) / 2, nan=0.0, posinf=0.0, neginf=0.0)

    def next_groups(self, previous: list[list[int]]) -> list[list[int]]:
        """Affinity propagation on the similarity, retried as the reference does."""
        similarity = self.similarity().numpy()
        convergence_iter = CONVERGENCE_ITER
        for _ in range(MAX_TRIES):
            clustering = AffinityPropagation(affinity="precomputed", convergence_iter=convergence_iter)
            labels = clustering.fit_predict(similarity)
            centers = clustering.cluster_centers_indices_
            if len(centers) > 0:
                return [[task for task in range(self.num_tasks) if labels[task] == c] for c in range(len(centers))]
            convergence_iter += 100
        return previous


class ReferenceLoop(MultiTaskMethod):
    """The reference code's selective-update batch behind the library's method interface.

    Phases: ``forward``, ``backward``, ``optimizer``, and ``affinity`` (the per-group
    affinity update and the per-batch clustering).

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> loop = ReferenceLoop(torch.optim.SGD(model.parameters(), lr=0.1), 3, warmup_steps=1)
        >>> x = torch.randn(8, 4)
        >>> for _ in range(3):
        ...     losses = loop.step(lambda: list(model(x).pow(2).mean(0)))
        >>> sorted(task for group in loop.groups for task in group)
        [0, 1, 2]
    """

    name = "reference"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        warmup_steps: int,
        profile: bool = False,
        nonfinite: str = "propagate",
    ) -> None:
        if nonfinite != "propagate":
            raise ValueError(f"the reference loop has no non-finite guard (nonfinite='propagate'), got {nonfinite!r}")
        super().__init__(optimizer, num_tasks, profile=profile, nonfinite=nonfinite)
        self.warmup_steps = warmup_steps
        self.tracker = ReferenceAffinity(num_tasks)
        self.groups: list[list[int]] = [[task] for task in range(num_tasks)]
        self._steps_done = 0

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        self._timer.reset()
        order = list(self.groups)
        random.shuffle(order)
        self.tracker.start_batch()
        if len(order) == 1:
            order = order * 2
        first: list[torch.Tensor] | None = None
        for group in order:
            losses = self._forward(closure)
            if first is None:
                first = losses
            self.optimizer.zero_grad()
            with self._timer.phase("backward"):
                torch.stack([losses[task] for task in group]).sum().backward()
            with self._timer.phase("optimizer"):
                self.optimizer.step()
            with self._timer.phase("affinity"):
                self.tracker.update(group, losses)
        self._steps_done += 1
        # The reference regroups at the start of every batch after warm-up; doing it at the
        # end of the previous one is the same work in the same sequence, and keeps
        # `groups` what the coming batch uses (as SelectiveGroupUpdate's does).
        if self._steps_done >= self.warmup_steps:
            with self._timer.phase("affinity"):
                self.groups = self.tracker.next_groups(self.groups)
        return detached(first)


LIBRARY = "SelectiveGroupUpdate"
REFERENCE = "reference loop"


def create_loop(
    name: str, optimizer: torch.optim.Optimizer, num_tasks: int, shared_params: Any = None, **options: Any
) -> MultiTaskMethod:
    """The reference loop or ``SelectiveGroupUpdate`` with the reference's crediting, by ``name``.

    Built with ``methods.create``'s signature (what the timing loop calls); ``options``
    are the bench's (``profile``; ``warmup_steps`` is passed by the caller's closure).
    """
    if name == REFERENCE:
        return ReferenceLoop(optimizer, num_tasks, **options)
    from selgroup_fast import SelectiveGroupUpdate

    return SelectiveGroupUpdate(optimizer, num_tasks, attribution="reference", **options)


def comparison_markdown(results: list[MethodResult]) -> str:
    """The two rows (clustering + affinity, total, groups) and, with both, the ratios."""
    header = [
        "loop",
        "forward (s)",
        "backprop (s)",
        "optimizer step (s)",
        "clustering + affinity (s)",
        "share",
        "total (s)",
        "groups",
    ]
    rows = [
        [
            result.method,
            f"{result.phases['forward']:.4f}",
            f"{result.phases['backward']:.4f}",
            f"{result.phases['optimizer']:.4f}",
            f"{result.phases['affinity']:.4f}",
            f"{100 * result.shares['affinity']:.1f} %",
            f"{result.total:.4f}",
            "–" if result.groups_mean is None else f"{result.groups_mean:.2f}",
        ]
        for result in results
    ]
    text = markdown_table(header, rows)
    if len(results) == 2:
        reference, library = results
        library_affinity = library.phases["affinity"]
        affinity_ratio = reference.phases["affinity"] / library_affinity if library_affinity else float("inf")
        text += (
            f"\nReference loop / SelectiveGroupUpdate: clustering + affinity {affinity_ratio:.1f}×, "
            f"total per batch {reference.ratio:.2f}× ± {reference.ratio_mad:.2f} (paired per round, ± MAD).\n"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--only", choices=["reference", "library"], help="run one of the two loops only")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("benchmarks/results/reference_loop.md"),
        help="the Markdown file to write (default: benchmarks/results/reference_loop.md)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name for name, side in ((REFERENCE, "reference"), (LIBRARY, "library")) if args.only in (None, side)]
    try:
        settings = run_settings(args)
        config = settings.config
        print(f"reference_loop: {describe(settings)}", file=sys.stderr)
        random.seed(config.seed)
        workload = prepare_workload(settings.factory, config.request(settings.tasks))
    except (UsageError, ModelError) as error:
        parser.error(str(error))

    def create(name: str, optimizer: torch.optim.Optimizer, num_tasks: int, **options: Any) -> MultiTaskMethod:
        return create_loop(name, optimizer, num_tasks, **options, warmup_steps=config.warmup)

    results: list[MethodResult] = run_methods(names, workload, config, create=create, baseline=LIBRARY)

    env = environment(config.device)
    machine, versions = env["machine"], env["versions"]
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    text = "\n".join(
        [
            "## Selective updates: the reference code's loop against SelectiveGroupUpdate",
            "",
            f"* Command: `{shlex.join(['python', 'benchmarks/reference_loop.py', *argv])}`",
            f"* Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"* Machine: {machine['cpu']} ({machine['cpu_cores']} cores){gpu}",
            f"* Versions: {', '.join(f'{k} {v}' for k, v in versions.items() if v is not None)}",
            f"* Run: {describe(settings).splitlines()[0]}; both with warm-up {config.warmup} steps "
            "(one group per task) before the measured steps, the reference's crediting, medians; the two loops "
            "take turns round by round (selgroup-bench's interleaved rounds)",
            "",
            comparison_markdown(results),
        ]
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
