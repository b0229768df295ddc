"""Procedural video: clips of 1-2 coloured shapes bouncing elastically off the walls
(``MovingShapesDataset``, ``"moving_shapes"``), with the closed-form motion law (``bounce``) so any
continuation of a clip can be rendered exactly (``ground_truth``) to judge long rollouts.

Like the stills (``shapes.py``), every clip is drawn from numpy's PCG64 seeded by
``(seed, split, index)`` and rasterised by the SDF renderer (``render.py``), stored as uint8.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .render import (BACKGROUND_NUMBERS, DEFAULT_ROTATION, MAX_ROTATION, SHAPE_EXTENT, SHAPE_NAMES, render_backgrounds,
                     render_coverage)
from .render_cache import ChunkCache, single_thread, to_uint8, uint8_to_unit
from .seeding import item_rng, split_id
from .shapes import COLOUR_JITTER, COLOUR_NAMES, COLOURS


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
        self._cache = ChunkCache(self.num_samples, functools.partial(self._render, num_frames=self.num_frames))
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
        return to_uint8(video)

    def params(self, index: int) -> ClipParams:
        """The ground-truth parameters (shape, colours, start, velocity, walls) of clip ``index``."""
        return self._params[index]

    def ground_truth(self, index: int, num_frames: int) -> torch.Tensor:
        """Clip ``index`` rendered for ``num_frames`` frames (longer than the dataset's for rollouts),
        ``(num_frames, 3, S, S)`` in [-1, 1]; its first ``self.num_frames`` frames equal ``self[index]``."""
        with single_thread():
            return uint8_to_unit(self._render([index], num_frames)[0])

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
            "video": uint8_to_unit(self._cache.get(index)),
            "label": torch.tensor(SHAPE_NAMES.index(self._params[index].shape), dtype=torch.int64),
            "caption": self.caption(index),
        }
