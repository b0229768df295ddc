"""Align Your Steps (Sabour, Fidler & Kreis 2024): a K-step time grid optimised for one model and its data.

AYS bounds the KL divergence between the true generative SDE and its discretisation on a grid
(the KLUB, Sec. 3.1-3.2). On EDM's SDE (VE, sigma(t) = t) with the denoiser ``D`` frozen over each
interval at its noisy end (the step that DDIM / DPM-Solver-1 / the flow Euler step make), Girsanov's
theorem gives per interval ``[s_{i-1}, s_i]`` of VE noise levels

    KLUB_i = int_{s_{i-1}}^{s_i} s^-3  E || D(x_s, s) - D(x_{s_i}, s_i) ||^2 ds
           = 1/2 int_{SNR_i}^{SNR_{i-1}} E || D(x, SNR) - D(x_{s_i}, SNR_i) ||^2 dSNR,      SNR = 1 / s^2,

with ``x_0`` from the data, ``x_s = x_0 + s e_1`` and ``x_{s_i} = x_s + sqrt(s_i^2 - s^2) e_2`` (the
joint law of the forward, hence of the true reverse, process). Any affine path is a VE path in
disguise (``x_t / alpha(t)``, ``s = sigma(t) / alpha(t)``), so here ``D`` is the model's x0-prediction
(``path.convert`` of its velocity) at the path time of equal SNR, and the weight ``s^-3 ds`` is sampled
exactly by drawing SNR uniformly on the interval. The expectation is a Monte Carlo mean over fixed
draws (common random numbers), so candidate grids are compared on the same samples.

Optimisation (Sec. 3.3): coordinate descent, each interior point moved to the best of a set of
candidates between its neighbours for the sum of its two KLUB terms, a few sweeps; starting from a
coarse grid and subdividing (midpoints in log sigma) before optimising again, until K steps. Interior
points live in EDM's range ``sigma in [0.002, 80]``; the grid starts at t = 1 and ends at t = 0, and the
last interval's SNR integral is cut at ``sigma_min``. ``interpolate_time_grid`` re-spaces a saved grid
to another step count, log-linearly as the paper does for its released schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from genmod.core.paths import AffinePath, LinearPath
from genmod.samplers.steppers import ODESolver, run_step

OBJECTIVES = ("klub", "lte", "global")


@dataclass
class KLUBDraws:
    """The fixed random numbers of every KLUB estimate: data, two noises and the SNR quantile per sample."""

    x0: torch.Tensor
    eps_1: torch.Tensor
    eps_2: torch.Tensor
    u: torch.Tensor

    @classmethod
    def draw(cls, x0: torch.Tensor, generator: torch.Generator | None = None) -> "KLUBDraws":
        def normal():
            return torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)

        u = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64).to(x0.device)
        return cls(x0, normal(), normal(), u)


@dataclass
class AYSResult:
    """The optimised grid (t, decreasing from 1 to 0) and the summed objective after each level and sweep."""

    time_grid: torch.Tensor
    history: list = field(default_factory=list)


def x0_denoiser(velocity_fn, path: AffinePath | None = None):
    """``D(x, t)``: the data prediction of a velocity model, converted exactly on ``path``."""
    path = path or LinearPath()
    return lambda x, t: path.convert(velocity_fn(x, t), x, t, src="velocity", dst="x0")


def _snr(path: AffinePath, t: float) -> float:
    tt = torch.tensor(float(t), dtype=torch.float64)
    return float(path.alpha(tt) ** 2 / path.sigma(tt) ** 2) if t > 0 else math.inf


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def klub(denoiser, draws: KLUBDraws, path: AffinePath, t_clean: float, t_noisy: float, snr_max: float) -> float:
    """The KLUB of the interval ``[t_clean, t_noisy]`` (per data dimension), Monte Carlo over ``draws``."""
    snr_clean, snr_noisy = min(_snr(path, t_clean), snr_max), _snr(path, t_noisy)
    snr = snr_noisy + draws.u * (snr_clean - snr_noisy)                       # uniform in SNR = s^-3 ds weight
    t = path.t_from_log_snr(snr.log()).to(torch.float64)
    ratio = (snr_noisy / snr).sqrt()                                          # s / s_i in VE noise levels
    x0 = draws.x0
    eps_noisy = _column(ratio, x0) * draws.eps_1 + _column((1 - ratio**2).clamp(min=0).sqrt(), x0) * draws.eps_2
    x_t = _column(path.alpha(t), x0) * x0 + _column(path.sigma(t), x0) * draws.eps_1
    tn = torch.full_like(t, t_noisy)
    x_noisy = _column(path.alpha(tn), x0) * x0 + _column(path.sigma(tn), x0) * eps_noisy
    t_dtype = torch.promote_types(x0.dtype, torch.float32)
    gap = denoiser(x_t, t.to(t_dtype)) - denoiser(x_noisy, tn.to(t_dtype))
    return 0.5 * (snr_clean - snr_noisy) * float(gap.flatten(1).pow(2).mean())


def _log_sigma_to_t(path: AffinePath, log_sigma: list[float]) -> list[float]:
    """VE log noise level -> path time (equal SNR: log SNR = -2 log sigma)."""
    return path.t_from_log_snr(torch.tensor([-2 * v for v in log_sigma], dtype=torch.float64)).tolist()


def _grid(path: AffinePath, log_sigma: list[float]) -> list[float]:
    return [1.0] + _log_sigma_to_t(path, log_sigma) + [0.0]


def _coordinate_sweep(point_cost, path, log_sigma, bounds, num_candidates) -> list[float]:
    """Move each interior point, in turn, to the candidate between its neighbours with the lowest
    ``point_cost(grid, i)`` (the cost that point ``grid[i + 1]`` changes)."""
    log_sigma = list(log_sigma)
    for i in range(len(log_sigma)):
        upper = log_sigma[i - 1] if i > 0 else bounds[1]
        lower = log_sigma[i + 1] if i + 1 < len(log_sigma) else bounds[0]
        candidates = [lower + (upper - lower) * (j + 1) / (num_candidates + 1) for j in range(num_candidates)]
        best, best_value = log_sigma[i], math.inf
        for value in [log_sigma[i]] + candidates:
            value_cost = point_cost(_grid(path, log_sigma[:i] + [value] + log_sigma[i + 1:]), i)
            if value_cost < best_value:
                best, best_value = value, value_cost
        log_sigma[i] = best
    return log_sigma


def _subdivide(log_sigma: list[float], bounds) -> list[float]:
    """Double the step count: a midpoint (in log sigma) inside every interval, the range's bounds as ends."""
    points = [bounds[1]] + list(log_sigma) + [bounds[0]]
    out = []
    for a, b in zip(points[:-1], points[1:]):
        out += [0.5 * (a + b), b]
    return out[:-1]


