"""Decreasing time grids ``1 = t_0 > t_1 > ... > t_n = 0`` for the solvers (docs/DESIGN.md §1).

* ``uniform``: evenly spaced in t.
* ``shifted``: uniform pushed through the SD3 shift ``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024,
  Sec. 5.3.2), the same grid as diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)``.
* ``karras``: EDM's rho-spaced noise levels (Karras et al. 2022, eq. 5, rho = 7) in VE sigma, mapped
  to t by equal log-SNR on ``path`` (linear path: ``t = sigma / (1 + sigma)``). The first point is
  pinned to t = 1, where samplers start from pure noise (EDM's own first point, sigma_max = 80, is
  t = 0.988 on the linear path).
* ``cosine``: uniform in the cosine path's angle (``alpha = cos(pi u / 2)``), mapped by equal
  log-SNR onto ``path``; on ``CosinePath`` it is uniform.

Other schedules (e.g. Align Your Steps, Sabour et al. 2024) plug in with ``register_time_grid``;
an explicit user grid passes through ``get_time_grid`` after validation.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from genmod.core.paths import AffinePath, LinearPath

TIME_GRIDS: dict[str, Callable[..., torch.Tensor]] = {}


def register_time_grid(name: str, fn: Callable[..., torch.Tensor] | None = None):
    """Register ``fn(num_steps, **kw) -> grid`` under ``name`` (usable as a decorator)."""

    def add(f):
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string, got {name!r}")
        TIME_GRIDS[name] = f
        return f

    return add(fn) if fn is not None else add


def _check_num_steps(num_steps):
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")


@register_time_grid("uniform")
def uniform_grid(num_steps: int, t_max: float = 1.0, t_min: float = 0.0) -> torch.Tensor:
    """``num_steps + 1`` evenly spaced times from ``t_max`` to ``t_min``."""
    _check_num_steps(num_steps)
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"t_min/t_max: need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
    return torch.linspace(t_max, t_min, num_steps + 1, dtype=torch.float64)


@register_time_grid("shifted")
def shifted_grid(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """Uniform grid through the SD3 shift ``s t / (1 + (s - 1) t)``; ``shift > 1`` spends more steps near noise."""
    if shift <= 0:
        raise ValueError(f"shift: must be > 0, got {shift}")
    t = uniform_grid(num_steps)
    return shift * t / (1 + (shift - 1) * t)


def _log_snr_to_grid(log_snr: torch.Tensor, path: AffinePath | None) -> torch.Tensor:
    path = path or LinearPath()
    grid = path.t_from_log_snr(log_snr.to(torch.float64)).to(torch.float64)
    grid[0], grid[-1] = 1.0, 0.0
    return grid


@register_time_grid("karras")
def karras_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                path: AffinePath | None = None) -> torch.Tensor:
    """EDM noise levels ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` then 0, as t on ``path``."""
    _check_num_steps(num_steps)
    if not 0 < sigma_min < sigma_max or rho <= 0:
        raise ValueError(f"sigma_min/sigma_max/rho: need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
    if num_steps == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float64)
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    # VE sigma <-> affine path at equal SNR: SNR = 1 / sigma^2.
    log_snr = torch.cat([-2 * sigmas.log(), torch.tensor([math.inf], dtype=torch.float64)])
    return _log_snr_to_grid(log_snr, path)


@register_time_grid("cosine")
def cosine_grid(num_steps: int, path: AffinePath | None = None) -> torch.Tensor:
    """Uniform in the cosine path's angle, mapped by equal log-SNR onto ``path``."""
    _check_num_steps(num_steps)
    u = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    log_snr = 2 * (torch.log(torch.cos(0.5 * math.pi * u)) - torch.log(torch.sin(0.5 * math.pi * u)))
    return _log_snr_to_grid(log_snr, path)


def validate_time_grid(grid: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Check an explicit grid: 1-D, at least two points, strictly decreasing, inside [0, 1]."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"time_grid: expected a 1-D sequence of at least 2 times, got shape {tuple(grid.shape)}")
    if not torch.isfinite(grid).all() or grid.max() > 1 or grid.min() < 0:
        raise ValueError(f"time_grid: times must lie in [0, 1], got {grid.tolist()}")
    if (grid.diff() >= 0).any():
        raise ValueError("time_grid: must be strictly decreasing (t = 1 noise first, t = 0 data last)")
    return grid


def get_time_grid(name: str | Sequence[float] | torch.Tensor, num_steps: int | None = None, **kwargs) -> torch.Tensor:
    """A registered grid by name (``uniform``, ``shifted``, ``karras``, ``cosine``, ...) or a validated explicit grid."""
    if not isinstance(name, str):
        grid = validate_time_grid(name)
        if num_steps is not None and grid.numel() != num_steps + 1:
            raise ValueError(f"time_grid: has {grid.numel() - 1} steps but num_steps={num_steps}")
        return grid
    if name not in TIME_GRIDS:
        raise ValueError(f"time grid: expected one of {', '.join(TIME_GRIDS)} or an explicit list of times, got {name!r}")
    if num_steps is None:
        raise ValueError(f"num_steps: required for the {name!r} grid")
    return validate_time_grid(TIME_GRIDS[name](num_steps, **kwargs))


def space_timesteps(num_train_steps: int, section_counts) -> list[int]:
    """ADM's respacing (Nichol & Dhariwal 2021, Sec. 4): the kept steps of a ``num_train_steps`` DDPM chain, ascending.

    ``section_counts``: an int, a list of ints or a comma string; the chain is cut into that many equal
    sections and each section is strided evenly to its count (fractional stride, rounded), ends included.
    """
    if isinstance(section_counts, str):
        section_counts = [int(c) for c in section_counts.split(",")]
    counts = [int(section_counts)] if isinstance(section_counts, int) else [int(c) for c in section_counts]
    size_per, extra = divmod(num_train_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"num_steps: cannot take {count} steps from a section of {size} DDPM steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):  # accumulated as ADM does, so the rounding agrees at every count
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


@register_time_grid("ddpm")
def ddpm_grid(num_steps: int, num_train_steps: int = 1000) -> torch.Tensor:
    """The respaced DDPM chain as times: kept step n sits at ``t = (n + 1) / N`` (``DiscreteSchedulePath``), then 0."""
    _check_num_steps(num_steps)
    kept = space_timesteps(num_train_steps, num_steps)
    times = [(n + 1) / num_train_steps for n in reversed(kept)] + [0.0]
    return torch.tensor(times, dtype=torch.float64)
