"""NYUD-v2 from disk, in the two layouts public multi-task code reads (nothing is downloaded).

``nyud``: the layout of the paper's ``data/nyud.py`` (InvPT/ATRC's NYUD-v2 release, derived
from MTI-Net's loader)::

    ROOT/gt_sets/train.txt, ROOT/gt_sets/val.txt   one image id per line
    ROOT/images/<id>.png          RGB (MTI-Net's release: <id>.jpg)
    ROOT/segmentation/<id>.png    class labels, 0 = void, 1..40 the NYU-40 classes
    ROOT/depth/<id>.npy           depth in metres, [H, W] or [H, W, 1]
    ROOT/normals/<id>.png         normals as (n + 1) / 2 * 255 (MTI-Net's: <id>.npy in [-1, 1])
    ROOT/edge/<id>.png            edge map, 0 or 255 (MTI-Net's: <id>.npy, 0 or 1)

``nyud_npy``: the preprocessed arrays MTAN and LibMTL read (13 classes, 288 × 384)::

    ROOT/{train,val}/image/<i>.npy    [H, W, 3] RGB in [0, 1], i = 0 .. N-1
    ROOT/{train,val}/label/<i>.npy    [H, W] class labels 0..12, -1 = void
    ROOT/{train,val}/depth/<i>.npy    [H, W, 1] depth, 0 = missing
    ROOT/{train,val}/normal/<i>.npy   [H, W, 3] normals in [-1, 1], 0 = missing

Both yield the interface's items: void labels become 255, missing depth or normals NaN.
Every map is resized to ``img_size`` × ``img_size`` (the image bilinearly with antialiasing,
the targets by nearest neighbour, so labels stay labels and NaN stays NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .common import IGNORE_LABEL, DataError, normalise_image

NYUD_TASKS = ("semseg", "depth", "normals", "edge")
NYUD_NPY_TASKS = ("semseg", "depth", "normals")
# Semantic classes: the NYU-40 classes of the paper's layout, the 13 classes of the .npy release.
NYUD_CLASSES = 40
NYUD_NPY_CLASSES = 13

# Folder and accepted file suffixes (the paper's first, then MTI-Net's) of the image and each task.
_NYUD_FILES = {
    "image": ("images", (".png", ".jpg")),
    "semseg": ("segmentation", (".png",)),
    "depth": ("depth", (".npy",)),
    "normals": ("normals", (".png", ".npy")),
    "edge": ("edge", (".png", ".npy")),
}
_NYUD_LAYOUT = (
    "gt_sets/{train,val}.txt, images/<id>.png|jpg, segmentation/<id>.png, depth/<id>.npy, "
    "normals/<id>.png|npy, edge/<id>.png|npy"
)
_NPY_FOLDERS = {"image": "image", "semseg": "label", "depth": "depth", "normals": "normal"}
_NPY_LAYOUT = "{train,val}/{image,label,depth,normal}/<i>.npy with i = 0 .. N-1"


def _read_png(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - pillow is in the train extra
        raise DataError(f"reading {path} needs pillow: pip install pillow") from error
    with Image.open(path) as image:
        return np.asarray(image)


def _read_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _resize(array: np.ndarray, size: int, image: bool) -> torch.Tensor:
    """[H, W, C] -> [C, size, size]: bilinear with antialiasing for the image, nearest for targets."""
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
    if image:
        return F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return F.interpolate(tensor, size=(size, size), mode="nearest-exact")[0]


class _NyudBase(Dataset):
    """Shared item assembly; subclasses find the files and decode each one."""

    name: str
    layout: str
    #: The number of classes of each label-kind task (what a head must have at least).
    classes: dict[str, int]

    def __init__(self, root: Path, split: str, tasks: tuple[str, ...], img_size: int) -> None:
        self.root, self.split, self.tasks, self.img_size = root, split, tasks, img_size
        if not root.is_dir():
            self._fail(f"{root} is not a folder")
        self.files = self._find_files()
        self[0]  # decodes one item now, so a malformed file fails here rather than mid-training

    def _fail(self, problem: str) -> NoReturn:
        raise DataError(f"{self.name}: {problem} (expected {self.layout} under {self.root})")

    def _find_files(self) -> list[dict[str, Path]]:
        raise NotImplementedError

    def _decode(self, key: str, path: Path) -> np.ndarray:
        """The array of ``key`` ("image" or a task) as [H, W, C]: float RGB in [0, 1], labels or values."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        files = self.files[index]
        image = self._load(files, "image")
        height, width = image.shape[:2]
        targets = {}
        for task in self.tasks:
            array = self._load(files, task)
            if array.shape[:2] != (height, width):
                self._fail(f"{files[task]} is {array.shape[0]}x{array.shape[1]} but its image is {height}x{width}")
            resized = _resize(array.astype(np.float32), self.img_size, image=False)
            if task in ("semseg", "edge"):
                targets[task] = resized[0].round().long()
            else:
                targets[task] = resized.float()
        resized_image = _resize(image.astype(np.float32), self.img_size, image=True)
        return normalise_image(resized_image.clamp(0, 1).permute(1, 2, 0).numpy()), targets

    def _load(self, files: dict[str, Path], key: str) -> np.ndarray:
        path = files[key]
        try:
            array = self._decode(key, path)
        except DataError:
            raise
        except (OSError, ValueError, EOFError) as error:  # unreadable or truncated: name the file, in one line
            self._fail(f"cannot read {path}: {type(error).__name__}: {error}".replace("\n", " "))
        return array


