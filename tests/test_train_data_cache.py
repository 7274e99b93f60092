"""The trainer's split cache (--data-cache): the same batches as the DataLoader's, bit for bit, in the
same order across epochs and resumes, each scene rendered once; its limits refused in one line."""

from __future__ import annotations

import itertools

import pytest
import torch
from train_helpers import TINY, MapData

from selgroup_fast.data import DataError, build_dataset, scenes_dataset
from selgroup_fast.data.split_cache import SplitCache
from selgroup_fast.tasks import TaskSpec
from selgroup_fast.train import TrainConfig, TrainError, fit
from selgroup_fast.train import batches as batches_module
from selgroup_fast.train.batches import TrainBatches

TASKS = ["semseg", "depth", "normals", "edge"]
CPU = torch.device("cpu")


@pytest.fixture
def small_split(monkeypatch):
    """A 24-scene training split (6 batches of 4 an epoch), so that a test crosses epochs quickly."""
    monkeypatch.setitem(scenes_dataset.SCENES_LENGTHS, "train", 24)
    return build_dataset("scenes", "train", TASKS, img_size=16)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits: NaN (an invalid depth pixel) equals NaN only bitwise."""
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor


def _assert_same_batches(expected: list, actual: list) -> None:
    assert len(expected) == len(actual)
    for (images, targets), (cached_images, cached_targets) in zip(expected, actual, strict=True):
        assert torch.equal(_bits(images), _bits(cached_images))
        assert list(targets) == list(cached_targets)
        for name, target in targets.items():
            assert target.dtype == cached_targets[name].dtype, name
            assert torch.equal(_bits(target), _bits(cached_targets[name])), name


def _batches(data, workers: int, data_cache: str, position: tuple[int, int] = (0, 0)) -> TrainBatches:
    config = TrainConfig(batch_size=4, workers=workers, data_cache=data_cache, seed=3)
    batches = TrainBatches(data, config, world_size=1, rank=0, device=CPU)
    batches.epoch, batches.batch_in_epoch = position
    return batches


def _take(batches: TrainBatches, count: int) -> list:
    return list(itertools.islice(iter(batches), count))


@pytest.mark.parametrize("workers", [0, 1])
def test_cached_batches_are_the_dataloaders_bit_for_bit_across_epochs(small_split, workers):
    uncached = _batches(small_split, workers=0, data_cache="off")
    cached = _batches(small_split, workers=workers, data_cache="on")
    assert uncached.cache is None and cached.cache is not None
    expected = _take(uncached, 15)  # 2.5 epochs
    _assert_same_batches(expected, _take(cached, 15))
    assert any(torch.isnan(images).any() or torch.isnan(t["depth"]).any() for images, t in expected)
    assert cached.epoch == uncached.epoch == 2 and cached.batch_in_epoch == uncached.batch_in_epoch == 3


def test_each_scene_is_rendered_once(small_split, monkeypatch):
    rendered: list[int] = []
    render = scenes_dataset.ScenesDataset.__getitem__

    def counted(self, index):
        rendered.append(index)
        return render(self, index)

    monkeypatch.setattr(scenes_dataset.ScenesDataset, "__getitem__", counted)
    batches = _batches(small_split, workers=0, data_cache="on")
    _take(batches, 15)  # 60 items of a 24-item split
    assert sorted(rendered) == list(range(24))
    assert batches.cache is not None and batches.cache.complete


def test_a_resumed_position_continues_the_same_batches(small_split):
    straight = _take(_batches(small_split, workers=0, data_cache="off"), 15)
    # the checkpointed position after 8 batches: epoch 1, its third batch
    resumed = _batches(small_split, workers=1, data_cache="on", position=(1, 2))
    _assert_same_batches(straight[8:], _take(resumed, 7))


def test_the_trainer_trains_the_same_with_and_without_the_cache(tmp_path):
    """Same seed: the same scenes in the same order, so the same losses and metrics, exactly."""
    runs = {
        mode: fit(TrainConfig(method="gd", iters=3, out=str(tmp_path / mode), data_cache=mode, **TINY))
        for mode in ("off", "on")
    }
    assert runs["off"]["data_cache"] == "off (--data-cache off)"
    assert runs["on"]["data_cache"].startswith("on (4000 items, ")
    assert runs["on"]["metrics"] == runs["off"]["metrics"]
    assert runs["on"]["val_loss"] == runs["off"]["val_loss"]


def test_auto_leaves_a_split_over_its_limit_to_the_dataloader(small_split, monkeypatch):
    monkeypatch.setattr(batches_module, "AUTO_CACHE_LIMIT", 100_000)  # the 24 scenes take 24 × 30 × 16² bytes
    auto = _batches(small_split, workers=0, data_cache="auto")
    assert auto.cache is None
    assert auto.cache_note == "off (0.2 MiB > the 0.1 MiB of --data-cache auto; --data-cache on caches it)"
    assert _batches(small_split, workers=0, data_cache="on").cache is not None  # on: any size


def test_too_little_shared_memory_is_refused_by_on_and_avoided_by_auto(small_split, monkeypatch):
    monkeypatch.setattr(batches_module, "shared_memory_room", lambda: 100_000)
    with pytest.raises(
        TrainError, match=r"^--data-cache on: the split cache takes 0.2 MiB, /dev/shm has 0.1 MiB free$"
    ):
        _batches(small_split, workers=1, data_cache="on")
    assert _batches(small_split, workers=1, data_cache="auto").cache_note == (
        "off (0.2 MiB > the 0.1 MiB free in /dev/shm)"
    )
    assert _batches(small_split, workers=0, data_cache="on").cache is not None  # no worker: no shared memory


def test_the_shared_memory_must_hold_a_cache_per_process_of_the_machine(small_split, monkeypatch):
    """Under torchrun every local rank allocates its own cache in the one /dev/shm, before any writes into it."""
    monkeypatch.setattr(batches_module, "shared_memory_room", lambda: 500_000)  # one 0.2 MiB cache fits, 4 do not
    assert _batches(small_split, workers=1, data_cache="auto").cache is not None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _batches(small_split, workers=1, data_cache="auto").cache_note == (
        "off (4 processes × 0.2 MiB > the 0.5 MiB free in /dev/shm)"
    )
    with pytest.raises(TrainError, match=r"^--data-cache on: the split cache takes 4 processes × 0.2 MiB, /dev/shm "):
        _batches(small_split, workers=1, data_cache="on")


def test_on_refuses_data_that_is_not_the_built_in_scenes(tmp_path):
    config = TrainConfig(method="gd", iters=1, out=str(tmp_path), data_cache="on", **TINY)
    tasks = ["square", "negated"]
    specs = [TaskSpec(name, "regression", 1) for name in tasks]
    with pytest.raises(TrainError, match=r"^--data-cache on: only the built-in scenes dataset is cached"):
        fit(config, tasks=specs, train_data=MapData(16, 0, tasks), val_data=MapData(8, 1, tasks))


def test_a_bad_mode_is_one_error_line(tmp_path):
    with pytest.raises(TrainError, match=r"^--data-cache must be one of auto, on, off, got 'yes'$"):
        fit(TrainConfig(method="gd", iters=1, out=str(tmp_path), data_cache="yes", **TINY))


class _WideLabels(torch.utils.data.Dataset):
    """Two items whose second has a label uint8 cannot hold."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        return torch.zeros(3, 2, 2), {"semseg": torch.full((2, 2), 300 if index else 1, dtype=torch.int64)}


def test_a_label_the_cache_cannot_hold_is_refused():
    cache = SplitCache(_WideLabels(), shared=False)
    with pytest.raises(DataError, match=r"^item 1: 'semseg' has label 300, outside the split cache's 0..255"):
        cache[1]
