"""NYUD-v2 from disk: tiny fake copies of the paper's layout and of MTAN/LibMTL's .npy layout,
and malformed roots refused with one-line DataErrors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selgroup_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    build_dataset,
    dataset_tasks,
)

H, W = 8, 8  # the fake images are already img_size x img_size, so values pass through unresized
NYUD_TASKS = ["semseg", "depth", "normals", "edge"]


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(H, W, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    depth = rng.uniform(0.5, 9.0, size=(H, W)).astype(np.float32)
    depth[0, :3] = 0.0  # missing depth
    return {
        "image": rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8),
        "semseg": rng.integers(0, 41, size=(H, W), dtype=np.uint8),  # 0 = void
        "depth": depth,
        "normals": normals,
        "edge": (rng.random((H, W)) < 0.3).astype(np.uint8),
    }


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def make_nyud(root: Path, mti_net: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """A fake NYUD-v2 in the paper's layout (or MTI-Net's: .jpg images, .npy edges and normals)."""
    splits = {"train": ["0001", "0002", "0005"], "val": ["0003", "0004"]}
    stored = {}
    for split, ids in splits.items():
        (root / "gt_sets").mkdir(parents=True, exist_ok=True)
        (root / "gt_sets" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for k, image_id in enumerate(ids):
            arrays = _arrays(int(image_id))
            stored[image_id] = arrays
            if mti_net:
                path = root / "images" / f"{image_id}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arrays["image"]).save(path, quality=100)
                with Image.open(path) as decoded:
                    arrays["image"] = np.asarray(decoded)  # JPEG is lossy: the expected image is what it holds
                _save_npy(root / "edge" / f"{image_id}.npy", arrays["edge"].astype(np.float32))
                _save_npy(root / "normals" / f"{image_id}.npy", arrays["normals"].astype(np.float32))
            else:
                _save_png(root / "images" / f"{image_id}.png", arrays["image"])
                _save_png(root / "edge" / f"{image_id}.png", arrays["edge"] * 255)
                encoded = np.round((arrays["normals"] + 1) / 2 * 255).astype(np.uint8)
                arrays["normals"] = 2 * encoded.astype(np.float32) / 255 - 1  # what the PNG holds
                _save_png(root / "normals" / f"{image_id}.png", encoded)
            _save_png(root / "segmentation" / f"{image_id}.png", arrays["semseg"])
            depth = arrays["depth"] if k % 2 else arrays["depth"][..., None]  # both [H, W] and [H, W, 1]
            _save_npy(root / "depth" / f"{image_id}.npy", depth)
    return stored


def make_nyud_npy(root: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """A fake NYUD-v2 in MTAN's / LibMTL's preprocessed layout."""
    stored = {}
    for split, count in (("train", 3), ("val", 2)):
        stored[split] = []
        for index in range(count):
            arrays = _arrays(100 + index + 10 * (split == "val"))
            image = arrays["image"].astype(np.float32) / 255
            label = arrays["semseg"].astype(np.float32) % 14 - 1  # 13 classes, -1 = void
            normal = arrays["normals"].astype(np.float32)
            normal[1, 1] = 0.0  # missing normal
            _save_npy(root / split / "image" / f"{index}.npy", image)
            _save_npy(root / split / "label" / f"{index}.npy", label)
            _save_npy(root / split / "depth" / f"{index}.npy", arrays["depth"][..., None])
            _save_npy(root / split / "normal" / f"{index}.npy", normal)
            stored[split].append({"image": image, "label": label, "depth": arrays["depth"], "normal": normal})
    return stored


def _unnormalise(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mti_net", [False, True], ids=["paper_layout", "mti_net_files"])
def test_nyud_items_decode_every_target(tmp_path: Path, mti_net: bool) -> None:
    stored = make_nyud(tmp_path, mti_net)
    assert dataset_tasks("nyud") == tuple(NYUD_TASKS)
    data = build_dataset("nyud", "val", NYUD_TASKS, img_size=H, root=tmp_path)
    assert len(data) == 2 and len(build_dataset("nyud", "train", ["depth"], img_size=H, root=tmp_path)) == 3
    image, targets = data[1]
    arrays = stored["0004"]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    np.testing.assert_allclose(_unnormalise(image), arrays["image"] / 255, atol=1e-6)
    semseg = arrays["semseg"].astype(np.int64) - 1
    semseg[semseg < 0] = 255
    assert targets["semseg"].dtype == torch.int64 and np.array_equal(targets["semseg"].numpy(), semseg)
    depth = np.where(arrays["depth"] > 0, arrays["depth"], np.nan)[None]
    np.testing.assert_array_equal(targets["depth"].numpy(), depth)
    np.testing.assert_allclose(targets["normals"].numpy(), arrays["normals"].transpose(2, 0, 1), atol=1e-6)
    assert targets["edge"].dtype == torch.int64 and np.array_equal(targets["edge"].numpy(), arrays["edge"])


def test_nyud_reads_one_bit_edge_pngs(tmp_path: Path) -> None:
    stored = make_nyud(tmp_path)
    Image.fromarray(stored["0003"]["edge"].astype(bool)).save(tmp_path / "edge" / "0003.png")
    with Image.open(tmp_path / "edge" / "0003.png") as saved:
        assert saved.mode == "1"
    targets = build_dataset("nyud", "val", ["edge"], img_size=H, root=tmp_path)[0][1]
    assert np.array_equal(targets["edge"].numpy(), stored["0003"]["edge"])


def test_nyud_resizes_every_map_to_img_size(tmp_path: Path) -> None:
    make_nyud(tmp_path)
    image, targets = build_dataset("nyud", "train", NYUD_TASKS, img_size=16, root=tmp_path)[0]
    assert image.shape == (3, 16, 16)
    assert targets["semseg"].shape == (16, 16) and targets["edge"].shape == (16, 16)
    assert targets["depth"].shape == (1, 16, 16) and targets["normals"].shape == (3, 16, 16)
    assert torch.isin(targets["edge"], torch.tensor([0, 1])).all()
    labels = targets["semseg"][targets["semseg"] != 255]
    assert labels.min() >= 0 and labels.max() < 40


def test_nyud_npy_items(tmp_path: Path) -> None:
    stored = make_nyud_npy(tmp_path)
    assert dataset_tasks("nyud_npy") == ("semseg", "depth", "normals")
    data = build_dataset("nyud_npy", "train", ["semseg", "depth", "normals"], img_size=H, root=tmp_path)
    assert len(data) == 3
    image, targets = data[2]
    arrays = stored["train"][2]
    np.testing.assert_allclose(_unnormalise(image), arrays["image"], atol=1e-6)
    label = arrays["label"].astype(np.int64)
    label[label == -1] = 255
    assert np.array_equal(targets["semseg"].numpy(), label)
    np.testing.assert_array_equal(
        targets["depth"].numpy(), np.where(arrays["depth"] > 0, arrays["depth"], np.nan)[None]
    )
    normals = targets["normals"].numpy()
    assert np.isnan(normals[:, 1, 1]).all()
    normals[:, 1, 1] = 0.0
    np.testing.assert_allclose(normals, arrays["normal"].transpose(2, 0, 1))
    assert len(build_dataset("nyud_npy", "val", ["depth"], img_size=H, root=tmp_path)) == 2


def _break(root: Path, relative: str, content: bytes | None) -> None:
    path = root / relative
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)


@pytest.mark.parametrize(
    ("relative", "content", "tasks", "message"),
    [
        ("gt_sets/val.txt", None, NYUD_TASKS, "missing gt_sets/val.txt"),
        ("gt_sets/val.txt", b"\n\n", NYUD_TASKS, "lists no image"),
        ("images/0003.png", None, NYUD_TASKS, r"missing images/0003\.png\|\.jpg"),
        ("depth/0004.npy", None, NYUD_TASKS, r"missing depth/0004\.npy"),
        ("segmentation/0003.png", b"not a png", NYUD_TASKS, r"cannot read .*segmentation/0003\.png"),
        ("depth/0003.npy", b"\x93NUMPY garbage", ["depth"], r"cannot read .*depth/0003\.npy"),
    ],
)
def test_malformed_nyud_roots_raise_one_line(tmp_path: Path, relative, content, tasks, message) -> None:
    make_nyud(tmp_path)
    _break(tmp_path, relative, content)
    with pytest.raises(DataError, match=message) as error:
        build_dataset("nyud", "val", tasks, img_size=H, root=tmp_path)
    text = str(error.value)
    assert "\n" not in text and "expected gt_sets/{train,val}.txt" in text and str(tmp_path) in text


def test_nyud_needs_only_the_requested_tasks_files(tmp_path: Path) -> None:
    make_nyud(tmp_path)
    _break(tmp_path, "depth/0003.npy", None)
    assert len(build_dataset("nyud", "val", ["semseg"], img_size=H, root=tmp_path)) == 2


@pytest.mark.parametrize(
    ("array", "relative", "message"),
    [
        (np.zeros((H, W, 2), np.float32), "depth/0003.npy", r"\[H, W\] or \[H, W, 1\]"),
        (np.zeros((H + 1, W), np.float32), "depth/0003.npy", r"is 9x8 but its image is 8x8"),
    ],
)
def test_malformed_nyud_arrays(tmp_path: Path, array, relative, message) -> None:
    make_nyud(tmp_path)
    np.save(tmp_path / relative, array)
    with pytest.raises(DataError, match=message):
        build_dataset("nyud", "val", ["depth"], img_size=H, root=tmp_path)


@pytest.mark.parametrize(
    ("relative", "array", "message"),
    [
        ("train/image", None, r"missing train/image/"),
        ("train/label/1.npy", None, r"missing train/label/1\.npy"),
        ("train/label/0.npy", np.full((H, W), 0.5, np.float32), "integer labels"),
        ("train/label/0.npy", np.full((H, W), -3.0, np.float32), "labels outside"),
        ("train/normal/0.npy", np.zeros((H, W), np.float32), r"\[H, W, 3\] normals"),
        ("train/image/0.npy", np.zeros((H, W), np.float32), r"\[H, W, 3\] image"),
    ],
)
def test_malformed_npy_roots_raise_one_line(tmp_path: Path, relative, array, message) -> None:
    make_nyud_npy(tmp_path)
    path = tmp_path / relative
    if array is None:
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()
    else:
        np.save(path, array)
    with pytest.raises(DataError, match=message) as error:
        build_dataset("nyud_npy", "train", ["semseg", "depth", "normals"], img_size=H, root=tmp_path)
    assert "\n" not in str(error.value) and "{train,val}/{image,label,depth,normal}" in str(error.value)


def test_missing_or_absent_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a data root"):
        build_dataset("nyud", "train", ["depth"], img_size=H)
    with pytest.raises(DataError, match="is not a folder"):
        build_dataset("nyud_npy", "train", ["depth"], img_size=H, root=tmp_path / "absent")
    with pytest.raises(DataError, match="has no task 'edge'"):
        build_dataset("nyud_npy", "train", ["edge"], img_size=H, root=tmp_path)
