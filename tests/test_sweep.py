"""benchmarks/train_table.py: planning, resumable runs, the table's numbers (with a fake selgroup-train) and
one tiny real sweep through the CLI (slow)."""

from __future__ import annotations

import csv
import inspect
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

from selgroup_fast.selective import SelectiveGroupUpdate
from selgroup_fast.tasks import PRESETS

tt = load_benchmark("train_table")

# The fake trainer's metrics: a segmentation task scores mIoU (higher is better), a regression task RMSE (lower).
BASELINE_VALUE = {"segmentation": 0.5, "regression": 0.2}
# Relative change of every primary metric, per method, in the direction that helps (+) or hurts (-);
# seed s adds 0.01 * s. Δm of a run is then 100 * (gain + 0.01 * s) on every task.
GAIN = {"gd": 0.0, "selective": 0.05, "pcgrad": -0.02}
TIME_PER_BATCH = {"gd": 0.1, "selective": 0.25, "pcgrad": 0.4}


def _argument(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


class FakeTrainer:
    """Writes what ``selgroup-train`` writes (results.json / baseline.json, a checkpoint, an event file, a plot)."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail  # methods whose run exits with an error

    def __call__(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        self.calls.append(argv)
        args = argv[argv.index("selgroup_fast.train") + 1 :]
        out = Path(_argument(args, "--out"))
        specs = PRESETS[_argument(args, "--tasks")]
        method = _argument(args, "--method")
        seed = int(_argument(args, "--seed"))
        (out / "checkpoint.pt").write_bytes(b"weights")
        (out / "events.out.tfevents.1.host").write_bytes(b"events")
        if method in self.fail:
            log.write_text("progress 1/2\rprogress 2/2\nerror: the loss of task depth is nan at iteration 2\n")
            return 2
        log.write_text("".join(f"line {i}\n" for i in range(100)))
        hib = {
            spec.name: {"miou" if spec.kind == "segmentation" else "rmse": spec.kind == "segmentation"}
            for spec in specs
        }
        primary = {spec.name: next(iter(hib[spec.name])) for spec in specs}
        if args[0] == "baseline":
            metrics = {spec.name: {primary[spec.name]: BASELINE_VALUE[spec.kind]} for spec in specs}
            record = {"metrics": metrics, "higher_is_better": hib, "primary": primary, "tasks": list(primary)}
            (out / "baseline.json").write_text(json.dumps(record))
            return 0
        change = GAIN[method] + 0.01 * seed
        options = dict(item.split("=", 1) for item in args[1:] if "=" in item and not item.startswith("--"))
        if options.get("order") == "backward":
            change += 0.03
        metrics = {
            spec.name: {
                primary[spec.name]: BASELINE_VALUE[spec.kind]
                * (1 + change if spec.kind == "segmentation" else 1 - change)
            }
            for spec in specs
        }
        record = {
            "metrics": metrics,
            "higher_is_better": hib,
            "primary": primary,
            "tasks": list(primary),
            "time_per_batch_s": TIME_PER_BATCH[method] * (1 + 0.1 * seed),
            "wall_time_s": 1.0,
            "iterations": int(_argument(args, "--iters")),
            "machine": {"cpu": "fake"},
            "versions": {"torch": "fake"},
        }
        if method == "selective":
            k = len(specs)
            # Tasks 0 and 1 always together, the others apart; seed-dependent pair 1-2.
            cogrouping = [[1.0 if i == j else 0.0 for j in range(k)] for i in range(k)]
            cogrouping[0][1] = cogrouping[1][0] = 0.9
            cogrouping[1][2] = cogrouping[2][1] = 0.1 * seed
            record.update(groups_mean=3.0 + seed, cogrouping=cogrouping, affinity=[[0.0] * k for _ in range(k)])
            record["cogrouping_batches"] = 3
            # The trainer's checkpoint keeps the history as JSON text: 2 warm-up batches of K groups, then
            # 2, 2 and 3 + seed groups; two affinity snapshots whose entries move by 1 from 1 or -1.
            history = {
                "groups": [k, k, 2, 2, 3 + seed],
                "affinity_steps": [1, 2],
                "affinity": [[1.0] * (k * k), [1.0, *[-2.0] * (k * k - 1)]],
                "evaluations": [],
            }
            torch.save({"model": {}, "history": json.dumps(history)}, out / "checkpoint.pt")
            (out / "cogrouping.png").write_bytes(b"\x89PNG")
        (out / "results.json").write_text(json.dumps(record))
        return 0


SIZE = ["--iters", "2", "--img-size", "16", "--patch-size", "8", "--batch-size", "2"]


def test_variant_parse_label_and_folder_round_trip():
    variant = tt.Variant.parse("selective:grouping=random:2,decay=1e-4")
    assert variant == tt.Variant("selective", (("grouping", "random:2"), ("decay", "1e-4")))
    assert tt.Variant.parse(variant.label) == variant
    assert variant.folder_name == "selective__grouping-random_2__decay-1e-4"
    run = tt.Run("nyud", variant, 3)
    arguments = run.arguments(Path("/r"), tt.Size("b", 16, 8, 2, 5, 0.1, 5))
    assert arguments[:4] == ["--tasks", "nyud", "--method", "selective"]
    assert arguments[4:8] == ["--method-option", "grouping=random:2", "--method-option", "decay=1e-4"]
    assert arguments[-4:] == ["--seed", "3", "--out", "/r/nyud/selective__grouping-random_2__decay-1e-4/seed3"]
    assert tt.Run("nyud", None, 0).arguments(Path("/r"), tt.Size("b", 16, 8, 2, 5, 0.1, 5))[0] == "baseline"
    for bad in ("", ":order=x", "selective:order", "selective:=x"):
        with pytest.raises(ValueError):
            tt.Variant.parse(bad)


def test_check_variant_knows_the_selective_options():
    for label in (
        "selective:order=backward",
        "selective:grouping=random:2",
        "selective:decay=1e-3",
        "selective:attribution=reference",
        "cagrad:c=0.4",
    ):
        tt.check_variant(tt.Variant.parse(label))
    with pytest.raises(ValueError, match="takes no option 'ordering'"):
        tt.check_variant(tt.Variant.parse("selective:ordering=backward"))
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        tt.check_variant(tt.Variant.parse("sgd"))


def test_issue12_plan_covers_the_issue_and_its_ablation_defaults_are_the_methods():
    plan = tt.issue12_plan()
    count: dict[tuple[str, str], int] = {}
    for run in plan.runs:
        key = (run.preset, "baseline" if run.is_baseline else run.variant.label)
        count[key] = count.get(key, 0) + 1
    assert count[("nyud", "baseline")] == count[("taskonomy", "baseline")] == 1
    assert count[("nyud", "gd")] >= 3 and count[("nyud", "selective")] >= 3
    for method in ("pcgrad", "cagrad", "mgda", "imtl", "aligned_mtl", "nash_mtl", "uw", "dwa", "famo"):
        assert count[("nyud", method)] >= 1
    assert count[("taskonomy", "gd")] >= 2 and count[("taskonomy", "selective")] >= 2
    assert count[("taskonomy", "pcgrad")] >= 1
    for option in (
        "order=forward",
        "order=backward",
        "grouping=joint",
        "grouping=separate",
        "grouping=random:2",
        "decay=1e-2",
        "decay=1e-4",
        "attribution=reference",
    ):
        assert count[("nyud", f"selective:{option}")] >= 1
    # The plain selective run stands for each ablation's default: it must be the constructor's default.
    defaults = inspect.signature(SelectiveGroupUpdate.__init__).parameters
    for _, key, default, _ in tt.ISSUE12_ABLATIONS:
        value = defaults[key].default
        assert (float(default) == value) if isinstance(value, float) else (default == value)
    for run in plan.runs:
        if run.variant:
            tt.check_variant(run.variant)


def _sweep(tmp_path: Path, runner: FakeTrainer, *extra: str) -> int:
    return tt.main(
        [
            "--presets",
            "nyud",
            "--methods",
            "gd,selective,pcgrad,selective:order=backward",
            "--seeds",
            "0,1,2",
            "--out",
            str(tmp_path),
            *SIZE,
            *extra,
        ],
        runner=runner,
    )


def test_sweep_table_numbers_against_hand_computed_values(tmp_path):
    runner = FakeTrainer()
    assert _sweep(tmp_path, runner) == 0
    assert len(runner.calls) == 1 + 4 * 3
    summary = json.loads((tmp_path / "table.json").read_text())
    rows = summary["presets"]["nyud"]["rows"]
    for method, gain in GAIN.items():
        per_seed = [100 * (gain + 0.01 * seed) for seed in range(3)]
        assert rows[method]["delta_m_per_seed"] == pytest.approx(per_seed)
        assert rows[method]["delta_m"] == pytest.approx(statistics.fmean(per_seed))
        assert rows[method]["delta_m_std"] == pytest.approx(1.0)  # sample std of (g, g+1, g+2) percent
        time = statistics.fmean(TIME_PER_BATCH[method] * (1 + 0.1 * s) for s in range(3))
        assert rows[method]["time_per_batch_s"] == pytest.approx(time)
        assert rows[method]["times_gd"] == pytest.approx(TIME_PER_BATCH[method] / TIME_PER_BATCH["gd"])
        depth = [0.2 * (1 - gain - 0.01 * s) for s in range(3)]
        assert rows[method]["primary"]["depth"] == pytest.approx(statistics.fmean(depth))
    assert rows["selective:order=backward"]["delta_m"] == pytest.approx(100 * 0.08 + 1.0)
    assert rows["selective"]["groups_mean"] == pytest.approx(4.0) and rows["gd"]["groups_mean"] is None
    assert rows["single-task"]["delta_m"] == 0.0 and rows["single-task"]["vs_gd"] is None
    assert rows["selective"]["vs_gd_per_seed"] == pytest.approx([5.0, 5.0, 5.0])  # paired with GD's seed
    # From history.json: after warm-up 2, 2, 3 + seed groups (one change in two steps); every one of the
    # 16 affinity entries but the first moves by 3 from a mean absolute entry of (16 + 1 + 15 * 2) / 32.
    assert rows["selective"]["groups_after_warmup"] == pytest.approx(statistics.fmean((7 + s) / 3 for s in range(3)))
    assert rows["selective"]["group_count_changes"] == pytest.approx(0.5)
    assert rows["selective"]["affinity_fluctuation"] == pytest.approx((15 * 3 / 16) / (47 / 32))
    claims = summary["claims"]["nyud"]
    assert [entry["method"] for entry in claims["delta_m_ranking"]] == ["selective", "gd", "pcgrad"]
    assert claims["selective_rank"] == 1
    # Co-grouping: semseg-depth 0.9 in every seed; depth-normals 0, 0.1, 0.2 -> 0.1, second of six pairs.
    known = summary["presets"]["nyud"]["relations"]["known"]
    assert known == [
        {
            "pair": ["depth", "normals"],
            "frequency": pytest.approx(0.1),
            "per_seed": pytest.approx([0.0, 0.1, 0.2]),
            "rank": 2,
            "of": 6,
            "affinity": [0.0, 0.0],
        }
    ]
    assert summary["presets"]["nyud"]["relations"]["ranking"][0]["pair"] == ["semseg", "depth"]
    # The Markdown and CSV hold the same numbers.
    markdown = (tmp_path / "table.md").read_text()
    assert "| selective | 3 | +6.00 ± 1.00 | +5.00 ± 0.00 |" in markdown
    assert "| pcgrad | 3 | -1.00 ± 1.00 | -2.00 ± 0.00 |" in markdown
    assert "| depth – normals | 0.100 | 0.000, 0.100, 0.200 | 2 of 6 |" in markdown
    with open(tmp_path / "table.csv") as stream:
        lines = [line for line in csv.DictReader(stream) if line["variant"] == "selective" and line["task"] == "semseg"]
    assert float(lines[0]["delta_m"]) == pytest.approx(6.0) and float(lines[0]["value"]) == pytest.approx(0.5 * 1.06)


def test_finished_runs_keep_results_and_plots_and_lose_checkpoints(tmp_path):
    assert _sweep(tmp_path, FakeTrainer()) == 0
    folder = tmp_path / "nyud" / "selective" / "seed1"
    assert sorted(path.name for path in folder.iterdir()) == [
        "cogrouping.png",
        "command.json",
        "history.json",
        "results.json",
        "train.log",
    ]
    history = json.loads((folder / "history.json").read_text())
    assert history["groups"] == [4, 4, 2, 2, 4] and len(history["affinity"]) == 2
    assert (folder / "train.log").read_text().splitlines() == [f"line {i}" for i in range(100 - tt.LOG_TAIL_LINES, 100)]
    command = json.loads((folder / "command.json").read_text())
    assert command["argv"][1:3] == ["-m", "selgroup_fast.train"] and "--seed" in command["arguments"]


def test_a_killed_sweep_continues_and_redoes_only_the_unfinished_runs(tmp_path):
    assert _sweep(tmp_path, FakeTrainer()) == 0
    # A run killed before it wrote its results leaves a folder with a checkpoint and no results.json.
    killed = tmp_path / "nyud" / "pcgrad" / "seed2"
    (killed / "results.json").unlink()
    (killed / "checkpoint.pt").write_bytes(b"partial")
    (tmp_path / "nyud" / "gd" / "seed0" / "results.json").write_text('{"metrics": {"semseg"')  # cut short
    runner = FakeTrainer()
    assert _sweep(tmp_path, runner) == 0
    assert sorted(_argument(call, "--out") for call in runner.calls) == sorted(
        [str(tmp_path / "nyud" / "gd" / "seed0"), str(killed)]
    )
    assert not (killed / "checkpoint.pt").exists() and (killed / "results.json").exists()
    runner = FakeTrainer()
    assert _sweep(tmp_path, runner, "--table-only") == 0 and runner.calls == []


def test_a_failed_run_is_reported_in_the_table_and_redone_next_time(tmp_path, capsys):
    assert _sweep(tmp_path, FakeTrainer(fail={"pcgrad"})) == 1
    summary = json.loads((tmp_path / "table.json").read_text())
    pcgrad = summary["presets"]["nyud"]["rows"]["pcgrad"]
    assert (
        pcgrad["seeds"] == [] and pcgrad["failed"][0]["error"] == "error: the loss of task depth is nan at iteration 2"
    )
    assert "failed (seed 0: error: the loss of task depth is nan at iteration 2" in (tmp_path / "table.md").read_text()
    assert summary["presets"]["nyud"]["rows"]["selective"]["delta_m"] == pytest.approx(6.0)
    runner = FakeTrainer()
    assert _sweep(tmp_path, runner) == 0
    assert {_argument(call, "--method") for call in runner.calls} == {"pcgrad"} and len(runner.calls) == 3


def test_bad_input_is_one_error_line(tmp_path, capsys):
    assert _sweep(tmp_path, FakeTrainer()) == 0
    capsys.readouterr()
    for arguments, message in (
        # A finished folder made with another size is never mixed into this sweep's table.
        (
            ["--presets", "nyud", "--methods", "gd", "--out", str(tmp_path), "--iters", "3"],
            "holds a finished run of another command",
        ),
        (["--presets", "cityscapes", "--out", str(tmp_path)], "unknown preset 'cityscapes'"),
        (["--methods", "selective:ordr=forward", "--out", str(tmp_path)], "takes no option 'ordr'"),
        (["--methods", "gd", "--iters", "0", "--out", str(tmp_path / "new")], "--iters must be positive"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            tt.main(arguments, runner=FakeTrainer())
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_dry_run_prints_the_unfinished_commands(tmp_path, capsys):
    runner = FakeTrainer()
    assert tt.main(["--methods", "gd", "--out", str(tmp_path), *SIZE, "--dry-run"], runner=runner) == 0
    lines = capsys.readouterr().out.splitlines()
    assert runner.calls == [] and len(lines) == 2
    assert lines[0].startswith("selgroup-train baseline --tasks nyud") and "--method gd" in lines[1]


@pytest.mark.slow
def test_a_tiny_real_sweep_through_the_cli(tmp_path):
    arguments = [
        "--presets",
        "nyud",
        "--methods",
        "gd,selective:warmup_steps=1",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
        "--backbone",
        "test_vit",
        "--img-size",
        "16",
        "--patch-size",
        "8",
        "--batch-size",
        "2",
        "--iters",
        "3",
        "--lr",
        "1e-3",
        "--train-arg=--eval-batches=2",
    ]
    assert tt.main(arguments) == 0, (tmp_path / "nyud" / "gd" / "seed0" / "train.log").read_text()
    summary = json.loads((tmp_path / "table.json").read_text())
    rows = summary["presets"]["nyud"]["rows"]
    for label in ("gd", "selective:warmup_steps=1"):
        assert math.isfinite(rows[label]["delta_m"]) and rows[label]["time_per_batch_s"] > 0
    assert rows["selective:warmup_steps=1"]["groups_mean"] >= 1
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_timing_interleaves_rounds_and_takes_ratios_within_each_round(tmp_path):
    runner = FakeTrainer()
    arguments = ["--methods", "gd,selective,pcgrad", "--timing", "3", "--out", str(tmp_path), *SIZE]
    assert tt.main(arguments, runner=runner) == 0
    order = [(_argument(call, "--method"), _argument(call, "--seed")) for call in runner.calls]
    assert order == [
        ("gd", "0"), ("selective", "0"), ("pcgrad", "0"),
        ("selective", "1"), ("pcgrad", "1"), ("gd", "1"),
        ("pcgrad", "2"), ("gd", "2"), ("selective", "2"),
    ]  # fmt: skip
    rows = {row["label"]: row for row in json.loads((tmp_path / "timing.json").read_text())["rows"]}
    # The fake's time grows by 10 % a round for every method alike: the per-round ratio is constant.
    assert rows["pcgrad"]["times_gd_per_round"] == pytest.approx([4.0, 4.0, 4.0])
    assert rows["pcgrad"]["time_per_batch_s"] == pytest.approx(0.4 * 1.1)
    assert rows["selective"]["groups_mean"] == pytest.approx(4.0) and rows["gd"]["times_gd"] == pytest.approx(1.0)
    assert "| pcgrad | 3 | 0.4400 | 4.00 | 4.00, 4.00, 4.00 | – |" in (tmp_path / "timing.md").read_text()
    with pytest.raises(SystemExit):
        tt.main([*arguments, "--jobs", "2"], runner=runner)


def test_decay_figure_from_the_histories(tmp_path):
    ablations = {"nyud": (("affinity decay β", "decay", "1e-3", ("selective:decay=1e-2",)),)}
    runs = (tt.Run("nyud", tt.Variant("selective"), 0), tt.Run("nyud", tt.Variant.parse("selective:decay=1e-2"), 0))
    plan = tt.Plan(runs, ablations)
    size = tt.Size("test_vit", 16, 8, 2, 2, 1e-3, 2)
    assert [o.status for o in tt.execute(plan, tmp_path, size, runner=FakeTrainer(), echo=lambda _: None)] == [
        "done"
    ] * 2
    path = tt.decay_figure(plan, tmp_path, "nyud")
    assert path == tmp_path / "nyud_decay.png" and path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert tt.decay_figure(tt.Plan(runs), tmp_path, "nyud") is None  # no decay ablation in the plan


def test_baselines_only_runs_the_baselines_and_the_sweep_reuses_them(tmp_path):
    runner = FakeTrainer()
    assert _sweep(tmp_path, runner, "--baselines-only") == 0
    assert [call[call.index("selgroup_fast.train") + 1] for call in runner.calls] == ["baseline"]
    runner = FakeTrainer()
    assert _sweep(tmp_path, runner) == 0
    assert len(runner.calls) == 4 * 3 and "baseline" not in {
        call[call.index("selgroup_fast.train") + 1] for call in runner.calls
    }


def test_a_second_sweep_on_a_folder_in_use_is_refused(tmp_path, capsys):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a sweep in progress
        with pytest.raises(SystemExit) as exit_info:
            _sweep(tmp_path, FakeTrainer())
    assert exit_info.value.code == 2 and "another train_table.py is running on" in capsys.readouterr().err
    assert _sweep(tmp_path, FakeTrainer()) == 0  # released: the sweep runs


def test_a_moved_sweep_folder_still_reads(tmp_path):
    import shutil

    assert _sweep(tmp_path / "a", FakeTrainer()) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    runner = FakeTrainer()
    assert _sweep(tmp_path / "b", runner) == 0 and runner.calls == []  # every run counts as finished
    rows = json.loads((tmp_path / "b" / "table.json").read_text())["presets"]["nyud"]["rows"]
    assert rows["selective"]["delta_m"] == pytest.approx(6.0)
