"""A diffusers scheduler that drives genmod's ODE steppers (``genmod.samplers.steppers``) one network call per ``step()``.

With the defaults (``path="linear"``, ``prediction_type="velocity"``) the boundary is diffusers' flow
convention (docs/DESIGN.md §1): sigma = t, sigma = 1 is noise, ``x_t = sigma * noise + (1 - sigma) * x0``,
the model output is the velocity ``v = noise - x0`` and the network's timestep is ``1000 * sigma``.
With the same ``num_train_timesteps`` and ``shift`` keys, ``FlowMatchEulerDiscreteScheduler.from_config(
ours.config)`` follows the same grid, and our ``solver="euler"`` reproduces its trajectory.

Other paths (``cosine``, ``vp``) and prediction types (``x0``, ``epsilon``) follow the package
convention: ``sigmas`` holds the time grid t, the timestep is ``1000 t``, and the network output is
converted to a velocity with ``genmod.core.paths`` before the stepper sees it. An epsilon network
says nothing about x0 where alpha(t) = 0, so with ``prediction_type="epsilon"`` the grid is scaled into
``[0, 1 - 1/num_train_timesteps]`` (the last DDPM training step).

``timesteps`` lists every evaluation of the stepper's own schedule (stage times repeat grid times, as in
diffusers' Heun scheduler); ``step`` returns where the network is evaluated next, or the end of the
interval after its last evaluation. ``order`` is the number of network calls per step (euler and
dpmsolver++2m 1, midpoint and heun 2, rk4 4), which diffusers pipelines use for warm-up counts, the
progress bar and img2img slicing (``timesteps[t_start * order:]``).

``schedule`` picks the grid of ``set_timesteps(N)``: ``uniform`` (the default, as above), ``shifted``,
``karras``, ``cosine`` (``genmod.samplers.time_grids``) or ``ays``, an Align-Your-Steps grid optimised for
this model (``genmod ays``) and saved in ``ays_grids`` (``{steps: grid}``, re-spaced to other step counts).
``solver`` may also be adaptive (``dopri5``, ``bosh3``, ... through torchdiffeq, with ``rtol`` / ``atol``):
such a solve does not fit one network call per ``step()``, so ``timesteps`` holds its start only and the
pipeline calls ``integrate(velocity_fn, sample)`` once; ``last_nfe`` then says how many calls it used.

As in diffusers' flow schedulers, ``step_index`` is None until the first ``step``, which finds its
place in ``timesteps`` from ``begin_index`` (``set_begin_index``) or else from the ``timestep`` it is
given, so a pipeline may start part-way through the grid (img2img) with any solver; a start must be
the first evaluation of a step. ``set_timesteps`` resets both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from genmod.core.paths import get_path
from genmod.samplers.adaptive import ADAPTIVE_METHODS, check_tolerances
from genmod.samplers.ays import interpolate_time_grid
from genmod.samplers.ode import sample_ode
from genmod.samplers.steppers import ODESolver, evaluation_times, time_batch
from genmod.samplers.time_grids import get_time_grid

SOLVERS = ("euler", "midpoint", "heun", "rk4", "dpmsolver++2m") + ADAPTIVE_METHODS
PREDICTION_TYPES = ("velocity", "x0", "epsilon")
CALLS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "dpmsolver++2m": 1}
SCHEDULES = ("uniform", "shifted", "karras", "cosine", "ays")


@dataclass
class FlowSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class FlowMatchSolverScheduler(SchedulerMixin, ConfigMixin):
    """Flow-matching ODE scheduler: a solver (euler, midpoint, heun, rk4, dpmsolver++2m, or adaptive dopri5 ...) on a
    path and prediction type, over a named time grid (``schedule``)."""

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, solver: str = "euler",
                 path: str = "linear", prediction_type: str = "velocity", schedule: str = "uniform",
                 ays_grids: dict | None = None, rtol: float = 1e-5, atol: float = 1e-5):
        if solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: must be an int >= 1, got {num_train_timesteps!r}")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < float("inf"):
            raise ValueError(f"shift: must be a finite number > 0, got {shift!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if schedule == "ays" and not ays_grids:
            raise ValueError("schedule: 'ays' needs a saved grid (ays_grids); optimise one with `genmod ays PIPELINE --steps N`")
        check_tolerances(rtol, atol)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.ode_solver = ODESolver("euler" if solver in ADAPTIVE_METHODS else solver, get_path(path), prediction_type)
        self.sigmas = None
        self.timesteps = None
        self.num_inference_steps = None
        self._begin_index = None
        self._reset_state()

    def _reset_state(self):
        self._step_index = None  # index into `timesteps` of the next network call (None before the first step)
        self._step = None        # the stepper's generator for the current interval (None between intervals)
        self._request = None     # (x_eval, t_eval) it asked the network for
        self.ode_solver.reset()

    @property
    def order(self) -> int:
        """Network calls per step of the solver (a dry run of one interior step); 1 for an adaptive solve."""
        return CALLS_PER_STEP.get(self.config.solver, 1)

    @property
    def is_adaptive(self) -> bool:
        """An adaptive solver (dopri5 ...): the pipeline calls ``integrate`` instead of ``step``."""
        return self.config.solver in ADAPTIVE_METHODS

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Where the next solve starts in ``timesteps`` (pipelines: ``t_start * order``); must start a step."""
        self._begin_index = begin_index

    # ----------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None):
        """Build the decreasing time grid (uniform, or user ``sigmas``), shifted as diffusers does."""
        if sigmas is None:
            if not num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps: must be >= 1, got {num_inference_steps}")
            sigmas = self.schedule_sigmas(num_inference_steps)
        sigmas = np.asarray(sigmas, dtype=np.float32)
        shift = self.config.shift
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        if self.config.prediction_type == "epsilon":  # keep alpha(t) > 0 where an epsilon network is asked
            sigmas = sigmas * np.float32(1 - 1 / self.config.num_train_timesteps)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)]).to(device)
        self.num_inference_steps = len(sigmas)
        self._grid = self.sigmas.double().tolist()  # the float32 grid, exactly, as the stepper's floats
        # an adaptive solve is one pipeline step (``integrate``): its only timestep is the start
        schedule = [[self._grid[0]]] if self.is_adaptive else evaluation_times(self._grid, self.ode_solver)
        # interval of every network call, and whether it is the first call of its step
        self._interval_of = [i for i, times in enumerate(schedule) for _ in times]
        self._starts_step = [j == 0 for times in schedule for j in range(len(times))]
        num_train = self.config.num_train_timesteps
        self.timesteps = torch.tensor([t * num_train for times in schedule for t in times], dtype=torch.float32,
                                      device=device)
        self._begin_index = None
        self._reset_state()

    def schedule_sigmas(self, num_steps: int) -> np.ndarray:
        """The grid of ``config.schedule`` without its final 0 (then shifted by ``config.shift`` as any grid).

        ``uniform`` is ``1 .. 1/N`` as Flux/SD3 pass it; ``shifted`` the SD3 shift 3 of it; ``karras`` / ``cosine``
        from ``genmod.samplers.time_grids`` on the path; ``ays`` the saved Align-Your-Steps grid of N steps, or the
        saved grid re-spaced log-linearly to N (``genmod.samplers.ays.interpolate_time_grid``)."""
        name = self.config.schedule
        if name == "uniform":
            return np.linspace(1.0, 1.0 / num_steps, num_steps)
        if name == "ays":
            grids = {int(k): v for k, v in self.config.ays_grids.items()}
            saved = grids.get(num_steps, grids[max(grids)])
            grid = interpolate_time_grid(saved, num_steps, self.ode_solver.path)
        else:
            kwargs = {"shift": 3.0} if name == "shifted" else {"path": self.ode_solver.path}
            grid = get_time_grid(name, num_steps, **kwargs)
        return grid[:-1].numpy()

    def integrate(self, velocity_fn, sample: torch.Tensor) -> torch.Tensor:
        """An adaptive solve of ``velocity_fn(x, t)`` (the network output as ``config.prediction_type``) from the
        grid's start to t = 0 with ``config.rtol`` / ``atol``; the calls it used are in ``self.last_nfe``."""
        if not self.is_adaptive or self.sigmas is None:
            raise RuntimeError(f"integrate: needs an adaptive solver ({', '.join(ADAPTIVE_METHODS)}) and set_timesteps first")
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x, stats = sample_ode(velocity_fn, sample.to(dtype), [self._grid[0], 0.0], method=self.config.solver,
                              path=self.ode_solver.path, prediction=self.config.prediction_type,
                              rtol=self.config.rtol, atol=self.config.atol, return_stats=True)
        self.last_nfe = stats.nfe
        self._step_index = len(self.timesteps)
        return x.to(sample.dtype)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """The index in ``timesteps`` of the step that starts at ``timestep`` (stage times repeat grid times)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = float(torch.as_tensor(timestep).flatten()[0])
        matches = (schedule.double().cpu() - value).abs().le(1e-3).nonzero().flatten().tolist()
        starts = [k for k in matches if self._starts_step[k]]
        if not starts:
            where = "is a stage inside a step, not the start of one" if matches else "is not in this schedule"
            raise ValueError(f"timestep: {value} {where} (timesteps: {self.timesteps.tolist()})")
        return starts[0]

    def _init_step_index(self, timestep):
        index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        if not 0 <= index < len(self.timesteps) or not self._starts_step[index]:
            raise ValueError(f"begin_index: {index} is not the first network call of a step; "
                             f"use a multiple of order={self.order}")
        self._step_index = index

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The forward process ``x_t = alpha(t) x0 + sigma(t) noise`` of the path, for img2img-style starts."""
        if noise is None:
            raise ValueError("noise: scale_noise needs the noise tensor")
        t = torch.as_tensor(timestep, device=sample.device).flatten()
        if self.timesteps is not None and self._begin_index is not None:  # diffusers: the grid time at begin_index
            t = self.sigmas[self._interval_of[self._begin_index]].expand(t.shape)
        elif self.timesteps is not None:  # the grid time of each timestep's step, exactly as step() uses it
            t = torch.stack([self.sigmas[self._interval_of[self.index_for_timestep(v)]] for v in t])
        else:
            t = t / self.config.num_train_timesteps
        t = t.to(device=sample.device, dtype=torch.promote_types(sample.dtype, torch.float32))
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        return self.ode_solver.path.sample(sample, noise, t).x_t.to(sample.dtype)

    # ----------------------------------------------------------------------------------------
    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        """Feed one network output to the stepper; return where it asks next (or the interval's end)."""
        if self.sigmas is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self.is_adaptive:
            raise RuntimeError(f"step: {self.config.solver} is adaptive and picks its own steps; call integrate(velocity_fn, sample)")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise RuntimeError("step called after the last timestep; call set_timesteps again")
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        # 1. a new interval starts at `sample` (a step callback may have replaced it)
        if self._step is None:
            interval = self._interval_of[self._step_index]
            self._step = self.ode_solver.step(sample.to(dtype), self._grid[interval], self._grid[interval + 1])
            self._request = next(self._step)
        # 2. the network output at the requested point, as a velocity
        x_eval, t_eval = self._request
        velocity = self.ode_solver.path.convert(model_output.to(dtype), x_eval, time_batch(x_eval, t_eval),
                                            src=self.config.prediction_type, dst="velocity")
        # 3. the stepper's next request, or the end of the interval
        try:
            self._request = self._step.send(velocity)
            prev = self._request[0]
        except StopIteration as done:
            prev, self._step = done.value, None
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return FlowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self):
        return self.config.num_train_timesteps
