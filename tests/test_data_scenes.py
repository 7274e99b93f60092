"""The built-in ``scenes`` dataset: determinism, the interface's shapes and dtypes, and the
geometric relations between its targets (checked from the targets themselves, not from the
renderer's internals)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selgroup_fast.data import SCENES_LENGTHS, DataError, build_dataset, dataset_tasks
from selgroup_fast.data.scenes import (
    CLASS_NAMES,
    CRATE,
    OCCLUSION_JUMP,
    PERSON,
    RESHADING_LIGHT,
    RUG,
    WALL,
    PrimitivesBuilder,
    Render,
    Scene,
    draw_scene,
    render,
)
from selgroup_fast.data.targets import edge as edge_target
from selgroup_fast.data.targets import occlusion_mask
from selgroup_fast.tasks import PRESETS

SIZE = 32
ALL_TASKS = dataset_tasks("scenes")
INDICES = range(6)


@pytest.fixture(scope="module")
def samples() -> list[tuple[torch.Tensor, dict[str, torch.Tensor], float]]:
    """Six validation scenes with every target, and each scene's focal length in pixels."""
    data = build_dataset("scenes", "val", ALL_TASKS, img_size=SIZE, seed=3)
    out = []
    for index in INDICES:
        image, targets = data[index]
        fov = draw_scene(np.random.default_rng([3, 1, index])).fov
        out.append((image, targets, (SIZE / 2) / np.tan(fov / 2)))
    return out


def test_every_preset_task_is_provided_with_its_shape_dtype_and_label_range() -> None:
    for preset, specs in PRESETS.items():
        data = build_dataset("scenes", "train", [spec.name for spec in specs], img_size=SIZE)
        image, targets = data[1]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32, preset
        assert torch.isfinite(image).all()
        assert set(targets) == {spec.name for spec in specs}
        for spec in specs:
            target = targets[spec.name]
            if spec.kind == "segmentation":
                assert target.shape == (SIZE, SIZE) and target.dtype == torch.int64, spec
                labels = target[target != 255]
                assert labels.min() >= 0 and labels.max() < spec.channels, spec
            else:
                assert target.shape == (spec.channels, SIZE, SIZE) and target.dtype == torch.float32, spec


def test_split_lengths_are_fixed() -> None:
    assert len(build_dataset("scenes", "train", ["depth"], img_size=SIZE)) == SCENES_LENGTHS["train"] == 4000
    assert len(build_dataset("scenes", "val", ["depth"], img_size=SIZE)) == SCENES_LENGTHS["val"] == 500
    with pytest.raises(IndexError):
        build_dataset("scenes", "val", ["depth"], img_size=SIZE)[500]


def test_deterministic_from_seed_split_and_index() -> None:
    tasks = ["semseg", "depth", "normals"]
    first = build_dataset("scenes", "train", tasks, img_size=SIZE, seed=7)[5]
    again = build_dataset("scenes", "train", tasks, img_size=SIZE, seed=7)[5]
    assert torch.equal(first[0], again[0])
    for task in tasks:
        assert torch.equal(first[1][task].nan_to_num(-1), again[1][task].nan_to_num(-1))
    for other in (
        build_dataset("scenes", "train", tasks, img_size=SIZE, seed=8)[5],
        build_dataset("scenes", "val", tasks, img_size=SIZE, seed=7)[5],
        build_dataset("scenes", "train", tasks, img_size=SIZE, seed=7)[6],
    ):
        assert not torch.equal(first[0], other[0])


def test_a_scene_does_not_depend_on_the_resolution() -> None:
    """The same index at 32 and 64 pixels is one room: the 64-pixel depth, pooled 2x2, is the 32-pixel one's."""
    small = build_dataset("scenes", "train", ["depth"], img_size=32)[2][1]["depth"][0]
    large = build_dataset("scenes", "train", ["depth"], img_size=64)[2][1]["depth"][0]
    pooled = large.reshape(32, 2, 32, 2).permute(0, 2, 1, 3).reshape(32, 32, 4)
    agree = (pooled.nanmedian(-1).values - small).abs() < 0.1 * small
    assert agree[torch.isfinite(small)].float().mean() > 0.9


