"""Procedural coloured shapes: still images (``ShapesDataset``) and bouncing clips (``MovingShapesDataset``).

Everything is generated from a seed, offline and identically on every machine: the per-item
parameters come from numpy's PCG64 seeded by ``(seed, split, index)`` (so item ``i`` does not depend
on ``num_samples``), and the pictures are rasterised from signed distance functions (SDFs) and
stored as uint8, which hides the last-bit float differences between CPUs.

Anti-aliasing: every shape is drawn on a ``supersample``-times finer grid, where a sub-pixel's
coverage is the SDF-based box filter ``clamp(0.5 - d, 0, 1)`` (``d`` = signed distance in sub-pixels),
then averaged down to the output grid.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .seeding import item_rng, split_id

SHAPE_NAMES = ("circle", "square", "triangle", "plus", "ring", "diamond", "star", "heart")

# Named colours (RGB in [0, 1]); each drawn colour is jittered by at most COLOUR_JITTER per channel.
COLOURS = {
    "red": (0.92, 0.16, 0.12),
    "green": (0.18, 0.80, 0.22),
    "blue": (0.20, 0.38, 0.98),
    "yellow": (0.96, 0.88, 0.12),
    "orange": (1.00, 0.55, 0.06),
    "purple": (0.62, 0.26, 0.90),
    "cyan": (0.10, 0.86, 0.92),
    "white": (0.96, 0.96, 0.96),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_JITTER = 0.04

# Shape radius as a fraction of the image side, per size word.
SIZE_RANGES = {"small": (0.13, 0.17), "medium": (0.19, 0.24), "large": (0.27, 0.32)}
SIZE_NAMES = tuple(SIZE_RANGES)

# Largest distance of a shape's outline from its centre, in units of its radius, for any
# rotation we draw (a square's corner at 0.8*sqrt(2) rotated by up to 0.3 rad stays inside 1.15).
SHAPE_EXTENT = 1.15
MAX_ROTATION = {"circle": 0.0, "ring": 0.0, "diamond": 0.2}  # radians; others: DEFAULT_ROTATION
DEFAULT_ROTATION = 0.3

# 3 x 3 position words indexed by (row third, column third) of the shape's centroid.
POSITION_WORDS = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)


def position_word(x: float, y: float, size: int) -> str:
    """The 3x3 position word of a point (pixel units, y down) in a ``size`` x ``size`` image."""
    col = min(2, max(0, int(3 * x / size)))
    row = min(2, max(0, int(3 * y / size)))
    return POSITION_WORDS[row][col]


# ----------------------------------------------------------------------------------------------
# Signed distance functions in a shape's own frame: unit radius, y pointing down, negative inside.
# ----------------------------------------------------------------------------------------------


def _sdf_box(qx, qy, half_w, half_h):
    dx, dy = qx.abs() - half_w, qy.abs() - half_h
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _sdf_circle(qx, qy, cx=0.0, cy=0.0, radius=1.0):
    return torch.sqrt((qx - cx) ** 2 + (qy - cy) ** 2) - radius


def _sdf_polygon(qx, qy, vertices):
    """Exact SDF of a simple polygon: distance to the nearest edge, sign from the even-odd rule."""
    dist2 = torch.full_like(qx, float("inf"))
    inside = torch.zeros_like(qx, dtype=torch.bool)
    n = len(vertices)
    for i in range(n):
        (ax, ay), (bx, by) = vertices[i], vertices[(i + 1) % n]
        ex, ey = bx - ax, by - ay
        px, py = qx - ax, qy - ay
        t = ((px * ex + py * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
        dist2 = torch.minimum(dist2, (px - t * ex) ** 2 + (py - t * ey) ** 2)
        if ay != by:  # a horizontal edge never crosses a horizontal ray
            crosses = ((ay > qy) != (by > qy)) & (qx < ax + (qy - ay) * ex / ey)
            inside ^= crosses
    return torch.where(inside, -1.0, 1.0) * torch.sqrt(dist2)


def _regular_star(points: int, outer: float, inner: float):
    verts = []
    for k in range(2 * points):
        angle = -math.pi / 2 + k * math.pi / points  # first tip points up (y down => -pi/2)
        rad = outer if k % 2 == 0 else inner
        verts.append((rad * math.cos(angle), rad * math.sin(angle)))
    return verts


_TRIANGLE = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
_DIAMOND = [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]
_STAR = _regular_star(5, 1.0, 0.45)
_HEART_TIP = [(-0.9, -0.3), (0.9, -0.3), (0.0, 0.95)]  # top edge hidden inside the lobes


def shape_sdf(shape: str, qx: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
    """Signed distance (units of the shape radius) of ``shape`` at local points ``(qx, qy)``."""
    if shape == "circle":
        return _sdf_circle(qx, qy)
    if shape == "square":
        return _sdf_box(qx, qy, 0.8, 0.8)
    if shape == "triangle":
        return _sdf_polygon(qx, qy, _TRIANGLE)
    if shape == "plus":
        return torch.minimum(_sdf_box(qx, qy, 1.0, 0.3), _sdf_box(qx, qy, 0.3, 1.0))
    if shape == "ring":
        return (torch.sqrt(qx**2 + qy**2) - 0.72).abs() - 0.28
    if shape == "diamond":
        return _sdf_polygon(qx, qy, _DIAMOND)
    if shape == "star":
        return _sdf_polygon(qx, qy, _STAR)
    if shape == "heart":
        # Two round lobes over a downward triangle; the union's SDF is the min (exact outside).
        lobes = torch.minimum(_sdf_circle(qx, qy, -0.44, -0.38, 0.5), _sdf_circle(qx, qy, 0.44, -0.38, 0.5))
        return torch.minimum(lobes, _sdf_polygon(qx, qy, _HEART_TIP))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_NAMES)}")


def render_coverage(
    shapes: list[str],
    centers: torch.Tensor,
    radii: torch.Tensor,
    angles: torch.Tensor,
    size: int,
    supersample: int = 2,
) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1], shape ``(B, size, size)``, of B shapes.

    ``centers`` (B, 2) are (x, y) in pixels with y down (pixel ``j`` spans [j, j+1)), ``radii`` (B,)
    in pixels, ``angles`` (B,) in radians.
    """
    n = len(shapes)
    centers, radii, angles = centers.float(), radii.float(), angles.float()
    # Only a window around each shape is rasterised (everything outside has zero coverage): its
    # side covers the outline plus one pixel on each side, rounded up to a multiple of 4 so items
    # share few window sizes, and shapes of one class and window size are drawn as one batch.
    windows = [min(size, 4 * math.ceil(2 * (SHAPE_EXTENT * float(r) + 1) / 4)) for r in radii]
    cov = torch.zeros(n, size, size)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (name, w) in enumerate(zip(shapes, windows)):
        groups.setdefault((name, w), []).append(i)
    for (name, w), members in groups.items():
        idx = torch.tensor(members)
        cx, cy = centers[idx, 0], centers[idx, 1]
        ox = (cx - w / 2).floor().clamp(0, size - w)
        oy = (cy - w / 2).floor().clamp(0, size - w)
        local = (torch.arange(w * supersample, dtype=torch.float32) + 0.5) / supersample
        dx = (ox.view(-1, 1, 1) + local.view(1, 1, -1)) - cx.view(-1, 1, 1)  # (B, 1, w*ss)
        dy = (oy.view(-1, 1, 1) + local.view(1, -1, 1)) - cy.view(-1, 1, 1)  # (B, w*ss, 1)
        r = radii[idx].view(-1, 1, 1)
        cos, sin = torch.cos(angles[idx]).view(-1, 1, 1), torch.sin(angles[idx]).view(-1, 1, 1)
        # Offsets into the shape's frame (rotation by the item's angle, scaled to unit radius).
        qx = (cos * dx - sin * dy) / r
        qy = (sin * dx + cos * dy) / r
        dist_sub = shape_sdf(name, qx, qy) * r * supersample
        window = (0.5 - dist_sub).clamp(0.0, 1.0)
        if supersample > 1:
            window = torch.nn.functional.avg_pool2d(window.unsqueeze(1), supersample).squeeze(1)
        rows = oy.long().view(-1, 1, 1) + torch.arange(w).view(1, -1, 1)
        cols = ox.long().view(-1, 1, 1) + torch.arange(w).view(1, 1, -1)
        cov[idx.view(-1, 1, 1), rows, cols] = window
    return cov


