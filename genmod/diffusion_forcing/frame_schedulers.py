"""A swapped-in flow scheduler inside a Diffusion Forcing rollout: one copy per chunk frame.

Every frame of a chunk travels the same levels ``S, S-1, ..., 0`` (times ``tau[S] = 1 .. tau[0] = 0``), but the
scheduling matrix decides when (Chen et al. 2024, Alg. 2: a frame waits while its column repeats). The default
step is DDIM; with a scheduler (``RolloutSettings.scheduler``, ``DiffusionForcingPipeline(scheduler=...)``) each
frame gets its own copy, set to the level grid, and is stepped only at the rows where its level changes, so
multistep solvers (DPM-Solver++ 2M, UniPC) keep a history per frame. The model output handed over is rebuilt from
the guided ``(x0_hat, eps_hat)`` in the scheduler's own prediction type.

Schedulers: genmod's ``FlowMatchSolverScheduler`` on the rollout's path (``euler``, ``dpmsolver++2m``), or a
diffusers flow scheduler (``FlowMatchEulerDiscreteScheduler``; ``DPMSolverMultistepScheduler`` /
``UniPCMultistepScheduler`` with ``use_flow_sigmas=True, prediction_type="flow_prediction"``), which step the
linear path's velocity ``eps - x0``. One network call per step only: a row of the matrix evaluates each
frame once (Heun, RK4 would need extra rows).
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import torch

__all__ = ["FrameSchedulers"]


def _output_type(scheduler, path_name: str) -> str:
    """The prediction type the scheduler wants, checked against the rollout's path."""
    config = scheduler.config
    if "path" in config:  # genmod's FlowMatchSolverScheduler: any path, any prediction type
        if config.path != path_name:
            raise ValueError(f"scheduler: steps the {config.path!r} path, but the model was trained on {path_name!r}; "
                             f"use FlowMatchSolverScheduler(path={path_name!r}, ...)")
        return config.prediction_type
    if path_name != "linear":
        raise ValueError(f"scheduler: {type(scheduler).__name__} steps the linear path's velocity, but the model was "
                         f"trained on {path_name!r}; use genmod's FlowMatchSolverScheduler(path={path_name!r})")
    return "velocity"


def _set_grid(scheduler, tau: torch.Tensor) -> None:
    """Set ``scheduler`` to the levels ``tau[S] .. tau[1]`` (then 0) and check it took them unchanged."""
    levels = tau.flip(0)[:-1].double().cpu().numpy()  # [S]: 1 .. tau[1]
    if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(sigmas=levels.astype(np.float32))
    else:
        scheduler.set_timesteps(len(levels))
    got = scheduler.sigmas.double().cpu().numpy()[: len(levels)]
    if len(scheduler.sigmas) != len(levels) + 1 or not np.allclose(got, levels, atol=1e-5):
        raise ValueError(f"scheduler: {type(scheduler).__name__} does not step the rollout's levels {levels.round(4).tolist()} "
                         f"(it set {got.round(4).tolist()}); use shift 1, no dynamic shifting and the uniform grid")


class FrameSchedulers:
    """``step(i, x0_hat, eps_hat, x_t, t)``: frame ``i``'s next state from its own copy of ``scheduler``."""

    def __init__(self, scheduler, path, path_name: str, tau: torch.Tensor, num_frames: int):
        if getattr(scheduler, "order", 1) != 1:
            raise ValueError(f"scheduler: {type(scheduler).__name__} takes {scheduler.order} network calls per step; "
                             "a Diffusion Forcing row evaluates each frame once (use euler, dpmsolver++2m or UniPC)")
        self.path, self.output_type = path, _output_type(scheduler, path_name)
        scheduler = copy.deepcopy(scheduler)  # the pipeline's own scheduler is left as it was
        _set_grid(scheduler, tau)
        self.copies = [copy.deepcopy(scheduler) for _ in range(num_frames)]
        self.calls = [0] * num_frames

    def _model_output(self, x0_hat: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided prediction in the scheduler's type: x0, epsilon, or the path velocity alpha' x0 + sigma' eps."""
        if self.output_type == "x0":
            return x0_hat
        if self.output_type == "epsilon":
            return eps_hat
        return self.path.d_alpha(t).to(x0_hat.dtype) * x0_hat + self.path.d_sigma(t).to(x0_hat.dtype) * eps_hat

    def step(self, i: int, x0_hat: torch.Tensor, eps_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        scheduler = self.copies[i]
        timestep = scheduler.timesteps[self.calls[i]]
        self.calls[i] += 1
        out = scheduler.step(self._model_output(x0_hat, eps_hat, t), timestep, x_t, return_dict=False)[0]
        return out.to(x_t.dtype)