def test_zbuffer_and_euclidean_depth_differ_by_the_ray_angle(samples) -> None:
    """euclidean / zbuffer = |(x, y, f)| / f: its square minus 1 is (x^2 + y^2) / f^2 in pixel offsets."""
    offsets = torch.arange(SIZE, dtype=torch.float64) + 0.5 - SIZE / 2
    radius2 = offsets[None, :] ** 2 + offsets[:, None] ** 2
    for _, targets, focal in samples:
        ratio = targets["depth_euclidean"][0].double() / targets["depth_zbuffer"][0].double()
        valid = torch.isfinite(ratio)
        assert valid.float().mean() > 0.5
        np.testing.assert_allclose(ratio[valid] ** 2 - 1, radius2[valid] / focal**2, rtol=1e-4, atol=1e-6)
        assert torch.equal(targets["depth"].nan_to_num(-1), targets["depth_zbuffer"].nan_to_num(-1))


def _points(zdepth: torch.Tensor, focal: float) -> torch.Tensor:
    """Back-projection of a z-depth map through the pinhole: [H, W, 3] camera-frame points."""
    offsets = torch.arange(SIZE, dtype=torch.float64) + 0.5 - SIZE / 2
    x = offsets[None, :].expand(SIZE, SIZE) / focal
    y = offsets[:, None].expand(SIZE, SIZE) / focal
    return torch.stack([x, y, torch.ones_like(x)], -1) * zdepth.double()[..., None]


def test_normals_agree_with_the_depth_maps_gradient_on_planes(samples) -> None:
    checked = 0
    for _, targets, focal in samples:
        points = _points(targets["depth_zbuffer"][0], focal)
        along_x = points[1:-1, 2:] - points[1:-1, :-2]
        along_y = points[2:, 1:-1] - points[:-2, 1:-1]
        from_depth = torch.nn.functional.normalize(torch.cross(along_x, along_y, dim=-1), dim=-1)
        from_depth = torch.where((from_depth * points[1:-1, 1:-1]).sum(-1, keepdim=True) > 0, -from_depth, from_depth)
        normals = targets["normals"].double().permute(1, 2, 0)
        # Planar pixels: one facet (segment_unsup25d) with one normal across the 3x3 neighbourhood.
        facets = targets["segment_unsup25d"].double().permute(1, 2, 0)
        same = torch.ones(SIZE - 2, SIZE - 2, dtype=torch.bool)
        for field in (normals, facets):
            windows = field.unfold(0, 3, 1).unfold(1, 3, 1).reshape(SIZE - 2, SIZE - 2, field.shape[-1], 9)
            same &= (windows - field[1:-1, 1:-1, :, None]).abs().amax((-1, -2)) < 1e-5
        planar = same & torch.isfinite(from_depth).all(-1)
        cosine = (from_depth[planar] * normals[1:-1, 1:-1][planar]).sum(-1).clamp(-1, 1)
        angle = torch.rad2deg(torch.acos(cosine))
        assert angle.max() < 0.5, angle.max()
        checked += int(planar.sum())
    assert checked > 0.5 * len(samples) * (SIZE - 2) ** 2


def test_normals_are_unit_and_face_the_camera(samples) -> None:
    for _, targets, focal in samples:
        normals = targets["normals"].double().permute(1, 2, 0)
        valid = torch.isfinite(normals).all(-1)
        np.testing.assert_allclose(normals[valid].norm(dim=-1), 1.0, rtol=1e-6)
        rays = _points(torch.ones(SIZE, SIZE), focal)
        assert ((normals * rays).sum(-1)[valid] < 0).all()
        assert torch.equal(targets["normals"].nan_to_num(9), targets["normal"].nan_to_num(9))


def test_reshading_is_the_normals_lit_by_the_fixed_light(samples) -> None:
    light = torch.tensor(RESHADING_LIGHT, dtype=torch.float64)
    for _, targets, _ in samples:
        expected = (targets["normals"].double().permute(1, 2, 0) @ light).clamp_min(0)
        np.testing.assert_allclose(targets["reshading"][0].double(), expected, equal_nan=True, rtol=0, atol=1e-6)


def test_invalid_pixels_are_the_sky_in_every_target(samples) -> None:
    for _, targets, _ in samples:
        sky = targets["semseg"] == 255
        for task in (
            "depth",
            "depth_euclidean",
            "normals",
            "principal_curvature",
            "reshading",
            "keypoints3d",
            "segment_unsup25d",
        ):
            assert torch.equal(torch.isnan(targets[task]).any(0), sky), task
            assert torch.equal(torch.isnan(targets[task]).all(0), sky), task
        for task in ("edge_occlusion", "edge_texture", "keypoints2d", "segment_unsup2d"):
            assert torch.isfinite(targets[task]).all(), task


