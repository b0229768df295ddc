"""samplers: network-agnostic solvers, time grids, guidance and logits sampling.

A solver integrates a velocity callable ``velocity_fn(x, t)`` (``t`` of shape ``[B]``) over a decreasing
time grid from t = 1 (noise) to t = 0 (data), in the package convention of docs/DESIGN.md §1.
"""

from genmod.samplers.autoregressive import filter_logits, sample_logits
from genmod.samplers.guidance import classifier_free_guidance, combine_guidance
from genmod.samplers.ode import (
    SOLVERS,
    NFECounter,
    SolverStats,
    as_velocity_fn,
    dpm_solver_pp_2m,
    euler,
    heun,
    midpoint,
    nfe_per_solve,
    rk4,
    sample_ode,
    solve,
)
from genmod.samplers.steppers import (ODESolver, ddpm_ancestral_step, draw_noise, evaluation_times, run_step,
                                     velocity_singular_at_zero)
from genmod.samplers.sde import diffusion_coefficient, sample_sde
from genmod.samplers.ddpm import sample_ddpm
from genmod.samplers.ddim import ddim_noise_std, ddim_step
from genmod.samplers.time_grids import (
    TIME_GRIDS,
    cosine_grid,
    ddpm_grid,
    get_time_grid,
    karras_grid,
    register_time_grid,
    shifted_grid,
    space_timesteps,
    uniform_grid,
    validate_time_grid,
)

__all__ = [
    "SOLVERS", "TIME_GRIDS", "NFECounter", "ODESolver", "SolverStats", "as_velocity_fn",
    "classifier_free_guidance", "combine_guidance", "cosine_grid", "ddim_noise_std", "ddim_step", "ddpm_ancestral_step", "ddpm_grid", "draw_noise", "diffusion_coefficient", "dpm_solver_pp_2m",
    "euler", "evaluation_times", "filter_logits", "get_time_grid", "heun", "karras_grid", "midpoint",
    "nfe_per_solve", "register_time_grid", "rk4", "run_step", "sample_logits", "sample_ddpm", "sample_ode", "sample_sde",
    "shifted_grid", "solve", "space_timesteps", "uniform_grid", "validate_time_grid", "velocity_singular_at_zero",
]
