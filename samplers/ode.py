"""ODE solvers for ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 (data) over a time grid.

A solver only sees ``velocity_fn(x, t)`` (``t`` of shape ``[B]``, filled with one time) and a grid; it
knows nothing of the network. Each method is written once, as a stepper in ``genmod.samplers.steppers`` that
asks for one velocity at a time; ``sample_ode`` drives it with a velocity function, and the diffusers
scheduler ``genmod.flow.scheduler.FlowMatchSolverScheduler`` drives the same stepper one network call
per ``step()``. Network evaluations (NFE) are counted by ``NFECounter``.

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

Where the velocity is singular at t = 0 (VP: sigma'(0) = inf; an x0-predicting network), the Runge-Kutta
solvers take the step onto t = 0 as a jump to the data prediction, ``x_0 = alpha(0) x0(x_t) + sigma(0)
eps(x_t)`` (1 NFE, the first-order DDIM / DPM-Solver step), instead of evaluating the velocity at t = 0.

All solvers accept a strictly monotone grid; going 0 -> 1 (inversion) works for the Runge-Kutta ones.

Adaptive solvers (``dopri5`` and torchdiffeq's other embedded pairs, ``genmod.samplers.adaptive``) go
through ``sample_ode`` too, with ``rtol`` / ``atol``; they evaluate the velocity at the grid's end, so
with an x0-predicting network or a path singular at t = 0 the grid must end at some t_min > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from genmod.core.paths import AffinePath, LinearPath
from genmod.samplers.adaptive import ADAPTIVE_METHODS, solve_adaptive
from genmod.samplers.steppers import (
    METHODS,
    SOLVER_ALIASES,
    ODESolver,
    evaluation_times,
    intervals,
    run_step,
    velocity_singular_at_zero,  # also re-exported: genmod.samplers.ode.velocity_singular_at_zero
)

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


def solve(solver: ODESolver, velocity_fn: VelocityFn, x_init: torch.Tensor, time_grid,
          callback=None, progress: bool = False) -> torch.Tensor:
    """Run ``solver``'s steps over ``time_grid``, one ``run_step`` per interval, calling ``callback(i, t_next, x)``."""
    steps = intervals(time_grid)
    if solver.method == "dpm_solver_pp_2m" and steps[0][1] > steps[0][0]:
        raise ValueError("time_grid: dpm_solver_pp_2m integrates from noise to data; give a decreasing grid")
    solver.reset()
    x = x_init
    for i, (t_cur, t_next) in enumerate(tqdm(steps, desc=solver.method, leave=False) if progress else steps):
        x = run_step(solver.step(x, t_cur, t_next), velocity_fn)
        if callback is not None:
            callback(i, t_next, x)
    return x


def _whole_solve(method: str):
    def solver(velocity_fn: VelocityFn, x_init: torch.Tensor, time_grid, callback=None, progress: bool = False,
               path: AffinePath | None = None, final_euler: bool = False) -> torch.Tensor:
        ode_solver = ODESolver(method, path or LinearPath(), final_euler=final_euler)
        return solve(ode_solver, velocity_fn, x_init, time_grid, callback=callback, progress=progress)

    solver.__name__ = method
    solver.__doc__ = f"Integrate ``velocity_fn`` over ``time_grid`` with the {method} stepper (see module docstring)."
    return solver


euler = _whole_solve("euler")
midpoint = _whole_solve("midpoint")
heun = _whole_solve("heun")
rk4 = _whole_solve("rk4")
dpm_solver_pp_2m = _whole_solve("dpm_solver_pp_2m")

SOLVERS: dict[str, Callable] = {name: globals()[name] for name in METHODS}


def nfe_per_solve(method: str, num_steps: int, heun_final_euler: bool = False, path: AffinePath | None = None,
                  prediction: str = "velocity") -> int:
    """Network evaluations of a ``num_steps`` solve ending at t = 0, counted on the stepper's own schedule."""
    settings = ODESolver(method, path or LinearPath(), prediction, final_euler=heun_final_euler)
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return sum(len(times) for times in evaluation_times(grid, settings))


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
    prediction: str = "velocity",
    rtol: float = 1e-5,
    atol: float = 1e-5,
):
    """Integrate ``dx/dt = velocity_fn(x, t)`` over ``time_grid`` (``time_grid[0]`` is where ``x_init`` lives).

    Args:
        velocity_fn: ``(x [B, ...], t [B]) -> velocity`` like x (or the ``prediction`` it names).
        method: ``euler``, ``midpoint``, ``heun``, ``rk4`` or ``dpm_solver_pp_2m``; or an adaptive one through
            torchdiffeq (``dopri5``, ``dopri8``, ``bosh3``, ``fehlberg2``, ``adaptive_heun``), which steps
            between the grid's times on its own and reports the calls it used in the stats' ``nfe``.
        path: the affine path (DPM-Solver++ converts the velocity to x0 with it); default linear.
        callback: called as ``callback(step_index, t_next, x_next)`` after each step.
        progress: show a tqdm bar over steps.
        return_stats: also return ``SolverStats(nfe, num_steps, time_grid)``.
        enable_grad: keep autograd on (off by default: sampling needs no graph).
        final_euler: Heun only: make the step onto t = 0 an Euler step (EDM's choice, one NFE fewer).
        prediction: ``velocity`` (default), ``x0`` or ``epsilon``: what ``velocity_fn`` returns; other types
            are converted with ``path``, and x0 makes the step onto t = 0 a jump to the data prediction.
        rtol, atol: the adaptive solvers' relative and absolute tolerances (ignored by the fixed-step ones).
    """
    name = SOLVER_ALIASES.get(method, method)
    if name not in SOLVERS and name not in ADAPTIVE_METHODS:
        raise ValueError(f"method: expected one of {', '.join(list(SOLVERS) + list(ADAPTIVE_METHODS))}, got {method!r}")
    if not torch.is_tensor(x_init):
        raise ValueError(f"x_init: expected a tensor, got {type(x_init).__name__}")
    path = path or LinearPath()
    counter = NFECounter(as_velocity_fn(velocity_fn, path, prediction))
    grid = torch.as_tensor(time_grid, dtype=torch.float64)
    with torch.set_grad_enabled(enable_grad):
        if name in ADAPTIVE_METHODS:
            intervals(grid)  # the same grid checks as the fixed-step solvers
            if float(grid[-1]) == 0.0 and (prediction == "x0" or velocity_singular_at_zero(path)):
                raise ValueError(f"time_grid: {name} evaluates the velocity at t = 0, which this path / prediction "
                                 "cannot give; end the grid at a small t_min > 0")
            x = solve_adaptive(counter, x_init, grid, name, rtol=rtol, atol=atol, callback=callback)
        else:
            settings = ODESolver(name, path, prediction, final_euler=final_euler)
            x = solve(settings, counter, x_init, grid, callback=callback, progress=progress)
    if return_stats:
        return x, SolverStats(nfe=counter.nfe, num_steps=grid.numel() - 1, time_grid=grid)
    return x
