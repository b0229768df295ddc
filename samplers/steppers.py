"""Every ODE solver once, as a stepper that asks for one velocity at a time.

A step is a Python generator over one interval ``[t_cur, t_next]`` of a decreasing time grid: each
``v = yield x_eval, t_eval`` asks its driver for the velocity ``dx/dt`` at ``(x_eval, t_eval)``
(``t_eval`` a Python float), and the generator returns ``x`` at ``t_next``. The first request of
every step is at its start point ``(x, t_cur)``. Two drivers run the same steps:
``genmod.samplers.ode.sample_ode`` (a velocity function) and ``genmod.flow.scheduler.FlowMatchSolverScheduler``
(one network call per diffusers ``step()``); ``evaluation_times`` dry-runs them for the schedule.

Where the velocity cannot be evaluated at t = 0 (VP: sigma'(0) = inf; an x0-predicting network:
eps = (x - alpha x0) / sigma with sigma(0) = 0) the multi-stage solvers take the step onto t = 0 as a
jump to the data prediction (the first-order DDIM step, 1 call) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator

import torch

from genmod.core.paths import AffinePath, LinearPath

# v = yield (x_eval, t_eval); the generator's return value is x at t_next
Step = Generator[tuple[torch.Tensor, float], torch.Tensor, torch.Tensor]

METHODS = ("euler", "midpoint", "heun", "rk4", "dpm_solver_pp_2m")
SOLVER_ALIASES = {"dpmsolver++2m": "dpm_solver_pp_2m", "dpm++2m": "dpm_solver_pp_2m"}


def time_batch(x: torch.Tensor, t: float) -> torch.Tensor:
    """``t`` as a ``[B]`` tensor in x's precision, at least float32 (bf16 would round 1000 t to ~3 digits)."""
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


def velocity_singular_at_zero(path: AffinePath | None) -> bool:
    """True when alpha'(0) or sigma'(0) is infinite (e.g. VP: sigma' = -alpha alpha' / sigma), so v(x, 0) cannot be evaluated."""
    path = path or LinearPath()
    zero = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        return not bool(torch.isfinite(path.d_alpha(zero)).all() and torch.isfinite(path.d_sigma(zero)).all())


@dataclass
class ODESolver:
    """One solve: which method, on which path, for which network output, and the multistep memory it keeps.

    ``step(x, t_cur, t_next)`` hands out the step generator of each interval in turn; DPM-Solver++(2M)
    remembers its last data prediction here between steps, so use one ``ODESolver`` per solve (or
    ``reset()`` it), as a diffusers scheduler is reset by ``set_timesteps``.
    """

    method: str = "heun"
    path: AffinePath = field(default_factory=LinearPath)
    prediction: str = "velocity"     # what the network predicts; only x0 changes the step onto t = 0
    final_euler: bool = False        # Heun: the step onto t = 0 is an Euler step (EDM, Karras et al. 2022)
    previous_x0: torch.Tensor | None = None   # DPM-Solver++(2M) history
    previous_h: float | None = None

    def __post_init__(self):
        self.method = SOLVER_ALIASES.get(self.method, self.method)
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        self.path = self.path or LinearPath()

    def reset(self):
        """Forget the multistep history (a new solve starts)."""
        self.previous_x0, self.previous_h = None, None

    def step(self, x: torch.Tensor, t_cur: float, t_next: float) -> Step:
        """The step generator for the interval ``[t_cur, t_next]``."""
        one_call_last = self.method in ("midpoint", "heun", "rk4") and t_next == 0.0
        if one_call_last and self.method == "heun" and self.final_euler:
            return euler_step(x, t_cur, t_next)
        if one_call_last and (self.prediction == "x0" or velocity_singular_at_zero(self.path)):
            return jump_to_zero_step(x, t_cur, self.path)
        if self.method == "dpm_solver_pp_2m":
            return dpm_solver_pp_2m_step(x, t_cur, t_next, self)
        return RUNGE_KUTTA_STEPS[self.method](x, t_cur, t_next)


# ---------------------------------------------------------------------------------------------
# Explicit Runge-Kutta steps: x at t_cur -> x at t_next (h = t_next - t_cur < 0 towards data).
# ---------------------------------------------------------------------------------------------
def euler_step(x, t_cur, t_next) -> Step:
    """Euler: ``x + h v(x, t)``, first order."""
    v_cur = yield x, t_cur                          # slope at the start
    return x + (t_next - t_cur) * v_cur             # straight line to t_next