def render_backgrounds(rng_values: np.ndarray, size: int) -> torch.Tensor:
    """Dark, lightly textured backgrounds ``(B, 3, size, size)`` in [0, 1] from per-item random numbers.

    ``rng_values`` is ``(B, 3 + 2 + 1 + 3 * 16)``: base colour, gradient direction/strength and a 4x4
    low-frequency noise field per channel (bilinearly upsampled).
    """
    v = torch.from_numpy(rng_values).float()
    b = v.shape[0]
    base = 0.04 + 0.20 * v[:, 0:3]
    angle = 2 * math.pi * v[:, 3]
    strength = 0.08 * v[:, 4]
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    ramp = torch.cos(angle).view(-1, 1, 1) * gx + torch.sin(angle).view(-1, 1, 1) * gy
    gradient = strength.view(-1, 1, 1) * ramp
    texture_amp = 0.05 * v[:, 5].view(-1, 1, 1, 1)
    noise = (v[:, 6:].view(b, 3, 4, 4) - 0.5) * 2
    noise = torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    bg = base.view(b, 3, 1, 1) + gradient.unsqueeze(1) + texture_amp * noise
    return bg.clamp(0.0, 1.0)


BACKGROUND_NUMBERS = 6 + 3 * 16


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255.0 + 0.5).floor().to(torch.uint8)


