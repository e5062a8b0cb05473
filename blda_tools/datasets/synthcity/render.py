"""SynthCity appearance: per-class colours and textures, the two domains, class-dependent drift.

An image is rendered from a `SceneLayout` in three vectorised steps: (1) every pixel gets its
class's colour and texture (colour AND texture tell classes apart); (2) in the target domain a
drifting class is blended towards another class's colour and texture (`TARGET_DRIFT`), which is
what makes a source-trained model biased in a class-dependent way; (3) the domain's camera model
(palette, white balance, gain, vignetting, shadows, blur, sensor noise) is applied to the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from blda_tools.datasets.synthcity.scenes import (
    BICYCLE,
    BUILDING,
    BUS,
    FENCE,
    MOTORCYCLE,
    PERSON,
    RIDER,
    ROAD,
    SIDEWALK,
    TERRAIN,
    TRUCK,
    VEGETATION,
    VOID,
    WALL,
    LayoutParams,
    SceneLayout,
)


@dataclass(frozen=True)
class ClassStyle:
    """How one class looks in the clean (source) rendering."""

    colour: tuple[int, int, int]
    texture: str  # a key of _TEXTURES
    amplitude: float  # texture contrast: colour * (1 + amplitude * texture), texture in [-1, 1]
    instance_spread: float = 0.0  # per-object colour variation (things only)


CLASS_STYLES: tuple[ClassStyle, ...] = (
    ClassStyle((112, 110, 116), "asphalt", 0.12),  # road
    ClassStyle((196, 160, 148), "tiles", 0.35),  # sidewalk
    ClassStyle((150, 118, 88), "windows", 0.45, 0.0),  # building
    ClassStyle((176, 174, 150), "bricks", 0.3),  # wall
    ClassStyle((92, 128, 84), "lattice", 0.6),  # fence
    ClassStyle((72, 72, 84), "vertical", 0.25),  # pole
    ClassStyle((45, 42, 30), "lamps", 1.5),  # traffic light
    ClassStyle((232, 200, 40), "flat", 0.05),  # traffic sign
    ClassStyle((58, 140, 50), "leaves", 0.5),  # vegetation
    ClassStyle((168, 172, 78), "grass", 0.35),  # terrain
    ClassStyle((112, 172, 236), "sky", 0.15),  # sky
    ClassStyle((186, 62, 60), "cloth", 0.3, 0.2),  # person
    ClassStyle((66, 64, 186), "cloth", 0.3, 0.15),  # rider
    ClassStyle((40, 70, 160), "glossy", 0.35, 0.25),  # car
    ClassStyle((206, 124, 40), "ribs", 0.35, 0.15),  # truck
    ClassStyle((40, 164, 172), "bands", 0.4, 0.1),  # bus
    ClassStyle((150, 60, 152), "bands", 0.45, 0.05),  # train
    ClassStyle((206, 32, 122), "glossy", 0.35, 0.15),  # motorcycle
    ClassStyle((122, 204, 222), "flat", 0.05, 0.15),  # bicycle
)
EGO_VEHICLE_COLOUR = (36, 36, 42)  # the bonnet under the void strip

# Class-dependent appearance drift of the target domain: class -> (class it drifts towards,
# amount). At amount a the class is rendered with colour, texture and contrast (1 - a) * own +
# a * other's. Classes not listed (road, sky, car, building, vegetation, person, ...) keep their
# source appearance, so only the camera model changes them.
TARGET_DRIFT: dict[int, tuple[int, float]] = {
    SIDEWALK: (ROAD, 0.7),
    FENCE: (WALL, 0.8),
    TERRAIN: (VEGETATION, 0.6),
    TRUCK: (BUS, 0.55),
    RIDER: (PERSON, 0.65),
    BICYCLE: (MOTORCYCLE, 0.5),
    WALL: (BUILDING, 0.4),
}


@dataclass(frozen=True)
class Domain:
    """A SynthCity domain: how often things appear (`layout`) and how the camera renders them."""

    name: str
    layout: LayoutParams
    drift: dict[int, tuple[int, float]] = field(default_factory=dict)
    saturation: float = 1.0  # 1 keeps the palette, > 1 saturates, < 1 washes out
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mean channel gains
    white_balance_jitter: float = 0.0  # per-image std of each channel gain
    gain_range: tuple[float, float] = (1.0, 1.0)  # per-image global illumination
    texture_scale: float = 1.0
    vignetting: float = 0.0  # brightness lost in the corners
    shadows: float = 0.0  # mean number of cast shadows on the ground
    blur_per_width: float = 0.0  # Gaussian blur sigma, in pixels per 512 pixels of width
    noise_sigma: float = 0.0  # sensor noise std, in 8-bit grey levels


SOURCE = Domain(
    name="source",
    layout=LayoutParams(cars=5.0, trucks=0.8, buses=0.3, train_probability=0.1, persons=3.0,
                        cyclists=0.5, motorcyclists=0.3, parked_bicycles=0.3, poles=3.5,
                        trees=1.5, fence_probability=0.35, terrain_probability=0.3),
    saturation=1.1,
    white_balance_jitter=0.02,
    gain_range=(0.95, 1.05),
)  # fmt: skip
TARGET = Domain(
    name="target",
    layout=LayoutParams(cars=3.5, trucks=0.35, buses=0.25, train_probability=0.1, persons=5.0,
                        cyclists=1.0, motorcyclists=0.15, parked_bicycles=0.8, poles=5.0,
                        trees=3.0, fence_probability=0.5, terrain_probability=0.45,
                        ego_vehicle_fraction=0.08),
    drift=TARGET_DRIFT,
    saturation=0.95,
    white_balance=(0.95, 1.0, 1.05),
    white_balance_jitter=0.03,
    gain_range=(0.85, 1.25),
    texture_scale=0.85,
    vignetting=0.2,
    shadows=0.8,
    blur_per_width=1.0,
    noise_sigma=5.0,
)  # fmt: skip
DOMAINS = {"source": SOURCE, "target": TARGET}


class _Fields:
    """Pixel coordinates and noise fields shared by every texture of one image."""

    def __init__(self, size: tuple[int, int], rng: np.random.Generator):
        height, width = size
        self.rows = np.arange(height, dtype=np.float32)[:, None]
        self.cols = np.arange(width, dtype=np.float32)[None, :]
        self.height = height
        self.unit = width / 512.0  # texture periods scale with the image
        # Uniform (cheaper to draw than normal), std 0.5 / sqrt(3).
        self.fine = rng.random(size, dtype=np.float32) - 0.5
        self.mid = _smooth_noise(rng, size, max(int(3 * self.unit), 2))
        self.coarse = _smooth_noise(rng, size, max(int(10 * self.unit), 2))


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cell: int) -> np.ndarray:
    """Unit-scale noise that varies over about `cell` pixels (bilinear upsampling of a grid)."""
    grid = rng.standard_normal((size[0] // cell + 2, size[1] // cell + 2), dtype=np.float32)
    row_knot, row_weight = _knots(size[0], cell)
    col_knot, col_weight = _knots(size[1], cell)
    top = (
        grid[row_knot][:, col_knot] * (1 - col_weight)
        + grid[row_knot][:, col_knot + 1] * col_weight
    )
    bottom = (
        grid[row_knot + 1][:, col_knot] * (1 - col_weight)
        + grid[row_knot + 1][:, col_knot + 1] * col_weight
    )
    return top * (1 - row_weight[:, None]) + bottom * row_weight[:, None]


def _knots(length: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid knot left of each pixel and the pixel's linear-interpolation weight to the next."""
    position = (np.arange(length, dtype=np.float32) + 0.5) / cell
    knot = np.floor(position).astype(np.intp)
    return knot, position - knot