def test_occlusion_edges_sit_on_depth_discontinuities(samples) -> None:
    """Every occlusion pixel has a neighbour farther by the jump (or the sky); every big jump
    between two objects marks its near side."""
    for _, targets, _ in samples:
        distance = targets["depth_euclidean"][0].double().nan_to_num(float("inf"))
        occlusion = targets["edge_occlusion"][0] > 0.5
        labels = targets["semseg"]
        assert torch.isin(targets["edge_occlusion"], torch.tensor([0.0, 1.0])).all()
        has_farther = torch.zeros_like(occlusion)
        must_mark = torch.zeros_like(occlusion)
        padded = torch.nn.functional.pad(distance[None, None], (1, 1, 1, 1), value=0.0)[0, 0]
        padded_labels = torch.nn.functional.pad(labels[None, None], (1, 1, 1, 1), value=-1)[0, 0]
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            neighbour = padded[1 + dy : 1 + dy + SIZE, 1 + dx : 1 + dx + SIZE]
            neighbour_label = padded_labels[1 + dy : 1 + dy + SIZE, 1 + dx : 1 + dx + SIZE]
            has_farther |= neighbour > distance * (1 + OCCLUSION_JUMP)
            must_mark |= (neighbour > 1.5 * distance) & (neighbour_label != labels) & (neighbour_label >= 0)
        must_mark &= torch.isfinite(distance) & ~torch.isin(labels, torch.tensor([RUG, 255]))
        assert occlusion.any()
        assert not (occlusion & ~has_farther).any()
        assert not (must_mark & ~occlusion).any()


def _crate_before_a_wall(size: int) -> Render:
    """A hand-built scene: a 0.8 m crate standing on the floor 3 m ahead, a wall 6 m ahead, the camera 1.5 m high."""
    boxes = PrimitivesBuilder()
    plain = np.array([0.0, 1.0, 0.0, 0.0])
    boxes.add((0.0, 1.5, 6.1), (6.0, 1.5, 0.1), 0.0, 1, WALL, np.full(3, 0.8), plain)
    boxes.add((0.0, 0.4, 3.0), (0.4, 0.4, 0.4), 0.0, 2, CRATE, np.full(3, 0.4), plain)
    pitch = 0.3
    forward = np.array([0.0, -np.sin(pitch), np.cos(pitch)])
    down = np.cross([1.0, 0.0, 0.0], forward)
    scene = Scene(
        boxes=boxes.build(),
        spheres=PrimitivesBuilder().build(),
        cylinders=PrimitivesBuilder().build(),
        floor_albedo=np.full(3, 0.5),
        floor_texture=plain,
        camera_position=np.array([0.0, 1.5, 0.0]),
        camera_basis=np.stack([[1.0, 0.0, 0.0], down, forward], axis=1),
        fov=np.deg2rad(60),
        light=np.array([0.0, 1.0, 0.0]),
        ambient=0.3,
        sky=np.full((2, 3), 0.7),
        noise=0.0,
        gain=1.0,
    )
    return render(scene, size, np.random.default_rng(0))


def test_occlusion_edges_on_a_hand_built_scene() -> None:
    """The crate's outline against the wall and the floor behind it is occluding; its contact with
    the floor is an object boundary but no occlusion; the floor, an infinite plane, occludes nothing."""
    r = _crate_before_a_wall(48)
    occlusion, edge, labels = occlusion_mask(r), edge_target(r) == 1, r.label
    crate, floor, wall = labels == CRATE, labels == 0, labels == WALL
    assert crate.sum() > 50 and floor.sum() > 100 and wall.sum() > 100
    assert not (occlusion & floor).any()
    below_is_floor = np.zeros_like(crate)  # the contact row, without its two corners
    below_is_floor[:-1, 1:-1] = crate[:-1, 1:-1] & floor[1:, 1:-1] & crate[:-1, :-2] & crate[:-1, 2:]
    beside_wall = np.zeros_like(crate)
    beside_wall[1:] |= crate[1:] & wall[:-1]
    beside_wall[:, 1:] |= crate[:, 1:] & wall[:, :-1]
    beside_wall[:, :-1] |= crate[:, :-1] & wall[:, 1:]
    assert below_is_floor.sum() >= 5 and beside_wall.sum() >= 10
    assert not (occlusion & below_is_floor).any() and edge[below_is_floor].all()
    assert occlusion[beside_wall].all()
    # The crate's outline plus the wall's top edge against the sky: nothing else.
    wall_top = wall & np.vstack([np.zeros((1, 48), bool), labels[:-1] == 255])
    assert not (occlusion & ~crate & ~wall_top).any()


