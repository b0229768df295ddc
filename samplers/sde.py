"""Euler-Maruyama for the reverse-time SDE of an affine path, driven by the velocity.

For any diffusion coefficient g(t) the SDE, run from t = 1 to t = 0 (``tau = 1 - t`` forward),

    dx = [-v(x, t) + g(t)^2 / 2 * score(x, t)] dtau + g(t) dW,

has the same marginals p_t as the probability-flow ODE ``dx/dt = v`` (its Fokker-Planck equation
reduces to the continuity equation of v; Song et al. 2021, eq. 6 and App. D.1; Ma et al. 2024 SiT,
Sec. 3.3). The score comes from the velocity through the path: ``score = -E[eps | x_t] / sigma``
(``AffinePath.convert``). Diffusion schedules (times ``noise_scale``):

* ``sigma``: ``g = sigma(t)`` (default; finite everywhere, vanishes at the data end),
* ``path``: the path's own forward-SDE diffusion ``g^2 = 2 sigma sigma' - 2 (alpha'/alpha) sigma^2`` (the
  classic reverse SDE; infinite where alpha = 0, e.g. linear path at t = 1),
* ``constant``: ``g = 1``,
* ``sit``: ``g = sqrt(2 sigma(t))``, SiT's default (Ma et al. 2024, Sec. 3.3 and eq. 9: diffusion
  ``w_t = sigma_t`` with drift ``v + w_t * score`` and noise ``sqrt(2 w_t) dW``; its ``diffusion_norm``
  multiplies ``w_t``, i.e. ``noise_scale = sqrt(diffusion_norm)``).

The last step carries no fresh noise: ``last_step="ode"`` (default) is an Euler step of the ODE,
``last_step="mean"`` an Euler step of the SDE drift without its noise (SiT's ``last_step="Mean"``, which
with 250 points to t = 0.04 and a last step of 0.04 gives its published SDE samples).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from genmod.core.paths import AffinePath, LinearPath

DIFFUSION_SCHEDULES = ("sigma", "path", "constant", "sit")
LAST_STEPS = ("ode", "mean")


def diffusion_coefficient(path: AffinePath, t: torch.Tensor, schedule: str = "sigma", noise_scale: float = 1.0) -> torch.Tensor:
    """``g(t)`` of the chosen schedule times ``noise_scale``."""
    if schedule == "sigma":
        g = path.sigma(t)
    elif schedule == "path":
        a, s, da, ds = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
        g = torch.sqrt((2 * s * ds - 2 * (da / a) * s**2).clamp(min=0))
    elif schedule == "constant":
        g = torch.ones_like(t)
    elif schedule == "sit":
        g = torch.sqrt(2 * path.sigma(t))
    else:
        raise ValueError(f"diffusion: expected one of {', '.join(DIFFUSION_SCHEDULES)}, got {schedule!r}")
    return noise_scale * g


def _em_step(x, velocity, t: float, t_batch, dtau: float, path: AffinePath, diffusion: str, noise_scale: float,
             generator, add_noise: bool = True) -> torch.Tensor:
    """One Euler-Maruyama step ``x + dtau (-v + g^2/2 score) + g sqrt(dtau) noise`` (no noise: the drift only)."""
    g = diffusion_coefficient(path, torch.tensor(t, dtype=torch.float64), diffusion, noise_scale).item()
    if not torch.isfinite(torch.tensor(g)):
        raise ValueError(f"diffusion: g(t) is infinite at t={t} for diffusion={diffusion!r} on {path!r}; start the grid below it or use 'sigma'")
    score = path.convert(velocity, x, t_batch, src="velocity", dst="score")
    x = x + dtau * (-velocity + 0.5 * g**2 * score)
    if not add_noise:
        return x
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                        device=generator.device if generator is not None else x.device).to(x.device)
    return x + g * dtau**0.5 * noise


def sample_sde(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_init: torch.Tensor,
    time_grid: Sequence[float] | torch.Tensor,
    path: AffinePath | None = None,
    diffusion: str = "sigma",
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    progress: bool = False,
    return_stats: bool = False,
    last_step: str = "ode",
):
    """Euler-Maruyama over a decreasing ``time_grid``; noise drawn from ``generator``.

    One ``randn(x.shape)`` per step but the last (``last_step``: ``ode`` | ``mean``, see the module doc).
    Returns ``x`` (and ``SolverStats`` when ``return_stats``); one velocity call per step.
    """
    from genmod.samplers.ode import NFECounter, SolverStats  # local: avoid a cycle in samplers/__init__
    from genmod.samplers.steppers import intervals, time_batch

    path = path or LinearPath()
    if noise_scale < 0:
        raise ValueError(f"noise_scale: must be >= 0, got {noise_scale}")
    pairs = intervals(time_grid)
    if pairs[0][1] > pairs[0][0]:
        raise ValueError("time_grid: sample_sde integrates from noise to data; give a decreasing grid")
    diffusion_coefficient(path, torch.tensor(0.5), diffusion)  # validates the schedule name early
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step: expected one of {', '.join(LAST_STEPS)}, got {last_step!r}")
    counter = NFECounter(velocity_fn)
    x = x_init
    with torch.no_grad():
        for i, (t, t_next) in enumerate(tqdm(pairs, desc="sde", leave=False) if progress else pairs):
            t_batch = time_batch(x, t)
            velocity = counter(x, t_batch)
            dtau = t - t_next
            last = i == len(pairs) - 1
            if noise_scale == 0 or (last and last_step == "ode"):
                x = x - dtau * velocity
            else:
                x = _em_step(x, velocity, t, t_batch, dtau, path, diffusion, noise_scale, generator, add_noise=not last)
            if callback is not None:
                callback(i, t_next, x)
    if return_stats:
        grid = torch.tensor([pairs[0][0]] + [t_next for _, t_next in pairs], dtype=torch.float64)
        return x, SolverStats(nfe=counter.nfe, num_steps=len(pairs), time_grid=grid)
    return x
