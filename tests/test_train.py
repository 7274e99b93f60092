"""selgroup-train's Python API: every method through the trainer, results.json, baseline and Δm,
non-finite losses, a user's own model and data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import TINY, MapData, MapModel, load_checkpoint

import selgroup_fast
from selgroup_fast.metrics import delta_m, delta_m_all
from selgroup_fast.models import MultiTaskViT
from selgroup_fast.tasks import PRESETS, TaskSpec
from selgroup_fast.train import (
    NonFiniteLoss,
    TrainConfig,
    TrainError,
    fit,
    fit_baseline,
)

RESULT_KEYS = {
    "config",
    "versions",
    "machine",
    "metrics",
    "higher_is_better",
    "primary",
    "time_per_batch_s",
    "wall_time_s",
    "iterations",
    "tasks",
    "overhead",
}
SELECTIVE_KEYS = {"groups_mean", "cogrouping", "affinity"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The trainer tests share the 2-core machine."""


@pytest.mark.parametrize("method", selgroup_fast.methods.available())
def test_every_method_trains_through_the_trainer(method, tmp_path):
    options = {"warmup_steps": 1} if method == "selective" else {}
    config = TrainConfig(method=method, method_options=options, iters=3, eval_every=3, out=str(tmp_path), **TINY)
    results = fit(config)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["metrics"] == results["metrics"]
    assert RESULT_KEYS <= set(results)
    assert results["iterations"] == 3 and results["tasks"] == ["semseg", "depth", "normals", "edge"]
    for task in results["tasks"]:
        primary = results["primary"][task]
        assert math.isfinite(results["metrics"][task][primary])
        assert set(results["higher_is_better"][task]) == set(results["metrics"][task])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [3]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["iteration"] == 3
    # training moved the encoder and every task's decoder away from the seeded initial model
    torch.manual_seed(0)
    initial = MultiTaskViT(list(PRESETS["nyud"]), "test_vit", 16, 8).state_dict()
    for name in ["encoder.patch_embed.proj.weight"] + [f"decoders.{k}.weight" for k in range(4)]:
        assert not torch.equal(state["model"][name], initial[name]), name
    assert any(name.startswith("tensorboard") for name in (p.name for p in tmp_path.iterdir()))
    if method == "selective":
        assert SELECTIVE_KEYS <= set(results)
        k = len(results["tasks"])
        assert len(results["affinity"]) == k and len(results["cogrouping"]) == k
        # after warm-up (1 batch) the two remaining batches used the affinity's groups: the diagonal
        # of the co-grouping frequency is 1 and it is symmetric
        cogrouping = torch.tensor(results["cogrouping"])
        assert torch.equal(cogrouping.diagonal(), torch.ones(k)) and torch.equal(cogrouping, cogrouping.T)
        assert 1 <= results["groups_mean"] <= k
        for plot in ("affinity.png", "cogrouping.png", "groups.png", "affinity_entries.png"):
            assert (tmp_path / plot).stat().st_size > 1000
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {
            "train/loss/semseg",
            "train/lr",
            "selective/groups",
            "affinity/semseg->depth",
            "time/forward_s",
            "time/affinity_s",
            "val/semseg/mIoU",
            "val/loss/edge",
        } <= tags
        assert [event.step for event in events.Scalars("train/lr")] == [1, 2, 3]
    else:
        assert not SELECTIVE_KEYS & set(results) and not (tmp_path / "affinity.png").exists()


def test_baseline_then_delta_m(tmp_path):
    base_config = TrainConfig(method="gd", tasks="depth,normals", iters=2, out=str(tmp_path / "base"), **TINY)
    baseline = fit_baseline(base_config)
    on_disk = json.loads((tmp_path / "base" / "baseline.json").read_text())
    assert on_disk["metrics"] == baseline["metrics"]
    assert {"metrics", "higher_is_better", "primary", "tasks", "config"} <= set(on_disk)
    assert on_disk["tasks"] == ["depth", "normals"]
    # one single-task run per task, each trained on its own task only
    for task in ("depth", "normals"):
        single = json.loads((tmp_path / "base" / task / "results.json").read_text())
        assert single["tasks"] == [task] and single["metrics"][task] == on_disk["metrics"][task]

    config = TrainConfig(
        method="gd",
        tasks="depth,normals",
        iters=2,
        out=str(tmp_path / "mt"),
        baseline=str(tmp_path / "base" / "baseline.json"),
        **TINY,
    )
    results = fit(config)
    # Δm by hand from the two files: the mean over tasks of ±(M - M_b) / M_b × 100 on the primary metrics
    terms = []
    for task in ("depth", "normals"):
        metric = results["primary"][task]
        sign = 1 if results["higher_is_better"][task][metric] else -1
        m, b = results["metrics"][task][metric], on_disk["metrics"][task][metric]
        terms.append(sign * (m - b) / b * 100)
    assert results["delta_m"] == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert results["delta_m"] == delta_m(
        results["metrics"], on_disk["metrics"], results["higher_is_better"], results["primary"]
    )
    assert results["delta_m_all"] == delta_m_all(results["metrics"], on_disk["metrics"], results["higher_is_better"])
    saved = json.loads((tmp_path / "mt" / "results.json").read_text())
    assert saved["delta_m"] == results["delta_m"] and saved["delta_m_all"] == results["delta_m_all"]

    # a finished baseline is not trained again (each task's results.json is reused)
    before = (tmp_path / "base" / "depth" / "results.json").stat().st_mtime_ns
    fit_baseline(base_config)
    assert (tmp_path / "base" / "depth" / "results.json").stat().st_mtime_ns == before

    # a baseline for other tasks is refused before anything trains
    with pytest.raises(TrainError, match="other tasks.*'semseg'"):
        fit(
            TrainConfig(
                method="gd",
                tasks="semseg,depth",
                iters=2,
                out=str(tmp_path / "other"),
                baseline=str(tmp_path / "base" / "baseline.json"),
                **TINY,
            )
        )
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nonfinite_loss_is_reported_with_task_and_iteration(mode, tmp_path, monkeypatch):
    from selgroup_fast.tasks import task_losses
    from selgroup_fast.train import loop

    seen = {"iteration": 0}
    original_step = loop._Run._step

    def counting_step(self, images, targets):
        seen["iteration"] = self.iteration + 1
        return original_step(self, images, targets)

    monkeypatch.setattr(loop._Run, "_step", counting_step)

    def loss_fn(outputs, targets, tasks):
        losses = task_losses(outputs, targets, tasks)
        if seen["iteration"] == 3:  # only the third batch: the depth loss is NaN
            losses[1] = losses[1] * float("nan")
        return losses

    config = TrainConfig(method="gd", iters=5, on_nonfinite=mode, out=str(tmp_path), **TINY)
    if mode == "stop":
        with pytest.raises(NonFiniteLoss, match="task 'depth' at iteration 3") as error:
            fit(config, loss_fn=loss_fn)
        assert (error.value.task, error.value.iteration) == ("depth", 3)
        state = load_checkpoint(tmp_path / "checkpoint.pt")  # the last good state: after iteration 2
        assert state["iteration"] == 2
        assert all(torch.isfinite(p).all() for p in state["model"].values())
    else:
        results = fit(config, loss_fn=loss_fn)
        assert results["skipped_steps"] == 1 and results["iterations"] == 5
        state = load_checkpoint(tmp_path / "checkpoint.pt")
        assert all(torch.isfinite(p).all() for p in state["model"].values())


