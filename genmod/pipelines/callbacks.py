"""diffusers' ``callback_on_step_end`` for every genmod pipeline, in one place.

The contract is diffusers' (``DiffusionPipeline`` docs, "Pipeline callbacks"): after each step the
pipeline calls ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` where ``callback_kwargs``
holds the tensors named in ``callback_on_step_end_tensor_inputs`` (each must be one of the pipeline's
``_callback_tensor_inputs``); the callback returns a dict, and a tensor it returns replaces the
pipeline's. ``PipelineCallback`` / ``MultiPipelineCallbacks`` objects bring their own tensor inputs.
What a "step" is depends on the pipeline: an ODE step (flow), an AR step (CausalFusion), a frame
chunk (Diffusion Forcing), a latent token's head solve (LatentLM).
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback


class StepCallback:
    """``callback_on_step_end`` and its tensor inputs, checked once; ``__call__`` runs it and returns the tensors."""

    def __init__(self, pipe, callback, tensor_inputs, allowed: list[str]):
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        tensor_inputs = list(tensor_inputs or [])
        for name in tensor_inputs:
            if name not in allowed:
                raise ValueError(f"callback_on_step_end_tensor_inputs: {name!r} is not one of {allowed}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback_on_step_end: expected a callable, got {type(callback).__name__}")
        self.pipe, self.callback, self.tensor_inputs = pipe, callback, tensor_inputs

    def __bool__(self) -> bool:
        return self.callback is not None

    def __call__(self, step: int, timestep, tensors: dict) -> dict:
        """``tensors`` after the callback: the entries it returned replace the given ones."""
        if self.callback is None:
            return tensors
        kwargs = {name: tensors[name] for name in self.tensor_inputs}
        outputs: Optional[dict] = self.callback(self.pipe, step, timestep, kwargs)
        if outputs is None:
            return tensors
        if not isinstance(outputs, dict):
            raise ValueError(f"callback_on_step_end: must return a dict, got {type(outputs).__name__}")
        return {**tensors, **{k: v for k, v in outputs.items() if k in tensors}}


def tensor_hook(pipe, callback, tensor_inputs, name: str = "latents"):
    """``hook(step, tensor) -> replacement or None`` running ``callback_on_step_end`` on one tensor, or None without a callback.

    For samplers whose step hands out one tensor (an AR step's latents, a frame chunk, a latent token);
    ``timestep`` is 0: the step's output has reached t = 0.
    """
    step_callback = StepCallback(pipe, callback, tensor_inputs, pipe._callback_tensor_inputs)
    if not step_callback:
        return None

    def hook(step: int, tensor):
        returned = step_callback(step, torch.zeros(()), {name: tensor})[name]
        return None if returned is tensor else returned

    return hook
