"""The SDF renderer of the procedural shapes: outlines as signed distance functions (SDFs), their
anti-aliased coverage, and the textured backgrounds, shared by ``ShapesDataset`` and ``MovingShapesDataset``.

Anti-aliasing: every shape is drawn on a ``supersample``-times finer grid, where a sub-pixel's
coverage is the SDF-based box filter ``clamp(0.5 - d, 0, 1)`` (``d`` = signed distance in sub-pixels),
then averaged down to the output grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SHAPE_NAMES = ("circle", "square", "triangle", "plus", "ring", "diamond", "star", "heart")

# Largest distance of a shape's outline from its centre, in units of its radius, for any
# rotation we draw (a square's corner at 0.8*sqrt(2) rotated by up to 0.3 rad stays inside 1.15).
SHAPE_EXTENT = 1.15
MAX_ROTATION = {"circle": 0.0, "ring": 0.0, "diamond": 0.2}  # radians; others: DEFAULT_ROTATION
DEFAULT_ROTATION = 0.3

# Random numbers per background: base colour (3), gradient direction and strength (2), texture
# amplitude (1) and a 4x4 noise field per channel (3 * 16).
BACKGROUND_NUMBERS = 6 + 3 * 16


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
