"""Scheduling matrices for Diffusion Forcing sampling (Chen et al. 2024, Sec. 3.3 and App. D).

A scheduling matrix ``K`` of integer noise levels has shape ``[M + 1, H]``: row ``m`` is the level of
each of the ``H`` frames being generated before denoising step ``m``; level ``S`` (``num_levels``) is
pure noise and ``0`` is clean. Step ``m`` moves every frame whose level changes from ``K[m, t]`` to
``K[m + 1, t]``; the other frames are only read. Valid matrices start at all-``S``, end at all-``0``
and never increase down a column.

Levels map to package times by a decreasing grid (``grid[0] = 1``, ``grid[-1] = 0``, as the ODE
samplers use): level ``k`` sits at ``t = grid[S - k]`` (``level_times``).
"""

from __future__ import annotations

import torch

SCHEDULES = ("full_sequence", "autoregressive", "pyramid", "trapezoid")


def pyramid_matrix(num_levels: int, horizon: int, slope: float = 1.0) -> torch.Tensor:
    """``K[m, t] = clip(S + floor(t * slope) - m, 0, S)`` (the DF paper's pyramid, "causal uncertainty").

    Later frames stay noisier; ``slope`` is how many levels each frame lags its predecessor. Rows
    run from all-``S`` to all-``0``: ``M = S + floor((H - 1) * slope)`` steps.
    """
    _check(num_levels, horizon)
    if slope < 0:
        raise ValueError(f"slope: must be >= 0, got {slope}")
    lag = torch.floor(torch.arange(horizon, dtype=torch.float64) * slope).long()
    steps = num_levels + int(lag[-1])
    m = torch.arange(steps + 1)[:, None]
    return (num_levels + lag[None, :] - m).clamp(0, num_levels)


def full_sequence_matrix(num_levels: int, horizon: int) -> torch.Tensor:
    """Every frame shares one level, ``S -> 0``: full-sequence diffusion (a pyramid with slope 0)."""
    return pyramid_matrix(num_levels, horizon, 0.0)


def autoregressive_matrix(num_levels: int, horizon: int) -> torch.Tensor:
    """Each frame is fully denoised before the next starts (a pyramid with slope ``S``)."""
    return pyramid_matrix(num_levels, horizon, float(num_levels))


def trapezoid_matrix(num_levels: int, horizon: int, slope: float = 1.0) -> torch.Tensor:
    """Both ends of the horizon are denoised first, the middle last (DF's trapezoid, for planning to a goal).

    Frame ``t`` lags by ``floor(min(t, H - 1 - t) * slope)`` levels.
    """
    _check(num_levels, horizon)
    if slope < 0:
        raise ValueError(f"slope: must be >= 0, got {slope}")
    idx = torch.arange(horizon)
    lag = torch.floor(torch.minimum(idx, horizon - 1 - idx).double() * slope).long()
    steps = num_levels + int(lag.max())
    m = torch.arange(steps + 1)[:, None]
    return (num_levels + lag[None, :] - m).clamp(0, num_levels)


def get_scheduling_matrix(schedule, num_levels: int, horizon: int, slope: float = 1.0) -> torch.Tensor:
    """A matrix by name (``full_sequence``/``full``, ``autoregressive``, ``pyramid``, ``trapezoid``) or
    a user matrix (list / tensor ``[M + 1, H]``), validated with ``validate_scheduling_matrix``."""
    if isinstance(schedule, str):
        name = "full_sequence" if schedule in ("full", "full_sequence", "full-sequence") else schedule
        if name == "full_sequence":
            return full_sequence_matrix(num_levels, horizon)
        if name == "autoregressive":
            return autoregressive_matrix(num_levels, horizon)
        if name == "pyramid":
            return pyramid_matrix(num_levels, horizon, slope)
        if name == "trapezoid":
            return trapezoid_matrix(num_levels, horizon, slope)
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)} or a matrix, got {schedule!r}")
    matrix = torch.as_tensor(schedule)
    validate_scheduling_matrix(matrix, num_levels, horizon)
    return matrix.long()


def validate_scheduling_matrix(matrix: torch.Tensor, num_levels: int, horizon: int | None = None) -> None:
    """Raise a one-line ValueError unless ``matrix`` is ``[M + 1, H]`` integers in ``[0, S]`` that start
    at ``S``, end at ``0`` and never increase from one row to the next."""
    matrix = torch.as_tensor(matrix)
    if matrix.dim() != 2 or matrix.shape[0] < 2:
        raise ValueError(f"schedule: a scheduling matrix must be [steps + 1, frames], got shape {tuple(matrix.shape)}")
    if matrix.is_floating_point() and not torch.equal(matrix, matrix.round()):
        raise ValueError("schedule: scheduling matrix entries must be integer noise levels")
    matrix = matrix.long()
    if horizon is not None and matrix.shape[1] != horizon:
        raise ValueError(f"schedule: matrix has {matrix.shape[1]} columns but {horizon} frames are generated")
    if int(matrix.min()) < 0 or int(matrix.max()) > num_levels:
        raise ValueError(f"schedule: levels must lie in [0, {num_levels}], got [{int(matrix.min())}, {int(matrix.max())}]")
    if (matrix[0] != num_levels).any():
        raise ValueError(f"schedule: the first row must be all {num_levels} (pure noise), got {matrix[0].tolist()}")
    if (matrix[-1] != 0).any():
        raise ValueError(f"schedule: the last row must be all 0 (clean), got {matrix[-1].tolist()}")
    if (matrix[1:] > matrix[:-1]).any():
        raise ValueError("schedule: levels must never increase from one row to the next")


def level_times(num_levels: int, grid: torch.Tensor | None = None) -> torch.Tensor:
    """``tau[k]`` = package time of level ``k`` (``tau[0] = 0`` clean, ``tau[S] = 1`` noise): the grid reversed."""
    if grid is None:
        grid = torch.linspace(1.0, 0.0, num_levels + 1, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.numel() != num_levels + 1:
        raise ValueError(f"grid: has {grid.numel() - 1} steps but num_levels={num_levels}")
    return grid.flip(0)


def _check(num_levels: int, horizon: int) -> None:
    if int(num_levels) < 1:
        raise ValueError(f"num_inference_steps: must be >= 1, got {num_levels}")
    if int(horizon) < 1:
        raise ValueError(f"horizon: must be >= 1 frame, got {horizon}")
