"""selgroup-bench: the command's outputs, its pure pieces, and the reference-loop comparison script."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import bench_toy_factory
import pytest
import torch
import torch.nn.functional as F
from conftest import load_benchmark

import selgroup_fast
from selgroup_fast.bench import (
    BenchConfig,
    main,
    median_breakdown,
    prepare_workload,
    run_methods,
    run_suite,
    write_outputs,
)
from selgroup_fast.bench.cli import _int_list
from selgroup_fast.bench.timing import MethodResult, default_methods, method_options, rotated, set_paired_ratios
from selgroup_fast.methods import MultiTaskMethod
from selgroup_fast.methods.base import detached
from selgroup_fast.models import (
    ModelError,
    ModelRequest,
    MultiTaskViT,
    load_factory,
    parse_tasks,
    synthetic_batch,
    vit_bench_model,
)
from selgroup_fast.profiling import PHASES
from selgroup_fast.tasks import task_losses

pytest.importorskip("timm")
pytest.importorskip("matplotlib")

# timm's own tiny ViT test configuration (64 wide, 6 blocks): the same code path as
# vit_tiny_patch16_224 at a fraction of the cost.
TINY = ["--backbone", "test_vit", "--img-size", "32", "--patch-size", "8", "--batch-size", "2"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


reference_loop = load_benchmark("reference_loop")


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path


# --- the command -------------------------------------------------------------------


def test_main_writes_every_report(tmp_path, capsys):
    names = default_methods()
    args = [*TINY, "--tasks", "3", "--rounds", "2", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)]
    assert main(args) == 0

    printed = capsys.readouterr().out
    assert "clustering + affinity" in printed and "Per-batch breakdown, K = 3" in printed
    for name in names:
        assert any(line.startswith(name + " ") for line in printed.splitlines()), name

    record = json.loads((tmp_path / "results.json").read_text())
    assert record["command"].startswith("selgroup-bench --backbone test_vit")
    assert record["machine"]["cpu_cores"] >= 1 and record["machine"]["cpu"]
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["selgroup_fast"] == selgroup_fast.__version__
    assert record["date"][:4].isdigit() and record["config"]["rounds"] == 2 and record["config"]["amp"] is None
    assert record["model"] == {
        "factory": "selgroup_fast.models.vit:vit_bench_model",
        "description": "test_vit (random init), 32 px images, patch 8",
    }
    assert record["breakdown_num_tasks"] == 3
    (run,) = record["runs"]
    assert run["tasks"] == ["semseg", "depth", "normals"]
    assert [r["method"] for r in run["results"]] == names
    for result in run["results"]:
        assert result["total_s"] > 0 and math.isfinite(result["total_s"])
        phases = [result[f"{phase}_s"] for phase in PHASES]
        assert all(seconds >= 0 for seconds in phases) and result["forward_s"] > 0
        assert result["other_s"] == pytest.approx(max(result["total_s"] - sum(phases), 0.0))
        assert result["forward_share"] == pytest.approx(result["forward_s"] / result["total_s"])
        assert result["peak_memory_mib"] is None or result["peak_memory_mib"] >= 0
        if result["method"] == "selective":
            assert 1 <= result["groups_mean"] <= 3
        assert result["steps"] == 2 and len(result["round_totals_s"]) == 2
        gd_rounds = run["results"][0]["round_totals_s"]
        ratios = [mine / gd for mine, gd in zip(result["round_totals_s"], gd_rounds, strict=False)]
        assert result["round_ratios_to_gd"] == pytest.approx(ratios)
        assert result["ratio_to_gd"] == pytest.approx(sum(ratios) / 2)  # the median of two
        assert result["ratio_to_gd_mad"] == pytest.approx(abs(ratios[0] - ratios[1]) / 2)
    assert run["results"][0]["ratio_to_gd"] == 1.0 and run["results"][0]["ratio_to_gd_mad"] == 0.0

    with (tmp_path / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == names
    assert all(float(row["total_s"]) > 0 and row["num_tasks"] == "3" for row in rows)

    table = (tmp_path / "results.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| method"))
    assert "forward" in header and "backprop" in header and "total (s)" in header and "× GD (± MAD)" in header
    body = [line for line in table if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split("|")[1].strip() for line in body] == names
    assert all(line.count("|") == header.count("|") for line in body)

    summary = (tmp_path / "README.md").read_text()
    assert record["command"] in summary and record["machine"]["cpu"] in summary
    assert any(note.startswith("GD drift: GD's median step per round") for note in record["notes"])
    assert "![breakdown](breakdown.png)" in summary
    _assert_png(tmp_path / "breakdown.png")
    assert not (tmp_path / "sweep.png").exists()


class ToyGroupedUpdate(MultiTaskMethod):
    """A stand-in for ``selective`` with its interface: one task per group during
    ``warmup_steps`` batches, then the groups [[0], [1, ...]]; one forward, backward
    and optimizer step per group, and a (trivial) timed affinity phase."""

    def __init__(self, optimizer, num_tasks, *, warmup_steps, profile=False, nonfinite="skip"):
        super().__init__(optimizer, num_tasks, profile=profile, nonfinite=nonfinite)
        self.warmup_steps = warmup_steps
        self.groups = [[task] for task in range(num_tasks)]
        self.steps_done = 0

    def step(self, closure):
        self._timer.reset()
        for group in self.groups:
            self.optimizer.zero_grad()
            losses = self._forward(closure)
            with self._timer.phase("backward"):
                torch.stack([losses[task] for task in group]).sum().backward()
            with self._timer.phase("optimizer"):
                self.optimizer.step()
        self.steps_done += 1
        with self._timer.phase("affinity"):
            if self.steps_done >= self.warmup_steps:
                self.groups = [[0], list(range(1, self.num_tasks))]
        return detached(losses)


def test_sweep_and_a_grouped_method(tmp_path, monkeypatch):
    monkeypatch.setitem(selgroup_fast.methods._REGISTRY, "selective", ("grouping", f"{__name__}:ToyGroupedUpdate"))
    args = [*TINY, "--methods", "gd,selective", "--tasks", "3", "--rounds", "1", "--steps", "1", "--warmup", "2"]
    assert main([*args, "--sweep-tasks", "2,3", "--out", str(tmp_path)]) == 0
    _assert_png(tmp_path / "sweep.png")
    record = json.loads((tmp_path / "results.json").read_text())
    assert [run["num_tasks"] for run in record["runs"]] == [2, 3]
    gd, toy = record["runs"][1]["results"]
    # built with warmup_steps = the bench's warm-up (2): the measured step uses 2 groups
    assert toy["groups_mean"] == 2.0 and gd["groups_mean"] is None
    assert toy["affinity_s"] > 0 and gd["affinity_s"] == 0.0
    assert toy["ratio_to_gd"] == pytest.approx(toy["total_s"] / gd["total_s"])
    with (tmp_path / "results.csv").open() as handle:
        assert [(row["method"], row["num_tasks"]) for row in csv.DictReader(handle)] == [
            ("gd", "2"),
            ("selective", "2"),
            ("gd", "3"),
            ("selective", "3"),
        ]
    markdown = (tmp_path / "results.md").read_text()
    assert "| method | K=2 | K=3 |" in markdown and "| selective | " in markdown
    assert "![sweep](sweep.png)" in (tmp_path / "README.md").read_text()


# --- your own model (--model) and the Python API -----------------------------------------


def test_a_user_factory_gets_the_same_outputs(tmp_path, capsys):
    args = ["--model", "bench_toy_factory:build", "--methods", "gd,pcgrad,uw", "--tasks", "4", "--batch-size", "5"]
    assert (
        main([*args, "--rounds", "2", "--steps", "1", "--warmup", "1", "--sweep-tasks", "2", "--out", str(tmp_path)])
        == 0
    )
    assert "Per-batch breakdown, K = 4" in capsys.readouterr().out
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["model"] == {"factory": "bench_toy_factory:build", "description": "tiny MLP"}
    assert record["breakdown_num_tasks"] == 4
    assert [(run["num_tasks"], run["tasks"][-1]) for run in record["runs"]] == [(2, "task1"), (4, "task3")]
    for run in record["runs"]:
        assert [r["method"] for r in run["results"]] == ["gd", "pcgrad", "uw"]
        assert all(r["total_s"] > 0 and r["backward_s"] > 0 for r in run["results"])
        assert run["results"][1]["manipulation_s"] > 0  # PCGrad's projections ran on the toy's shared trunk
    for name in ["results.csv", "results.md", "README.md"]:
        assert (tmp_path / name).stat().st_size > 0
    _assert_png(tmp_path / "breakdown.png")
    _assert_png(tmp_path / "sweep.png")


def test_a_factory_from_python_with_bf16_autocast(tmp_path):
    config = BenchConfig(batch_size=4, rounds=2, steps=1, warmup=1, amp="bf16")
    bench_toy_factory.AUTOCAST_SEEN.clear()
    suite = run_suite(["gd", "famo"], config, bench_toy_factory.build, ["2"])
    # every closure call ran under autocast, except build_model's check of the closure
    assert bench_toy_factory.AUTOCAST_SEEN[0] is None
    assert set(bench_toy_factory.AUTOCAST_SEEN[1:]) == {torch.bfloat16}
    assert suite.model == "bench_toy_factory:build" and suite.breakdown == 2
    written = write_outputs(suite, tmp_path, command="run_suite(...)")
    assert {path.name for path in written} == {
        "results.json",
        "results.csv",
        "results.md",
        "README.md",
        "breakdown.png",
    }
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["amp"] == "bf16" and record["command"] == "run_suite(...)"
    assert any("torch.autocast(bf16)" in note for note in record["notes"])


def test_the_state_column_reports_each_method_s_state_bytes(tmp_path):
    """Issue #23: the bench reports what each method keeps between steps, re-derived here from the shapes."""
    K = 3
    suite = run_suite(
        ["gd", "db_mtl", "moco", "uw", "selective"],
        BenchConfig(batch_size=4, rounds=1, steps=1, warmup=1),
        bench_toy_factory.build,
        [str(K)],
    )
    width = sum(p.numel() for p in bench_toy_factory.build(BenchConfig().request(str(K))).shared_params)
    float32 = 4
    expected = {
        "gd": 0,
        "db_mtl": K * width * float32,  # the K×P EMA of the log losses' gradients
        "moco": K * width * float32 + K * float32,  # the K×P tracked gradients and λ
        # the K log-variances and their Adam's exp_avg, exp_avg_sq (K each) and its 0-d float32 step count
        "uw": 3 * K * float32 + float32,
        "selective": K * K * float32,  # the affinity
    }
    assert {result.method: result.state_bytes for result in suite.results[K]} == expected
    write_outputs(suite, tmp_path, command="run_suite(...)")
    record = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"]: r["state_bytes"] for r in record["runs"][0]["results"]} == expected
    lines = (tmp_path / "results.md").read_text().splitlines()[2:]
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line]
    column = header.index("state MiB")
    assert {row[0]: row[column] for row in rows} == {
        name: "–" if size == 0 else f"{size / 2**20:.3g}" for name, size in expected.items()
    }
    assert any(note.startswith("state MiB:") for note in record["notes"])


