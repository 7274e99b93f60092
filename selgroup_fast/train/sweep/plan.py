"""What a sweep runs: method variants, the shared size, the runs, and plans read from JSON files.

A plan file (``selgroup_fast/train/sweep/plans/NAME.json`` for the built-in ones, or any path) is
one JSON object; every key is checked, and a malformed file is one :class:`PlanError` line that
names the file and the key. See docs/training.md ("Evidence sweeps") for the format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ...cli_common import UsageError
from ...tasks import PRESETS


class PlanError(UsageError):
    """A malformed plan file or an impossible plan (the command prints it as one ``error:`` line)."""


@dataclass(frozen=True)
class Variant:
    """A method and its ``--method-option`` settings, e.g. ``selective:grouping=random:2``."""

    method: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME[:KEY=VALUE[,KEY=VALUE...]]`` -> Variant (options split at commas that start a ``KEY=``).

        >>> Variant.parse("selective:grouping=random:2,decay=1e-4")
        Variant(method='selective', options=(('grouping', 'random:2'), ('decay', '1e-4')))
        >>> Variant.parse("gd").label
        'gd'
        """
        method, _, rest = text.strip().partition(":")
        if not method:
            raise PlanError(f"a method variant needs a method name, got {text!r}")
        options = []
        for item in re.split(r",(?=[A-Za-z_]\w*=)", rest) if rest else []:
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise PlanError(f"method options are KEY=VALUE, got {item!r} in {text!r}")
            options.append((key.strip(), value.strip()))
        return cls(method, tuple(options))

    @property
    def label(self) -> str:
        """The text :meth:`parse` reads back."""
        if not self.options:
            return self.method
        return self.method + ":" + ",".join(f"{key}={value}" for key, value in self.options)

    @property
    def folder_name(self) -> str:
        """A file-system-safe name: ``selective__grouping-random_2``."""
        parts = [self.method, *(f"{key}-{value}" for key, value in self.options)]
        return re.sub(r"[^A-Za-z0-9_.\-]", "_", "__".join(parts))


@dataclass(frozen=True)
class Size:
    """The flags every run of a sweep shares (model, data, schedule): the same budget for all.

    The defaults are the CPU sweep's size (benchmarks/results/train_sweep/README.md says why): timm's
    6-block, 64-wide test ViT at 32 px with 8 px patches; Adam, lr 1e-3, poly decay; 400 iterations.
    """

    backbone: str = "test_vit"
    img_size: int = 32
    patch_size: int = 8
    batch_size: int = 8
    iters: int = 400
    lr: float = 1e-3
    #: evaluate every N iterations; 0: once, at the end
    eval_every: int = 0
    dataset: str = "scenes"
    # The trainer's defaults, written out so that a later change of a default cannot mix two settings.
    weight_decay: float = 1e-6
    optimizer: str = "adam"
    schedule: str = "poly"
    # Data loaded in the training process, between the timed steps: no worker competes with the step.
    workers: int = 0
    #: more ``selgroup-train`` arguments for every run
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "batch_size", "iters"):
            if getattr(self, name) < 1:
                raise PlanError(f"size: {name} must be positive, got {getattr(self, name)}")
        if self.eval_every < 0 or self.workers < 0:
            raise PlanError("size: eval_every and workers must be >= 0")

    def flags(self) -> list[str]:
        return [
            "--dataset",
            self.dataset,
            "--backbone",
            self.backbone,
            "--img-size",
            str(self.img_size),
            "--patch-size",
            str(self.patch_size),
            "--batch-size",
            str(self.batch_size),
            "--iters",
            str(self.iters),
            "--lr",
            repr(self.lr),
            "--weight-decay",
            repr(self.weight_decay),
            "--optimizer",
            self.optimizer,
            "--schedule",
            self.schedule,
            "--eval-every",
            str(self.eval_every or self.iters),
            "--checkpoint-every",
            str(self.iters),
            "--workers",
            str(self.workers),
            *self.extra,
        ]