#: The two tasks of the own-model test: x² and -x.
PAIR = ["square", "negated"]


@pytest.mark.parametrize("method", ["selective", "pcgrad"])
def test_own_model_tasks_and_data(method, tmp_path):
    tasks = [TaskSpec(name, "regression", 1) for name in PAIR]
    torch.manual_seed(0)
    model = MapModel(2)
    config = TrainConfig(
        method=method,
        iters=40,
        lr=1e-2,
        batch_size=8,
        eval_every=40,
        out=str(tmp_path),
        progress=False,
        method_options={"warmup_steps": 5} if method == "selective" else {},
    )
    results = fit(config, model=model, train_data=MapData(64, 0, PAIR), val_data=MapData(16, 1, PAIR), tasks=tasks)
    assert results["dataset"] == "custom" and results["tasks"] == ["square", "negated"]
    # tasks unknown to selgroup_fast.metrics are evaluated by their mean validation loss
    assert results["primary"] == {"square": "loss", "negated": "loss"}
    assert results["higher_is_better"]["square"] == {"loss": False}
    # training helped: the validation losses fell below those of the initial model
    torch.manual_seed(0)
    initial = MapModel(2)
    val = MapData(16, 1, PAIR)
    with torch.no_grad():
        outputs = initial(val.x)
    initial_negated = (outputs[1] + val.x).abs().mean().item()
    assert results["metrics"]["negated"]["loss"] < initial_negated


def test_own_model_needs_its_tasks(tmp_path):
    with pytest.raises(TrainError, match="needs tasks="):
        fit(TrainConfig(out=str(tmp_path), **TINY), model=MapModel(2))


@pytest.mark.parametrize(
    "method, amp",
    [("gd", "bf16"), ("selective", "fp16"), pytest.param("selective", "off", marks=pytest.mark.slow, id="compile")],
)
def test_mixed_precision_and_compile(method, amp, tmp_path):
    config = TrainConfig(
        method=method,
        amp=amp,
        compile=amp == "off",
        iters=2,
        out=str(tmp_path),
        method_options={"warmup_steps": 1} if method == "selective" else {},
        **TINY,
    )
    results = fit(config)
    assert results["iterations"] == 2 and results["config"]["amp"] == amp
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert state["model"]["decoders.0.weight"].dtype == torch.float32  # autocast leaves the parameters alone
    if amp == "fp16":
        assert state["scaler"] is not None and state["scaler"]["scale"] > 0


def test_the_machine_defaults_are_said():
    from selgroup_fast.train.config import CPU_DEFAULTS, GPU_DEFAULTS, resolve

    config, note = resolve(TrainConfig(), torch.device("cpu"))
    assert (config.backbone, config.img_size, config.patch_size, config.iters, config.lr) == (
        "test_vit",
        32,
        8,
        300,
        1e-3,
    )
    assert (config.method, config.dataset, config.tasks, config.batch_size) == ("selective", "scenes", "nyud", 8)
    assert note == CPU_DEFAULTS.note and "under 3 minutes on 2 cores" in note
    # the paper's Table C.1 on a GPU (resolve only reads the device's type)
    config, note = resolve(TrainConfig(), torch.device("cuda"))
    assert (config.optimizer, config.lr, config.weight_decay, config.schedule, config.batch_size, config.img_size) == (
        "adam",
        2e-5,
        1e-6,
        "poly",
        8,
        224,
    )
    assert note == GPU_DEFAULTS.note
    # any size or length given: no note
    assert resolve(TrainConfig(iters=5), torch.device("cpu"))[1] is None


@pytest.mark.slow
def test_no_arguments_trains_the_default_run(tmp_path):
    from train_helpers import run_train

    done = run_train("--out", str(tmp_path), timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CPU defaults:" in done.stderr and "selective on scenes" in done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["iterations"] == 300 and results["method"] == "selective"
    assert 2 <= results["groups_mean"] <= 4 and len(results["groups_final"]) >= 1