#: (method name, first shared weight before the step, after it) of every Recorder step, in order.
RECORDER_LOG: list[tuple[str, float, float]] = []


class Recorder(MultiTaskMethod):
    """Logs its steps into RECORDER_LOG; SGD-steps unless frozen."""

    def __init__(self, name, optimizer, num_tasks, *, frozen, profile=False, nonfinite="skip"):
        super().__init__(optimizer, num_tasks, profile=profile, nonfinite=nonfinite)
        self.name, self.frozen = name, frozen
        self.weight = optimizer.param_groups[0]["params"][0]

    def step(self, closure):
        self._timer.reset()
        before = self.weight.flatten()[0].item()
        losses = self._forward(closure)
        if not self.frozen:
            self.optimizer.zero_grad()
            torch.stack(losses).sum().backward()
            self.optimizer.step()
        RECORDER_LOG.append((self.name, before, self.weight.flatten()[0].item()))
        return detached(losses)


def test_interleaved_rounds_rotate_the_order_and_keep_each_method_s_weights():
    workload = prepare_workload(bench_toy_factory.build, ModelRequest(tasks="2", batch_size=4))
    initial = workload.bench.shared_params[0].flatten()[0].item()

    def create(name, optimizer, num_tasks, shared_params=None, **options):
        return Recorder(
            name,
            torch.optim.SGD(optimizer.param_groups[0]["params"], lr=0.5),
            num_tasks,
            frozen=name == "frozen",
            **options,
        )

    RECORDER_LOG.clear()
    config = BenchConfig(batch_size=4, rounds=2, steps=2, warmup=1)
    results = run_methods(["trained", "frozen"], workload, config, create=create, baseline="trained")
    names = [name for name, _, _ in RECORDER_LOG]
    # warm-up one after the other, then round 1 in the given order and round 2 rotated by 2 / 2 places
    assert names == [
        "trained",
        "frozen",
        "trained",
        "trained",
        "frozen",
        "frozen",
        "frozen",
        "frozen",
        "trained",
        "trained",
    ]
    trained = [(before, after) for name, before, after in RECORDER_LOG if name == "trained"]
    assert trained[0][0] == initial
    assert all(after != before for before, after in trained)
    assert all(trained[i][1] == trained[i + 1][0] for i in range(len(trained) - 1))  # its own weights, round to round
    assert all(before == after == initial for name, before, after in RECORDER_LOG if name == "frozen")
    assert [r.steps for r in results] == [4, 4] and [len(r.round_totals) for r in results] == [2, 2]
    assert results[0].round_ratios == [1.0, 1.0]
    assert results[1].round_ratios == pytest.approx(
        [f / t for f, t in zip(results[1].round_totals, results[0].round_totals, strict=False)]
    )


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_a_two_batch_method_is_timed_on_the_two_halves_of_the_batch(name):
    workload = prepare_workload(bench_toy_factory.build, ModelRequest(tasks="2", batch_size=4))
    steps = []  # the closures of each step

    def create(name, optimizer, num_tasks, shared_params=None, **options):
        method = selgroup_fast.methods.create(name, optimizer, num_tasks, shared_params=shared_params, **options)
        step = method.step
        method.step = lambda *closures: steps.append(closures) or step(*closures)
        return method

    config = BenchConfig(batch_size=4, rounds=2, steps=1, warmup=1)
    results = run_methods([name], workload, config, create=create, baseline=name)
    assert results[0].steps == 2 and len(steps) == 3
    assert all(closures == workload.bench.halves for closures in steps)
    workload.bench.halves = None  # a factory that does not split its batch
    with pytest.raises(ModelError, match=rf"^{name} reads two batches per step: the model's BenchModel.halves must"):
        run_methods([name], workload, config, baseline=name)


