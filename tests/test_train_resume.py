"""Checkpoints: N iterations straight and N/2 + a real kill + --resume give bitwise identical
parameters; corrupted or foreign checkpoints are refused and left alone."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_helpers import (
    ROOT,
    TINY_ARGS,
    load_checkpoint,
    run_train,
    subprocess_env,
    train_command,
)

ITERS = 8
HALF = ITERS // 2
# selective with a 2-batch warm-up: the affinity, the groups and the order generator all cross the
# resume; poly decay: so does the LR schedule; batch 2 over 4000 scenes: the data position too.
RUN = [*TINY_ARGS, "--method", "selective", "--method-option", "warmup_steps=2", "--iters", str(ITERS),
       "--eval-every", str(ITERS), "--checkpoint-every", str(HALF)]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"] == ITERS
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert torch.equal(a["method"]["tracker"]["affinity"], b["method"]["tracker"]["affinity"])
    assert a["method"]["groups"] == b["method"]["groups"]
    assert torch.equal(a["method"]["generator"], b["method"]["generator"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][name]))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight")
    done = run_train(*RUN, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return load_checkpoint(out / "checkpoint.pt")


def _start_and_kill_after_first_checkpoint(out: Path, signum: int) -> subprocess.CompletedProcess:
    process = subprocess.Popen(train_command(*RUN, "--out", str(out)), env=subprocess_env(), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():  # appears complete, by rename, at iteration HALF
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "signum",
    [pytest.param(signal.SIGKILL, marks=pytest.mark.slow), signal.SIGTERM],
    ids=["SIGKILL", "SIGTERM"],
)
def test_kill_and_resume_is_bitwise_identical_to_a_straight_run(signum, straight, tmp_path):
    killed = _start_and_kill_after_first_checkpoint(tmp_path, signum)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    if signum == signal.SIGKILL:
        assert killed.returncode == -signal.SIGKILL
        assert state["iteration"] == HALF  # the kill came before the next checkpoint (at the end)
    else:
        # SIGTERM: the run finished its iteration, checkpointed it and exited with 128 + 15
        assert killed.returncode == 128 + signal.SIGTERM, killed.stderr
        assert "SIGTERM at iteration" in killed.stderr and "--resume" in killed.stderr
        assert HALF <= state["iteration"] < ITERS
    assert not (tmp_path / "results.json").exists()
    resumed = run_train(*RUN, "--out", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_state(load_checkpoint(tmp_path / "checkpoint.pt"), straight)


def _main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (the refusals happen before any training)."""
    from selgroup_fast.train.cli import main

    status = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, captured.out, captured.err)


def test_a_corrupted_checkpoint_is_refused_and_kept(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint at all")
    done = _main(capsys, *RUN, "--out", str(tmp_path), "--resume")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert done.stderr.startswith(f"error: checkpoint {checkpoint} is corrupted")
    assert checkpoint.read_bytes() == b"not a checkpoint at all"


def test_a_checkpoint_of_another_run_is_refused_and_kept(straight, tmp_path, capsys):
    from selgroup_fast.train import checkpoint as ckpt

    foreign = dict(straight)
    foreign["identity"] = {**straight["identity"], "method": "gd", "img_size": 32}
    ckpt.save(tmp_path / "checkpoint.pt", {k: v for k, v in foreign.items() if k != "format"})
    before = (tmp_path / "checkpoint.pt").read_bytes()
    done = _main(capsys, *RUN, "--out", str(tmp_path), "--resume")
    assert done.returncode == 2
    assert "written by another run: method='gd' (this run: 'selective'); img_size=32 (this run: 16)" in done.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    # and without --resume the run refuses to start over it
    fresh = _main(capsys, *RUN, "--out", str(tmp_path))
    assert fresh.returncode == 2 and "already holds a checkpoint" in fresh.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