def _period_mask(coordinate, period, duty):
    return (coordinate % period) < duty * period


def _tiles(f):
    lines = _period_mask(f.rows, 10 * f.unit, 0.12) | _period_mask(f.cols, 16 * f.unit, 0.08)
    return np.where(lines, -1.0, 0.3 * f.fine)


def _windows(f):
    window = _period_mask(f.cols, 14 * f.unit, 0.5) & _period_mask(f.rows, 18 * f.unit, 0.5)
    return np.where(window, -1.0, 0.4 + 0.15 * f.fine)


def _bricks(f):
    period = 5 * f.unit
    offset = (np.floor(f.rows / period) % 2) * 1.25 * period
    mortar = _period_mask(f.rows, period, 0.2) | _period_mask(f.cols + offset, 2.5 * period, 0.1)
    return np.where(mortar, 1.0, -0.3 + 0.2 * f.fine)


def _lattice(f):
    period = 7 * f.unit
    wire = _period_mask(f.cols + f.rows, period, 0.2) | _period_mask(f.cols - f.rows, period, 0.2)
    return np.where(wire, 1.0, -0.6)


def _lamps(f):
    period = 6 * f.unit
    centre_distance = (f.rows % period - period / 2) ** 2 + (f.cols % period - period / 2) ** 2
    return np.where(centre_distance < (0.3 * period) ** 2, 1.0, -0.5)


