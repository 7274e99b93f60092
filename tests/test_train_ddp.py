"""selgroup-train under torchrun: 2 CPU processes (gloo) match one process with the two batches
together; only rank 0 writes; methods not yet supported under DDP are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import train_ddp_run
from conftest import free_port
from train_helpers import ROOT, TINY_ARGS, load_checkpoint, subprocess_env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["PYTHONPATH"] = f"{ROOT / 'tests'}:{env['PYTHONPATH']}"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)


def test_ddp_with_two_processes_matches_one_process_with_both_batches(tmp_path, one_thread):
    done = _torchrun(str(ROOT / "tests" / "train_ddp_run.py"), str(tmp_path / "ddp"), "4")
    assert done.returncode == 0, done.stderr[-3000:]
    train_ddp_run.train(str(tmp_path / "single"), 8)
    for method in train_ddp_run.METHODS:
        ddp = load_checkpoint(tmp_path / "ddp" / method / "checkpoint.pt")
        single = load_checkpoint(tmp_path / "single" / method / "checkpoint.pt")
        assert ddp["world_size"] == 2 and single["world_size"] == 1
        assert ddp["iteration"] == single["iteration"] == train_ddp_run.ITERS
        for name, value in single["model"].items():
            torch.testing.assert_close(ddp["model"][name], value, rtol=1e-4, atol=1e-5, msg=f"{method} {name}")
        results = json.loads((tmp_path / "ddp" / method / "results.json").read_text())
        assert results["world_size"] == 2
        # rank 0 alone wrote the evaluation record: one line, not one per rank
        assert len((tmp_path / "ddp" / method / "metrics.jsonl").read_text().splitlines()) == 1
        if method == "selective":
            assert ddp["method"]["groups"] == single["method"]["groups"]
            torch.testing.assert_close(
                ddp["method"]["tracker"]["affinity"], single["method"]["tracker"]["affinity"], rtol=1e-4, atol=1e-6
            )


@pytest.mark.slow
def test_the_cli_under_torchrun_on_scenes(tmp_path):
    done = _torchrun(
        "-m",
        "selgroup_fast.train",
        *TINY_ARGS,
        "--method",
        "selective",
        "--method-option",
        "warmup_steps=1",
        "--iters",
        "3",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and results["iterations"] == 3
    assert load_checkpoint(tmp_path / "checkpoint.pt")["world_size"] == 2