def coarsest_steps(num_steps: int) -> int:
    """The step count AYS starts from: ``num_steps`` halved while it stays even and above 2."""
    while num_steps % 2 == 0 and num_steps > 2:
        num_steps //= 2
    return num_steps


def local_error(velocity_fn, draws: KLUBDraws, path: AffinePath, t_clean: float, t_noisy: float, method: str,
                reference_substeps: int = 2) -> float:
    """Root-mean-square local truncation error of one ``method`` step over ``[t_noisy -> t_clean]`` from the
    path's marginal at ``t_noisy`` (``alpha x0 + sigma eps``), against ``reference_substeps`` rk4 steps."""
    x0 = draws.x0
    x = path.alpha(torch.tensor(t_noisy, dtype=torch.float64)).item() * x0 + \
        path.sigma(torch.tensor(t_noisy, dtype=torch.float64)).item() * draws.eps_1
    step = run_step(ODESolver(method, path).step(x, t_noisy, t_clean), velocity_fn)
    reference = x
    edges = torch.linspace(t_noisy, t_clean, reference_substeps + 1, dtype=torch.float64).tolist()
    for a, b in zip(edges[:-1], edges[1:]):
        reference = run_step(ODESolver("rk4", path).step(reference, a, b), velocity_fn)
    return float((step - reference).flatten(1).pow(2).mean().sqrt())


def global_error(velocity_fn, draws: KLUBDraws, path: AffinePath, grid, method: str, reference: torch.Tensor) -> float:
    """RMS distance at t = 0 between a ``method`` solve over ``grid`` from the noises ``draws.eps_1`` and ``reference``."""
    solver, x = ODESolver(method, path), draws.eps_1
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = run_step(solver.step(x, t_cur, t_next), velocity_fn)
    return float((x - reference).flatten(1).pow(2).mean().sqrt())


