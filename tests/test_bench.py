"""selgroup-bench: the command's outputs, its pure pieces, and the reference-loop comparison script."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import selgroup_fast
from selgroup_fast.bench import MultiTaskViT, main, median_breakdown, parse_tasks, synthetic_batch, task_losses
from selgroup_fast.bench.cli import _int_list
from selgroup_fast.bench.timing import MethodResult, default_methods, method_options, set_ratios_to_gd
from selgroup_fast.methods import MultiTaskMethod
from selgroup_fast.methods.base import detached
from selgroup_fast.profiling import PHASES

pytest.importorskip("timm")
pytest.importorskip("matplotlib")

# timm's own tiny ViT test configuration (64 wide, 6 blocks): the same code path as
# vit_tiny_patch16_224 at a fraction of the cost.
TINY = ["--backbone", "test_vit", "--img-size", "32", "--patch-size", "8", "--batch-size", "2"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _load_reference_loop():
    spec = importlib.util.spec_from_file_location("reference_loop", REPO / "benchmarks" / "reference_loop.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reference_loop"] = module
    spec.loader.exec_module(module)
    return module


reference_loop = _load_reference_loop()


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path


# --- the command -------------------------------------------------------------------


def test_main_writes_every_report(tmp_path, capsys):
    names = default_methods()
    assert main([*TINY, "--tasks", "3", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0

    printed = capsys.readouterr().out
    assert "clustering + affinity" in printed and "Per-batch breakdown, K = 3" in printed
    for name in names:
        assert any(line.startswith(name + " ") for line in printed.splitlines()), name

    record = json.loads((tmp_path / "results.json").read_text())
    assert record["command"].startswith("selgroup-bench --backbone test_vit")
    assert record["machine"]["cpu_cores"] >= 1 and record["machine"]["cpu"]
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["selgroup_fast"] == selgroup_fast.__version__
    assert record["date"][:4].isdigit() and record["config"]["img_size"] == 32
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
    assert run["results"][0]["ratio_to_gd"] == 1.0

    with (tmp_path / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == names
    assert all(float(row["total_s"]) > 0 and row["num_tasks"] == "3" for row in rows)

    table = (tmp_path / "results.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| method"))
    assert "forward" in header and "backprop" in header and "total (s)" in header and "× GD" in header
    body = [line for line in table if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split("|")[1].strip() for line in body] == names
    assert all(line.count("|") == header.count("|") for line in body)

    summary = (tmp_path / "README.md").read_text()
    assert record["command"] in summary and record["machine"]["cpu"] in summary
    assert "![breakdown](breakdown.png)" in summary
    _assert_png(tmp_path / "breakdown.png")
    assert not (tmp_path / "sweep.png").exists()


class ToyGroupedUpdate(MultiTaskMethod):
    """A stand-in for ``selective`` with its interface: one task per group during
    ``warmup_steps`` batches, then the groups [[0], [1, ...]]; one forward, backward
    and optimizer step per group, and a (trivial) timed affinity phase."""

    def __init__(self, optimizer, num_tasks, *, warmup_steps, profile=False):
        super().__init__(optimizer, num_tasks, profile=profile)
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
    args = [*TINY, "--methods", "gd,selective", "--tasks", "3", "--steps", "1", "--warmup", "2"]
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


def test_unknown_method_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown or unavailable method 'nope'.*gd"):
        main([*TINY, "--methods", "nope", "--tasks", "2", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])


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


def test_other_is_never_negative_and_ratios_follow_gd():
    phases = dict.fromkeys(PHASES, 0.0) | {"forward": 2.0}
    fast = MethodResult("gd", 4, phases, total=1.5, steps=1)
    assert fast.other == 0.0
    slow = MethodResult("pcgrad", 4, phases, total=6.0, steps=1)
    other_k = MethodResult("pcgrad", 8, phases, total=6.0, steps=1)
    set_ratios_to_gd([fast, slow, other_k])
    assert (fast.ratio_to_gd, slow.ratio_to_gd, other_k.ratio_to_gd) == (1.0, 4.0, None)


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
    assert method_options("selective", 7) == {"warmup_steps": 7}
    assert method_options("pcgrad", 7) == {}


def test_model_shapes_losses_and_head_isolation():
    tasks = parse_tasks("nyud")
    torch.manual_seed(0)
    model = MultiTaskViT(tasks, "test_vit", img_size=32, patch_size=8)
    batch = synthetic_batch(tasks, 3, 32, "cpu", torch.float32, seed=5)
    again = synthetic_batch(tasks, 3, 32, "cpu", torch.float32, seed=5)
    assert torch.equal(batch.images, again.images)
    assert all(torch.equal(a, b) for a, b in zip(batch.targets, again.targets))
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
    with pytest.raises(ValueError, match="multiple of the patch size"):
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
    args = [*TINY, "--tasks", "3", "--steps", "2", "--warmup", "1", "--only", "reference", "--output", str(output)]
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
    assert reference_loop.main([*TINY, "--tasks", "3", "--steps", "2", "--warmup", "1", "--output", str(output)]) == 0
    text = output.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| reference loop") or line.startswith("| Selective")]
    assert len(rows) == 2
    assert "Reference loop / SelectiveGroupUpdate: clustering + affinity" in text