_TEXTURES = {
    "asphalt": lambda f: np.clip(f.fine + 0.4 * f.coarse, -1, 1),
    "tiles": _tiles,
    "windows": _windows,
    "bricks": _bricks,
    "lattice": _lattice,
    "vertical": lambda f: np.sin(2 * np.pi * f.cols / (3 * f.unit)) + 0 * f.rows,
    "lamps": _lamps,
    "flat": lambda f: 0.2 * f.fine,
    "leaves": lambda f: np.clip(1.2 * f.mid + 0.5 * f.fine, -1, 1),
    "grass": lambda f: (
        0.7 * np.sin(2 * np.pi * f.cols / (2.5 * f.unit) + 2 * f.coarse) + 0.3 * f.fine
    ),
    "sky": lambda f: np.clip(f.rows / f.height - 0.3 + 0.6 * np.maximum(f.coarse, 0), -1, 1),
    "cloth": lambda f: 0.5 * np.sin(2 * np.pi * f.rows / (4 * f.unit)) + 0.3 * f.mid,
    "glossy": lambda f: 0.6 * np.cos(2 * np.pi * f.rows / (16 * f.unit)) + 0.1 * f.fine,
    "ribs": lambda f: np.where(_period_mask(f.cols, 4 * f.unit, 0.3), 0.8, -0.3) + 0 * f.rows,
    "bands": lambda f: np.where(_period_mask(f.rows, 10 * f.unit, 0.4), -1.0, 0.4) + 0 * f.cols,
}
_TEXTURE_NAMES = tuple(_TEXTURES)


@dataclass(frozen=True)
class _ClassTables:
    """Per-class look-up tables (row 19 is the void ego vehicle), drift already blended in."""

    colour: np.ndarray  # (20, 3) float32
    amplitude: np.ndarray  # (20,)
    own_texture: np.ndarray  # (20,) index into _TEXTURE_NAMES
    drift_texture: np.ndarray  # (20,)
    drift_amount: np.ndarray  # (20,)
    instance_spread: np.ndarray  # (20,)


def _class_tables(domain: Domain) -> _ClassTables:
    styles = list(CLASS_STYLES) + [ClassStyle(EGO_VEHICLE_COLOUR, "flat", 0.05)]
    own = np.array([_TEXTURE_NAMES.index(s.texture) for s in styles])
    colour = np.array([s.colour for s in styles], dtype=np.float32)
    amplitude = np.array([s.amplitude for s in styles], dtype=np.float32)
    other, amount = np.arange(len(styles)), np.zeros(len(styles), dtype=np.float32)
    for source_class, (towards, how_much) in domain.drift.items():
        other[source_class], amount[source_class] = towards, how_much
    blend = amount[:, None]
    return _ClassTables(
        colour=(1 - blend) * colour + blend * colour[other],
        amplitude=((1 - amount) * amplitude + amount * amplitude[other]) * domain.texture_scale,
        own_texture=own,
        drift_texture=own[other],
        drift_amount=amount,
        instance_spread=np.array([s.instance_spread for s in styles], dtype=np.float32),
    )


