"""Ancestral DDPM sampling over a (respaced) chain, driven by the velocity like every other solver.

Ho et al. 2020 (Eq. 11): from pure noise, every step draws ``x_{t_next}`` from the Gaussian posterior
``q(x_{t_next} | x_t, x0_hat)`` with ``x0_hat`` the network's data prediction; ``fixed_large`` variance is the
step's beta (ADM's ``FIXED_LARGE``, CausalFusion's sampler), ``fixed_small`` the posterior variance.
Respacing (Nichol & Dhariwal 2021, Sec. 4) is the time grid: ``get_time_grid("ddpm", 250)`` keeps ADM's
``space_timesteps(1000, [250])`` steps at ``t = (n + 1) / 1000`` on ``DiscreteSchedulePath``, and each step's
beta is recomputed from the ``alpha_bar`` at its two ends. The step itself is
``genmod.samplers.steppers.ddpm_ancestral_step``; guidance is whatever ``velocity_fn`` returns (CFG on epsilon
equals CFG on the velocity: the conversion is affine in the prediction with weights summing to one).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from genmod.core.paths import AffinePath, get_path
from genmod.samplers.steppers import ddpm_ancestral_step, intervals, run_step


def sample_ddpm(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_init: torch.Tensor,
    time_grid: Sequence[float] | torch.Tensor,
    path: AffinePath | str = "ddpm_linear",
    generator=None,
    variance: str = "fixed_large",
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    progress: bool = False,
    return_stats: bool = False,
):
    """Ancestral DDPM over a decreasing ``time_grid`` ending at 0; one velocity call and one noise draw per step.

    ``generator``: one ``torch.Generator`` or one per sample (row i of every draw from ``generator[i]``).
    Returns ``x`` (and ``SolverStats`` when ``return_stats``).
    """
    from genmod.samplers.ode import NFECounter, SolverStats  # local: avoid a cycle in samplers/__init__

    path = get_path(path)
    pairs = intervals(time_grid)
    if pairs[0][1] > pairs[0][0] or pairs[-1][1] != 0.0:
        raise ValueError("time_grid: sample_ddpm runs from noise to data; give a decreasing grid ending at 0")
    counter = NFECounter(velocity_fn)
    x = x_init
    with torch.no_grad():
        for i, (t_cur, t_next) in enumerate(tqdm(pairs, desc="ddpm", leave=False) if progress else pairs):
            x = run_step(ddpm_ancestral_step(x, t_cur, t_next, path, generator, variance), counter)
            if callback is not None:
                callback(i, t_next, x)
    if return_stats:
        grid = torch.tensor([pairs[0][0]] + [t for _, t in pairs], dtype=torch.float64)
        return x, SolverStats(nfe=counter.nfe, num_steps=len(pairs), time_grid=grid)
    return x