def _uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


@dataclass
class ShapeParams:
    """What one still image shows (pixels, y down)."""

    shape: str
    colour: str
    size: str
    center: tuple[float, float]
    radius: float
    angle: float
    rgb: tuple[float, float, float]


@contextlib.contextmanager
def _single_thread():
    """Render on one intra-op thread: the tensors are small, so extra threads only add
    synchronisation, and on a shared CPU they spin (measured 4-40x slower on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _ChunkCache:
    """Renders items in chunks on first access and keeps them (uint8) in memory."""

    chunk_size = 512

    def __init__(self, num_items: int, render_fn):
        self.num_items = num_items
        self.render_fn = render_fn
        self.chunks: dict[int, torch.Tensor] = {}

    def get(self, index: int) -> torch.Tensor:
        k = index // self.chunk_size
        if k not in self.chunks:
            start = k * self.chunk_size
            with _single_thread():
                self.chunks[k] = self.render_fn(range(start, min(start + self.chunk_size, self.num_items)))
        return self.chunks[k][index - k * self.chunk_size]

    def all(self, progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm

        starts = range(0, self.num_items, self.chunk_size)
        for start in tqdm(starts, desc="rendering", disable=not progress):
            self.get(start)
        return torch.cat([self.chunks[k] for k in sorted(self.chunks)])


class ShapesDataset(Dataset):
    """32x32 RGB coloured shapes of 8 classes with size/colour/position captions (``"shapes"``).

    Returns ``{"image": (3, S, S) in [-1, 1], "label": int64, "caption": str}``; e.g. caption
    ``"a small red circle on the left"``. The position word is the 3x3 cell of the drawn shape's
    area centroid. ``split`` ("train"/"test"/"val") changes the seed stream, so splits differ.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        image_size: int = 32,
        seed: int = 0,
        supersample: int = 2,
    ):
        split_id(split)
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is too small (need >= 8)")
        if supersample < 1:
            raise ValueError(f"supersample={supersample} must be >= 1")
        self.split, self.seed, self.supersample = split, int(seed), int(supersample)
        self.num_samples = int(num_samples if num_samples is not None else (10000 if split == "train" else 2000))
        if self.num_samples <= 0:
            raise ValueError(f"num_samples={num_samples} must be positive")
        self.image_size, self.channels = int(image_size), 3
        self.class_names = list(SHAPE_NAMES)
        self.num_classes = len(SHAPE_NAMES)
        self._params = [self._draw_params(i) for i in range(self.num_samples)]
        self._bg_numbers = np.stack([item_rng(self.seed, split, i, stream=1).random(BACKGROUND_NUMBERS)
                                     for i in range(self.num_samples)])
        self._cache = _ChunkCache(self.num_samples, self._render)
        self._captions: dict[int, str] = {}

    def _draw_params(self, index: int) -> ShapeParams:
        rng = item_rng(self.seed, self.split, index)
        s = self.image_size
        shape = SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        size = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
        lo, hi = SIZE_RANGES[size]
        radius = float(rng.uniform(lo, hi) * s)
        margin = SHAPE_EXTENT * radius + 0.5
        center = (float(rng.uniform(margin, s - margin)), float(rng.uniform(margin, s - margin)))
        max_rot = MAX_ROTATION.get(shape, DEFAULT_ROTATION)
        angle = float(rng.uniform(-max_rot, max_rot))
        base = np.array(COLOURS[colour])
        rgb = tuple(float(c) for c in np.clip(base + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 1))
        return ShapeParams(shape, colour, size, center, radius, angle, rgb)

    def _render(self, indices: range) -> torch.Tensor:
        params = [self._params[i] for i in indices]
        cov = render_coverage(
            [p.shape for p in params],
            torch.tensor([p.center for p in params]),
            torch.tensor([p.radius for p in params]),
            torch.tensor([p.angle for p in params]),
            self.image_size,
            self.supersample,
        )
        bg = render_backgrounds(self._bg_numbers[indices.start : indices.stop], self.image_size)
        rgb = torch.tensor([p.rgb for p in params]).view(-1, 3, 1, 1)
        alpha = cov.unsqueeze(1)
        img = bg * (1 - alpha) + rgb * alpha
        # The caption's position word comes from the drawn area centroid (hearts are not symmetric).
        lin = torch.arange(self.image_size, dtype=torch.float32) + 0.5
        mass = cov.sum(dim=(1, 2))
        cx = (cov.sum(dim=1) * lin).sum(dim=1) / mass
        cy = (cov.sum(dim=2) * lin).sum(dim=1) / mass
        for k, i in enumerate(indices):
            p = self._params[i]
            where = position_word(float(cx[k]), float(cy[k]), self.image_size)
            self._captions[i] = f"a {p.size} {p.colour} {p.shape} {where}"
        return _to_uint8(img)

    def __len__(self) -> int:
        return self.num_samples

    def params(self, index: int) -> ShapeParams:
        """The ground-truth drawing parameters of item ``index``."""
        return self._params[index]

    def images_uint8(self, progress: bool = True) -> torch.Tensor:
        """All images as one uint8 tensor ``(N, 3, S, S)`` (renders what is not cached yet; call it
        before DataLoader workers start so they share the rendered images instead of redrawing)."""
        return self._cache.all(progress)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        img = self._cache.get(index)
        return {
            "image": _uint8_to_unit(img),
            "label": torch.tensor(SHAPE_NAMES.index(self._params[index].shape), dtype=torch.int64),
            "caption": self._captions[index],
        }