def render_scene(layout: SceneLayout, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """Render `layout` as seen in `domain`: an (H, W, 3) uint8 RGB image.

    Random appearance choices (noise, object colours, illumination) come from `rng`, so the
    same layout rendered with the same generator state gives the same image.
    """
    tables = _class_tables(domain)
    classes = np.where(layout.labels == VOID, len(CLASS_STYLES), layout.labels).astype(np.intp)
    fields = _Fields(layout.size, rng)
    present = np.flatnonzero(np.bincount(classes.ravel(), minlength=len(tables.amplitude)))
    needed = np.union1d(tables.own_texture[present], tables.drift_texture[present])
    stack = np.stack(
        [np.broadcast_to(_TEXTURES[_TEXTURE_NAMES[i]](fields), layout.size) for i in needed]
    )
    slot = np.zeros(len(_TEXTURE_NAMES), dtype=np.intp)  # texture index -> row of `stack`
    slot[needed] = np.arange(len(needed))
    own = np.take_along_axis(stack, slot[tables.own_texture][classes][None], 0)[0]
    drifted = np.take_along_axis(stack, slot[tables.drift_texture][classes][None], 0)[0]
    amount = tables.drift_amount[classes]
    texture = (1 - amount) * own + amount * drifted  # the drift blends textures too
    # Each object gets its own brightness and tint; instance 0 (stuff) keeps the class colour.
    instance_count = int(layout.instances.max()) + 1
    brightness = rng.standard_normal((instance_count, 1)).astype(np.float32)
    tint = 0.5 * rng.standard_normal((instance_count, 3)).astype(np.float32)
    variation = (
        1 + tables.instance_spread[classes][..., None] * (brightness + tint)[layout.instances]
    )
    colour = tables.colour[classes] * variation
    image = colour * (1 + tables.amplitude[classes] * texture)[..., None]
    return _camera(image, layout, domain, rng)


def _camera(image: np.ndarray, layout: SceneLayout, domain: Domain, rng) -> np.ndarray:
    """The domain's camera model, applied to a float RGB image in 8-bit units."""
    height, width = layout.size
    # Saturation (blend with the grey mean), white balance and gain as one 3 x 3 colour matrix.
    saturation = domain.saturation * np.eye(3) + (1 - domain.saturation) / 3 * np.ones((3, 3))
    gains = np.asarray(domain.white_balance) + domain.white_balance_jitter * rng.standard_normal(3)
    colour_matrix = saturation * (gains * rng.uniform(*domain.gain_range))[None, :]
    image = image @ colour_matrix.astype(np.float32)
    shading = np.ones((height, width), dtype=np.float32)  # illumination: vignetting and shadows
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    if domain.vignetting:
        radius = 0.5 * ((cols / width - 0.5) * 2) ** 2 + 0.5 * ((rows / height - 0.5) * 2) ** 2
        shading *= 1 - domain.vignetting * radius
    for _ in range(rng.poisson(domain.shadows)):
        # A shadow cast across the ground: a slanted band below the horizon.
        slope, start = rng.uniform(-1.5, 1.5), rng.uniform(0, width)
        band = (
            np.abs(cols - start - slope * (rows - layout.horizon)) < rng.uniform(0.05, 0.2) * width
        )
        shading[band & (rows > layout.horizon)] *= rng.uniform(0.6, 0.8)
    image = image * shading[..., None]
    if domain.blur_per_width:
        sigma = domain.blur_per_width * width / 512
        image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest")
    if domain.noise_sigma:
        image = image + domain.noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.clip(image, 0, 255) + 0.5).astype(np.uint8)  # round half up