def midpoint_step(x, t_cur, t_next) -> Step:
    """Explicit midpoint, second order: the slope at a half Euler step carries the whole step."""
    h = t_next - t_cur
    v_cur = yield x, t_cur                          # slope at the start
    x_mid = x + 0.5 * h * v_cur                     # half an Euler step
    v_mid = yield x_mid, t_cur + 0.5 * h            # slope at the midpoint
    return x + h * v_mid                            # full step with the midpoint slope


def heun_step(x, t_cur, t_next) -> Step:
    """Heun's trapezoid predictor-corrector (Karras et al. 2022, Alg. 1 lines 5-8), second order."""
    h = t_next - t_cur
    v_cur = yield x, t_cur                          # slope at the start
    x_euler = x + h * v_cur                         # Euler predictor
    v_next = yield x_euler, t_next                  # slope at the predicted end point
    return x + 0.5 * h * (v_cur + v_next)           # trapezoid corrector


def rk4_step(x, t_cur, t_next) -> Step:
    """Classical fourth-order Runge-Kutta."""
    h = t_next - t_cur
    k1 = yield x, t_cur                             # slope at the start
    k2 = yield x + 0.5 * h * k1, t_cur + 0.5 * h    # midpoint, predicted with k1
    k3 = yield x + 0.5 * h * k2, t_cur + 0.5 * h    # midpoint, predicted with k2
    k4 = yield x + h * k3, t_next                   # end point, predicted with k3
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)  # Simpson weights


RUNGE_KUTTA_STEPS = {"euler": euler_step, "midpoint": midpoint_step, "heun": heun_step, "rk4": rk4_step}


def jump_to_zero_step(x, t_cur, path: AffinePath) -> Step:
    """The step onto t = 0 through the data prediction: ``alpha(0) x0 + sigma(0) eps`` at ``(x, t_cur)``."""
    v_cur = yield x, t_cur                          # velocity at the start
    t_batch = time_batch(x, t_cur)
    x0 = path.convert(v_cur, x, t_batch, src="velocity", dst="x0")      # data prediction
    eps = path.convert(v_cur, x, t_batch, src="velocity", dst="epsilon")  # noise prediction
    zero = torch.zeros(1, dtype=torch.float64)
    return path.alpha(zero).item() * x0 + path.sigma(zero).item() * eps  # the path at t = 0


