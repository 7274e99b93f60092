"""selgroup-train's command line: every bad input is one `error: ...` line and exit status 2,
before anything trains or is written."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import TINY_ARGS, run_train


def _error(capsys, tmp_path, *args: str) -> str:
    from selgroup_fast.train.cli import main

    out = tmp_path / "out"
    status = main([*TINY_ARGS, "--iters", "1", "--out", str(out), *args])
    captured = capsys.readouterr()
    assert status == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert not out.exists()  # refused before anything was written
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "sgd_magic"], "unknown method 'sgd_magic'; available: gd, selective"),
        (["--method", "gd", "--method-option", "decay=1e-4"], "method 'gd' takes no option 'decay'"),
        (["--method", "cagrad", "--method-option", "c=-1"], "method 'cagrad': cagrad_weights: c must be"),
        (["--method-option", "decay"], "--method-option"),
        (
            ["--method", "stch", "--method-option", "warmup=0", "--method-option", "window=1"],
            "--method stch: its warm-up (1 steps) is not shorter than the run (--iters 1); lower warmup= or window=",
        ),
        # every declared warm-up: a run not longer never applies the rule (the last --iters wins)
        (
            ["--method", "gradnorm", "--method-option", "warmup_steps=3", "--iters", "3"],
            "--method gradnorm: its warm-up (3 steps) is not shorter than the run (--iters 3); lower warmup_steps= or "
            "raise --iters",
        ),
        (
            ["--method", "excess_mtl", "--method-option", "n_warmup_steps=2", "--iters", "2"],
            "--method excess_mtl: its warm-up (2 steps) is not shorter than the run (--iters 2); lower n_warmup_steps=",
        ),
        (  # a smoothing of a weighting with a warm-up has that warm-up
            ["--method", "cr_mogm", "--method-option", "base='gradnorm'"]
            + ["--method-option", "base_options={'warmup_steps': 4}", "--iters", "4"],
            "--method cr_mogm: its warm-up (4 steps) is not shorter than the run (--iters 4); lower warmup_steps= in "
            "base_options or raise --iters",
        ),
        (
            ["--method", "selective", "--iters", "100"],
            "--method selective: its warm-up (100 steps) is not shorter than the run (--iters 100); lower warmup_steps=",
        ),
        # the two-batch methods split each batch in halves: refused when the run is built, not at the first step
        *(
            (
                ["--method", name, "--batch-size", "1"],
                f"--method {name} reads two batches per step: the trainer splits each batch in halves, which needs "
                "--batch-size 2 or more (got 1)",
            )
            for name in ("modo", "sdmgrad")
        ),
        (["--tasks", "semseg,colour"], "unknown task 'colour'"),
        (["--tasks", "depth,depth"], "named twice"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--dataset", "nyud", "--tasks", "sal"], "dataset 'nyud' has no task 'sal'"),
        # the dataset's declared classes against the head, before anything trains (issue #19)
        (["--dataset", "nyud", "--tasks", "pascal:semseg"], "labels task 'semseg' with 40 classes but its head has 21"),
        (["--tasks", "cityscapes:semseg"], "unknown preset 'cityscapes'"),
        (["--tasks", "nyud:sal"], "unknown task 'sal'; preset 'nyud': semseg, depth, normals, edge"),
        (["--img-size", "20", "--patch-size", "8"], "--img-size 20 is not a multiple of --patch-size 8"),
        (["--backbone", "no_such_vit"], "'no_such_vit' is not a timm model name"),
        (["--backbone", "resnet18"], "--backbone resnet18: not a plain timm ViT"),
        (["--optimizer", "lion"], "invalid choice: 'lion'"),
        (["--data-cache", "maybe"], "argument --data-cache: invalid choice: 'maybe'"),
        (["--iters", "0"], "expected a positive integer"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--resume", "/nonexistent/checkpoint.pt"], "no such checkpoint file"),
    ],
)
def test_bad_input_is_one_error_line(args, message, capsys, tmp_path):
    assert message in _error(capsys, tmp_path, *args)


def test_a_malformed_data_root(capsys, tmp_path):
    root = tmp_path / "nyud"
    root.mkdir()
    line = _error(capsys, tmp_path, "--dataset", "nyud", "--data-root", str(root))
    assert str(root) in line


def test_a_baseline_for_other_tasks(capsys, tmp_path):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(
        json.dumps(
            {
                "metrics": {"depth": {"rmse": 1.0}},
                "higher_is_better": {"depth": {"rmse": False}},
                "primary": {"depth": "rmse"},
                "tasks": ["depth"],
            }
        )
    )
    assert "is for other tasks (depth); it has no 'semseg'" in _error(capsys, tmp_path, "--baseline", str(baseline))
    baseline.write_text("{not json")
    assert "not valid JSON" in _error(capsys, tmp_path, "--baseline", str(baseline))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(capsys, tmp_path):
    assert "--device cuda: no usable GPU here" in _error(capsys, tmp_path, "--device", "cuda")


def test_baseline_takes_no_method(capsys, tmp_path):
    from selgroup_fast.train.cli import main

    assert main(["baseline", "--method", "selective", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unrecognized arguments: --method selective")


def test_the_module_entry_point_reports_errors_without_a_traceback(tmp_path):
    done = run_train("--method", "nope", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: --method: unknown method 'nope'") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
