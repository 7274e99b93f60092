"""The dense targets of every preset's tasks, computed from one :class:`~.scenes.Render`.

Each function returns a numpy map: ``[S, S]`` int64 labels for segmentation-kind tasks
(255 = ignore) or ``[C, S, S]`` float32 for regression-kind tasks (NaN = invalid, on the
sky). Each task of :mod:`selgroup_fast.tasks` names its function; ``docs/datasets.md``
describes every target.
"""

from __future__ import annotations

import numpy as np

from .common import IGNORE_LABEL
from .scenes import FLOOR, OCCLUSION_JUMP, PAINTING, RESHADING_LIGHT, RUG, WALL, Render

_SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))
# Luminance weights (ITU-R BT.601) for the grey images of the appearance targets.
_LUMA = np.array([0.299, 0.587, 0.114])
# Scales that map the corner responses into about [0, 1] (measured over many scenes).
_KEYPOINTS2D_SCALE = 2e-3
_KEYPOINTS3D_SCALE = 5e-2
_SEGMENT_LEVELS = 8


def _neighbour(a: np.ndarray, dy: int, dx: int, fill: float | bool) -> np.ndarray:
    """``out[..., i, j] = a[..., i + dy, j + dx]``, ``fill`` outside the image."""
    out = np.full_like(a, fill)
    h, w = a.shape[-2:]
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[..., yd, xd] = a[..., ys, xs]
    return out


def _regression(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a if a.ndim == 3 else a[None], dtype=np.float32)


def semseg(r: Render) -> np.ndarray:
    """Object class per pixel; the sky is void (255)."""
    return r.label.astype(np.int64)


def human_parts(r: Render) -> np.ndarray:
    """Part of a person per pixel (head, torso, upper/lower arm, upper/lower leg), 0 elsewhere."""
    return r.part.astype(np.int64)


def sal(r: Render) -> np.ndarray:
    """Salient = the free-standing objects (furniture, balls, pillars, barrels, people): 1, else 0."""
    background = np.isin(r.label, (FLOOR, WALL, RUG, PAINTING, IGNORE_LABEL))
    return (~background).astype(np.int64)


def edge(r: Render) -> np.ndarray:
    """Object boundaries (as NYUD's edges come from its annotations): 1 where a 4-neighbour is another object."""
    boundary = np.zeros(r.instance.shape, bool)
    for dy, dx in _SHIFTS:
        other = _neighbour(r.instance, dy, dx, -2)
        boundary |= (other != -2) & (other != r.instance)
    return boundary.astype(np.int64)


def depth(r: Render) -> np.ndarray:
    """z-buffer depth in metres (NYUD's depth), NaN on the sky."""
    return _regression(r.zdepth)


def normals(r: Render) -> np.ndarray:
    """Unit surface normal in the camera frame (x right, y down, z forward), facing the camera."""
    return _regression(r.normal.transpose(2, 0, 1))


def depth_euclidean(r: Render) -> np.ndarray:
    """Distance from the camera centre along the pixel's ray: ``depth_zbuffer / cos(ray, optical axis)``."""
    return _regression(r.distance)


def occlusion_mask(r: Render) -> np.ndarray:
    """Occluding contours: surface pixels whose 4-neighbour lies behind their surface.

    A pixel ``p`` is on an occluding contour when a neighbour ``q`` shows another facet at
    least ``OCCLUSION_JUMP`` (relative) farther (or the sky) and ``q``'s ray passes behind
    ``p``'s surface: for an object, ``q``'s ray misses ``p``'s primitive altogether; for the
    floor and the walls, ``q``'s ray crosses ``p``'s (infinite) plane before reaching its own
    surface. Contacts (a box standing on the floor, a wall meeting another) are not contours;
    rugs and paintings lie flat on their support and occlude nothing.
    """
    distance = np.where(r.hit, r.distance, np.inf)
    point = r.ray * np.where(r.hit, r.distance, 0.0)[..., None]
    normal = np.where(r.hit[..., None], r.normal, 0.0)
    offset = (normal * point).sum(-1)  # plane: normal . X = offset (< 0: it faces the camera)
    rows = np.maximum(r.source, 0)
    is_object = r.source >= 0
    structure = np.where(is_object, r.structure[rows] if len(r.structure) else False, True)
    decal = np.where(is_object, r.decal[rows] if len(r.decal) else False, False)
    contour = np.zeros(r.hit.shape, bool)
    ii, jj = np.indices(r.hit.shape)
    h, w = r.hit.shape
    for dy, dx in _SHIFTS:
        inside = _neighbour(np.ones(r.hit.shape, bool), dy, dx, False)
        q_distance = _neighbour(distance, dy, dx, 0.0)
        q_facet = _neighbour(r.facet, dy, dx, -2)
        q_ray = _neighbour(r.ray.transpose(2, 0, 1), dy, dx, 0.0)
        farther = inside & (q_facet != r.facet) & (q_distance > distance * (1 + OCCLUSION_JUMP))
        approach = (normal * q_ray.transpose(1, 2, 0)).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing = np.where(approach < 0, offset / np.where(approach < 0, approach, -1.0), np.inf)
        behind_plane = crossing < q_distance / (1 + OCCLUSION_JUMP)
        if len(r.crossed):
            q_crossed = r.crossed[rows, np.clip(ii + dy, 0, h - 1), np.clip(jj + dx, 0, w - 1)]
        else:
            q_crossed = np.zeros(r.hit.shape, bool)
        behind = np.where(structure, behind_plane, ~q_crossed) & ~decal
        contour |= r.hit & farther & behind
    return contour