# ----------------------------------------------------------------------------------------------
# Moving shapes
# ----------------------------------------------------------------------------------------------


def bounce(start: np.ndarray | float, velocity, t, low, high):
    """Position at time ``t`` of a point moving at constant ``velocity`` between walls ``low``/``high``
    with elastic reflections: the unfolded coordinate ``start - low + velocity * t`` folded into
    ``[0, L]`` by a triangle wave of period ``2L`` (``L = high - low``)."""
    length = high - low
    unfolded = np.mod(np.asarray(start) - low + np.asarray(velocity) * np.asarray(t), 2 * length)
    return low + np.where(unfolded <= length, unfolded, 2 * length - unfolded)


_DIRECTIONS = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")


def direction_word(vx: float, vy: float) -> str:
    """8-way direction of a screen velocity (y down)."""
    sector = int(round(math.atan2(vy, vx) / (math.pi / 4))) % 8
    return _DIRECTIONS[sector]


@dataclass
class ClipParams:
    """What one clip shows: ``len(colours)`` shapes of one class (pixels and pixels/frame, y down)."""

    shape: str
    colours: list[str]
    rgbs: list[tuple[float, float, float]]
    radius: list[float]
    angle: list[float]
    start: list[tuple[float, float]]
    velocity: list[tuple[float, float]]
    walls: list[tuple[float, float]]  # (low, high) bound of the centre on both axes

    def centers(self, times) -> np.ndarray:
        """Centres ``(num_shapes, len(times), 2)`` at (possibly fractional or future) frame times."""
        t = np.asarray(times, dtype=np.float64)
        out = []
        for start, vel, (low, high) in zip(self.start, self.velocity, self.walls):
            x = bounce(start[0], vel[0], t, low, high)
            y = bounce(start[1], vel[1], t, low, high)
            out.append(np.stack([x, y], axis=-1))
        return np.stack(out)


