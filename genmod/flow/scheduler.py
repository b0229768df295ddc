"""A diffusers scheduler that steps genmod's ODE solvers one network call at a time.

Convention at this boundary is diffusers' flow convention (docs/DESIGN.md §1): sigma = t, sigma = 1 is
noise, ``x_t = sigma * noise + (1 - sigma) * x0``, the model output is the velocity
``v = noise - x0`` and the network's timestep is ``1000 * sigma``. With the same ``num_train_timesteps``
and ``shift`` config keys, ``FlowMatchEulerDiscreteScheduler.from_config(ours.config)`` follows the same
grid, and our ``solver="euler"`` reproduces its trajectory.

Explicit Runge-Kutta solvers (Euler, midpoint, Heun, RK4) are stepped through their Butcher tableaus:
``timesteps`` lists every stage's time (like diffusers' Heun scheduler repeats timesteps), and
``step`` returns the point where the network is evaluated next, or the end of the interval after the
last stage. DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, data prediction in log-SNR) is a multistep
method with one call per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

# (c, A, b) of explicit Runge-Kutta methods; A is strictly lower-triangular, one row per stage.
BUTCHER_TABLEAUS = {
    "euler": ([0.0], [[]], [1.0]),
    "midpoint": ([0.0, 0.5], [[], [0.5]], [0.0, 1.0]),
    "heun": ([0.0, 1.0], [[], [1.0]], [0.5, 0.5]),
    "rk4": ([0.0, 0.5, 0.5, 1.0], [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
}
SOLVERS = tuple(BUTCHER_TABLEAUS) + ("dpmsolver++2m",)


@dataclass
class FlowSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class FlowMatchSolverScheduler(SchedulerMixin, ConfigMixin):
    """Flow-matching ODE scheduler with a choice of solver (euler, midpoint, heun, rk4, dpmsolver++2m)."""

    order = 1
    _compatibles = ["FlowMatchEulerDiscreteScheduler"]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, solver: str = "euler"):
        if solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
        if shift <= 0:
            raise ValueError(f"shift: must be > 0, got {shift}")
        self.sigmas = None
        self.timesteps = None
        self.num_inference_steps = None
        self._reset_state()

    # ----------------------------------------------------------------------------------------
    def _reset_state(self):
        self._interval = 0          # index i of the interval [sigma_i, sigma_{i+1}]
        self._stage = 0             # RK stage within the interval
        self._x_start = None        # sample at sigma_i
        self._stage_velocities = []
        self._previous_x0 = None    # DPM-Solver++(2M) memory

    @property
    def step_index(self):
        return self._interval

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None):
        """Build the decreasing sigma grid (uniform, or user ``sigmas``), shifted as diffusers does."""
        if sigmas is None:
            if not num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps: must be >= 1, got {num_inference_steps}")
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        sigmas = np.asarray(sigmas, dtype=np.float32)
        shift = self.config.shift
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)]).to(device)
        self.num_inference_steps = len(sigmas)

        if self.config.solver in BUTCHER_TABLEAUS:
            c, _, _ = BUTCHER_TABLEAUS[self.config.solver]
            s0, s1 = self.sigmas[:-1, None], self.sigmas[1:, None]
            stage_sigmas = s0 + torch.tensor(c, device=self.sigmas.device)[None] * (s1 - s0)
            self.timesteps = (stage_sigmas.flatten() * self.config.num_train_timesteps).to(device)
        else:
            self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(device)
        self._reset_state()

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process x_t = sigma * noise + (1 - sigma) * x0, for img2img-style starts."""
        sigma = (timestep / self.config.num_train_timesteps).to(sample.dtype)
        while sigma.ndim < sample.ndim:
            sigma = sigma[..., None]
        return sigma * noise + (1 - sigma) * sample

    # ----------------------------------------------------------------------------------------
    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        if self.sigmas is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self._interval >= self.num_inference_steps:
            raise RuntimeError("step called after the last timestep; call set_timesteps again")
        velocity = model_output.float()
        if self.config.solver == "dpmsolver++2m":
            prev = self._dpm_solver_pp_2m_step(velocity, sample.float())
        else:
            prev = self._runge_kutta_step(velocity, sample.float())
        prev = prev.to(model_output.dtype)
        return FlowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _runge_kutta_step(self, velocity, sample):
        _, a, b = BUTCHER_TABLEAUS[self.config.solver]
        if self._stage == 0:
            self._x_start = sample
            self._stage_velocities = []
        self._stage_velocities.append(velocity)
        h = self.sigmas[self._interval + 1] - self.sigmas[self._interval]
        next_stage = self._stage + 1
        if next_stage < len(b):  # evaluate the network next at the following stage point
            increment = sum(coef * k for coef, k in zip(a[next_stage], self._stage_velocities) if coef != 0)
            self._stage = next_stage
            return self._x_start + h * increment if torch.is_tensor(increment) else self._x_start.clone()
        increment = sum(coef * k for coef, k in zip(b, self._stage_velocities) if coef != 0)
        self._stage = 0
        self._interval += 1
        return self._x_start + h * increment

    def _dpm_solver_pp_2m_step(self, velocity, sample):
        """One DPM-Solver++(2M) step on the linear path: alpha = 1 - t, sigma = t, x0 = x - t v."""
        i = self._interval
        t, t_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = sample - t * velocity
        if t_next == 0:  # the exact solution at t = 0 given the data prediction (lower order final)
            out = x0
        else:
            lam = lambda s: torch.log((1 - s) / s)  # noqa: E731  log-SNR^(1/2): log(alpha / sigma)
            h = lam(t_next) - lam(t)  # +inf on the first step from t = 1 (alpha = 0)
            data_estimate = x0
            if self._previous_x0 is not None and torch.isfinite(h):
                h_prev = lam(t) - lam(self.sigmas[i - 1])
                if torch.isfinite(h_prev):
                    r = h_prev / h
                    data_estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._previous_x0
            alpha_next = 1 - t_next
            out = (t_next / t) * sample - alpha_next * torch.expm1(-h) * data_estimate
        self._previous_x0 = x0
        self._interval += 1
        return out

    def __len__(self):
        return self.config.num_train_timesteps
