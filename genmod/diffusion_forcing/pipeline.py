"""DiffusionForcingPipeline: context frames in, N new frames out (Chen et al. 2024, Sec. 3.3).

The sampler is ``genmod.diffusion_forcing.sampling.rollout`` (scheduling matrix, stabilised
context, KV cache, sliding window, history / gradient guidance); the pipeline adds diffusers'
loading/saving, generators (one or one per sample) and output formats. Without ``context`` the
first ``num_context_frames`` frames are generated from scratch too (the model is a generator of
whole clips), and the ``num_frames`` frames after them are returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline  # noqa: F401  (diffusers looks component base names up here)
from diffusers.utils import BaseOutput

from genmod.diffusion_forcing.sampling import RolloutSettings, rollout
from genmod.diffusion_forcing.schedules import SCHEDULES
from genmod.pipelines.base import GenmodPipeline
from genmod.pipelines.callbacks import tensor_hook

OUTPUT_TYPES = ("pt", "np", "frames", "latent")


@dataclass
class DiffusionForcingPipelineOutput(BaseOutput):
    """``frames``: video ``pt`` (B, T, C, H, W) in [0, 1], ``np`` (B, T, H, W, C) in [0, 1], ``frames``
    a list of lists of PIL images; sequences ``(B, T * frame_stack, D)`` in data units."""

    frames: object


class DiffusionForcingPipeline(GenmodPipeline):
    """Roll out a ``DiffusionForcingTransformer`` or a ``DiffusionForcingUNet``.

    Args:
        transformer: the frame-causal network (either class; the component keeps this name for both
            so that saved pipelines load the same way).
        path, prediction: the package path and the network's prediction type it was trained with.
        context_noise: stabilisation level ``t_c`` of clean frames; schedule/slope/num_inference_steps: defaults.
        frame_stack: time steps per frame for sequences (outputs are unstacked).
        scheduler: optional flow scheduler that steps each frame instead of DDIM (swap it in with
            ``pipe.scheduler = ...``; ``genmod.diffusion_forcing.frame_schedulers``): genmod's
            ``FlowMatchSolverScheduler(path=..., solver="euler" | "dpmsolver++2m")``, or on the linear path
            ``FlowMatchEulerDiscreteScheduler`` / ``UniPCMultistepScheduler`` with flow sigmas.
    """

    model_cpu_offload_seq = "transformer"
    _optional_components = ["scheduler"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, scheduler=None, path: str = "cosine", prediction: str = "velocity",
                 context_noise: float = 0.02, schedule: str = "pyramid", slope: float = 1.0, frame_stack: int = 1,
                 num_inference_steps: int = 20):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.register_to_config(path=path, prediction=prediction, context_noise=float(context_noise), schedule=schedule,
                                slope=float(slope), frame_stack=int(frame_stack), num_inference_steps=int(num_inference_steps))

    def _to_model_frames(self, context) -> torch.Tensor:
        """Video context in [-1, 1] ``(B, C_f, C, H, W)``; sequences ``(B, steps, D)`` are stacked into frames."""
        context = torch.as_tensor(context, dtype=torch.float32)
        if self.transformer.config.modality == "sequence":
            k = self.config.frame_stack
            if context.dim() != 3 or context.shape[1] % k:
                raise ValueError(f"context: expected (B, steps, D) with steps divisible by frame_stack={k}, got {tuple(context.shape)}")
            return context.reshape(context.shape[0], context.shape[1] // k, k * context.shape[2])
        return context

    @torch.no_grad()
    def __call__(
        self,
        context: torch.Tensor | None = None,
        num_frames: int = 16,
        num_context_frames: int | None = None,
        schedule: str | list | torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        slope: float | None = None,
        chunk_size: int | None = None,
        window: int | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        history_guidance: str = "noise",
        guidance_fn=None,
        guidance_strength: float = 0.0,
        guidance_grad: str = "x0",
        context_noise: float | None = None,
        stabilization: str = "v1.5",
        clip_denoised: float | None | str = "auto",
        use_kv_cache: bool = True,
        class_labels=None,
        actions: torch.Tensor | None = None,
        batch_size: int | None = None,
        generator=None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generate ``num_frames`` frames after ``context`` (``(B, C_f, C, H, W)`` in [-1, 1], or
        ``(B, steps, D)`` for sequences); without ``context``, ``num_context_frames`` (default 1)
        frames are generated first. ``schedule``: autoregressive | pyramid | full_sequence |
        trapezoid | a matrix. ``guidance_scale``: history guidance w (1 = off) of the frames whose level is in
        ``guidance_interval``. ``stabilization``: ``genmod.diffusion_forcing.stabilization``; ``clip_denoised``:
        ``auto`` clamps x0 to [-1, 1] for video only.
        ``callback_on_step_end(pipe, chunk, 0, {"latents": frames [B, h, ...]})``: after every chunk; returned frames replace it.
        """
        schedule = self._schedule(schedule, output_type)
        device = self._execution_device
        class_labels, batch_size = self._labels_and_batch(class_labels, batch_size, generator, device)
        settings = self._rollout_settings(
            num_inference_steps, slope, context_noise, clip_denoised, window=window,
            kv_cache="reencode" if use_kv_cache else None, guidance_scale=guidance_scale,
            guidance_interval=guidance_interval, history_guidance=history_guidance, guidance_fn=guidance_fn,
            guidance_strength=guidance_strength, guidance_grad=guidance_grad, stabilization=stabilization)
        conditions = dict(class_labels=class_labels, actions=actions, generator=generator)
        context = self._start_context(context, settings, num_context_frames, batch_size, conditions, device)
        on_chunk_end = tensor_hook(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        with self.progress_bar(total=1) as bar:
            out = rollout(self.transformer, context, int(num_frames), settings, schedule=schedule,
                          chunk_size=chunk_size, on_chunk_end=on_chunk_end, **conditions)
            bar.update()
        frames = self._format(out[:, context.shape[1]:], output_type)
        self.maybe_free_model_hooks()
        return DiffusionForcingPipelineOutput(frames=frames) if return_dict else (frames,)

    def _rollout_settings(self, num_inference_steps, slope, context_noise, clip_denoised, **options) -> RolloutSettings:
        """The call's ``RolloutSettings``: None falls back to the saved config; ``clip_denoised="auto"`` is [-1, 1]
        for video and off for sequences."""
        if clip_denoised == "auto":
            clip_denoised = 1.0 if self.transformer.config.modality == "video" else None
        return RolloutSettings(
            path=self.config.path, prediction=self.config.prediction, clip_denoised=clip_denoised,
            scheduler=getattr(self, "scheduler", None),
            num_inference_steps=num_inference_steps or self.config.num_inference_steps,
            slope=self.config.slope if slope is None else slope,
            context_noise=self.config.context_noise if context_noise is None else context_noise, **options)

    def _start_context(self, context, settings, num_context_frames, batch_size, conditions: dict, device):
        """The given context frames, or ``num_context_frames`` opening frames generated from scratch."""
        if context is None:
            return self._opening_frames(settings, num_context_frames, batch_size or 1, conditions, device)
        return self._given_context(context, num_context_frames, conditions["generator"], device)

    def _schedule(self, schedule, output_type: str = "pt"):
        """The call's schedule (default the saved one); names are checked, matrices pass through; so is
        ``output_type``."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        schedule = self.config.schedule if schedule is None else schedule
        if isinstance(schedule, str):
            schedule = schedule.replace("-", "_")
            if schedule not in SCHEDULES + ("full",):
                raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
        return schedule

    def _labels_and_batch(self, class_labels, batch_size: int | None, generator, device):
        """Class ids ``[B]`` (or None; the shared parser, null id allowed) and the batch size a generator list
        or the labels imply."""
        if isinstance(generator, list):
            batch_size = batch_size or len(generator)
        if class_labels is not None:
            class_labels = self.parse_class_labels(class_labels, device, allow_null=True)
            batch_size = batch_size or len(class_labels)
        return class_labels, batch_size

    def _opening_frames(self, settings, num_context_frames, batch: int, conditions: dict, device) -> torch.Tensor:
        """Without context: the first ``num_context_frames`` (default 1) frames, a clip generated from
        nothing with the full-sequence schedule (Chen et al. 2024, Sec. 3.3)."""
        self._generator_for(conditions["generator"], batch)
        count = 1 if num_context_frames is None else int(num_context_frames)
        context = torch.zeros((batch, 0, *self.transformer.frame_shape), device=device)
        if count > 0:
            context = rollout(self.transformer, context, count, settings, schedule="full_sequence", chunk_size=count,
                              **conditions)
        return context

    def _given_context(self, context, num_context_frames, generator, device) -> torch.Tensor:
        """User context in model frames, cut to its last ``num_context_frames`` frames if given."""
        context = self._to_model_frames(context).to(device)
        if num_context_frames is not None and num_context_frames != context.shape[1]:
            context = context[:, -int(num_context_frames):]
        self._generator_for(generator, context.shape[0])
        return context

    def _format(self, frames: torch.Tensor, output_type: str):
        if self.transformer.config.modality == "sequence":
            k = self.config.frame_stack
            seq = frames.reshape(frames.shape[0], frames.shape[1] * k, frames.shape[2] // k)
            return seq.cpu().numpy() if output_type == "np" else seq
        if output_type == "latent":
            return frames
        video = (frames.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return video
        array = video.permute(0, 1, 3, 4, 2).cpu().numpy()
        if output_type == "np":
            return array
        return [DiffusionPipeline.numpy_to_pil(clip) for clip in array]


__all__ = ["DiffusionForcingPipeline", "DiffusionForcingPipelineOutput"]