class MovingShapesDataset(Dataset):
    """Clips of 1-2 shapes moving at constant velocity and bouncing elastically off the walls
    (``"moving_shapes"``), for video / Diffusion Forcing work.

    Returns ``{"video": (T, 3, S, S) in [-1, 1], "label": shape class, "caption": str}``. The motion
    is the closed-form reflection law (``bounce``), so ``ground_truth(i, num_frames)`` renders any
    continuation exactly and long rollouts can be judged.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        num_frames: int = 16,
        image_size: int = 32,
        max_shapes: int = 2,
        seed: int = 0,
        supersample: int = 2,
    ):
        split_id(split)
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be >= 1")
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is too small (need >= 8)")
        if max_shapes not in (1, 2):
            raise ValueError(f"max_shapes={max_shapes} must be 1 or 2")
        self.split, self.seed, self.supersample = split, int(seed), int(supersample)
        self.num_samples = int(num_samples if num_samples is not None else (2000 if split == "train" else 500))
        if self.num_samples <= 0:
            raise ValueError(f"num_samples={num_samples} must be positive")
        self.num_frames, self.image_size, self.channels, self.max_shapes = num_frames, image_size, 3, max_shapes
        self.class_names = list(SHAPE_NAMES)
        self.num_classes = len(SHAPE_NAMES)
        self._params = [self._draw_params(i) for i in range(self.num_samples)]
        self._bg_numbers = np.stack([item_rng(self.seed, split, i, stream=1).random(BACKGROUND_NUMBERS)
                                     for i in range(self.num_samples)])
        self._cache = _ChunkCache(self.num_samples, functools.partial(self._render, num_frames=self.num_frames))
        self._cache.chunk_size = max(1, 4096 // num_frames)

    def _draw_params(self, index: int) -> ClipParams:
        rng = item_rng(self.seed, self.split, index)
        s = self.image_size
        shape = SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]
        n = 1 + int(rng.integers(self.max_shapes))
        colour_ids = rng.choice(len(COLOUR_NAMES), size=n, replace=False)
        p = ClipParams(shape, [], [], [], [], [], [], [])
        for k in range(n):
            colour = COLOUR_NAMES[colour_ids[k]]
            p.colours.append(colour)
            base = np.array(COLOURS[colour])
            p.rgbs.append(tuple(float(c) for c in np.clip(base + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 1)))
            radius = float(rng.uniform(0.12, 0.19) * s)
            margin = SHAPE_EXTENT * radius + 0.5
            p.radius.append(radius)
            max_rot = MAX_ROTATION.get(shape, DEFAULT_ROTATION)
            p.angle.append(float(rng.uniform(-max_rot, max_rot)))
            p.start.append((float(rng.uniform(margin, s - margin)), float(rng.uniform(margin, s - margin))))
            speed = float(rng.uniform(0.6, 1.6)) * s / 32  # pixels per frame
            heading = float(rng.uniform(0, 2 * math.pi))
            p.velocity.append((speed * math.cos(heading), speed * math.sin(heading)))
            p.walls.append((margin, s - margin))
        return p

    def _render(self, indices, num_frames: int) -> torch.Tensor:
        s, t = self.image_size, num_frames
        indices = list(indices)
        bg = render_backgrounds(self._bg_numbers[indices], s)  # (B, 3, s, s), static over time
        video = bg.unsqueeze(1).repeat(1, t, 1, 1, 1)
        for k in range(self.max_shapes):  # painter's order: shape 0 below shape 1
            items = [b for b, i in enumerate(indices) if len(self._params[i].colours) > k]
            if not items:
                continue
            shapes, centers, radii, angles, rgbs = [], [], [], [], []
            for b in items:
                p = self._params[indices[b]]
                traj = p.centers(np.arange(t))[k]
                shapes += [p.shape] * t
                centers.append(traj)
                radii += [p.radius[k]] * t
                angles += [p.angle[k]] * t
                rgbs.append(p.rgbs[k])
            cov = render_coverage(
                shapes,
                torch.from_numpy(np.concatenate(centers)).float(),
                torch.tensor(radii),
                torch.tensor(angles),
                s,
                self.supersample,
            ).view(len(items), t, 1, s, s)
            rgb = torch.tensor(rgbs).view(-1, 1, 3, 1, 1)
            sel = torch.tensor(items)
            video[sel] = video[sel] * (1 - cov) + rgb * cov
        return _to_uint8(video)

    def params(self, index: int) -> ClipParams:
        """The ground-truth parameters (shape, colours, start, velocity, walls) of clip ``index``."""
        return self._params[index]

    def ground_truth(self, index: int, num_frames: int) -> torch.Tensor:
        """Clip ``index`` rendered for ``num_frames`` frames (longer than the dataset's for rollouts),
        ``(num_frames, 3, S, S)`` in [-1, 1]; its first ``self.num_frames`` frames equal ``self[index]``."""
        with _single_thread():
            return _uint8_to_unit(self._render([index], num_frames)[0])

    def caption(self, index: int) -> str:
        p = self._params[index]
        if len(p.colours) == 1:
            return f"a {p.colours[0]} {p.shape} moving {direction_word(*p.velocity[0])}"
        return f"a {p.colours[0]} {p.shape} and a {p.colours[1]} {p.shape} bouncing around"

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return {
            "video": _uint8_to_unit(self._cache.get(index)),
            "label": torch.tensor(SHAPE_NAMES.index(self._params[index].shape), dtype=torch.int64),
            "caption": self.caption(index),
        }