def dpm_solver_pp_2m_step(x, t_cur, t_next, memory: ODESolver) -> Step:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on ``memory.path`` with the data prediction from the velocity.

    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i``, ``h_i = lambda_{i+1} - lambda_i``,
    ``D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}``, ``r_i = h_{i-1} / h_i``. The first step (no history,
    and h = inf from alpha = 0) and the step onto sigma = 0 use ``D_i = x0_i`` (first order, DDIM).
    """
    path = memory.path
    ends = torch.tensor([t_cur, t_next], dtype=torch.float64)
    alpha_next = path.alpha(ends)[1].item()
    sigma_cur, sigma_next = path.sigma(ends).tolist()
    lambda_cur, lambda_next = path.half_log_snr(ends).tolist()  # -inf where alpha = 0, +inf where sigma = 0
    # 1. data prediction at the start
    v_cur = yield x, t_cur
    x0 = path.convert(v_cur, x, time_batch(x, t_cur), src="velocity", dst="x0")
    previous_x0, previous_h = memory.previous_x0, memory.previous_h
    memory.previous_x0 = x0
    # 2. onto sigma = 0: the exact limit of the update (e^{-h} -> 0 and sigma_{i+1} / sigma_i -> 0)
    if sigma_next == 0.0:
        return alpha_next * x0
    # 3. second-order data estimate from the previous step's prediction, where there is a finite one
    h = lambda_next - lambda_cur
    memory.previous_h = h
    data_estimate = x0
    if previous_x0 is not None and previous_h is not None and previous_h != float("inf"):
        r = previous_h / h
        data_estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
    # 4. exponential-integrator update; -expm1(-h) = 1 - e^{-h}, stable for small h and 1 for h = inf
    one_minus_exp = (-torch.expm1(torch.tensor(-h, dtype=torch.float64))).item()
    return (sigma_next / sigma_cur) * x + alpha_next * one_minus_exp * data_estimate


# ---------------------------------------------------------------------------------------------
# DDPM ancestral step (stochastic): x at t_cur -> a draw of x at t_next
# ---------------------------------------------------------------------------------------------
DDPM_VARIANCES = ("fixed_large", "fixed_small")


def draw_noise(x: torch.Tensor, generator=None) -> torch.Tensor:
    """``N(0, I)`` shaped like x from ``generator`` (or one generator per sample of the batch: row i from ``generator[i]``)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([draw_noise(row, gen) for row, gen in zip(x, generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def ddpm_ancestral_step(x, t_cur, t_next, path: AffinePath, generator=None, variance: str = "fixed_large") -> Step:
    """One ancestral DDPM step ``x_{t_next} ~ N(mu(x, x0), var)`` (Ho et al. 2020, Eq. 6-7 and the sampler of Eq. 11).

    With ``abar = alpha^2`` at both ends and ``beta = 1 - abar_cur / abar_next`` (the step's beta, also for a
    respaced chain: Nichol & Dhariwal 2021, Sec. 4), the posterior mean is
    ``sqrt(abar_next) beta / (1 - abar_cur) x0 + sqrt(1 - beta) (1 - abar_next) / (1 - abar_cur) x`` with
    ``x0`` the data prediction at ``(x, t_cur)``; ``fixed_large`` variance is ``beta``, ``fixed_small`` the posterior
    variance ``beta (1 - abar_next) / (1 - abar_cur)``. Noise is drawn at every step, also onto t = 0 where it is
    unused (the official ADM loop's draw order), so the same generator gives the same samples.
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"variance: expected one of {', '.join(DDPM_VARIANCES)}, got {variance!r}")
    v_cur = yield x, t_cur                          # the prediction at the start (as a velocity)
    x0 = path.convert(v_cur, x, time_batch(x, t_cur), src="velocity", dst="x0")
    abar_cur, abar_next = (path.alpha(torch.tensor([t_cur, t_next], dtype=torch.float64)) ** 2).tolist()
    beta = 1.0 - abar_cur / abar_next
    coef_x0 = abar_next**0.5 * beta / (1.0 - abar_cur)
    coef_x = (1.0 - beta) ** 0.5 * (1.0 - abar_next) / (1.0 - abar_cur)
    mean = coef_x0 * x0 + coef_x * x                # q(x_next | x, x0) posterior mean
    noise = draw_noise(x, generator)
    if t_next == 0.0:
        return mean
    var = beta if variance == "fixed_large" else beta * (1.0 - abar_next) / (1.0 - abar_cur)
    return mean + var**0.5 * noise


# ---------------------------------------------------------------------------------------------
# Driving a step
# ---------------------------------------------------------------------------------------------
def run_step(step: Step, velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Drive one step to its end with ``velocity_fn(x, t [B])``; return x at its t_next."""
    x_eval, t_eval = next(step)
    while True:
        try:
            x_eval, t_eval = step.send(velocity_fn(x_eval, time_batch(x_eval, t_eval)))
        except StopIteration as done:
            return done.value


def intervals(time_grid) -> list[tuple[float, float]]:
    """``(t_cur, t_next)`` pairs of a strictly monotone grid of at least two times."""
    grid = torch.as_tensor(time_grid, dtype=torch.float64).flatten()
    if grid.numel() < 2:
        raise ValueError(f"time_grid: need at least 2 times, got {grid.numel()}")
    diffs = grid.diff()
    if not ((diffs < 0).all() or (diffs > 0).all()):
        raise ValueError("time_grid: must be strictly monotone (decreasing from noise t=1 to data t=0)")
    times = grid.tolist()
    return list(zip(times[:-1], times[1:]))


def evaluation_times(time_grid, settings: ODESolver) -> list[list[float]]:
    """The times a solve over ``time_grid`` evaluates the velocity at, one list per step (a dry run)."""
    settings = ODESolver(settings.method, settings.path, settings.prediction, settings.final_euler)
    x = torch.zeros(1, dtype=torch.float64)
    schedule = []
    for t_cur, t_next in intervals(time_grid):
        times = []
        def record(x_eval, t_batch):  # a zero velocity: the schedule does not depend on the values
            times.append(float(t_batch[0]))
            return torch.zeros_like(x_eval)

        run_step(settings.step(x, t_cur, t_next), record)
        schedule.append(times)
    return schedule
