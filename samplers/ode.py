"""ODE solvers for ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 (data) over a time grid.

A solver only sees ``velocity_fn(x, t)`` (``t`` of shape ``[B]``, filled with one time) and a grid; it
knows nothing of the network. Network evaluations (NFE) are counted by ``NFECounter``.

* ``euler``: first order.
* ``midpoint``: explicit midpoint, second order, 2 NFE per step.
* ``heun``: Heun's trapezoid predictor-corrector (Karras et al. 2022, Alg. 1), second order, 2 NFE per
  step. With ``final_euler=True`` the step that lands on t = 0 is a plain Euler step (as in EDM, n steps
  then cost 2n - 1 NFE); by default it is a full Heun step, which on the linear path is ~1.5-2x more
  accurate for one more NFE (benchmarks/solvers_nfe.py).
* ``rk4``: classical fourth-order Runge-Kutta, 4 NFE per step.
* ``dpm_solver_pp_2m``: DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): multistep
  second order in ``lambda = log(alpha / sigma)`` on the data prediction ``x0 = convert(v)`` of the
  path, 1 NFE per step. The first step and the step onto t = 0 are first order (DDIM), as in the paper.

Where the path's velocity is singular at t = 0 (VP: sigma'(0) = inf), the Runge-Kutta solvers take the
step onto t = 0 as a jump to the data prediction, ``x_0 = alpha(0) x0(x_t) + sigma(0) eps(x_t)`` (1 NFE,
the first-order DDIM / DPM-Solver step), instead of evaluating the velocity at t = 0.

All solvers accept a strictly monotone grid; going 0 -> 1 (inversion) works for the Runge-Kutta ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from genmod.core.paths import AffinePath, LinearPath

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NFECounter:
    """Wraps a ``velocity_fn`` and counts its calls in ``.nfe``."""

    def __init__(self, fn: VelocityFn):
        self.fn = fn
        self.nfe = 0

    def __call__(self, x, t):
        self.nfe += 1
        return self.fn(x, t)


@dataclass
class SolverStats:
    """What a solve cost: network evaluations, steps and the grid used."""

    nfe: int
    num_steps: int
    time_grid: torch.Tensor


def as_velocity_fn(model_fn: Callable, path: AffinePath, prediction: str = "velocity") -> VelocityFn:
    """Turn an ``x0`` / ``epsilon`` / ``score`` predicting ``model_fn(x, t)`` into a velocity function via the path."""
    if prediction == "velocity":
        return model_fn
    return lambda x, t: path.convert(model_fn(x, t), x, t, src=prediction, dst="velocity")


def _grid_list(time_grid) -> list[float]:
    grid = torch.as_tensor(time_grid, dtype=torch.float64).flatten()
    if grid.numel() < 2:
        raise ValueError(f"time_grid: need at least 2 times, got {grid.numel()}")
    diffs = grid.diff()
    if not ((diffs < 0).all() or (diffs > 0).all()):
        raise ValueError("time_grid: must be strictly monotone (decreasing from noise t=1 to data t=0)")
    return grid.tolist()


def _time(x: torch.Tensor, t: float) -> torch.Tensor:
    """``t`` as a ``[B]`` tensor in x's precision, at least float32 (bf16 would round 1000 t to ~3 digits)."""
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


def _steps(grid: list[float], progress: bool, desc: str):
    pairs = list(zip(grid[:-1], grid[1:]))
    return tqdm(pairs, desc=desc, leave=False) if progress else pairs


# ---------------------------------------------------------------------------------------------
# Single explicit Runge-Kutta steps: x at t -> x at t + h (h < 0 when integrating towards data).
# ---------------------------------------------------------------------------------------------
def euler_step(velocity_fn, x, t, t_next):
    return x + (t_next - t) * velocity_fn(x, _time(x, t))


def midpoint_step(velocity_fn, x, t, t_next):
    h = t_next - t
    x_mid = x + 0.5 * h * velocity_fn(x, _time(x, t))
    return x + h * velocity_fn(x_mid, _time(x, t + 0.5 * h))


