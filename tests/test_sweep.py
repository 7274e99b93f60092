"""selgroup-train sweep (selgroup_fast.train.sweep): plan files, resumable runs, the table's numbers (with a fake
selgroup-train), the committed sweep's tables regenerated from its runs, and one tiny real sweep (slow)."""

from __future__ import annotations

import csv
import inspect
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from selgroup_fast.selective import SelectiveGroupUpdate
from selgroup_fast.tasks import PRESETS
from selgroup_fast.train import cli as train_cli
from selgroup_fast.train.sweep import cli as sweep_cli
from selgroup_fast.train.sweep import plan as sweep_plan
from selgroup_fast.train.sweep import runs as sweep_runs
from selgroup_fast.train.sweep import table as sweep_table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

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
#: The fake sweep's plan: three seeds of four variants on NYUD, every seed in the first pass.
FAKE_PLAN = {
    "presets": {
        "nyud": {"methods": [{"variants": ["gd", "selective", "pcgrad", "selective:order=backward"], "seeds": 3}]}
    }
}


def write_plan(folder: Path, data: object, name: str = "plan.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def fake_plan(tmp_path_factory) -> Path:
    return write_plan(tmp_path_factory.mktemp("plans"), FAKE_PLAN)


def _sweep(plan: Path, out: Path, runner: FakeTrainer, *extra: str) -> int:
    return sweep_cli.main([str(plan), "--out", str(out), *SIZE, *extra], runner=runner)


def test_variant_parse_label_and_folder_round_trip():
    variant = sweep_plan.Variant.parse("selective:grouping=random:2,decay=1e-4")
    assert variant == sweep_plan.Variant("selective", (("grouping", "random:2"), ("decay", "1e-4")))
    assert sweep_plan.Variant.parse(variant.label) == variant
    assert variant.folder_name == "selective__grouping-random_2__decay-1e-4"
    run = sweep_plan.Run("nyud", variant, 3)
    size = sweep_plan.Size(backbone="b", img_size=16, patch_size=8, batch_size=2, iters=5, lr=0.1)
    arguments = run.arguments(Path("/r"), size)
    assert arguments[:4] == ["--tasks", "nyud", "--method", "selective"]
    assert arguments[4:8] == ["--method-option", "grouping=random:2", "--method-option", "decay=1e-4"]
    assert arguments[-4:] == ["--seed", "3", "--out", "/r/nyud/selective__grouping-random_2__decay-1e-4/seed3"]
    assert arguments[arguments.index("--eval-every") + 1] == "5"  # eval_every 0: once, at the end
    assert sweep_plan.Run("nyud", None, 0).arguments(Path("/r"), size)[0] == "baseline"
    for bad in ("", ":order=x", "selective:order", "selective:=x"):
        with pytest.raises(sweep_plan.PlanError):
            sweep_plan.Variant.parse(bad)


def test_check_variant_knows_the_selective_options():
    for label in (
        "selective:order=backward",
        "selective:grouping=random:2",
        "selective:decay=1e-3",
        "selective:attribution=reference",
        "cagrad:c=0.4",
    ):
        sweep_plan.check_variant(sweep_plan.Variant.parse(label))
    with pytest.raises(sweep_plan.PlanError, match="takes no option 'ordering'"):
        sweep_plan.check_variant(sweep_plan.Variant.parse("selective:ordering=backward"))
    with pytest.raises(sweep_plan.PlanError, match="unknown method 'sgd'"):
        sweep_plan.check_variant(sweep_plan.Variant.parse("sgd"))


def test_issue12_plan_covers_the_issue_and_its_ablation_defaults_are_the_methods():
    assert {"issue12", "issue12_timing"} <= set(sweep_plan.builtin_plans())
    plan = sweep_plan.load_plan("issue12")
    count: dict[tuple[str, str], int] = {}
    for run in plan.runs:
        key = (run.preset, "baseline" if run.is_baseline else run.variant.label)
        count[key] = count.get(key, 0) + 1
    assert count[("nyud", "baseline")] == count[("taskonomy", "baseline")] == 1
    assert count[("nyud", "gd")] == 3 and count[("nyud", "selective")] == 3
    for method in ("pcgrad", "cagrad", "mgda", "imtl", "aligned_mtl", "nash_mtl", "uw", "dwa", "famo"):
        assert count[("nyud", method)] == 3
    assert count[("taskonomy", "gd")] == count[("taskonomy", "selective")] == count[("taskonomy", "pcgrad")] == 2
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
        assert count[("nyud", f"selective:{option}")] == 2
    # The issue's minimum first: after the 2 baselines, NYUD's gd and selective at 3 seeds, every other method
    # and ablation at seed 0, Taskonomy's gd and selective at 2 seeds and pcgrad at seed 0 (33 runs); then seed 1
    # of NYUD's methods and ablations and of Taskonomy's pcgrad, then seed 2 of NYUD's methods.
    seeds = [run.seed for run in plan.runs]
    assert seeds[2:8] == [0, 1, 2] * 2 and set(seeds[8:25]) == {0} and seeds[25:29] == [0, 1, 0, 1]
    assert seeds[29] == 0 and set(seeds[30:48]) == {1} and set(seeds[48:]) == {2} and len(seeds) == 57
    assert [run.preset for run in plan.runs[48:]] == ["nyud"] * 9 and plan.runs[47].preset == "taskonomy"
    # The plain selective run stands for each ablation's default: it must be the constructor's default.
    defaults = inspect.signature(SelectiveGroupUpdate.__init__).parameters
    for ablation in plan.ablations["nyud"]:
        value = defaults[ablation.key].default
        assert ablation.method == "selective"
        assert (float(ablation.default) == value) if isinstance(value, float) else (ablation.default == value)


def test_the_committed_sweeps_regenerate_their_committed_tables():
    """Every committed run still reads: the tables regenerated from benchmarks/results/train_sweep's,
    train_timing's, evidence's and evidence_long's runs (with the header the committed table records: command,
    notes, date, commits) are the committed tables, byte for byte, and the built-in plans take every committed run
    for finished."""
    for name, folder, files in (
        ("issue12", "train_sweep", ("table.md", "table.csv", "table.json")),
        ("issue12_timing", "train_timing", ("timing.md", "timing.json")),
        ("issue24", "evidence", ("table.md", "table.csv", "table.json")),
        ("issue24_long", "evidence_long", ("table.md", "table.csv", "table.json")),
    ):
        root = RESULTS / folder
        header = json.loads((root / files[-1]).read_text())
        plan = sweep_plan.load_plan(name)
        sweep_runs.check_resumable(plan, root, plan.size)
        assert all(sweep_runs.is_complete(run, root) for run in plan.runs), f"{folder}: a run is not finished"
        tables = sweep_table.tabulate(
            plan, root, plan.size, header["command"], header["notes"], header["date"], header["code"]
        )
        assert sorted(tables) == sorted(files)
        for file in files:
            assert tables[file] == (root / file).read_text(), f"{folder}/{file} differs from its regeneration"


def test_the_committed_sweep_resumes_with_nothing_to_run(tmp_path, capsys):
    """selgroup-train sweep issue12 on a copy of the committed sweep: every run counts as finished (dry run: no
    command) and --table-only runs nothing and writes the table (through ``selgroup-train sweep``)."""
    shutil.copytree(RESULTS / "train_sweep", tmp_path / "sweep")
    assert train_cli.main(["sweep", "issue12", "--out", str(tmp_path / "sweep"), "--dry-run"]) == 0
    assert capsys.readouterr().out == ""
    runner = FakeTrainer()
    assert sweep_cli.main(["issue12", "--out", str(tmp_path / "sweep"), "--table-only"], runner=runner) == 0
    assert runner.calls == []
    committed = (RESULTS / "train_sweep" / "table.md").read_text().splitlines()
    regenerated = (tmp_path / "sweep" / "table.md").read_text().splitlines()
    assert (
        regenerated[2] == "* Command: `selgroup-train sweep issue12 --out " + str(tmp_path / "sweep") + " --table-only`"
    )
    # The date and the code differ (the committed runs predate command.json's commit: the checkout's is used).
    assert regenerated[7].startswith("* Code: ")
    assert regenerated[4:7] == committed[4:7] and regenerated[8:] == committed[8:]


def test_sweep_table_numbers_against_hand_computed_values(tmp_path, fake_plan):
    runner = FakeTrainer()
    assert _sweep(fake_plan, tmp_path, runner) == 0
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


def test_finished_runs_keep_results_and_plots_and_lose_checkpoints(tmp_path, fake_plan):
    assert _sweep(fake_plan, tmp_path, FakeTrainer()) == 0
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
    tail = sweep_runs.LOG_TAIL_LINES
    assert (folder / "train.log").read_text().splitlines() == [f"line {i}" for i in range(100 - tail, 100)]
    command = json.loads((folder / "command.json").read_text())
    assert command["argv"][1:3] == ["-m", "selgroup_fast.train"] and "--seed" in command["arguments"]


def test_a_killed_sweep_continues_and_redoes_only_the_unfinished_runs(tmp_path, fake_plan):
    assert _sweep(fake_plan, tmp_path, FakeTrainer()) == 0
    # A run killed before it wrote its results leaves a folder with a checkpoint and no results.json.
    killed = tmp_path / "nyud" / "pcgrad" / "seed2"
    (killed / "results.json").unlink()
    (killed / "checkpoint.pt").write_bytes(b"partial")
    (tmp_path / "nyud" / "gd" / "seed0" / "results.json").write_text('{"metrics": {"semseg"')  # cut short
    runner = FakeTrainer()
    assert _sweep(fake_plan, tmp_path, runner) == 0
    assert sorted(_argument(call, "--out") for call in runner.calls) == sorted(
        [str(tmp_path / "nyud" / "gd" / "seed0"), str(killed)]
    )
    assert not (killed / "checkpoint.pt").exists() and (killed / "results.json").exists()
    runner = FakeTrainer()
    assert _sweep(fake_plan, tmp_path, runner, "--table-only") == 0 and runner.calls == []


def test_a_sweep_killed_between_a_run_and_its_pruning_finishes_that_folder(tmp_path, fake_plan):
    """The run finished (its results are complete) but the sweep died before keeping its history and
    pruning it: the next pass does not redo the run, and keeps its history and prunes it then."""
    assert _sweep(fake_plan, tmp_path, FakeTrainer()) == 0
    folder = tmp_path / "nyud" / "selective" / "seed2"
    kept = json.loads((folder / "history.json").read_text())
    (folder / "history.json").unlink()
    arguments = json.loads((folder / "command.json").read_text())["arguments"]
    FakeTrainer()(["python", "-m", "selgroup_fast.train", *arguments], {}, folder / "train.log")  # the run again
    assert (folder / "checkpoint.pt").is_file() and (folder / "events.out.tfevents.1.host").is_file()
    runner = FakeTrainer()
    assert _sweep(fake_plan, tmp_path, runner) == 0 and runner.calls == []
    assert json.loads((folder / "history.json").read_text()) == kept
    assert not (folder / "checkpoint.pt").exists() and not (folder / "events.out.tfevents.1.host").exists()
    assert len((folder / "train.log").read_text().splitlines()) == sweep_runs.LOG_TAIL_LINES


def test_a_failed_run_is_reported_in_the_table_and_redone_next_time(tmp_path, fake_plan):
    assert _sweep(fake_plan, tmp_path, FakeTrainer(fail={"pcgrad"})) == 1
    summary = json.loads((tmp_path / "table.json").read_text())
    pcgrad = summary["presets"]["nyud"]["rows"]["pcgrad"]
    assert (
        pcgrad["seeds"] == [] and pcgrad["failed"][0]["error"] == "error: the loss of task depth is nan at iteration 2"
    )
    assert "failed (seed 0: error: the loss of task depth is nan at iteration 2" in (tmp_path / "table.md").read_text()
    assert summary["presets"]["nyud"]["rows"]["selective"]["delta_m"] == pytest.approx(6.0)
    runner = FakeTrainer()
    assert _sweep(fake_plan, tmp_path, runner) == 0
    assert {_argument(call, "--method") for call in runner.calls} == {"pcgrad"} and len(runner.calls) == 3


def _one_error_line(capsys, arguments: list[str], message: str) -> None:
    assert sweep_cli.main(arguments, runner=FakeTrainer()) == 2, arguments
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err and captured.err.count("\n") == 1, (
        captured.err
    )
    assert captured.out == ""


def test_bad_input_is_one_error_line(tmp_path, fake_plan, capsys):
    assert _sweep(fake_plan, tmp_path, FakeTrainer()) == 0
    capsys.readouterr()
    gd_only = write_plan(tmp_path / "plans", {"presets": {"nyud": {"methods": [{"variants": ["gd"]}]}}})
    for arguments, message in (
        # A finished folder made with another size is never mixed into this sweep's table.
        ([str(gd_only), "--out", str(tmp_path), "--iters", "3"], "holds a finished run of another command"),
        (
            [str(gd_only), "--out", str(tmp_path / "new"), "--iters", "0"],
            "argument --iters: expected a positive integer",
        ),
        ([str(gd_only), "--out", str(tmp_path / "new"), "--prerender"], "--prerender needs --scenes-cache"),
        (["issue12_timing", "--out", str(tmp_path / "new"), "--jobs", "2"], "a timing plan runs one method at a time"),
        (["no_such_plan", "--out", str(tmp_path / "new")], "no plan 'no_such_plan': not a built-in plan (issue12"),
    ):
        _one_error_line(capsys, arguments, message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"presets": {"nyud": {}}, "seeds": 3},
            "plan.json: unknown key 'seeds' (keys: description, presets, size, timing)",
        ),
        ({"presets": {"cityscapes": {}}}, "plan.json.presets.cityscapes: unknown preset 'cityscapes'"),
        (
            {"presets": {"nyud": {"methods": [{"variants": ["sgd"]}]}}},
            "plan.json.presets.nyud.methods[0].variants[0]: unknown method 'sgd'",
        ),
        (
            {"presets": {"nyud": {"methods": [{"variants": ["gd", "selective:ordr=forward"]}]}}},
            "methods[0].variants[1]: method 'selective' takes no option 'ordr'",
        ),
        ({"presets": {"nyud": {"methods": [{"variants": ["gd"], "seed": 2}]}}}, "methods[0]: unknown key 'seed'"),
        (
            {"presets": {"nyud": {"methods": [{"variants": ["gd"], "seeds": 0}]}}},
            "methods[0].seeds: expected an integer >= 1, got 0",
        ),
        (
            {"presets": {"nyud": {"methods": [{"variants": ["gd"], "seeds": "3"}]}}},
            'methods[0].seeds: expected int, got "3"',
        ),
        ({"presets": {"nyud": {"methods": [{"variants": "gd"}]}}}, 'methods[0].variants: expected list, got "gd"'),
        ({"presets": {"nyud": {"methods": [{"seeds": 2}]}}}, "methods[0]: missing key 'variants'"),
        (
            {"presets": {"nyud": {"methods": [{"variants": ["gd"], "seeds": 2, "first_seeds": 3}]}}},
            "methods[0].first_seeds: 3 is more than seeds (2)",
        ),
        ({"presets": {"nyud": {"methods": [{"variants": ["gd", "gd"]}]}}}, "plan.json: nyud gd seed 0 is listed twice"),
        (
            {
                "presets": {
                    "nyud": {
                        "ablations": [
                            {"title": "t", "method": "selective", "key": "decay", "default": "1e-3", "values": ["x"]}
                        ]
                    }
                }
            },
            "ablations[0].values[0]: method 'selective':",
        ),
        ({"presets": {"nyud": {}}, "size": {"iters": 0}}, "plan.json.size: iters must be positive, got 0"),
        ({"presets": {"nyud": {}}, "size": {"lr": "fast"}}, 'plan.json.size.lr: expected int or float, got "fast"'),
        ({"presets": {"nyud": {}}, "size": {"depth": 3}}, "plan.json.size: unknown key 'depth'"),
        ({}, "plan.json: needs exactly one of 'presets' (a sweep) and 'timing' (a timing plan)"),
        (
            {"timing": {"preset": "nyud", "variants": ["gd"], "rounds": True}},
            "plan.json.timing.rounds: expected int, got true",
        ),
        ([1, 2], "plan.json: expected an object, got [1, 2]"),
    ],
)
def test_a_malformed_plan_file_is_one_error_line(tmp_path, capsys, data, message):
    plan = write_plan(tmp_path, data)
    _one_error_line(capsys, [str(plan), "--out", str(tmp_path / "out")], message.replace("plan.json", str(plan)))
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_plan_file_that_is_not_json_is_one_error_line(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text('{"presets": {"nyud": {}},}')
    _one_error_line(capsys, [str(plan), "--out", str(tmp_path / "out")], f"{plan}: not valid JSON (")


def test_dry_run_prints_the_unfinished_commands(tmp_path, capsys):
    plan = write_plan(tmp_path / "plans", {"presets": {"nyud": {"methods": [{"variants": ["gd"]}]}}})
    runner = FakeTrainer()
    assert sweep_cli.main([str(plan), "--out", str(tmp_path), *SIZE, "--dry-run"], runner=runner) == 0
    lines = capsys.readouterr().out.splitlines()
    assert runner.calls == [] and len(lines) == 2
    assert lines[0].startswith("selgroup-train baseline --tasks nyud") and "--method gd" in lines[1]


@pytest.mark.slow
def test_a_tiny_real_sweep_through_the_cli(tmp_path):
    plan = write_plan(
        tmp_path / "plans",
        {
            "size": {"backbone": "test_vit", "img_size": 16, "patch_size": 8, "batch_size": 2, "iters": 3},
            "presets": {"nyud": {"methods": [{"variants": ["gd", "selective:warmup_steps=1"]}]}},
        },
    )
    out = tmp_path / "sweep"
    assert train_cli.main(["sweep", str(plan), "--out", str(out), "--train-arg=--eval-batches=2"]) == 0, (
        out / "nyud" / "gd" / "seed0" / "train.log"
    ).read_text()
    summary = json.loads((out / "table.json").read_text())
    rows = summary["presets"]["nyud"]["rows"]
    for label in ("gd", "selective:warmup_steps=1"):
        assert math.isfinite(rows[label]["delta_m"]) and rows[label]["time_per_batch_s"] > 0
    assert rows["selective:warmup_steps=1"]["groups_mean"] >= 1
    assert not list(out.rglob("*.pt")) and not list(out.rglob("events.out.tfevents.*"))


def test_timing_interleaves_rounds_and_takes_ratios_within_each_round(tmp_path):
    plan = write_plan(
        tmp_path / "plans", {"timing": {"preset": "nyud", "variants": ["gd", "selective", "pcgrad"], "rounds": 3}}
    )
    runner = FakeTrainer()
    assert sweep_cli.main([str(plan), "--out", str(tmp_path), *SIZE], runner=runner) == 0
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


def test_decay_figure_from_the_histories(tmp_path):
    ablation = sweep_plan.Ablation("affinity decay β", "selective", "decay", "1e-3", ("1e-2",))
    runs = tuple(
        sweep_plan.Run("nyud", variant, 0) for variant in (sweep_plan.Variant("selective"), *ablation.variants)
    )
    plan = sweep_plan.Plan(runs, {"nyud": (ablation,)})
    size = sweep_plan.Size(img_size=16, iters=2)
    outcomes = sweep_runs.execute(plan, tmp_path, size, runner=FakeTrainer(), echo=lambda _: None)
    assert [outcome.status for outcome in outcomes] == ["done"] * 2
    path = sweep_table.decay_figure(plan, tmp_path, "nyud")
    assert path == tmp_path / "nyud_decay.png" and path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sweep_table.decay_figure(sweep_plan.Plan(runs), tmp_path, "nyud") is None  # no decay ablation in the plan


def test_baselines_only_runs_the_baselines_and_the_sweep_reuses_them(tmp_path, fake_plan):
    runner = FakeTrainer()
    assert _sweep(fake_plan, tmp_path, runner, "--baselines-only") == 0
    assert [call[call.index("selgroup_fast.train") + 1] for call in runner.calls] == ["baseline"]
    runner = FakeTrainer()
    assert _sweep(fake_plan, tmp_path, runner) == 0
    assert len(runner.calls) == 4 * 3 and "baseline" not in {
        call[call.index("selgroup_fast.train") + 1] for call in runner.calls
    }


def test_a_second_sweep_on_a_folder_in_use_is_refused(tmp_path, fake_plan, capsys):
    import fcntl

    with open(tmp_path / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a sweep in progress
        assert _sweep(fake_plan, tmp_path, FakeTrainer()) == 2
    assert "error: another sweep is running on" in capsys.readouterr().err
    assert _sweep(fake_plan, tmp_path, FakeTrainer()) == 0  # released: the sweep runs


def test_a_moved_sweep_folder_still_reads(tmp_path, fake_plan):
    assert _sweep(fake_plan, tmp_path / "a", FakeTrainer()) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    runner = FakeTrainer()
    assert _sweep(fake_plan, tmp_path / "b", runner) == 0 and runner.calls == []  # every run counts as finished
    rows = json.loads((tmp_path / "b" / "table.json").read_text())["presets"]["nyud"]["rows"]
    assert rows["selective"]["delta_m"] == pytest.approx(6.0)