def grid_costs(objective: str, velocity_fn, draws: KLUBDraws, path: AffinePath, snr_max: float,
               method: str = "euler", reference_steps: int = 64):
    """``(point_cost(grid, i), total(grid))`` for ``objective``; ``point_cost`` is what moving ``grid[i + 1]`` changes.

    ``klub`` / ``lte``: the two intervals next to the point (memoised per interval); ``global``: the error of
    the whole solve against an rk4 solve of ``reference_steps`` steps from the same noise.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "global":
        reference = _solve_reference(velocity_fn, draws, path, [1.0 - k / reference_steps for k in range(reference_steps + 1)])
        whole = lambda grid: global_error(velocity_fn, draws, path, grid, method, reference)  # noqa: E731
        return (lambda grid, i: whole(grid)), whole
    denoiser = x0_denoiser(velocity_fn, path)
    memo: dict[tuple[float, float], float] = {}

    def interval(t_clean: float, t_noisy: float) -> float:
        key = (round(t_clean, 12), round(t_noisy, 12))
        if key not in memo:
            memo[key] = (klub(denoiser, draws, path, t_clean, t_noisy, snr_max) if objective == "klub"
                         else local_error(velocity_fn, draws, path, t_clean, t_noisy, method))
        return memo[key]

    def total(grid):
        return sum(interval(grid[k + 1], grid[k]) for k in range(len(grid) - 1))

    return (lambda grid, i: interval(grid[i + 1], grid[i]) + interval(grid[i + 2], grid[i + 1])), total


def _solve_reference(velocity_fn, draws, path, fine_grid) -> torch.Tensor:
    solver, x = ODESolver("rk4", path), draws.eps_1
    for t_cur, t_next in zip(fine_grid[:-1], fine_grid[1:]):
        x = run_step(solver.step(x, t_cur, t_next), velocity_fn)
    return x


def optimize_time_grid(velocity_fn, x0: torch.Tensor, num_steps: int, path: AffinePath | None = None,
                       objective: str = "klub", method: str = "euler", sigma_min: float = 0.002,
                       sigma_max: float = 80.0, num_sweeps: int = 3, num_candidates: int = 9,
                       generator: torch.Generator | None = None) -> AYSResult:
    """The AYS grid of ``num_steps`` steps for the model ``velocity_fn(x, t)`` and data samples ``x0 [N, ...]``.

    ``objective``: ``klub`` (the paper's bound) or ``lte`` (the summed RMS local truncation error of one
    ``method`` step per interval against rk4). ``x0`` may be the data or the model's own samples; the rows
    of each model call are the rows of ``x0``, so a class-conditional ``velocity_fn`` may close over one
    label per row.
    """
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps: AYS needs an int >= 2 (an interior point to move), got {num_steps!r}")
    if not 0 < sigma_min < sigma_max or num_sweeps < 1 or num_candidates < 1:
        raise ValueError(f"sigma_min/sigma_max/num_sweeps/num_candidates: need 0 < sigma_min < sigma_max and counts >= 1, "
                         f"got {sigma_min}, {sigma_max}, {num_sweeps}, {num_candidates}")
    path = path or LinearPath()
    bounds = (math.log(sigma_min), math.log(sigma_max))
    cost, total = grid_costs(objective, velocity_fn, KLUBDraws.draw(x0, generator), path, sigma_min**-2, method)
    steps = coarsest_steps(num_steps)
    log_sigma = [bounds[1] + (j + 0.5) / (steps - 1) * (bounds[0] - bounds[1]) for j in range(steps - 1)]
    history = []
    with torch.no_grad():
        while True:
            for _ in range(num_sweeps):
                log_sigma = _coordinate_sweep(cost, path, log_sigma, bounds, num_candidates)
                history.append({"steps": steps, objective: total(_grid(path, log_sigma))})
            if steps >= num_steps:
                break
            log_sigma, steps = _subdivide(log_sigma, bounds), 2 * steps
    return AYSResult(torch.tensor(_grid(path, log_sigma), dtype=torch.float64), history)


def interpolate_time_grid(grid, num_steps: int, path: AffinePath | None = None) -> torch.Tensor:
    """Re-space a grid (1, interior..., 0) to ``num_steps`` steps: its interior points' log sigma, linearly
    interpolated (and extrapolated at the ends) over their normalised positions."""
    path = path or LinearPath()
    grid = torch.as_tensor(grid, dtype=torch.float64)
    old_steps = grid.numel() - 1
    if num_steps == old_steps:
        return grid.clone()
    if old_steps < 3 or num_steps < 1:
        raise ValueError(f"num_steps: cannot re-space a {old_steps}-step grid to {num_steps} steps")
    log_sigma = -0.5 * path.log_snr(grid[1:-1])                   # interior points, decreasing
    positions = torch.arange(1, old_steps, dtype=torch.float64) / old_steps
    new_positions = torch.arange(1, num_steps, dtype=torch.float64) / num_steps
    index = torch.searchsorted(positions, new_positions).clamp(1, positions.numel() - 1)
    left, right = positions[index - 1], positions[index]
    weight = (new_positions - left) / (right - left)
    new_log_sigma = log_sigma[index - 1] + weight * (log_sigma[index] - log_sigma[index - 1])
    interior = _log_sigma_to_t(path, new_log_sigma.tolist())
    return torch.tensor([1.0] + interior + [0.0], dtype=torch.float64)