def heun_step(velocity_fn, x, t, t_next):
    h = t_next - t
    v0 = velocity_fn(x, _time(x, t))
    x_pred = x + h * v0
    v1 = velocity_fn(x_pred, _time(x, t_next))
    return x + 0.5 * h * (v0 + v1)


def rk4_step(velocity_fn, x, t, t_next):
    h = t_next - t
    k1 = velocity_fn(x, _time(x, t))
    k2 = velocity_fn(x + 0.5 * h * k1, _time(x, t + 0.5 * h))
    k3 = velocity_fn(x + 0.5 * h * k2, _time(x, t + 0.5 * h))
    k4 = velocity_fn(x + h * k3, _time(x, t_next))
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def velocity_singular_at_zero(path: AffinePath | None) -> bool:
    """True when alpha'(0) or sigma'(0) is infinite (e.g. VP: sigma' = -alpha alpha' / sigma), so v(x, 0) cannot be evaluated."""
    path = path or LinearPath()
    zero = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        return not bool(torch.isfinite(path.d_alpha(zero)).all() and torch.isfinite(path.d_sigma(zero)).all())


def jump_to_zero_step(velocity_fn, x, t, path):
    """The step onto t = 0 through the data prediction: ``alpha(0) x0 + sigma(0) eps`` at the current (x, t)."""
    t_batch = _time(x, t)
    velocity = velocity_fn(x, t_batch)
    x0 = path.convert(velocity, x, t_batch, src="velocity", dst="x0")
    eps = path.convert(velocity, x, t_batch, src="velocity", dst="epsilon")
    zero = torch.zeros(1, dtype=torch.float64)
    return path.alpha(zero).item() * x0 + path.sigma(zero).item() * eps


def _runge_kutta(step, name):
    def solve(velocity_fn: VelocityFn, x_init: torch.Tensor, time_grid, callback=None, progress: bool = False,
              path: AffinePath | None = None, final_euler: bool = False) -> torch.Tensor:
        grid = _grid_list(time_grid)
        jump_onto_zero = name != "euler" and velocity_singular_at_zero(path)
        x = x_init
        for i, (t, t_next) in enumerate(_steps(grid, progress, name)):
            if t_next == 0.0 and name == "heun" and final_euler:
                x = euler_step(velocity_fn, x, t, t_next)
            elif t_next == 0.0 and jump_onto_zero:
                x = jump_to_zero_step(velocity_fn, x, t, path or LinearPath())
            else:
                x = step(velocity_fn, x, t, t_next)
            if callback is not None:
                callback(i, t_next, x)
        return x

    solve.__name__ = name
    solve.__doc__ = f"Integrate ``velocity_fn`` over ``time_grid`` with the {name} method (see module docstring)."
    return solve


euler = _runge_kutta(euler_step, "euler")
midpoint = _runge_kutta(midpoint_step, "midpoint")
heun = _runge_kutta(heun_step, "heun")
rk4 = _runge_kutta(rk4_step, "rk4")