@dataclass(frozen=True)
class Run:
    """One subprocess: the single-task baselines of a preset (``variant`` None) or one method seed."""

    preset: str
    variant: Variant | None
    seed: int

    @property
    def is_baseline(self) -> bool:
        return self.variant is None

    def folder(self, root: Path) -> Path:
        if self.variant is None:
            return root / self.preset / "baseline"
        return root / self.preset / self.variant.folder_name / f"seed{self.seed}"

    def result_file(self, root: Path) -> Path:
        return self.folder(root) / ("baseline.json" if self.is_baseline else "results.json")

    def arguments(self, root: Path, size: Size) -> list[str]:
        """The ``selgroup-train`` arguments of this run."""
        head = ["baseline"] if self.variant is None else []
        method = []
        if self.variant is not None:
            method = ["--method", self.variant.method]
            for key, value in self.variant.options:
                method += ["--method-option", f"{key}={value}"]
        out = ["--seed", str(self.seed), "--out", str(self.folder(root))]
        return [*head, "--tasks", self.preset, *method, *size.flags(), *out]


@dataclass(frozen=True)
class Ablation:
    """One option of a method varied over ``values``; the method's plain run stands for ``default``."""

    title: str
    method: str
    key: str
    default: str
    values: tuple[str, ...]

    @property
    def variants(self) -> tuple[Variant, ...]:
        return tuple(Variant(self.method, ((self.key, value),)) for value in self.values)

    @property
    def labels(self) -> tuple[str, ...]:
        """The table's rows: the plain method (the default) first, then every value."""
        return (self.method, *(variant.label for variant in self.variants))


@dataclass(frozen=True)
class Plan:
    """The runs in the order they start, each preset's ablations (for the table), and the plan's size.

    ``timing``: the runs are rounds of interleaved methods (:func:`timing_runs`), tabulated as times.
    """

    runs: tuple[Run, ...]
    ablations: dict[str, tuple[Ablation, ...]] = field(default_factory=dict)
    size: Size = Size()
    timing: bool = False


def timing_runs(preset: str, variants: Sequence[Variant], rounds: int) -> tuple[Run, ...]:
    """``rounds`` rounds of every variant, one run each at seed = the round, the order rotated every round.

    Run one at a time, the rounds interleave the methods so that a change of the machine's
    load hits all of them alike; each round's ratios to GD are taken within the round.

    >>> [(run.variant.label, run.seed) for run in timing_runs("nyud", [Variant("gd"), Variant("pcgrad")], 2)]
    [('gd', 0), ('pcgrad', 0), ('pcgrad', 1), ('gd', 1)]
    """
    runs: list[Run] = []
    for round_ in range(rounds):
        shift = round_ % len(variants)
        runs += [Run(preset, variant, round_) for variant in [*variants[shift:], *variants[:shift]]]
    return tuple(runs)


# --------------------------------------------------------------------------- plan files

_PLAN_KEYS = {"description", "size", "presets", "timing"}
_PRESET_KEYS = {"baseline_seed", "methods", "ablations"}
_METHODS_KEYS = {"variants", "seeds", "first_seeds"}
_ABLATION_KEYS = {"title", "method", "key", "default", "values", "seeds", "first_seeds"}
_TIMING_KEYS = {"preset", "variants", "rounds"}
_SIZE_TYPES: dict[str, type | tuple[type, ...]] = {
    "backbone": str,
    "img_size": int,
    "patch_size": int,
    "batch_size": int,
    "iters": int,
    "lr": (int, float),
    "eval_every": int,
    "dataset": str,
    "weight_decay": (int, float),
    "optimizer": str,
    "schedule": str,
    "workers": int,
    "extra": list,
}
assert set(_SIZE_TYPES) == {f.name for f in fields(Size)}


