"""``scenes``: procedurally rendered 3-D rooms with the dense targets of every preset's tasks.

A pinhole camera looks into a room (floor, three walls, no ceiling: rays over the walls see
the sky) furnished with boxes, spheres, vertical cylinders, rugs, wall paintings and
people made of primitives. Every pixel's ray is cast analytically against every primitive
at once (numpy, vectorised over primitives × pixels); the nearest hit gives depth, the
surface normal, the principal curvatures, the object, its class and its part. The image is
the textured albedo lit by an ambient term and a directional light with cast shadows, plus
sensor noise; the targets are functions of the same geometry, so the relations between
tasks are known (``docs/datasets.md`` says how each target is made).

A scene depends only on ``(seed, split, index)``, never on the resolution: the same index
at 32 and at 64 pixels shows the same room.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import IGNORE_LABEL

# Semantic classes (their labels are below 21, so they fit the 21-class PASCAL head and the
# 40-class NYUD head alike). Sky pixels are void: 255 in the label maps.
CLASS_NAMES = (
    "floor",
    "wall",
    "table",
    "cabinet",
    "crate",
    "ball",
    "pillar",
    "barrel",
    "person",
    "rug",
    "painting",
)
FLOOR, WALL, TABLE, CABINET, CRATE, BALL, PILLAR, BARREL, PERSON, RUG, PAINTING = range(len(CLASS_NAMES))
# PASCAL's human-part labels: 0 background, then head, torso, upper/lower arm, upper/lower leg.
PART_NAMES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")
SPLIT_CODES = {"train": 0, "val": 1}
# Camera-frame light of the ``reshading`` target (x right, y down, z forward; it points from
# the surface towards the light: up-left behind the camera).
RESHADING_LIGHT = np.array([-0.3, -0.5, -1.0]) / np.linalg.norm([-0.3, -0.5, -1.0])
# ``edge_occlusion``: a jump to a neighbour farther by this fraction of the depth.
OCCLUSION_JUMP = 0.05
_EPS = 1e-6
_TEXTURES = 4  # plain, checker, stripes, waves


@dataclass
class Primitives:
    """One kind of primitive of a scene, as parallel arrays (one row per primitive).

    ``center`` [N, 3], ``size`` [N, 3] (box half-extents; sphere radius in column 0;
    cylinder radius, bottom y, top y), ``yaw`` [N], and per primitive its instance, class,
    part labels (``part_lower`` applies below ``part_split`` y, else ``part``), albedo [N, 3]
    and solid texture (kind, frequency, phase, contrast).
    """

    center: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    instance: np.ndarray
    label: np.ndarray
    part: np.ndarray
    part_lower: np.ndarray
    part_split: np.ndarray
    albedo: np.ndarray
    texture: np.ndarray  # [N, 4]: kind, frequency, phase, contrast


class PrimitivesBuilder:
    """Collects primitives of one kind while a scene is drawn."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def add(self, center, size, yaw, instance, label, albedo, texture, part=0, part_lower=None, part_split=-1e9):
        lower = part if part_lower is None else part_lower
        self.rows.append((center, size, yaw, instance, label, part, lower, part_split, albedo, texture))

    def build(self) -> Primitives:
        if not self.rows:
            labels = {name: np.zeros(0, np.int64) for name in ("instance", "label", "part", "part_lower")}
            vectors = {"center": np.zeros((0, 3)), "size": np.zeros((0, 3)), "albedo": np.zeros((0, 3))}
            return Primitives(**labels, **vectors, yaw=np.zeros(0), part_split=np.zeros(0), texture=np.zeros((0, 4)))
        cols = list(zip(*self.rows))
        return Primitives(
            center=np.array(cols[0], float),
            size=np.array(cols[1], float),
            yaw=np.array(cols[2], float),
            instance=np.array(cols[3], np.int64),
            label=np.array(cols[4], np.int64),
            part=np.array(cols[5], np.int64),
            part_lower=np.array(cols[6], np.int64),
            part_split=np.array(cols[7], float),
            albedo=np.array(cols[8], float),
            texture=np.array(cols[9], float),
        )


@dataclass
class Scene:
    """A drawn scene: primitives, camera and lights (resolution-free)."""

    boxes: Primitives
    spheres: Primitives
    cylinders: Primitives
    floor_albedo: np.ndarray
    floor_texture: np.ndarray
    camera_position: np.ndarray
    camera_basis: np.ndarray  # [3, 3] columns: right, down, forward (world frame, y up)
    fov: float
    light: np.ndarray  # world direction towards the light
    ambient: float
    sky: np.ndarray  # [2, 3] horizon and zenith colours
    noise: float
    gain: float