def test_the_built_in_model_s_halves_are_those_of_its_batch():
    built = vit_bench_model(ModelRequest("nyud", batch_size=4), backbone="test_vit", img_size=32)
    first, second = (torch.stack(half()[0]) for half in built.halves)
    torch.testing.assert_close((first + second) / 2, torch.stack(built.closure()[0]))  # each loss a mean over samples
    assert not torch.allclose(first, second)
    assert vit_bench_model(ModelRequest("2", batch_size=1), backbone="test_vit", img_size=32).halves is None


def test_rotation_and_paired_ratios_by_hand():
    assert [rotated(list("ABCDEF"), r, 3) for r in range(3)] == [list("ABCDEF"), list("CDEFAB"), list("EFABCD")]
    assert [rotated([1, 2], r, 4) for r in range(4)] == [[1, 2], [1, 2], [2, 1], [2, 1]]
    phases = dict.fromkeys(PHASES, 0.0)
    gd = MethodResult("gd", 4, phases, total=2.0, steps=3, round_totals=[2.0, 4.0, 1.0])
    uw = MethodResult("uw", 4, phases, total=2.0, steps=3, round_totals=[2.2, 3.6, 1.0])
    set_paired_ratios([gd, uw], "gd")
    assert uw.round_ratios == pytest.approx([1.1, 0.9, 1.0])
    assert uw.ratio == pytest.approx(1.0) and uw.ratio_mad == pytest.approx(0.1)
    assert gd.ratio == 1.0 and gd.ratio_mad == 0.0
    set_paired_ratios([uw], "gd")
    assert uw.round_ratios is None and uw.ratio is None and uw.ratio_mad is None