def _labels(raw: np.ndarray, void: int, offset: int, path: Path, fail: Callable[[str], NoReturn]) -> np.ndarray:
    """Integer labels ``raw - offset`` with ``void`` mapped to 255, as [H, W, 1]."""
    if raw.ndim != 2:
        fail(f"{path} must be a 2-D label map, got shape {raw.shape}")
    if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
        fail(f"{path} must hold integer labels")
    labels = raw.astype(np.int64)
    out = np.where(labels == void, IGNORE_LABEL, labels - offset)
    if np.any((out < 0) | (out > IGNORE_LABEL)):
        fail(f"{path} holds labels outside [{void}, {IGNORE_LABEL + offset - 1}]")
    return out[..., None]


def _normals(raw: np.ndarray, path: Path, fail: Callable[[str], NoReturn]) -> np.ndarray:
    if raw.ndim != 3 or raw.shape[2] != 3:
        fail(f"{path} must be [H, W, 3] normals, got shape {raw.shape}")
    normals = raw.astype(np.float32)
    missing = ~np.isfinite(normals).all(-1) | (np.abs(normals).sum(-1) == 0)
    return np.where(missing[..., None], np.nan, normals)


def _depth(raw: np.ndarray, path: Path, fail: Callable[[str], NoReturn]) -> np.ndarray:
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2:
        fail(f"{path} must be an [H, W] or [H, W, 1] depth map, got shape {raw.shape}")
    depth = raw.astype(np.float32)
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.nan)[..., None]


class NyudDataset(_NyudBase):
    """NYUD-v2 in the paper's layout (see the module docstring)."""

    name = "nyud"
    layout = _NYUD_LAYOUT
    classes = {"semseg": NYUD_CLASSES, "edge": 2}

    def _find_files(self) -> list[dict[str, Path]]:
        split_file = self.root / "gt_sets" / f"{self.split}.txt"
        if not split_file.is_file():
            self._fail(f"missing gt_sets/{self.split}.txt")
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            self._fail(f"gt_sets/{self.split}.txt lists no image")
        files = []
        for image_id in ids:
            entry = {}
            for key in ("image", *self.tasks):
                folder, suffixes = _NYUD_FILES[key]
                found = [self.root / folder / f"{image_id}{s}" for s in suffixes]
                found = [path for path in found if path.is_file()]
                if not found:
                    self._fail(f"missing {folder}/{image_id}{'|'.join(suffixes)}")
                entry[key] = found[0]
            files.append(entry)
        return files

    def _decode(self, key: str, path: Path) -> np.ndarray:
        raw = _read_npy(path) if path.suffix == ".npy" else _read_png(path)
        if key == "image":
            if raw.ndim == 2:
                raw = np.repeat(raw[..., None], 3, axis=2)
            if raw.ndim != 3 or raw.shape[2] not in (3, 4):
                self._fail(f"{path} must be an RGB image, got shape {raw.shape}")
            return raw[..., :3].astype(np.float32) / 255.0
        if key == "semseg":
            return _labels(raw, void=0, offset=1, path=path, fail=self._fail)
        if key == "depth":
            return _depth(raw, path, self._fail)
        if key == "normals":
            values = raw.astype(np.float32)
            if path.suffix == ".png":
                values = 2 * values / 255.0 - 1
            return _normals(values, path, self._fail)
        # edge: 0/255 in PNGs, 0/1 in MTI-Net's arrays
        if raw.ndim == 3 and raw.shape[2] == 1:
            raw = raw[..., 0]
        if raw.ndim != 2:
            self._fail(f"{path} must be a 2-D edge map, got shape {raw.shape}")
        scale = 255.0 if path.suffix == ".png" and raw.dtype != bool else 1.0  # 1-bit PNGs read as bool
        return (raw.astype(np.float32) / scale > 0.5).astype(np.int64)[..., None]


class NyudNpyDataset(_NyudBase):
    """NYUD-v2 in MTAN's and LibMTL's preprocessed ``.npy`` layout (see the module docstring)."""

    name = "nyud_npy"
    layout = _NPY_LAYOUT
    classes = {"semseg": NYUD_NPY_CLASSES}

    def _find_files(self) -> list[dict[str, Path]]:
        split_dir = self.root / self.split
        image_dir = split_dir / "image"
        if not image_dir.is_dir():
            self._fail(f"missing {self.split}/image/")
        count = len(list(image_dir.glob("*.npy")))
        if count == 0:
            self._fail(f"{self.split}/image/ holds no .npy file")
        files = []
        for index in range(count):
            entry = {}
            for key in ("image", *self.tasks):
                path = split_dir / _NPY_FOLDERS[key] / f"{index}.npy"
                if not path.is_file():
                    self._fail(f"missing {self.split}/{_NPY_FOLDERS[key]}/{index}.npy")
                entry[key] = path
            files.append(entry)
        return files

    def _decode(self, key: str, path: Path) -> np.ndarray:
        raw = _read_npy(path)
        if key == "image":
            if raw.ndim != 3 or raw.shape[2] != 3:
                self._fail(f"{path} must be an [H, W, 3] image, got shape {raw.shape}")
            image = raw.astype(np.float32)
            return image / 255.0 if raw.dtype == np.uint8 else image
        if key == "semseg":
            return _labels(raw, void=-1, offset=0, path=path, fail=self._fail)
        if key == "depth":
            return _depth(raw, path, self._fail)
        return _normals(raw, path, self._fail)