def _object(value: Any, where: str, keys: set[str], required: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PlanError(f"{where}: expected an object, got {json.dumps(value)}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise PlanError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(keys))})")
    missing = [key for key in required if key not in value]
    if missing:
        raise PlanError(f"{where}: missing key {missing[0]!r}")
    return value


def _typed(value: Any, where: str, kind: type | tuple[type, ...]) -> Any:
    # bool is an int to Python; no plan value is meant as one.
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise PlanError(f"{where}: expected {names}, got {json.dumps(value)}")
    return value


def _count(value: Any, where: str, least: int = 1) -> int:
    if _typed(value, where, int) < least:
        raise PlanError(f"{where}: expected an integer >= {least}, got {value}")
    return value


def _strings(value: Any, where: str) -> list[str]:
    items = _typed(value, where, list)
    if not items:
        raise PlanError(f"{where}: expected a non-empty list")
    return [_typed(item, f"{where}[{i}]", str) for i, item in enumerate(items)]


def _variant(text: str, where: str) -> Variant:
    try:
        variant = Variant.parse(text)
        check_variant(variant)
    except PlanError as error:
        raise PlanError(f"{where}: {error}") from None
    return variant


def _seeds(entry: dict[str, Any], where: str) -> tuple[int, int]:
    seeds = _count(entry.get("seeds", 1), f"{where}.seeds")
    first = _count(entry.get("first_seeds", seeds), f"{where}.first_seeds")
    if first > seeds:
        raise PlanError(f"{where}.first_seeds: {first} is more than seeds ({seeds})")
    return seeds, first


def plan_from_data(data: Any, where: str = "plan") -> Plan:
    """A :class:`Plan` from a plan file's parsed JSON; ``where`` prefixes every error (the file's name).

    Runs start in an order that leaves a sweep cut short with every entry's ``first_seeds``: every
    preset's baselines (at ``baseline_seed``); then, preset by preset, every entry's variants at seeds
    ``0 .. first_seeds - 1``; then, seed by seed, every entry's further seeds up to ``seeds - 1``.

    >>> plan = plan_from_data({"presets": {"nyud": {"methods": [{"variants": ["gd", "pcgrad"], "seeds": 2,
    ...     "first_seeds": 1}]}}})
    >>> [(run.variant.label if run.variant else "baseline", run.seed) for run in plan.runs]
    [('baseline', 0), ('gd', 0), ('pcgrad', 0), ('gd', 1), ('pcgrad', 1)]
    """
    top = _object(data, where, _PLAN_KEYS)
    if ("presets" in top) == ("timing" in top):
        raise PlanError(f"{where}: needs exactly one of 'presets' (a sweep) and 'timing' (a timing plan)")
    if "description" in top:
        _typed(top["description"], f"{where}.description", str)
    size_data = dict(_object(top.get("size", {}), f"{where}.size", set(_SIZE_TYPES)))
    for key, value in size_data.items():
        _typed(value, f"{where}.size.{key}", _SIZE_TYPES[key])
    if "extra" in size_data:
        size_data["extra"] = tuple(_strings(size_data["extra"], f"{where}.size.extra"))
    try:
        size = Size(**size_data)
    except PlanError as error:
        raise PlanError(f"{where}.{error}") from None
    if "timing" in top:
        timing = _object(top["timing"], f"{where}.timing", _TIMING_KEYS, ("preset", "variants", "rounds"))
        timing_preset = _preset_name(timing["preset"], f"{where}.timing.preset")
        variants = [
            _variant(text, f"{where}.timing.variants[{i}]")
            for i, text in enumerate(_strings(timing["variants"], f"{where}.timing.variants"))
        ]
        rounds = _count(timing["rounds"], f"{where}.timing.rounds")
        return Plan(timing_runs(timing_preset, variants, rounds), size=size, timing=True)
    presets = _typed(top["presets"], f"{where}.presets", dict)
    if not presets:
        raise PlanError(f"{where}.presets: expected at least one preset")
    baselines: list[Run] = []
    first_pass: list[Run] = []
    later: list[tuple[int, Run]] = []  # (seed, run), sorted by seed (stably) at the end
    ablations: dict[str, tuple[Ablation, ...]] = {}
    for name, body in presets.items():
        at = f"{where}.presets.{name}"
        _preset_name(name, at)
        preset = _object(body, at, _PRESET_KEYS)
        baselines.append(Run(name, None, _count(preset.get("baseline_seed", 0), f"{at}.baseline_seed", least=0)))
        entries: list[tuple[list[Variant], int, int]] = []
        for i, entry in enumerate(_typed(preset.get("methods", []), f"{at}.methods", list)):
            here = f"{at}.methods[{i}]"
            entry = _object(entry, here, _METHODS_KEYS, ("variants",))
            variants = [
                _variant(text, f"{here}.variants[{j}]")
                for j, text in enumerate(_strings(entry["variants"], f"{here}.variants"))
            ]
            entries.append((variants, *_seeds(entry, here)))
        kept = []
        for i, entry in enumerate(_typed(preset.get("ablations", []), f"{at}.ablations", list)):
            here = f"{at}.ablations[{i}]"
            entry = _object(entry, here, _ABLATION_KEYS, ("title", "method", "key", "default", "values"))
            ablation = Ablation(
                _typed(entry["title"], f"{here}.title", str),
                _typed(entry["method"], f"{here}.method", str),
                _typed(entry["key"], f"{here}.key", str),
                _typed(entry["default"], f"{here}.default", str),
                tuple(_strings(entry["values"], f"{here}.values")),
            )
            for j, variant in enumerate(ablation.variants):
                _variant(variant.label, f"{here}.values[{j}]")
            kept.append(ablation)
            entries.append((list(ablation.variants), *_seeds(entry, here)))
        ablations[name] = tuple(kept)
        for variants, seeds, first in entries:
            first_pass += [Run(name, variant, seed) for variant in variants for seed in range(first)]
            later += [(seed, Run(name, variant, seed)) for seed in range(first, seeds) for variant in variants]
    runs = (*baselines, *first_pass, *(run for _, run in sorted(later, key=lambda item: item[0])))
    if len(set(runs)) != len(runs):
        duplicate = next(run for run in runs if runs.count(run) > 1)
        label = duplicate.variant.label if duplicate.variant else "baseline"
        raise PlanError(f"{where}: {duplicate.preset} {label} seed {duplicate.seed} is listed twice")
    return Plan(runs, {name: kept for name, kept in ablations.items() if kept}, size)


def _preset_name(value: Any, where: str) -> str:
    if _typed(value, where, str) not in PRESETS:
        raise PlanError(f"{where}: unknown preset {value!r}; presets: {', '.join(PRESETS)}")
    return value


def builtin_plans() -> list[str]:
    """The names of the plans shipped with the package (``selgroup-train sweep NAME``)."""
    folder = resources.files(__package__).joinpath("plans")
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def load_plan(name_or_path: str) -> Plan:
    """A built-in plan by name (:func:`builtin_plans`) or a plan file by path.

    >>> plan = load_plan("issue12")
    >>> sum(run.is_baseline for run in plan.runs), len(plan.runs)
    (2, 57)
    """
    if name_or_path in builtin_plans():
        where = f"{name_or_path}.json"
        text = resources.files(__package__).joinpath("plans").joinpath(where).read_text()
    else:
        where = name_or_path
        try:
            text = Path(name_or_path).read_text()
        except OSError as error:
            raise PlanError(
                f"no plan {name_or_path!r}: not a built-in plan ({', '.join(builtin_plans())}) "
                f"and not a readable file ({error.strerror})"
            ) from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise PlanError(f"{where}: not valid JSON ({error})") from None
    return plan_from_data(data, where)


def check_variant(variant: Variant) -> None:
    """Refuses an unknown method or an option it does not take (before anything runs).

    The method is built once, as the trainer builds it, on a tiny stand-in model: the
    options are then checked by the method itself (its constructor or its op), not by a
    second list of them here.
    """
    import torch

    from ... import methods
    from ..config import TrainError, method_error, parse_method_option

    if variant.method not in methods.available():
        raise PlanError(f"unknown method {variant.method!r}; available: {', '.join(methods.available())}")
    try:
        options = dict(parse_method_option(f"{key}={value}") for key, value in variant.options)
    except TrainError as error:
        raise PlanError(str(error)) from None
    encoder, heads = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD([*encoder.parameters(), *heads.parameters()], lr=0.1)
    try:
        methods.create(variant.method, optimizer, 3, shared_params=list(encoder.parameters()), **options)
    except (TypeError, ValueError) as error:
        raise PlanError(method_error(variant.method, error)) from None