def edge_occlusion(r: Render) -> np.ndarray:
    """Occluding contours (see :func:`occlusion_mask`) as a 0/1 map."""
    return _regression(occlusion_mask(r).astype(np.float32))


def _sobel_magnitude(grey: np.ndarray) -> np.ndarray:
    padded = np.pad(grey, 1, mode="edge")
    gx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]) - (
        padded[:-2, :-2] + 2 * padded[1:-1, :-2] + padded[2:, :-2]
    )
    gy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]) - (
        padded[:-2, :-2] + 2 * padded[:-2, 1:-1] + padded[:-2, 2:]
    )
    return np.hypot(gx, gy) / 8.0


def edge_texture(r: Render) -> np.ndarray:
    """Appearance edges: Sobel gradient magnitude of the grey, unlit textured albedo, clipped to [0, 1]."""
    return _regression(np.clip(_sobel_magnitude(r.albedo @ _LUMA), 0.0, 1.0))


def _box3(a: np.ndarray) -> np.ndarray:
    padded = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return np.add.reduce([padded[i : i + h, j : j + w] for i in range(3) for j in range(3)]) / 9.0


def harris(channels: np.ndarray) -> np.ndarray:
    """Harris corner response ``det(M) - 0.05 tr(M)^2`` of the channel-summed, 3×3-averaged structure tensor M."""
    gy, gx = np.gradient(channels, axis=(1, 2))
    xx, yy, xy = _box3((gx * gx).sum(0)), _box3((gy * gy).sum(0)), _box3((gx * gy).sum(0))
    return xx * yy - xy * xy - 0.05 * (xx + yy) ** 2


def keypoints2d(r: Render) -> np.ndarray:
    """2-D keypoint heat map: the Harris response of the clean grey image, ``tanh(max(R, 0) / scale)``."""
    response = harris((r.clean @ _LUMA)[None])
    return _regression(np.tanh(np.maximum(response, 0.0) / _KEYPOINTS2D_SCALE))


def keypoints3d(r: Render) -> np.ndarray:
    """3-D keypoint heat map: the Harris response of the normal field (geometric corners and curved spots)."""
    field = np.where(r.hit[..., None], r.normal, 0.0).transpose(2, 0, 1)
    heat = np.tanh(np.maximum(harris(field), 0.0) / _KEYPOINTS3D_SCALE)
    return _regression(np.where(r.hit, heat, np.nan))


def principal_curvature(r: Render) -> np.ndarray:
    """Principal curvatures k1 >= k2 (1/m) of the visible surface, exact from the primitives."""
    return _regression(r.curvature.transpose(2, 0, 1))


def reshading(r: Render) -> np.ndarray:
    """Shading under a fixed camera-frame light: ``max(0, n . l)``, NaN on the sky."""
    return _regression(np.maximum(r.normal @ RESHADING_LIGHT, 0.0))


def segment_unsup2d(r: Render) -> np.ndarray:
    """Appearance segments: grey unlit albedo quantised to 8 levels, as ``level / 7``."""
    grey = np.clip(r.albedo @ _LUMA, 0.0, 1.0 - 1e-9)
    return _regression(np.floor(grey * _SEGMENT_LEVELS) / (_SEGMENT_LEVELS - 1))


def segment_unsup25d(r: Render) -> np.ndarray:
    """Geometric segments: each visible facet (plane, box face, curved surface) valued by its depth rank in [0, 1]."""
    facets, inverse = np.unique(r.facet, return_inverse=True)
    inverse = inverse.reshape(r.facet.shape)
    mean_depth = np.bincount(inverse.ravel(), np.nan_to_num(r.distance, nan=0.0).ravel()) / np.bincount(inverse.ravel())
    mean_depth[facets < 0] = -np.inf
    rank = np.argsort(np.argsort(mean_depth, kind="stable"), kind="stable").astype(float)
    surfaces = int((facets >= 0).sum())
    rank -= len(facets) - surfaces  # the sky facet (-1) sorts first; surfaces rank 0 .. surfaces-1
    values = rank / max(surfaces - 1, 1)
    return _regression(np.where(r.hit, values[inverse], np.nan))