def test_semantic_edges_cover_every_class_boundary(samples) -> None:
    for _, targets, _ in samples:
        labels, edge = targets["semseg"], targets["edge"]
        assert torch.isin(edge, torch.tensor([0, 1])).all()
        boundary = torch.zeros_like(edge, dtype=torch.bool)
        boundary[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        boundary[:, :-1] |= labels[:, 1:] != labels[:, :-1]
        boundary[1:] |= labels[1:] != labels[:-1]
        boundary[:-1] |= labels[1:] != labels[:-1]
        assert not (boundary & (edge == 0)).any()


def test_saliency_and_human_parts_follow_the_classes(samples) -> None:
    for _, targets, _ in samples:
        labels = targets["semseg"]
        background = torch.isin(labels, torch.tensor([0, WALL, RUG, CLASS_NAMES.index("painting"), 255]))
        assert torch.equal(targets["sal"], (~background).long())
        parts = targets["human_parts"]
        assert parts.min() >= 0 and parts.max() <= 6
        assert (labels[parts > 0] == PERSON).all()
        assert (parts[labels == PERSON] > 0).all()


def test_people_have_all_six_parts_somewhere() -> None:
    data = build_dataset("scenes", "train", ["human_parts"], img_size=64)
    seen = set()
    for index in range(40):
        seen |= set(data[index][1]["human_parts"].unique().tolist())
        if seen >= set(range(7)):
            break
    assert seen >= set(range(7))


def test_curvature_is_zero_on_planes_and_ordered(samples) -> None:
    for _, targets, _ in samples:
        curvature = targets["principal_curvature"].double()
        valid = torch.isfinite(curvature).all(0)
        assert (curvature[0][valid] >= curvature[1][valid]).all() and (curvature[1][valid] >= 0).all()
        flat_classes = torch.isin(targets["semseg"], torch.tensor([0, WALL, RUG, CLASS_NAMES.index("table")]))
        assert (curvature[:, flat_classes] == 0).all()
        balls = targets["semseg"] == CLASS_NAMES.index("ball")
        if balls.any():  # a sphere: both curvatures 1/r, equal
            assert torch.equal(curvature[0][balls], curvature[1][balls]) and (curvature[0][balls] > 1).all()


def test_appearance_targets_are_in_their_ranges(samples) -> None:
    for _, targets, _ in samples:
        for task in ("edge_texture", "keypoints2d", "keypoints3d", "segment_unsup25d"):
            values = targets[task][torch.isfinite(targets[task])]
            assert values.min() >= 0 and values.max() <= 1, task
        levels = targets["segment_unsup2d"] * 7
        np.testing.assert_allclose(levels, levels.round(), atol=1e-6)
        ranks = targets["segment_unsup25d"][torch.isfinite(targets["segment_unsup25d"])]
        assert ranks.min() == 0 and ranks.max() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "imagenet"}, "unknown dataset"),
        ({"split": "test"}, "split must be"),
        ({"tasks": ["depth", "optical_flow"]}, "has no task 'optical_flow'"),
        ({"tasks": []}, "at least one task"),
        ({"tasks": "depth"}, "sequence of task names"),
        ({"tasks": ["depth", "depth"]}, "distinct"),
        ({"img_size": 4}, "img_size"),
        ({"img_size": 32.0}, "img_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_one_line_data_errors(kwargs, message) -> None:
    arguments = {"name": "scenes", "split": "train", "tasks": ["depth"], "img_size": SIZE} | kwargs
    with pytest.raises(DataError, match=message) as error:
        build_dataset(**arguments)
    assert "\n" not in str(error.value)


def test_the_cache_returns_what_was_rendered_and_survives_a_broken_file(tmp_path, monkeypatch) -> None:
    tasks = ["semseg", "depth", "normals", "edge"]
    rendered = build_dataset("scenes", "val", tasks, img_size=SIZE)[3]
    writer = build_dataset("scenes", "val", tasks, img_size=SIZE, cache_dir=tmp_path)
    first = writer[3]
    (folder,) = tmp_path.iterdir()
    assert sorted(path.name for path in folder.iterdir()) == ["3.npz"]
    monkeypatch.setenv("SELGROUP_SCENES_CACHE", str(tmp_path))
    reader = build_dataset("scenes", "val", tasks, img_size=SIZE)
    assert reader.cache == folder
    for image, targets in (first, reader[3]):
        assert torch.equal(image, rendered[0])
        for task in tasks:
            assert targets[task].dtype == rendered[1][task].dtype
            assert torch.equal(targets[task].nan_to_num(-1), rendered[1][task].nan_to_num(-1))
    (folder / "3.npz").write_bytes(b"truncated")
    assert torch.equal(reader[3][0], rendered[0])
    with pytest.raises(DataError, match="cannot create the cache folder"):
        build_dataset("scenes", "val", tasks, img_size=SIZE, cache_dir=folder / "3.npz")
