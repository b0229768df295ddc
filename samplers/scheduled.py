"""Drive any diffusers flow scheduler on a velocity function: the diffusers denoising loop, once.

``FlowMatchingPipeline`` runs this loop around its network; the pipelines whose ODE sits inside a larger
sampler (a CausalFusion AR step, a LatentLM head solve) call ``solve_with_scheduler`` so that the same
schedulers drop in: genmod's ``FlowMatchSolverScheduler`` (every solver of ``samplers.steppers``),
diffusers' ``FlowMatchEulerDiscreteScheduler`` and the multistep schedulers with flow settings
(``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` with ``use_flow_sigmas=True,
prediction_type="flow_prediction"``). The scheduler sees diffusers' flow convention (docs/DESIGN.md §1):
sigma = t, timestep ``= num_train_timesteps * sigma``, model output the velocity ``dx/dt``.
Duck-typed on ``set_timesteps`` / ``step`` / ``timesteps``: this module imports no scheduler.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["set_scheduler_timesteps", "solve_with_scheduler"]


def set_scheduler_timesteps(scheduler, num_inference_steps: int, sigmas=None, device=None) -> torch.Tensor:
    """``scheduler.set_timesteps`` on the uniform grid ``1 -> 1/N`` (then 0), as Flux/SD3 pass it, or on ``sigmas``.

    Schedulers without a ``sigmas`` argument get ``num_inference_steps`` and their own spacing.
    """
    accepts_sigmas = "sigmas" in inspect.signature(scheduler.set_timesteps).parameters
    if sigmas is None and accepts_sigmas:
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
    if sigmas is not None:
        if not accepts_sigmas:
            raise ValueError(f"sigmas: {type(scheduler).__name__} does not take a custom sigma grid")
        scheduler.set_timesteps(sigmas=np.asarray(sigmas, dtype=np.float32), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps


def solve_with_scheduler(scheduler, velocity_fn: Callable, x: torch.Tensor, num_inference_steps: int, sigmas=None,
                         on_step: Optional[Callable] = None) -> tuple[torch.Tensor, int]:
    """Integrate ``dx/dt = velocity_fn(x, t)`` from t = 1 to 0 with ``scheduler``; returns ``(x, network calls)``.

    One ``velocity_fn`` call (``t`` a ``[B]`` tensor of ``timestep / num_train_timesteps``) and one
    ``scheduler.step`` per entry of ``scheduler.timesteps``; ``on_step(i, timestep, x)`` may return a
    replacement for ``x`` after each step (diffusers' ``callback_on_step_end`` point).
    """
    timesteps = set_scheduler_timesteps(scheduler, num_inference_steps, sigmas, device=x.device)
    scale = float(scheduler.config.get("num_train_timesteps", 1000))
    for i, timestep in enumerate(timesteps):
        model_input = scheduler.scale_model_input(x, timestep) if hasattr(scheduler, "scale_model_input") else x
        t = torch.full((x.shape[0],), float(timestep) / scale, dtype=torch.promote_types(x.dtype, torch.float32),
                       device=x.device)
        velocity = velocity_fn(model_input, t)
        x = scheduler.step(velocity, timestep, x, return_dict=False)[0]
        if on_step is not None:
            replaced = on_step(i, timestep, x)
            x = x if replaced is None else replaced
    return x, len(timesteps)
