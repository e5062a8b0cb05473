"""SynthCity scene layouts: a street in perspective, drawn as a label map of Cityscapes train ids.

A layout is pure geometry (which class and which object each pixel shows); appearance is added by
`synthcity_render`. The camera looks down a straight street: ground points at lateral offset X and
depth Z (metres) project to column ``vanish_x + focal * X / Z`` and row
``horizon + focal * CAMERA_HEIGHT / Z``. Things are drawn far to near (painter's algorithm), so
nearer objects occlude farther ones. Loops run over objects (tens per image), never over pixels:
every shape is a vectorised mask over its clipped bounding box.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)  # fmt: skip
VOID = 255  # ignored pixels (the ego-vehicle strip); written as Cityscapes label id 0

CAMERA_HEIGHT = 1.5  # metres above the road
FOCAL_PER_WIDTH = 0.8  # focal length in pixels, per pixel of image width
FAR_DEPTH = 120.0  # metres; the street ends here in a row of distant buildings


@dataclass(frozen=True)
class LayoutParams:
    """How often each kind of thing appears (means of Poisson counts, or probabilities).

    The two SynthCity domains use different values, so their class frequencies differ (as GTA5's
    and Cityscapes' do).
    """

    cars: float = 4.0
    trucks: float = 0.5
    buses: float = 0.3
    train_probability: float = 0.1
    persons: float = 3.0
    cyclists: float = 0.5
    motorcyclists: float = 0.25
    parked_bicycles: float = 0.5
    poles: float = 4.0
    trees: float = 2.0
    wall_probability: float = 0.4
    fence_probability: float = 0.4
    terrain_probability: float = 0.35  # per side: a grass verge beyond the sidewalk
    planters: float = 0.8  # small terrain patches on the sidewalk
    ego_vehicle_fraction: float = 0.0  # bottom rows left void, like Cityscapes' ego vehicle


@dataclass
class SceneLayout:
    """One scene's geometry: train ids per pixel (255 = void) and object instance ids (0 = stuff)."""

    labels: np.ndarray  # (H, W) uint8
    instances: np.ndarray  # (H, W) int32
    horizon: int

    @property
    def size(self) -> tuple[int, int]:
        return self.labels.shape


class _Canvas:
    """The label and instance maps being drawn, plus the camera that places world objects."""

    def __init__(self, height: int, width: int, horizon: int, vanish_x: float):
        self.height, self.width = height, width
        self.horizon, self.vanish_x = horizon, vanish_x
        self.focal = FOCAL_PER_WIDTH * width
        self.labels = np.full((height, width), SKY, dtype=np.uint8)
        self.instances = np.zeros((height, width), dtype=np.int32)
        self.instance_count = 0

    def ground_row(self, depth: float) -> float:
        return self.horizon + self.focal * CAMERA_HEIGHT / depth

    def column(self, lateral: float, depth: float) -> float:
        return self.vanish_x + self.focal * lateral / depth

    def box(self, left: float, top: float, width: float, height: float):
        """Clipped pixel box and local coordinates u (0 left .. 1 right), v (0 top .. 1 bottom)."""
        x0, x1 = max(int(np.floor(left)), 0), min(int(np.ceil(left + width)), self.width)
        y0, y1 = max(int(np.floor(top)), 0), min(int(np.ceil(top + height)), self.height)
        if x0 >= x1 or y0 >= y1:
            return None
        u = (np.arange(x0, x1) + 0.5 - left) / max(width, 1e-6)
        v = (np.arange(y0, y1) + 0.5 - top) / max(height, 1e-6)
        return (slice(y0, y1), slice(x0, x1)), u[None, :], v[:, None]

    def paint(self, region, mask: np.ndarray, train_id: int, instance: int = 0) -> None:
        self.labels[region][mask] = train_id
        self.instances[region][mask] = instance

    def new_instance(self) -> int:
        self.instance_count += 1
        return self.instance_count


# Object shapes: parts as (train id, mask of local coordinates u, v), all in one bounding box.
Part = tuple[int, Callable[[np.ndarray, np.ndarray], np.ndarray]]


def _rect(u0, u1, v0, v1):
    return lambda u, v: (u >= u0) & (u < u1) & (v >= v0) & (v < v1)


def _ellipse(cu, cv, ru, rv):
    return lambda u, v: ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _ring(cu, cv, ru, rv, thickness):
    def mask(u, v):
        r = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
        return (r <= 1.0) & (r >= (1.0 - thickness) ** 2)

    return mask


def _union(*masks):
    return lambda u, v: np.logical_or.reduce(
        [np.broadcast_to(m(u, v), np.broadcast(u, v).shape) for m in masks]
    )


_VEHICLE_PARTS: dict[int, list[Part]] = {
    # Rear views: body, cabin or roof, wheels (which belong to the vehicle class in Cityscapes).
    CAR: [(CAR, _union(_rect(0.0, 1.0, 0.4, 0.85), _rect(0.15, 0.85, 0.0, 0.45),
                       _rect(0.05, 0.25, 0.8, 1.0), _rect(0.75, 0.95, 0.8, 1.0)))],
    TRUCK: [(TRUCK, _union(_rect(0.0, 1.0, 0.0, 0.85), _rect(0.05, 0.25, 0.85, 1.0),
                           _rect(0.75, 0.95, 0.85, 1.0)))],
    BUS: [(BUS, _union(_rect(0.0, 1.0, 0.02, 0.9), _rect(0.08, 0.25, 0.9, 1.0),
                       _rect(0.75, 0.92, 0.9, 1.0)))],
    TRAIN: [(TRAIN, _union(_rect(0.0, 1.0, 0.1, 0.95), _rect(0.3, 0.7, 0.0, 0.1)))],
}  # fmt: skip
_VEHICLE_SIZE = {CAR: (1.8, 1.5), TRUCK: (2.5, 3.6), BUS: (2.6, 3.2), TRAIN: (2.8, 3.9)}

_PERSON_PARTS: list[Part] = [
    (PERSON, _union(_ellipse(0.5, 0.07, 0.22, 0.07), _rect(0.15, 0.85, 0.13, 0.55),
                    _rect(0.2, 0.46, 0.55, 1.0), _rect(0.54, 0.8, 0.55, 1.0)))
]  # fmt: skip
# Side views of two-wheelers, in a box 1.0 m (bicycle) or 1.1 m (motorcycle) high.
_BICYCLE_PARTS: list[Part] = [
    (BICYCLE, _union(_ring(0.2, 0.7, 0.2, 0.3, 0.35), _ring(0.8, 0.7, 0.2, 0.3, 0.35),
                     _rect(0.2, 0.8, 0.45, 0.55), _rect(0.45, 0.55, 0.35, 0.7)))
]  # fmt: skip
_MOTORCYCLE_PARTS: list[Part] = [
    (MOTORCYCLE, _union(_ellipse(0.18, 0.72, 0.17, 0.28), _ellipse(0.82, 0.72, 0.17, 0.28),
                        _ellipse(0.5, 0.45, 0.35, 0.25)))
]  # fmt: skip
# A rider seen from the side, sitting: head, torso, a leg down to the pedals.
_RIDER_PARTS: list[Part] = [
    (RIDER, _union(_ellipse(0.55, 0.1, 0.12, 0.1), _rect(0.4, 0.7, 0.18, 0.6),
                   _rect(0.42, 0.6, 0.6, 0.95)))
]  # fmt: skip


class _Street:
    """The street's dimensions for one scene (metres), shared by every placement decision."""

    def __init__(self, rng: np.random.Generator):
        self.road_left = rng.uniform(3.5, 7.0)
        self.road_right = rng.uniform(3.5, 7.0)
        self.sidewalk = (rng.uniform(2.0, 4.5), rng.uniform(2.0, 4.5))  # left, right
        self.setback = (0.0, 0.0)

    def edge(self, side: int) -> float:
        """Signed lateral position of the road edge on `side` (-1 left, +1 right)."""
        return -self.road_left if side < 0 else self.road_right

    def sidewalk_edge(self, side: int) -> float:
        return self.edge(side) + side * self.sidewalk[side > 0]

    def facade(self, side: int) -> float:
        return self.sidewalk_edge(side) + side * self.setback[side > 0]


def draw_layout(
    rng: np.random.Generator, size: tuple[int, int], params: LayoutParams
) -> SceneLayout:
    """Draw one street scene of `size` (H, W) with object counts following `params`."""
    height, width = size
    horizon = int(round(height * rng.uniform(0.36, 0.46)))
    canvas = _Canvas(height, width, horizon, width * rng.uniform(0.4, 0.6))
    street = _Street(rng)
    verges = [TERRAIN if rng.random() < params.terrain_probability else SIDEWALK for _ in (0, 1)]
    street.setback = tuple(rng.uniform(1.0, 6.0) if v == TERRAIN else 0.0 for v in verges)

    _draw_skyline(canvas, rng)
    _draw_ground(canvas, street, verges, rng, params)
    for side in (-1, 1):
        _draw_facades(canvas, street, side, rng)
    for side in (-1, 1):
        _draw_barriers(canvas, street, side, rng, params)
    objects = _place_objects(canvas, street, rng, params)
    for _depth, draw in sorted(objects, key=lambda item: -item[0]):
        draw()
    ego_rows = int(round(params.ego_vehicle_fraction * height))
    if ego_rows:
        _draw_ego_vehicle(canvas, ego_rows)
    return SceneLayout(canvas.labels, canvas.instances, horizon)


def _draw_skyline(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Distant blocks where the street ends, standing on the ground at FAR_DEPTH."""
    base = canvas.ground_row(FAR_DEPTH)
    x = -rng.uniform(0, 0.05) * canvas.width
    while x < canvas.width:
        block_width = canvas.width * rng.uniform(0.03, 0.12)
        is_tree = rng.random() < 0.3
        block_height = canvas.focal * rng.uniform(3, 8 if is_tree else 30) / FAR_DEPTH
        found = canvas.box(x, base - block_height, block_width, block_height)
        if found:
            region, u, v = found
            shape = _ellipse(0.5, 0.6, 0.55, 0.6)(u, v) if is_tree else np.ones_like(u * v, bool)
            canvas.paint(region, shape, VEGETATION if is_tree else BUILDING)
        x += block_width


def _draw_ground(canvas, street, verges, rng, params) -> None:
    """Road, sidewalks and verges from the lateral position X of each ground pixel."""
    rows = np.arange(canvas.horizon + 1, canvas.height)
    if rows.size == 0:
        return
    row_distance = rows[:, None] + 0.5 - canvas.horizon
    lateral = (
        (np.arange(canvas.width)[None, :] + 0.5 - canvas.vanish_x) * CAMERA_HEIGHT / row_distance
    )
    depth = canvas.focal * CAMERA_HEIGHT / row_distance
    ground = np.where(lateral < 0, verges[0], verges[1]).astype(np.uint8)
    on_sidewalk = (lateral >= street.sidewalk_edge(-1)) & (lateral <= street.sidewalk_edge(1))
    ground[on_sidewalk] = SIDEWALK
    on_road = (lateral >= street.edge(-1)) & (lateral <= street.edge(1))
    ground[on_road] = ROAD
    for _ in range(rng.poisson(params.planters)):
        side = _random_side(rng)
        near = rng.uniform(4, 40)
        inner = street.edge(side) + side * 0.3
        outer = inner + side * street.sidewalk[side > 0] * rng.uniform(0.4, 0.8)
        lo, hi = sorted((inner, outer))
        patch = (
            (lateral >= lo)
            & (lateral <= hi)
            & (depth >= near)
            & (depth <= near + rng.uniform(3, 10))
        )
        ground[patch] = TERRAIN
    canvas.labels[rows[0] :] = ground


def _draw_facade(canvas, lateral, near, far, height, train_id, ragged=None) -> None:
    """A vertical plane parallel to the street at `lateral`, between depths `near` and `far`."""
    x_near, x_far = canvas.column(lateral, near), canvas.column(lateral, far)
    lo, hi = sorted((x_near, x_far))
    # Only columns on the plane's own side of the vanishing point see it.
    if lateral > 0:
        lo = max(lo, canvas.vanish_x + 1)
    else:
        hi = min(hi, canvas.vanish_x - 1)
    c0, c1 = max(int(np.floor(lo)), 0), min(int(np.ceil(hi)), canvas.width)
    if c0 >= c1:
        return
    columns = np.arange(c0, c1) + 0.5
    depth = np.clip(canvas.focal * lateral / (columns - canvas.vanish_x), near, far)
    bottom = canvas.horizon + canvas.focal * CAMERA_HEIGHT / depth
    top_height = height if ragged is None else height + ragged(columns)
    top = canvas.horizon - canvas.focal * (top_height - CAMERA_HEIGHT) / depth
    rows = np.arange(canvas.height)[:, None] + 0.5
    mask = (rows >= top[None, :]) & (rows < bottom[None, :])
    canvas.paint((slice(None), slice(c0, c1)), mask, train_id)


def _draw_facades(canvas, street, side, rng) -> None:
    """Buildings and tree lines along one side, far blocks first."""
    blocks, depth = [], rng.uniform(1.0, 4.0)
    while depth < FAR_DEPTH:
        length = rng.uniform(6, 25)
        choice = rng.random()
        if choice < 0.72:
            blocks.append((depth, depth + length, rng.uniform(6, 24), BUILDING, None))
        elif choice < 0.93:
            phase, wiggle = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2)
            ragged = lambda c, p=phase, w=wiggle: 1.5 * np.sin(c * w + p)  # noqa: E731
            blocks.append((depth, depth + length, rng.uniform(4, 10), VEGETATION, ragged))
        depth += length
    lateral = street.facade(side)
    for near, far, height, train_id, ragged in reversed(blocks):
        _draw_facade(canvas, lateral, near, far, height, train_id, ragged)


def _draw_barriers(canvas, street, side, rng, params) -> None:
    """Walls and fences along the outer edge of a sidewalk."""
    lateral = street.sidewalk_edge(side) - side * 0.1
    for train_id, probability in (
        (WALL, params.wall_probability),
        (FENCE, params.fence_probability),
    ):
        if rng.random() < probability:
            near = rng.uniform(2.0, 30.0)
            height = rng.uniform(0.8, 2.2)
            _draw_facade(canvas, lateral, near, near + rng.uniform(8, 40), height, train_id)


def _draw_ego_vehicle(canvas: _Canvas, rows: int) -> None:
    """The bonnet of the recording car: a void strip with a curved top edge, as in Cityscapes."""
    found = canvas.box(0, canvas.height - rows, canvas.width, rows)
    if found:
        region, u, v = found
        canvas.paint(region, v >= 0.6 * (2 * u - 1) ** 2, VOID)


def _draw_object(canvas, lateral, depth, width, height, parts, instance=None, lift=0.0) -> int:
    """Draw `parts` in the screen box of a `width` x `height` m object standing at (X, Z)."""
    scale = canvas.focal / depth
    pixel_width = max(width * scale, 1.0)  # thin things (poles) stay at least one pixel wide
    bottom = canvas.ground_row(depth) - lift * scale
    found = canvas.box(canvas.column(lateral, depth) - pixel_width / 2, bottom - height * scale,
                       pixel_width, height * scale)  # fmt: skip
    instance = canvas.new_instance() if instance is None else instance
    if found:
        region, u, v = found
        for train_id, shape in parts:
            canvas.paint(region, np.broadcast_to(shape(u, v), (v.size, u.size)), train_id, instance)
    return instance


def _pole(canvas, lateral, depth, rng) -> None:
    """A pole that may carry a traffic light near the top and/or a sign lower down."""
    height = rng.uniform(4.0, 8.0)
    _draw_object(canvas, lateral, depth, 0.15, height, [(POLE, _rect(-1, 2, -1, 2))])
    kind = rng.random()
    toward_road = -np.sign(lateral) * 0.25
    if kind < 0.45:
        _draw_object(canvas, lateral + toward_road, depth, 0.45, 1.1,
                     [(LIGHT, _rect(0, 1, 0, 1))], lift=height - 1.3)  # fmt: skip
    if 0.3 < kind < 0.8:
        shape = _ellipse(0.5, 0.5, 0.5, 0.5) if rng.random() < 0.5 else _rect(0, 1, 0, 1)
        _draw_object(canvas, lateral + toward_road, depth, 0.75, 0.75, [(SIGN, shape)],
                     lift=rng.uniform(2.0, 3.0))  # fmt: skip


def _tree(canvas, lateral, depth, rng) -> None:
    crown = rng.uniform(2.5, 5.0)
    height = rng.uniform(5.0, 9.0)
    trunk = _rect(0.45, 0.55, 0.5, 1.0)
    crown_shape = _ellipse(0.5, 0.5 * crown / height, 0.5, 0.5 * crown / height)
    _draw_object(canvas, lateral, depth, crown, height, [(VEGETATION, _union(trunk, crown_shape))])


def _two_wheeler(canvas, lateral, depth, vehicle, with_rider, rng) -> None:
    """A bicycle or motorcycle seen from the side, optionally ridden (the rider drawn on top)."""
    length, height = (1.7, 1.0) if vehicle == BICYCLE else (2.0, 1.1)
    parts = _BICYCLE_PARTS if vehicle == BICYCLE else _MOTORCYCLE_PARTS
    _draw_object(canvas, lateral, depth, length, height, parts)
    if with_rider:
        _draw_object(canvas, lateral, depth, length, 1.0, _RIDER_PARTS, lift=height * 0.65)


def _place_objects(canvas, street, rng, params) -> list[tuple[float, Callable[[], None]]]:
    """Every object of the scene as (depth, draw) so they can be drawn far to near."""
    objects = []

    def on_sidewalk(side):
        return street.edge(side) + side * rng.uniform(0.3, street.sidewalk[side > 0] - 0.3)

    def lane():
        return rng.uniform(street.edge(-1) + 1.2, street.edge(1) - 1.2)

    def add(depth, draw, *args):
        objects.append((depth, lambda: draw(*args)))

    for _ in range(rng.poisson(params.poles)):
        side = _random_side(rng)
        depth = rng.uniform(3, 60)
        add(depth, _pole, canvas, street.edge(side) + side * 0.4, depth, rng)
    for _ in range(rng.poisson(params.trees)):
        side = _random_side(rng)
        depth = rng.uniform(4, 70)
        add(depth, _tree, canvas, on_sidewalk(side), depth, rng)
    vehicles = [(CAR, params.cars), (TRUCK, params.trucks), (BUS, params.buses)]
    counts = [(kind, rng.poisson(mean)) for kind, mean in vehicles]
    if rng.random() < params.train_probability:
        counts.append((TRAIN, 1))
    for kind, count in counts:
        width, height = _VEHICLE_SIZE[kind]
        for _ in range(count):
            lateral = rng.uniform(-1.0, 1.0) if kind == TRAIN else lane()
            depth = rng.uniform(6, 45) if kind == TRAIN else rng.uniform(4, 80)
            add(depth, _draw_object, canvas, lateral, depth, width, height, _VEHICLE_PARTS[kind])
    for _ in range(rng.poisson(params.persons)):
        on_road = rng.random() < 0.15
        lateral = lane() if on_road else on_sidewalk(_random_side(rng))
        depth = rng.uniform(3, 50)
        size = rng.uniform(1.55, 1.95)
        add(depth, _draw_object, canvas, lateral, depth, size * 0.32, size, _PERSON_PARTS)
    riders = [(BICYCLE, params.cyclists, True), (MOTORCYCLE, params.motorcyclists, True),
              (BICYCLE, params.parked_bicycles, False)]  # fmt: skip
    for vehicle, mean, ridden in riders:
        for _ in range(rng.poisson(mean)):
            lateral = lane() if ridden else on_sidewalk(_random_side(rng))
            depth = rng.uniform(4, 40)
            add(depth, _two_wheeler, canvas, lateral, depth, vehicle, ridden, rng)
    return objects


def _random_side(rng: np.random.Generator) -> int:
    """-1 (left) or +1 (right) with equal probability."""
    return 1 if rng.random() < 0.5 else -1
