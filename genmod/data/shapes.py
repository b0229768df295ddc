"""Procedural still images of coloured shapes with captions (``ShapesDataset``, ``"shapes"``), and
the colour / size / position vocabulary of those captions (shared with ``moving_shapes.py``).

Everything is generated from a seed, offline and identically on every machine: the per-item
parameters come from numpy's PCG64 seeded by ``(seed, split, index)`` (so item ``i`` does not depend
on ``num_samples``), and the pictures are rasterised by the SDF renderer (``render.py``) and stored
as uint8 (``render_cache.py``), which hides the last-bit float differences between CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .render import (BACKGROUND_NUMBERS, DEFAULT_ROTATION, MAX_ROTATION, SHAPE_EXTENT, SHAPE_NAMES, render_backgrounds,
                     render_coverage)
from .render_cache import ChunkCache, to_uint8, uint8_to_unit
from .seeding import item_rng, split_id

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
        self._cache = ChunkCache(self.num_samples, self._render)
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
        return to_uint8(img)

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
            "image": uint8_to_unit(img),
            "label": torch.tensor(SHAPE_NAMES.index(self._params[index].shape), dtype=torch.int64),
            "caption": self._captions[index],
        }
