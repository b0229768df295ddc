"""FlowMatchingPipeline: class-conditional sampling of a flow-matching transformer, pixels or latents.

The denoising loop is the explicit diffusers loop over ``scheduler.timesteps`` (so any flow scheduler
can be swapped in: ours, ``FlowMatchEulerDiscreteScheduler``, or DPM-Solver/UniPC with flow
settings). Classifier-free guidance runs conditional and null-class inputs in one batched forward
and combines ``v_u + w (v_c - v_u)`` (docs/DESIGN.md §1), optionally only inside a guidance
interval of sigma (Kynkaanniemi et al. 2024).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DiffusionPipeline  # noqa: F401  (diffusers looks component base names up here)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from genmod.pipelines.base import GenmodPipeline
from genmod.samplers import combine_guidance


class FlowMatchingPipeline(GenmodPipeline):
    """Sample images from a ``FlowTransformer`` (and decode latents with an optional tokenizer ``vae``).

    Args:
        transformer: velocity network ``transformer(x, timestep=1000*sigma, class_labels)``.
        scheduler: a flow scheduler (diffusers flow convention, sigma=1 is noise); ``FlowMatchSolverScheduler``
            also takes other paths and x0/epsilon outputs (its ``path`` / ``prediction_type`` config).
        vae: optional tokenizer with ``decode(latents)``; None for pixel-space models.
        default_num_inference_steps: the step count ``__call__`` uses when given none (20 if None); a k-step
            student (``--distill_steps K``) saves K here, the only grid it was trained on.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, scheduler, vae=None, id2label: dict | None = None,
                 default_num_inference_steps: int | None = None):
        super().__init__()
        if default_num_inference_steps is not None and (isinstance(default_num_inference_steps, bool) or
                                                        not isinstance(default_num_inference_steps, int) or
                                                        default_num_inference_steps < 1):
            raise ValueError(f"default_num_inference_steps: must be an int >= 1 or None, got {default_num_inference_steps!r}")
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(id2label={str(k): v for k, v in (id2label or {}).items()},
                                default_num_inference_steps=default_num_inference_steps)

    # ----------------------------------------------------------------------------------------
    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Read every step, so a step callback that sets ``pipe._guidance_scale = 1.0`` turns CFG off (w = 1)."""
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        batch_size: int | None = None,
        num_images_per_label: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        generator=None,
        latents: torch.Tensor | None = None,
        sigmas: list[float] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generate samples.

        ``class_labels``: ids or names, one per sample, or nested lists (class-conditional models); each makes
        ``num_images_per_label`` samples. ``batch_size``: number of samples for unconditional models.
        ``num_inference_steps``: solver steps; None takes the saved ``default_num_inference_steps`` (else 20).
        ``guidance_scale`` w: 1 is no guidance; it is read from ``self.guidance_scale`` at every step, so a
        ``callback_on_step_end`` may change it (diffusers' CFG-cutoff pattern).
        ``guidance_interval=(lo, hi)``: guidance only for t in [lo, hi] (sigma on the linear path). ``generator``: one
        ``torch.Generator`` or a list of one per sample (each sample then reproducible on its own).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_callback_inputs(callback_on_step_end_tensor_inputs)
        device = self._execution_device
        labels, batch_size = self.prepare_labels(class_labels, batch_size, device, num_images_per_label)
        self._guidance_scale, self._guidance_interval, self._interrupt = guidance_scale, guidance_interval, False
        latents = self.prepare_latents(batch_size, generator, latents, device)
        num_inference_steps = num_inference_steps or getattr(self.config, "default_num_inference_steps", None) or 20
        timesteps = self.prepare_timesteps(num_inference_steps, sigmas, device)
        latents = self.denoise(latents, timesteps, labels, callback_on_step_end,
                               callback_on_step_end_tensor_inputs)
        images = latents if output_type == "latent" else self.decode_latents(latents)
        images = self.images_to_output(images, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # -- the pieces of __call__ ------------------------------------------------------------------
    def check_callback_inputs(self, tensor_inputs):
        for name in tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback_on_step_end_tensor_inputs: {name!r} is not one of {self._callback_tensor_inputs}")

    def prepare_labels(self, class_labels, batch_size: int | None, device, num_images_per_label: int = 1):
        """Class ids ``[B]`` (or None for unconditional models) and the batch size they imply."""
        labels = self.class_label_ids(class_labels, device, num_images_per_label)
        if labels is not None:
            if batch_size is not None and batch_size != len(labels):
                raise ValueError(f"batch_size={batch_size} disagrees with {len(labels)} class_labels")
            batch_size = len(labels)
        return labels, batch_size or 1

    def prepare_latents(self, batch_size: int, generator, latents: torch.Tensor | None, device) -> torch.Tensor:
        """Pure noise ``x_BCHW`` at t = 1 from ``generator``, or the given ``latents`` checked for shape."""
        cfg = self.transformer.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=self._generator_for(generator, batch_size), device=device,
                                   dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=self.transformer.dtype)

    def prepare_timesteps(self, num_inference_steps: int, sigmas, device) -> torch.Tensor:
        """Set the scheduler's grid: the uniform 1 -> 1/N (then 0) as Flux/SD3 pass it, or ``sigmas``."""
        accepts_sigmas = "sigmas" in inspect.signature(self.scheduler.set_timesteps).parameters
        own_grid = getattr(self.scheduler.config, "schedule", "uniform") != "uniform"  # karras, ays ...: the scheduler's
        if sigmas is None and accepts_sigmas and not own_grid:
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        if sigmas is not None:
            if not accepts_sigmas:
                raise ValueError(f"sigmas: {type(self.scheduler).__name__} does not take a custom sigma grid")
            self.scheduler.set_timesteps(sigmas=np.asarray(sigmas, dtype=np.float32), device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        return self.scheduler.timesteps

    def guided_output(self, x_BCHW: torch.Tensor, timestep: torch.Tensor, labels, guidance) -> torch.Tensor:
        """One network output at ``timestep``; with ``guidance=(w, interval)`` CFG in one batched forward.

        The combine ``u + w (c - u)`` is the same on velocity, x0 or epsilon outputs: the path's
        conversion between them is affine in the output at fixed ``(x, t)``.
        """
        batch_size, channels = x_BCHW.shape[:2]
        sigma = timestep / self.scheduler.config.num_train_timesteps
        if guidance is None or guidance[0] == 1.0 or not _inside(sigma, guidance[1]):
            out = self.transformer(x_BCHW, timestep.expand(batch_size), labels, return_dict=False)[0]
            return out[:, :channels]  # learn_sigma networks: the prediction is the first C channels
        null = torch.full_like(labels, self.transformer.config.num_classes)
        out = self.transformer(torch.cat([x_BCHW, x_BCHW]), timestep.expand(2 * batch_size),
                               torch.cat([labels, null]), return_dict=False)[0]
        out_cond, out_uncond = out[:, :channels].chunk(2)
        guided_channels = getattr(self.transformer.config, "guidance_channels", None)
        if guided_channels is None:  # all channels (every genmod-trained model)
            return combine_guidance(out_cond, out_uncond, guidance[0])
        return combine_guidance(out_cond, out_uncond, guidance[0], channels=guided_channels)  # SiT: 3 of 4

    def denoise(self, latents, timesteps, labels, callback_on_step_end, callback_tensor_inputs):
        """The diffusers loop: one network call and one ``scheduler.step`` per timestep, then the callback.

        Guidance ``(self.guidance_scale, interval)`` is read at every step, so a callback may change it. An
        adaptive scheduler (dopri5 ...) integrates the whole grid in one ``integrate`` call (one step here)."""
        if getattr(self.scheduler, "is_adaptive", False):
            return self.denoise_adaptive(latents, timesteps, labels, callback_on_step_end, callback_tensor_inputs)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                # 1. the network output where the scheduler asks for it
                model_input = latents
                if hasattr(self.scheduler, "scale_model_input"):
                    model_input = self.scheduler.scale_model_input(model_input, t)
                guidance = None if labels is None else (self.guidance_scale, self._guidance_interval)
                output = self.guided_output(model_input, t, labels, guidance)
                # 2. the solver consumes it and says where to evaluate next
                latents = self.scheduler.step(output, t, latents, return_dict=False)[0]
                # 3. a step callback may read and replace the latents
                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    callback_kwargs = {name: available[name] for name in callback_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress.update()
        return latents


    def denoise_adaptive(self, latents, timesteps, labels, callback_on_step_end, callback_tensor_inputs):
        """One adaptive solve from the grid's start to t = 0; the network sees ``timestep = N_train t``."""
        num_train = self.scheduler.config.num_train_timesteps

        def model_output(x, t):
            guidance = None if labels is None else (self.guidance_scale, self._guidance_interval)
            return self.guided_output(x.to(self.transformer.dtype), (t[0] * num_train).to(x.dtype), labels,
                                      guidance).to(x.dtype)

        latents = self.scheduler.integrate(model_output, latents)
        if callback_on_step_end is not None:
            available = {"latents": latents}
            outputs = callback_on_step_end(self, 0, timesteps[0], {name: available[name] for name in callback_tensor_inputs})
            latents = outputs.pop("latents", latents)
        return latents


def _inside(sigma: torch.Tensor, interval) -> bool:
    if interval is None:
        return True
    lo, hi = interval
    return bool(lo <= float(sigma) <= hi)