# --- clear errors: "selgroup-bench: error: ...", status 2, no traceback --------------------


def _run_main_expecting_usage_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("selgroup-bench: error: ")]
    return line


RUN = ["--tasks", "2", "--rounds", "1", "--steps", "1", "--warmup", "1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "gd,nope"], "unknown or unavailable method(s) 'nope'; available: gd"),
        ([*TINY[:2], "--img-size", "30", "--patch-size", "8"], "--img-size 30 must be a multiple of --patch-size 8"),
        (["--backbone", "resnet18", "--img-size", "32"], "--backbone 'resnet18' is not a timm ViT"),
        (["--backbone", "no_such_net", "--img-size", "32"], "--backbone 'no_such_net' is not a timm model name"),
        (["--tasks", "cityscapes"], "--tasks must be a positive number or one of nyud, pascal, taskonomy"),
        (["--device", "meta"], "--device meta: only cpu and cuda are supported"),
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--amp", "bf16", "--dtype", "float64"], "--amp bf16 autocasts float32 weights"),
        (["--model", "bench_toy_factory"], "--model must be 'package.module:factory'"),
        (["--model", "bench_toy_factory:build()"], "--model must be 'package.module:factory'"),
        (["--model", "no_such_module_q:build"], "cannot import 'no_such_module_q' for --model"),
        (["--model", "bench_toy_factory:missing"], "'bench_toy_factory' has no attribute 'missing'"),
        (["--model", "bench_toy_factory:NOT_CALLABLE"], "is a int, not a callable factory"),
        (
            ["--model", "bench_toy_factory:wrong_type"],
            "returned a TinyMultiTask, expected a selgroup_fast.models.BenchModel",
        ),
        (
            ["--model", "bench_toy_factory:wrong_losses"],
            "its closure: the closure returned 1 losses, expected num_tasks=2",
        ),
        (["--model", "bench_toy_factory:foreign_params"], "shared_params must hold trainable parameters of"),
        (
            ["--model", "bench_toy_factory:build", "--backbone", "test_vit"],
            "--backbone configure the built-in model only",
        ),
    ],
)
def test_usage_errors(args, message, capsys, tmp_path):
    line = _run_main_expecting_usage_error([*RUN, *args, "--out", str(tmp_path)], capsys)
    assert message in line
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_a_usage_error(capsys, tmp_path):
    line = _run_main_expecting_usage_error([*RUN, "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert "--device cuda: no usable GPU here" in line


def test_the_command_line_prints_one_error_line_and_exits_2():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    completed = subprocess.run(
        [sys.executable, "-m", "selgroup_fast.bench", "--methods", "nope", "--tasks", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "selgroup-bench: error: unknown or unavailable method(s) 'nope'" in completed.stderr


def test_load_factory_and_the_built_in_factory():
    assert load_factory("bench_toy_factory:build") is bench_toy_factory.build
    assert load_factory("selgroup_fast.models:vit_bench_model") is vit_bench_model
    with pytest.raises(ModelError, match="built 3 tasks, but 2 were asked for"):
        prepare_workload(lambda request: bench_toy_factory.build(ModelRequest("3")), ModelRequest("2"))
    with pytest.raises(ModelError, match="--tasks must be a positive number"):
        vit_bench_model(ModelRequest("cityscapes"), backbone="test_vit", img_size=32)
    built = vit_bench_model(ModelRequest("pascal", batch_size=2, seed=3), backbone="test_vit", img_size=32)
    again = vit_bench_model(ModelRequest("pascal", batch_size=2, seed=3), backbone="test_vit", img_size=32)
    assert built.task_names == ["semseg", "human_parts", "sal", "normals", "edge"]
    torch.testing.assert_close(
        torch.stack(built.closure()[0]), torch.stack(again.closure()[0])
    )  # same seed, same losses
    assert {id(p) for p in built.shared_params} == {id(p) for p in built.model.encoder.parameters()}
    assert len(built.task_params) == 2 * 5  # one 1x1 convolution (weight, bias) per task


# --- pure pieces -------------------------------------------------------------------


def test_median_breakdown_by_hand():
    samples = [
        {"forward": 1.0, "backward": 2.0},
        {"forward": 3.0, "backward": 4.0, "affinity": 1.0},
        {"forward": 2.0, "backward": 10.0},
    ]
    phases, total = median_breakdown(samples, [5.0, 9.0, 7.0])
    assert phases == {"forward": 2.0, "backward": 4.0, "manipulation": 0.0, "optimizer": 0.0, "affinity": 0.0}
    assert total == 7.0
    result = MethodResult("x", 2, phases, total, steps=3)
    assert result.other == pytest.approx(1.0)
    assert result.shares["forward"] == pytest.approx(2 / 7) and result.shares["backward"] == pytest.approx(4 / 7)
    # medians of an even count average the middle two
    assert median_breakdown([{"forward": 1.0}, {"forward": 2.0}], [1.0, 4.0]) == (
        {"forward": 1.5, "backward": 0.0, "manipulation": 0.0, "optimizer": 0.0, "affinity": 0.0},
        2.5,
    )
    with pytest.raises(ValueError):
        median_breakdown([], [])


def test_other_is_never_negative():
    phases = dict.fromkeys(PHASES, 0.0) | {"forward": 2.0}
    assert MethodResult("gd", 4, phases, total=1.5, steps=1).other == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("nyud", ["semseg", "depth", "normals", "edge"]),
        ("pascal", ["semseg", "human_parts", "sal", "normals", "edge"]),
        ("6", ["semseg", "depth", "normals", "edge", "semseg_2", "depth_2"]),
    ],
)
def test_task_presets_and_counts(text, expected):
    assert [spec.name for spec in parse_tasks(text)] == expected


def test_task_kinds():
    assert len(parse_tasks("TASKONOMY")) == 11
    assert {spec.kind for spec in parse_tasks("taskonomy")} == {"regression"}
    kinds = [spec.kind for spec in parse_tasks("5")]
    assert kinds == ["segmentation", "regression", "regression", "segmentation", "segmentation"]
    for bad in ["0", "-2", "cityscapes", "2.5"]:
        with pytest.raises(ValueError):
            parse_tasks(bad)


def test_sweep_list_parsing():
    assert _int_list("16,2, 4,4") == [2, 4, 16]
    for bad in ["", "a,2", "0,2"]:
        with pytest.raises(Exception, match="expected"):
            _int_list(bad)


def test_default_methods_put_gd_first_and_selective_gets_its_warmup():
    names = default_methods()
    assert names[0] == "gd" and sorted(names) == sorted(selgroup_fast.methods.available())
    unguarded = {"nonfinite": "propagate"}
    assert method_options("selective", 7) == {"warmup_steps": 7, **unguarded}
    assert method_options("pcgrad", 7) == unguarded
    assert method_options("pcgrad", 7, "representation") == {"space": "representation", **unguarded}
    assert method_options("uw", 7, "representation") == unguarded == method_options("gd", 7, "representation")


def test_gradient_methods_in_representation_space(tmp_path, capsys):
    args = [*TINY, "--methods", "gd,pcgrad", "--tasks", "2", "--rounds", "1", "--steps", "1", "--warmup", "1"]
    assert main([*args, "--space", "representation", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert "gradient methods in representation space" in printed.out + printed.err
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["space"] == "representation"
    assert [result["method"] for result in record["runs"][0]["results"]] == ["gd", "pcgrad"]


def test_model_shapes_losses_and_head_isolation():
    tasks = parse_tasks("nyud")
    torch.manual_seed(0)
    model = MultiTaskViT(tasks, "test_vit", img_size=32, patch_size=8)
    batch = synthetic_batch(tasks, 3, 32, "cpu", torch.float32, seed=5)
    again = synthetic_batch(tasks, 3, 32, "cpu", torch.float32, seed=5)
    assert torch.equal(batch.images, again.images)
    assert all(torch.equal(a, b) for a, b in zip(batch.targets, again.targets, strict=False))
    assert batch.targets[0].shape == (3, 32, 32) and batch.targets[0].dtype == torch.int64
    assert 0 <= batch.targets[0].min() and batch.targets[0].max() < 40
    assert batch.targets[1].shape == (3, 1, 32, 32) and batch.targets[2].shape == (3, 3, 32, 32)

    outputs = model(batch.images)
    assert [tuple(out.shape) for out in outputs] == [(3, 40, 32, 32), (3, 1, 32, 32), (3, 3, 32, 32), (3, 2, 32, 32)]
    losses = task_losses(outputs, batch.targets, tasks)
    torch.testing.assert_close(losses[0], F.cross_entropy(outputs[0], batch.targets[0]))
    torch.testing.assert_close(losses[1], (outputs[1] - batch.targets[1]).abs().mean())
    torch.testing.assert_close(losses[3], F.cross_entropy(outputs[3], batch.targets[3]))
    assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses)

    losses[1].backward()
    assert model.decoders[1].weight.grad is not None and model.decoders[1].weight.grad.abs().sum() > 0
    assert all(model.decoders[k].weight.grad is None for k in (0, 2, 3))
    shared = model.shared_parameters()
    assert shared and all(p.grad is not None for p in shared if p.requires_grad)
    assert {id(p) for p in shared}.isdisjoint(id(p) for p in model.decoders.parameters())


def test_model_rejects_a_patch_size_that_does_not_tile_the_image():
    with pytest.raises(ModelError, match="multiple of the patch size"):
        MultiTaskViT(parse_tasks("2"), "test_vit", img_size=30, patch_size=8)


# --- the reference loop (benchmarks/reference_loop.py) ---------------------------------


def test_reference_affinity_update_by_hand():
    tracker = reference_loop.ReferenceAffinity(3, decay=0.5)
    tracker.update([0, 1], [torch.tensor(2.0), torch.tensor(4.0), torch.tensor(1.0)])
    assert torch.count_nonzero(tracker.affinity) == 0  # no previous losses in this batch yet
    tracker.update([0, 1], [torch.tensor(1.0), torch.tensor(5.0), torch.tensor(0.5)])
    # r = (1 - after/before) / |G| = (0.25, -0.125, 0.25)
    expected = torch.tensor(
        [
            [0.5 * 0.25, 0.5 * -0.25, 0.5 * 0.25],  # self: r0 >= 0; 1: opposite signs -> -max(r1, r0); 2: outside G
            [0.5 * -0.25, 0.0, 0.5 * 0.25],  # 0: opposite signs; self: r1 < 0 is skipped
            [0.0, 0.0, 0.0],  # task 2 was not in the group
        ]
    )
    torch.testing.assert_close(tracker.affinity, expected)
    assert tracker.previous == [1.0, 5.0, 0.5]
    tracker.start_batch()
    tracker.update([2], [torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)])
    torch.testing.assert_close(tracker.affinity, expected)


def test_reference_similarity_is_finite_and_symmetric():
    tracker = reference_loop.ReferenceAffinity(3)
    tracker.affinity = torch.tensor([[2.0, 1.0, 0.5], [1.0, 4.0, 0.0], [3.0, 1.0, 0.0]])
    similarity = tracker.similarity()
    assert torch.isfinite(similarity).all() and torch.equal(similarity, similarity.T)
    assert similarity[0, 1] == pytest.approx((1.0 / 4.0 + 1.0 / 2.0) / 2)
    assert similarity[0, 0] == 1.0 and similarity[2, 2] == 0.0  # zero diagonal: zeroed, not NaN


def test_reference_loop_runs_one_forward_per_group():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    loop = reference_loop.ReferenceLoop(torch.optim.SGD(model.parameters(), lr=0.1), 3, warmup_steps=2, profile=True)
    x = torch.randn(8, 4)
    forwards = []

    def closure():
        forwards.append(1)
        return list(model(x).pow(2).mean(0))

    for step in range(5):
        forwards.clear()
        loop.step(closure)
        if step < 2:
            assert len(forwards) == 3 and "affinity" in loop.timings
        else:
            assert sorted(t for g in loop.groups for t in g) == [0, 1, 2]
            assert len(forwards) == (2 if len(loop.groups) == 1 else len(loop.groups))


def test_reference_script_alone_writes_its_table(tmp_path):
    output = tmp_path / "results" / "reference_loop.md"
    args = [
        *TINY,
        "--tasks",
        "3",
        "--rounds",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--only",
        "reference",
        "--output",
        str(output),
    ]
    assert reference_loop.main(args) == 0
    text = output.read_text()
    assert "| loop | forward (s)" in text and "clustering + affinity (s)" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| reference loop")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[4]) > 0 and float(cells[6]) > 0 and float(cells[7]) >= 1
    assert "python benchmarks/reference_loop.py" in text


@pytest.mark.skipif(not hasattr(selgroup_fast, "SelectiveGroupUpdate"), reason="SelectiveGroupUpdate not in this build")
def test_reference_script_compares_both_loops(tmp_path):
    output = tmp_path / "reference_loop.md"
    args = [*TINY, "--tasks", "3", "--rounds", "2", "--steps", "1", "--warmup", "1", "--output", str(output)]
    assert reference_loop.main(args) == 0
    text = output.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| reference loop", "| Selective"))]
    assert len(rows) == 2
    assert "Reference loop / SelectiveGroupUpdate: clustering + affinity" in text


# --- the micro-benchmarks' summary (benchmarks/summarize_micro.py) -------------------------


def test_micro_summary_pairs_each_fused_op_with_its_reference(tmp_path):
    summarize = load_benchmark("summarize_micro")

    def bench(op, side, num_tasks, device, median):
        info = {"op": op, "side": side, "num_tasks": num_tasks, "device": device}
        return {"extra_info": info, "stats": {"median": median}}

    run = {
        "datetime": "2026-11-27T10:00:00",
        "machine_info": {"cpu": {"brand_raw": "Test CPU"}, "python_version": "3.11.7", "versions": {"torch": "2.14"}},
        "benchmarks": [
            bench("affinity_update_", "fused", 11, "cpu", 2e-6),
            bench("affinity_update_", "fused", 11, "cuda", 4e-6),
            bench("affinity_update_", "reference", 11, "cpu", 5e-4),
            bench("aligned_mtl_weights", "reference", 32, "cpu", 3e-4),
            bench("aligned_mtl_weights", "fused", 32, "cpu", 1.5e-3),
            bench("imtl_weights", "fused", 4, "cpu", 7e-6),
            bench("imtl_weights", "reference", 4, "cpu", 3.5e-5),
            bench("cagrad_weights", "fused", 128, "cpu", 1e-3),
        ],
    }
    path = tmp_path / "Linux" / "0001_cpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps(run))
    output = tmp_path / "ops_micro.md"
    assert summarize.main(["--storage", str(tmp_path), "--note", "loaded", "--output", str(output)]) == 0
    text = output.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [
        "| `affinity_update_` | 11 | cpu | 2.0 | 500.0 | 250× |",
        "| `affinity_update_` | 11 | cuda | 4.0 | 500.0 | 125× |",  # every device against the CPU reference
        "| `aligned_mtl_weights` | 32 | cpu | 1,500.0 | 300.0 | 0.20× |",
        "| `cagrad_weights` | 128 | cpu | 1,000.0 | – | – |",
        "| `imtl_weights` | 4 | cpu | 7.0 | 35.0 | 5.0× |",
    ]
    assert "- loaded" in text and "Test CPU" in text and str(path.as_posix()) in text


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--warmup", "-1")])
def test_bench_compile_refuses_bad_counts_in_one_line(flag, value, capsys):
    load_benchmark("bench_methods")  # what bench_compile imports from its own folder
    bench_compile = load_benchmark("bench_compile")
    with pytest.raises(SystemExit) as exited:
        bench_compile.main([flag, value, "--output", "-"])
    least = 0 if flag == "--warmup" else 1
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {flag} must be at least {least}, got {value}\n"