def _texture(rng: np.random.Generator, plain_probability: float = 0.25) -> np.ndarray:
    kind = 0 if rng.random() < plain_probability else int(rng.integers(1, _TEXTURES))
    return np.array([kind, rng.uniform(2.0, 6.0), rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.5)])


def _albedo(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.15, 0.9, size=3)


def draw_scene(rng: np.random.Generator) -> Scene:
    """Draws a room, its furniture and people, the camera and the lights."""
    boxes, spheres, cylinders = PrimitivesBuilder(), PrimitivesBuilder(), PrimitivesBuilder()
    width, depth, height = rng.uniform(3.5, 6.0), rng.uniform(4.0, 7.0), rng.uniform(2.4, 3.2)
    half = width / 2
    wall_albedo = _albedo(rng) * 0.5 + 0.4
    instance = 1  # 0 is the floor; -1 the sky
    # Walls: thin boxes behind the room's far side and along its sides.
    thickness = 0.1
    for center, size in (
        ((0.0, height / 2, depth + thickness), (half + 2 * thickness, height / 2, thickness)),
        ((-half - thickness, height / 2, depth / 2), (thickness, height / 2, depth / 2 + 2 * thickness)),
        ((half + thickness, height / 2, depth / 2), (thickness, height / 2, depth / 2 + 2 * thickness)),
    ):
        boxes.add(center, size, 0.0, instance, WALL, wall_albedo * rng.uniform(0.85, 1.0), _texture(rng, 0.5))
        instance += 1

    def place(radius: float) -> tuple[float, float]:
        return rng.uniform(-half + radius, half - radius), rng.uniform(1.2, depth - radius)

    for _ in range(int(rng.integers(0, 3))):  # paintings on the back wall
        w, h = rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.7)
        x, y = rng.uniform(-half + w, half - w), rng.uniform(1.0, height - h - 0.1)
        boxes.add((x, y, depth - 0.01), (w / 2, h / 2, 0.02), 0.0, instance, PAINTING, _albedo(rng), _texture(rng))
        instance += 1
    for _ in range(int(rng.integers(0, 3))):  # rugs: a texture boundary without a depth jump
        w, d = rng.uniform(0.8, 2.0), rng.uniform(0.8, 2.0)
        x, z = place(max(w, d) / 2)
        boxes.add(
            (x, 0.005, z), (w / 2, 0.005, d / 2), rng.uniform(0, np.pi), instance, RUG, _albedo(rng), _texture(rng, 0.1)
        )
        instance += 1
    for _ in range(int(rng.integers(3, 10))):
        kind = int(rng.integers(0, 7))
        x, z = place(0.6)
        yaw = rng.uniform(0, np.pi)
        if kind == 0:  # table: wide and low
            size = (rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.6))
            boxes.add((x, size[1], z), size, yaw, instance, TABLE, _albedo(rng), _texture(rng))
        elif kind == 1:  # cabinet: tall
            size = (rng.uniform(0.25, 0.5), rng.uniform(0.6, 1.0), rng.uniform(0.2, 0.35))
            boxes.add((x, size[1], z), size, yaw, instance, CABINET, _albedo(rng), _texture(rng))
        elif kind == 2:  # crate: about a cube, sometimes a second one on top
            s = rng.uniform(0.15, 0.35)
            boxes.add((x, s, z), (s, s, s), yaw, instance, CRATE, _albedo(rng), _texture(rng))
            if rng.random() < 0.4:
                instance += 1
                t = s * rng.uniform(0.5, 0.9)
                boxes.add(
                    (x, 2 * s + t, z), (t, t, t), yaw + rng.uniform(0, 1), instance, CRATE, _albedo(rng), _texture(rng)
                )
        elif kind == 3:  # ball
            r = rng.uniform(0.15, 0.45)
            spheres.add((x, r, z), (r, 0, 0), 0.0, instance, BALL, _albedo(rng), _texture(rng))
        elif kind == 4:  # pillar: tall and thin
            r = rng.uniform(0.08, 0.18)
            cylinders.add(
                (x, 0, z), (r, 0.0, rng.uniform(1.2, height)), 0.0, instance, PILLAR, _albedo(rng), _texture(rng)
            )
        elif kind == 5:  # barrel: short and wide
            r = rng.uniform(0.25, 0.4)
            cylinders.add(
                (x, 0, z), (r, 0.0, rng.uniform(0.4, 0.9)), 0.0, instance, BARREL, _albedo(rng), _texture(rng)
            )
        else:
            _add_person(boxes, spheres, cylinders, rng, x, z, yaw, instance)
        instance += 1

    camera_position = np.array([rng.uniform(-0.3, 0.3) * half, rng.uniform(1.0, 1.8), rng.uniform(0.0, 0.6)])
    yaw, pitch = rng.uniform(-0.35, 0.35), rng.uniform(0.1, 0.45)
    forward = np.array([np.sin(yaw) * np.cos(pitch), -np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    down = np.cross(right, forward)
    azimuth, elevation = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.3)
    light = np.array([np.cos(azimuth) * np.cos(elevation), np.sin(elevation), np.sin(azimuth) * np.cos(elevation)])
    zenith = rng.uniform(0.5, 0.9, size=3) * np.array([0.7, 0.85, 1.0])
    return Scene(
        boxes=boxes.build(),
        spheres=spheres.build(),
        cylinders=cylinders.build(),
        floor_albedo=_albedo(rng),
        floor_texture=_texture(rng, 0.2),
        camera_position=camera_position,
        camera_basis=np.stack([right, down, forward], axis=1),
        fov=rng.uniform(np.deg2rad(50), np.deg2rad(70)),
        light=light,
        ambient=rng.uniform(0.25, 0.45),
        sky=np.stack([zenith * 1.1, zenith * 0.8]).clip(0, 1),
        noise=rng.uniform(0.005, 0.03),
        gain=rng.uniform(0.85, 1.15),
    )


def _add_person(
    boxes: PrimitivesBuilder,
    spheres: PrimitivesBuilder,
    cylinders: PrimitivesBuilder,
    rng: np.random.Generator,
    x: float,
    z: float,
    yaw: float,
    instance: int,
) -> None:
    """A standing person of primitives, facing ``yaw``: sphere head, box torso, cylinder limbs."""
    h = rng.uniform(1.4, 1.85)
    c, s = np.cos(yaw), np.sin(yaw)

    def at(dx: float) -> tuple[float, float]:  # a sideways offset in the person's frame
        return x + c * dx, z - s * dx

    skin, shirt, trousers = _albedo(rng), _albedo(rng), _albedo(rng)
    plain = np.array([0.0, 1.0, 0.0, 0.0])
    spheres.add((x, 0.9 * h, z), (0.1 * h, 0, 0), 0.0, instance, PERSON, skin, plain, part=1)
    boxes.add((x, 0.635 * h, z), (0.15 * h, 0.165 * h, 0.08 * h), yaw, instance, PERSON, shirt, _texture(rng), part=2)
    for side in (-1, 1):
        ax, az = at(side * 0.2 * h)
        cylinders.add(
            (ax, 0, az),
            (0.04 * h, 0.42 * h, 0.8 * h),
            0.0,
            instance,
            PERSON,
            shirt,
            plain,
            part=3,
            part_lower=4,
            part_split=0.61 * h,
        )
        lx, lz = at(side * 0.075 * h)
        cylinders.add(
            (lx, 0, lz),
            (0.06 * h, 0.0, 0.47 * h),
            0.0,
            instance,
            PERSON,
            trousers,
            plain,
            part=5,
            part_lower=6,
            part_split=0.235 * h,
        )


# --------------------------------------------------------------------------- ray casting
# Rays are tested against primitives in pairs: a ray and a primitive whose bounding sphere
# it may cross (see ``_candidates``), gathered over all pixels and primitives of a kind so
# that the number of numpy calls does not grow with the scene. Each ``_distance_*`` takes
# per-pair geometry (``center`` [M, 3], ``size`` [M, 3], ``yaw`` [M]), ray origins (one
# point [3] or [M, 3]) and unit directions [M, 3], and returns the distance to the hit
# (inf = miss). Only the nearest hit of a pixel needs its normal, so ``_surface_*`` computes
# normals, curvatures and facets afterwards from the hit points.


def _guard(d: np.ndarray) -> np.ndarray:
    """Direction components bounded away from 0, so that slab divisions stay finite."""
    return np.where(np.abs(d) < 1e-12, 1e-12, d)


def _distance_boxes(
    center: np.ndarray, size: np.ndarray, yaw: np.ndarray, origin: np.ndarray, direction: np.ndarray
) -> np.ndarray:
    """Slab test in each box's frame (rotated by its yaw about the vertical axis)."""
    c, s = np.cos(yaw), np.sin(yaw)
    r = origin - center
    d = direction
    local = (
        (c * r[:, 0] - s * r[:, 2], c * d[:, 0] - s * d[:, 2]),
        (r[:, 1], d[:, 1]),
        (s * r[:, 0] + c * r[:, 2], s * d[:, 0] + c * d[:, 2]),
    )
    nears, fars = [], []
    for axis, (o, dl) in enumerate(local):
        inverse = 1.0 / _guard(dl)
        half = size[:, axis]
        low, high = (-half - o) * inverse, (half - o) * inverse
        nears.append(np.minimum(low, high))
        fars.append(np.maximum(low, high))
    entry, leave = np.maximum.reduce(nears), np.minimum.reduce(fars)
    return np.where((entry <= leave) & (entry > _EPS), entry, np.inf)


def _distance_spheres(
    center: np.ndarray, size: np.ndarray, yaw: np.ndarray, origin: np.ndarray, direction: np.ndarray
) -> np.ndarray:
    r = origin - center
    b = (r * direction).sum(1)
    discriminant = b * b - ((r * r).sum(1) - size[:, 0] ** 2)
    t = -b - np.sqrt(np.maximum(discriminant, 0.0))
    return np.where((discriminant > 0) & (t > _EPS), t, np.inf)


def _distance_cylinders(
    center: np.ndarray, size: np.ndarray, yaw: np.ndarray, origin: np.ndarray, direction: np.ndarray
) -> np.ndarray:
    """Vertical capped cylinders: ``size`` = (radius, bottom y, top y), axis through ``center``'s x, z."""
    radius, bottom, top = size[:, 0], size[:, 1], size[:, 2]
    r = origin - center
    ox, oz = r[:, 0], r[:, 2]
    oy = origin[..., 1]
    dx, dy, dz = direction[:, 0], direction[:, 1], direction[:, 2]
    a = np.maximum(dx * dx + dz * dz, 1e-12)
    b = ox * dx + oz * dz
    discriminant = b * b - a * (ox * ox + oz * oz - radius**2)
    t_side = (-b - np.sqrt(np.maximum(discriminant, 0.0))) / a
    y_side = oy + t_side * dy
    t = np.where((discriminant > 0) & (t_side > _EPS) & (y_side >= bottom) & (y_side <= top), t_side, np.inf)
    inverse_dy = 1.0 / _guard(dy)
    for level in (top, bottom):
        t_cap = (level - oy) * inverse_dy
        cx, cz = ox + t_cap * dx, oz + t_cap * dz
        t = np.where((t_cap > _EPS) & (cx * cx + cz * cz <= radius**2) & (t_cap < t), t_cap, t)
    return t


def _surface_boxes(boxes: Primitives, point: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normals, curvatures and facets at points [P, 3] on boxes (one row of ``boxes`` per point)."""
    local = _rotate_y(point - boxes.center, -boxes.yaw)
    ratio = local / boxes.size
    axis = np.abs(ratio).argmax(-1)  # the face the point lies on
    sign = np.sign(np.take_along_axis(ratio, axis[:, None], -1)[:, 0])
    normal = np.zeros_like(point)
    normal[np.arange(len(point)), axis] = sign
    return _rotate_y(normal, boxes.yaw), np.zeros((len(point), 2)), axis * 2 + (sign > 0)


def _surface_spheres(spheres: Primitives, point: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    radius = spheres.size[:, 0]
    normal = (point - spheres.center) / radius[:, None]
    return normal, np.repeat((1.0 / radius)[:, None], 2, axis=1), np.zeros(len(point), np.int64)


def _surface_cylinders(cylinders: Primitives, point: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    radius, bottom, top = cylinders.size.T
    rx, rz = point[:, 0] - cylinders.center[:, 0], point[:, 2] - cylinders.center[:, 2]
    # The nearest of the side and the two caps is the surface the point lies on.
    gaps = np.stack([np.abs(np.hypot(rx, rz) - radius), np.abs(point[:, 1] - top), np.abs(point[:, 1] - bottom)])
    facet = gaps.argmin(0)
    side = facet == 0
    normal = np.stack(
        [
            np.where(side, rx / radius, 0.0),
            np.select([side, facet == 1], [0.0, 1.0], -1.0),
            np.where(side, rz / radius, 0.0),
        ],
        axis=-1,
    )
    curvature = np.stack([np.where(side, 1.0 / radius, 0.0), np.zeros(len(point))], axis=-1)
    return normal, curvature, facet


def _rotate_y(v: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Rotates vectors ``v`` [..., 3] about y by ``yaw`` (broadcast against ``v[..., 0]``)."""
    c, s = np.cos(yaw), np.sin(yaw)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return np.stack([c * x + s * z, y, -s * x + c * z], axis=-1)


_KINDS = (
    ("boxes", _distance_boxes, _surface_boxes),
    ("spheres", _distance_spheres, _surface_spheres),
    ("cylinders", _distance_cylinders, _surface_cylinders),
)


def _bounding_spheres(table: Primitives, kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre [N, 3] and radius [N] of a sphere around each primitive."""
    center = table.center.copy()
    box_radius = np.linalg.norm(table.size, axis=1)
    sphere_radius = table.size[:, 0]
    half_height = (table.size[:, 2] - table.size[:, 1]) / 2
    cylinder = kinds == 2
    center[cylinder, 1] = (table.size[cylinder, 1] + table.size[cylinder, 2]) / 2
    radius = np.select([kinds == 0, kinds == 1], [box_radius, sphere_radius], np.hypot(sphere_radius, half_height))
    return center, radius * (1 + 1e-6) + 1e-9


def _candidates(
    center: np.ndarray, radius: np.ndarray, origin: np.ndarray, direction: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The (primitive, ray) pairs whose ray passes within a primitive's bounding sphere, as index arrays.

    One origin [3]: the angle between the ray and the sphere's centre is at most asin(r / d).
    One origin per ray [P, 3]: the sphere's centre lies within r of the ray's line, not behind it.
    """
    if len(direction) == 0 or len(center) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if origin.ndim == 1:
        to_center = center - origin
        distance = np.linalg.norm(to_center, axis=1)
        inside = distance <= radius
        cos_limit = np.where(inside, -np.inf, np.sqrt(np.maximum(1 - (radius / distance) ** 2, 0.0)))
        cosine = direction @ (to_center / np.maximum(distance, 1e-12)[:, None]).T  # [P, N]
        mask = cosine >= cos_limit
    else:
        light = direction[0]  # one direction for all rays
        along = center @ light - (origin @ light)[:, None]  # [P, N]
        distance2 = (center * center).sum(1) - 2 * origin @ center.T + (origin * origin).sum(1)[:, None]
        mask = (distance2 - along * along <= radius**2) & (along > -radius)
    rays, primitives = np.nonzero(mask)
    return primitives, rays


def _pair_distances(
    geometry: tuple[np.ndarray, np.ndarray, np.ndarray],
    kinds: np.ndarray,
    primitives: np.ndarray,
    rays: np.ndarray,
    origin: np.ndarray,
    direction: np.ndarray,
) -> np.ndarray:
    """Distance along ray ``rays[m]`` to primitive ``primitives[m]`` for every pair m (inf = miss).

    ``geometry`` is the primitives' (center, size, yaw).
    """
    center, size, yaw = geometry
    t = np.full(len(primitives), np.inf, center.dtype)
    pair_kinds = kinds[primitives]
    for k, (_, distance, _) in enumerate(_KINDS):
        pick = np.flatnonzero(pair_kinds == k)
        if len(pick):
            rows, ray = primitives[pick], rays[pick]
            ray_origin = origin if origin.ndim == 1 else origin[ray]
            t[pick] = distance(center[rows], size[rows], yaw[rows], ray_origin, direction[ray])
    return t


def _solid_texture(texture: np.ndarray, point: np.ndarray) -> np.ndarray:
    """A multiplicative brightness in [1 - contrast, 1] from a solid texture at local points [P, 3]."""
    kind, frequency, phase, contrast = texture.T
    q = point * frequency[:, None]
    checker = (np.floor(q).sum(-1) % 2 == 0).astype(float)
    stripes = 0.5 + 0.5 * np.sin(q[:, 0] * 2 + q[:, 2] * 1.3 + phase)
    waves = 0.5 + 0.25 * (np.sin(q[:, 0] * 1.7 + phase) + np.sin(q[:, 1] * 2.3 + q[:, 2] * 1.1 - phase))
    pattern = np.select([kind == 1, kind == 2, kind == 3], [checker, stripes, waves], default=1.0)
    return 1.0 - contrast * (1.0 - pattern)


@dataclass
class Render:
    """What one render yields: the image and per-pixel geometry and labels, ``[S, S]`` maps."""

    image: np.ndarray  # [S, S, 3] in [0, 1], with noise
    clean: np.ndarray  # [S, S, 3] the same image without noise
    albedo: np.ndarray  # [S, S, 3] textured albedo, unlit
    hit: np.ndarray  # bool: a surface (not sky)
    distance: np.ndarray  # euclidean distance from the camera centre (NaN on sky)
    zdepth: np.ndarray  # distance along the optical axis (NaN on sky)
    normal: np.ndarray  # [S, S, 3] camera frame, unit, facing the camera (NaN on sky)
    curvature: np.ndarray  # [S, S, 2] principal curvatures k1 >= k2 in 1/m (NaN on sky)
    instance: np.ndarray  # int: object id (0 floor, -1 sky)
    facet: np.ndarray  # int: surface facet id, unique in the image (0 floor, -1 sky)
    label: np.ndarray  # int: class (IGNORE_LABEL on sky)
    part: np.ndarray  # int: human part (0 elsewhere)
    ray: np.ndarray  # [S, S, 3] camera-frame unit ray directions
    source: np.ndarray  # int: row of the hit primitive in ``crossed`` (-1 floor or sky)
    crossed: np.ndarray  # [N, S, S] bool: the pixel's ray hits primitive n somewhere
    structure: np.ndarray  # [N] bool: primitive n is a wall
    decal: np.ndarray  # [N] bool: primitive n is flat on a wall or the floor (rug, painting)


def render(scene: Scene, size: int, rng: np.random.Generator) -> Render:
    """Casts one ray per pixel centre and shades the nearest hits; ``rng`` draws the sensor noise."""
    focal = (size / 2) / np.tan(scene.fov / 2)
    coords = (np.arange(size) + 0.5 - size / 2) / focal
    v, u = np.meshgrid(coords, coords, indexing="ij")
    camera_rays = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)
    ray_norm = np.linalg.norm(camera_rays, axis=-1)
    camera_rays = camera_rays / ray_norm[:, None]
    direction = camera_rays @ scene.camera_basis.T
    pixels = len(direction)
    origin = scene.camera_position
    table = _concat([getattr(scene, name) for name, _, _ in _KINDS])
    kinds = np.concatenate([np.full(len(getattr(scene, name).yaw), k) for k, (name, _, _) in enumerate(_KINDS)])
    bound_center, bound_radius = _bounding_spheres(table, kinds)
    geometry = (table.center, table.size, table.yaw)

    # Row 0: the floor (y = 0); then every primitive. The nearest hit wins.
    dy = direction[:, 1]
    floor_t = np.where(dy < -1e-9, -origin[1] / np.where(dy < -1e-9, dy, -1.0), np.inf)
    distances = np.full((1 + len(kinds), pixels), np.inf)
    distances[0] = floor_t
    primitives, rays = _candidates(bound_center, bound_radius, origin, direction)
    distances[1 + primitives, rays] = _pair_distances(geometry, kinds, primitives, rays, origin, direction)
    nearest = distances.argmin(0)
    best_t = distances[nearest, np.arange(pixels)]
    hit_mask = np.isfinite(best_t)
    source = np.where(hit_mask, nearest - 1, -1)  # -1: floor or sky
    on_object = source >= 0
    point = origin + np.where(hit_mask, best_t, 0.0)[:, None] * direction
    row = np.maximum(source, 0)

    # Surface geometry: the floor's, then each kind's at its pixels.
    normal = np.zeros((pixels, 3))
    normal[:, 1] = 1.0
    curvature = np.zeros((pixels, 2))
    facet = np.where(hit_mask, 0, -1)
    for k, (_, _, surface) in enumerate(_KINDS):
        pick = np.flatnonzero(on_object & (kinds[row] == k)) if len(kinds) else np.zeros(0, np.int64)
        if len(pick):
            rows = _take(table, row[pick])
            normal[pick], curvature[pick], kind_facet = surface(rows, point[pick])
            facet[pick] = row[pick] * 8 + 1 + kind_facet

    # Labels.
    if len(table.yaw):
        instance = np.where(on_object, table.instance[row], 0)
        label = np.where(on_object, table.label[row], FLOOR)
        part = np.where(point[:, 1] >= table.part_split[row], table.part[row], table.part_lower[row])
        part = np.where(on_object, part, 0)
    else:
        instance, label, part = (np.zeros(pixels, np.int64) for _ in range(3))
    instance = np.where(hit_mask, instance, -1)
    label = np.where(hit_mask, label, IGNORE_LABEL)

    # Appearance: textured albedo, ambient + directional light with cast shadows.
    floor_tex = np.broadcast_to(scene.floor_texture, (pixels, 4))
    floor_albedo = np.broadcast_to(scene.floor_albedo, (pixels, 3))
    if len(table.yaw):
        texture = np.where(on_object[:, None], table.texture[row], floor_tex)
        albedo = np.where(on_object[:, None], table.albedo[row], floor_albedo)
        local = _rotate_y(point - table.center[row], -table.yaw[row])
        local = np.where(on_object[:, None], local, point)
    else:
        texture, albedo, local = floor_tex, floor_albedo, point
    albedo = albedo * _solid_texture(texture, local)[:, None]
    facing = (normal * direction).sum(-1) > 0  # thin boxes seen from behind: face the camera
    normal = np.where(facing[:, None], -normal, normal)
    lambert = np.maximum(normal @ scene.light, 0.0)
    # Shadows: walls, rugs and paintings cast none (the light is inside the room).
    lit = np.flatnonzero(hit_mask & (lambert > 0))
    casters = np.flatnonzero((table.label != WALL) & (table.label != RUG) & (table.label != PAINTING))
    shadow_origin = point[lit] + normal[lit] * 1e-4
    shadow_direction = np.broadcast_to(scene.light, shadow_origin.shape)
    pair_primitives, pair_rays = _candidates(
        bound_center[casters], bound_radius[casters], shadow_origin, shadow_direction
    )
    blocked = np.isfinite(
        _pair_distances(geometry, kinds, casters[pair_primitives], pair_rays, shadow_origin, shadow_direction)
    )
    shadowed = np.zeros(pixels, bool)
    shadowed[lit[pair_rays[blocked]]] = True
    lambert = np.where(shadowed, 0.0, lambert)
    shading = scene.ambient + (1 - scene.ambient) * lambert
    height = np.clip(-direction[:, 1] * 0.5 + 0.5, 0, 1)[:, None]
    sky = scene.sky[0] * height + scene.sky[1] * (1 - height)
    clean = np.where(hit_mask[:, None], albedo * shading[:, None], sky) * scene.gain
    clean = clean.clip(0.0, 1.0)
    image = (clean + rng.normal(0.0, scene.noise, clean.shape)).clip(0.0, 1.0)

    nan = np.nan
    camera_normal = normal @ scene.camera_basis
    principal = np.sort(curvature, axis=-1)[:, ::-1]
    shape2 = (size, size)
    return Render(
        image=image.reshape(*shape2, 3),
        clean=clean.reshape(*shape2, 3),
        albedo=np.where(hit_mask[:, None], albedo, sky).reshape(*shape2, 3),
        hit=hit_mask.reshape(shape2),
        distance=np.where(hit_mask, best_t, nan).reshape(shape2),
        zdepth=np.where(hit_mask, best_t / ray_norm, nan).reshape(shape2),
        normal=np.where(hit_mask[:, None], camera_normal, nan).reshape(*shape2, 3),
        curvature=np.where(hit_mask[:, None], principal, nan).reshape(*shape2, 2),
        instance=instance.reshape(shape2),
        facet=facet.reshape(shape2),
        label=label.reshape(shape2),
        part=part.reshape(shape2),
        ray=camera_rays.reshape(*shape2, 3),
        source=source.reshape(shape2),
        crossed=np.isfinite(distances[1:]).reshape(-1, *shape2),
        structure=table.label == WALL,
        decal=(table.label == RUG) | (table.label == PAINTING),
    )


_FIELDS = tuple(Primitives.__dataclass_fields__)


def _concat(tables: list[Primitives]) -> Primitives:
    return Primitives(**{name: np.concatenate([getattr(t, name) for t in tables]) for name in _FIELDS})


def _take(table: Primitives, rows: np.ndarray) -> Primitives:
    return Primitives(**{name: getattr(table, name)[rows] for name in _FIELDS})
