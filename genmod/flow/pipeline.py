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
from samplers import combine_guidance


class FlowMatchingPipeline(GenmodPipeline):
    """Sample images from a ``FlowTransformer`` (and decode latents with an optional tokenizer ``vae``).

    Args:
        transformer: velocity network ``transformer(x, timestep=1000*sigma, class_labels)``.
        scheduler: a flow scheduler (diffusers flow convention, sigma=1 is noise).
        vae: optional tokenizer with ``decode(latents)``; None for pixel-space models.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, scheduler, vae=None, id2label: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(id2label={str(k): v for k, v in (id2label or {}).items()})

    # ----------------------------------------------------------------------------------------
    @property
    def guidance_scale(self):
        return self._guidance_scale

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
        num_inference_steps: int = 20,
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

        ``class_labels``: ids or names, one per sample (class-conditional models). ``batch_size``:
        number of samples for unconditional models. ``guidance_scale`` w: 1 is no guidance.
        ``guidance_interval=(lo, hi)``: guidance only for sigma in [lo, hi]. ``generator``: one
        ``torch.Generator`` or a list of one per sample (each sample then reproducible on its own).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback_on_step_end_tensor_inputs: {name!r} is not one of {self._callback_tensor_inputs}")
        device = self._execution_device
        labels = self.class_label_ids(class_labels, device)
        if labels is not None:
            if batch_size is not None and batch_size != len(labels):
                raise ValueError(f"batch_size={batch_size} disagrees with {len(labels)} class_labels")
            batch_size = len(labels)
        batch_size = batch_size or 1
        do_cfg = labels is not None and guidance_scale != 1.0
        self._guidance_scale, self._interrupt = guidance_scale, False

        cfg = self.transformer.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=self._generator_for(generator, batch_size), device=device,
                                   dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=self.transformer.dtype)

        accepts_sigmas = "sigmas" in inspect.signature(self.scheduler.set_timesteps).parameters
        if sigmas is None and accepts_sigmas:  # the uniform grid 1 -> 1/N (then 0), as Flux/SD3 pass it
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        if sigmas is not None:
            if not accepts_sigmas:
                raise ValueError(f"sigmas: {type(self.scheduler).__name__} does not take a custom sigma grid")
            self.scheduler.set_timesteps(sigmas=np.asarray(sigmas, dtype=np.float32), device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        num_train = self.scheduler.config.num_train_timesteps
        if do_cfg:
            null = torch.full_like(labels, cfg.num_classes)
            labels_in = torch.cat([labels, null])

        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = latents
                if hasattr(self.scheduler, "scale_model_input"):
                    model_input = self.scheduler.scale_model_input(model_input, t)
                use_cfg = do_cfg and _inside(t / num_train, guidance_interval)
                if use_cfg:
                    x_in = torch.cat([model_input, model_input])
                    out = self.transformer(x_in, t.expand(2 * batch_size), labels_in, return_dict=False)[0]
                    v_cond, v_uncond = out.chunk(2)
                    velocity = combine_guidance(v_cond, v_uncond, guidance_scale)
                else:
                    velocity = self.transformer(model_input, t.expand(batch_size), labels, return_dict=False)[0]
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress.update()

        images = latents if output_type == "latent" else self.decode_latents(latents)
        images = self.images_to_output(images, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _inside(sigma: torch.Tensor, interval) -> bool:
    if interval is None:
        return True
    lo, hi = interval
    return bool(lo <= float(sigma) <= hi)