def dpm_solver_pp_2m(velocity_fn: VelocityFn, x_init: torch.Tensor, time_grid, callback=None, progress: bool = False,
                     path: AffinePath | None = None, final_euler: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on ``path``, with the data prediction taken from the velocity.

    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i``, ``h_i = lambda_{i+1} - lambda_i``,
    ``D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}``, ``r_i = h_{i-1} / h_i``. The first step (no history,
    and h = inf from alpha = 0) and the step onto sigma = 0 use ``D_i = x0_i``.
    """
    path = path or LinearPath()
    grid = _grid_list(time_grid)
    if grid[1] > grid[0]:
        raise ValueError("time_grid: dpm_solver_pp_2m integrates from noise to data; give a decreasing grid")
    grid_t = torch.tensor(grid, dtype=torch.float64)
    alphas, sigmas = path.alpha(grid_t).tolist(), path.sigma(grid_t).tolist()
    lambdas = path.half_log_snr(grid_t).tolist()  # -inf where alpha = 0, +inf where sigma = 0
    x = x_init
    previous_x0, previous_h = None, None
    for i, (t, t_next) in enumerate(_steps(grid, progress, "dpm_solver_pp_2m")):
        t_batch = _time(x, t)
        x0 = path.convert(velocity_fn(x, t_batch), x, t_batch, src="velocity", dst="x0")
        if sigmas[i + 1] == 0.0:
            x = alphas[i + 1] * x0  # exact limit of the update: e^{-h} -> 0 and sigma_{i+1}/sigma_i -> 0
        else:
            h = lambdas[i + 1] - lambdas[i]
            data_estimate = x0
            if previous_x0 is not None and previous_h is not None and previous_h != float("inf"):
                r = previous_h / h
                data_estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
            # -expm1(-h) = 1 - e^{-h}, stable for small h and equal to 1 for h = inf
            x = (sigmas[i + 1] / sigmas[i]) * x + alphas[i + 1] * (-torch.expm1(torch.tensor(-h, dtype=torch.float64))).item() * data_estimate
            previous_h = h
        previous_x0 = x0
        if callback is not None:
            callback(i, t_next, x)
    return x


SOLVERS: dict[str, Callable] = {
    "euler": euler,
    "midpoint": midpoint,
    "heun": heun,
    "rk4": rk4,
    "dpm_solver_pp_2m": dpm_solver_pp_2m,
}
SOLVER_ALIASES = {"dpmsolver++2m": "dpm_solver_pp_2m", "dpm++2m": "dpm_solver_pp_2m"}


def nfe_per_solve(method: str, num_steps: int, heun_final_euler: bool = False, path: AffinePath | None = None) -> int:
    """Network evaluations of a ``num_steps`` solve ending at t = 0 (one-call last step: Heun's Euler, or the jump on VP)."""
    method = SOLVER_ALIASES.get(method, method)
    per_step = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "dpm_solver_pp_2m": 1}[method]
    one_call_last = (method == "heun" and heun_final_euler) or (per_step > 1 and method != "dpm_solver_pp_2m" and velocity_singular_at_zero(path))
    return per_step * num_steps - ((per_step - 1) if one_call_last else 0)


def sample_ode(
    velocity_fn: VelocityFn,
    x_init: torch.Tensor,
    time_grid: Sequence[float] | torch.Tensor,
    method: str = "heun",
    path: AffinePath | None = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    progress: bool = False,
    return_stats: bool = False,
    enable_grad: bool = False,
    final_euler: bool = False,
):
    """Integrate ``dx/dt = velocity_fn(x, t)`` over ``time_grid`` (``time_grid[0]`` is where ``x_init`` lives).

    Args:
        velocity_fn: ``(x [B, ...], t [B]) -> velocity`` like x.
        method: ``euler``, ``midpoint``, ``heun``, ``rk4`` or ``dpm_solver_pp_2m``.
        path: the affine path (DPM-Solver++ converts the velocity to x0 with it); default linear.
        callback: called as ``callback(step_index, t_next, x_next)`` after each step.
        progress: show a tqdm bar over steps.
        return_stats: also return ``SolverStats(nfe, num_steps, time_grid)``.
        enable_grad: keep autograd on (off by default: sampling needs no graph).
        final_euler: Heun only: make the step onto t = 0 an Euler step (EDM's choice, one NFE fewer).
    """
    name = SOLVER_ALIASES.get(method, method)
    if name not in SOLVERS:
        raise ValueError(f"method: expected one of {', '.join(SOLVERS)}, got {method!r}")
    if not torch.is_tensor(x_init):
        raise ValueError(f"x_init: expected a tensor, got {type(x_init).__name__}")
    counter = NFECounter(velocity_fn)
    grid = torch.as_tensor(time_grid, dtype=torch.float64)
    with torch.set_grad_enabled(enable_grad):
        x = SOLVERS[name](counter, x_init, grid, callback=callback, progress=progress, path=path, final_euler=final_euler)
    if return_stats:
        return x, SolverStats(nfe=counter.nfe, num_steps=grid.numel() - 1, time_grid=grid)
    return x
