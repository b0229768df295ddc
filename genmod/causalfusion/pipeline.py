"""CausalFusionPipeline: class-conditional sampling and zero-shot editing with a CausalFusion transformer.

One ``__call__`` covers the whole range of the dual factorization (Deng et al. 2024, arXiv 2412.12095):
``num_ar_steps = 1`` is plain diffusion over all tokens, ``num_ar_steps = number of tokens`` is pure
autoregression; ``num_inference_steps`` ODE steps are spent on every AR step (total network calls =
``num_ar_steps * num_inference_steps`` per sample for a one-call solver). The clean prefix is held in a
KV cache. ``edit`` / ``image + keep_mask`` is zero-shot in- and out-painting: the kept tokens form the
clean prefix and only the rest is generated. The ODE solver and path come from ``samplers`` and
``genmod.core.paths`` (names in the pipeline config), the guidance is ``v_u + w (v_c - v_u)``.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline  # noqa: F401  (diffusers looks component base names up here)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from genmod.causalfusion.sampling import CausalFusionSampling, sample_tokens
from genmod.nn.embeddings import patchify, unpatchify
from genmod.pipelines.base import GenmodPipeline
from genmod.pipelines.callbacks import tensor_hook

EDIT_MASKS = ("inpaint", "outpaint", "left", "right", "top", "bottom")


class CausalFusionPipeline(GenmodPipeline):
    """Sample (and edit) images with a ``CausalFusionTransformer``; decode latents with an optional tokenizer ``vae``.

    Args:
        transformer: the ``CausalFusionTransformer``.
        vae: optional tokenizer with ``encode`` / ``decode``; None for pixel-space models.
        id2label: class names for ``class_labels`` given as strings.
        path, prediction: the diffusion path and output type the transformer was trained with.
        solver, time_grid: default solver (an ODE solver or ``ddpm``) and time grid of every AR step.
        num_inference_steps, guidance_scale, order: sampling defaults saved with the pipeline (an imported
            CausalFusion-XL keeps the official 250 DDPM steps, CFG 4 and the raster noise layout).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]
    scheduler = None  # set ``pipe.scheduler = <diffusers flow scheduler>`` to swap every AR step's solver

    def __init__(self, transformer, vae=None, id2label: dict | None = None, path: str = "linear",
                 prediction: str = "velocity", solver: str = "euler", time_grid: str = "uniform",
                 num_inference_steps: int = 16, guidance_scale: float = 1.0, order: str = "random"):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae)
        self.register_to_config(id2label={str(k): v for k, v in (id2label or {}).items()}, path=path,
                                prediction=prediction, solver=solver, time_grid=time_grid,
                                num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
                                order=order)

    def sampling_settings(self) -> dict:
        """The saved sampling defaults (printed by ``genmod sample``), used when a call does not pass them."""
        keys = ("solver", "time_grid", "path", "prediction", "num_inference_steps", "guidance_scale", "order")
        return {k: self.config.get(k, default) for k, default in zip(keys, ("euler", "uniform", "linear", "velocity", 16, 1.0, "random"))}

    # ----------------------------------------------------------------------------------------
    @staticmethod
    def edit_mask(kind: str, size: int, fraction: float = 0.5) -> torch.Tensor:
        """A ``[size, size]`` keep-mask (True = keep) for ``edit``.

        ``inpaint``: regenerate a centred square covering ``fraction`` of the side; ``outpaint``: keep
        only that centre and regenerate the border; ``left`` / ``right`` / ``top`` / ``bottom``: keep
        that half (``fraction`` of the side) and generate the rest.
        """
        if kind not in EDIT_MASKS:
            raise ValueError(f"kind: expected one of {', '.join(EDIT_MASKS)}, got {kind!r}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
        keep = torch.zeros(size, size, dtype=torch.bool)
        cut = int(round(size * fraction))
        lo = (size - cut) // 2
        if kind in ("inpaint", "outpaint"):
            keep[lo:lo + cut, lo:lo + cut] = True
            return ~keep if kind == "inpaint" else keep
        if kind == "left":
            keep[:, :cut] = True
        elif kind == "right":
            keep[:, size - cut:] = True
        elif kind == "top":
            keep[:cut] = True
        else:
            keep[size - cut:] = True
        return keep

    def _known_tokens(self, image: torch.Tensor, keep_mask: torch.Tensor, batch_size: int, device):
        """Encode ``image`` (``[B, C, H, W]`` in [-1, 1]) and map the pixel keep-mask to whole tokens."""
        cfg = self.transformer.config
        image = torch.as_tensor(image, device=device, dtype=torch.float32)
        if image.dim() == 3:
            image = image[None]
        if image.shape[0] == 1 and batch_size > 1:
            image = image.expand(batch_size, -1, -1, -1)
        if image.dim() != 4 or image.shape[0] != batch_size:
            raise ValueError(f"image: expected [{batch_size}, C, H, W] (or one image), got shape {tuple(image.shape)}")
        latents = image
        if self.vae is not None:
            encoded = self.vae.encode(image.to(self.vae.dtype))
            latents = getattr(encoded, "latents", encoded)
        if tuple(latents.shape[1:]) != (cfg.in_channels, cfg.sample_size, cfg.sample_size):
            raise ValueError(f"image: encodes to {tuple(latents.shape[1:])}, the transformer works on "
                             f"{(cfg.in_channels, cfg.sample_size, cfg.sample_size)}")
        keep = torch.as_tensor(keep_mask, device=device).bool()
        while keep.dim() > 2 and keep.shape[0] == 1:
            keep = keep[0]
        if keep.dim() != 2:
            raise ValueError(f"keep_mask: expected one [H, W] mask (True = keep), got shape {tuple(keep.shape)}")
        grid = self.transformer.grid_size
        # a token is known only if every pixel it covers is kept
        cells = torch.nn.functional.adaptive_avg_pool2d(keep[None, None].float(), (grid, grid))[0, 0] > 0.999
        return patchify(latents.to(self.transformer.dtype), cfg.patch_size), cells.reshape(-1)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        num_ar_steps: int = 1,
        step_sizes: list[int] | None = None,
        order: str | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        generator=None,
        image: torch.Tensor | None = None,
        keep_mask: torch.Tensor | None = None,
        solver: str | None = None,
        use_cache: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        scheduler=None, callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generate (or complete) images.

        ``class_labels``: ids or names, one per sample (class-conditional models); ``batch_size`` for
        unconditional ones. ``num_ar_steps``: AR steps (1 = plain diffusion, number of tokens = pure AR),
        or explicit ``step_sizes``; ``order``: ``random`` (per sample) or ``raster``.
        ``num_inference_steps``: ODE steps per AR step. ``guidance_scale`` w (1 = off) and
        ``guidance_interval=(t_lo, t_hi)``. ``generator``: one ``torch.Generator`` or one per sample.
        ``image`` + ``keep_mask`` (``[H, W]``, True = keep): zero-shot editing, see ``edit``.
        Unset ``num_inference_steps`` / ``guidance_scale`` / ``order`` / ``solver`` use the saved defaults.
        ``scheduler`` (or ``pipe.scheduler``): a diffusers flow scheduler solving every AR step instead of ``solver``.
        ``callback_on_step_end(pipe, ar_step, 0, {"latents"})`` after every AR step: see ``_ar_step_callback``.
        """
        saved = self.sampling_settings()
        num_inference_steps = saved["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = saved["guidance_scale"] if guidance_scale is None else guidance_scale
        order = saved["order"] if order is None else order
        device = self._execution_device
        labels, batch_size = self._labels_and_batch(class_labels, batch_size, device)
        self._generator_for(generator, batch_size)
        known_tokens, known_mask = self._editing_tokens(image, keep_mask, batch_size, device)
        num_steps = self._num_ar_steps(num_ar_steps, step_sizes, known_mask)
        settings = CausalFusionSampling(
            num_ar_steps=num_steps, step_sizes=step_sizes, num_inference_steps=num_inference_steps,
            solver=solver or saved["solver"], time_grid=saved["time_grid"], path=saved["path"],
            prediction=saved["prediction"], guidance_scale=guidance_scale, guidance_interval=guidance_interval,
            order=order, use_cache=use_cache, scheduler=scheduler if scheduler is not None else self.scheduler)
        with self.progress_bar(total=num_steps) as progress:
            tokens = sample_tokens(self.transformer, labels, batch_size, settings, generator=generator,
                                   known_tokens=known_tokens, known_mask=known_mask,
                                   on_ar_step=lambda _: progress.update(),
                                   on_ar_step_end=self._ar_step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs))
        images = self._tokens_to_output(tokens, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _ar_step_callback(self, callback, tensor_inputs):
        """The sampler's ``on_ar_step_end(step, tokens)`` as ``callback_on_step_end`` on ``[B, C, H, W]`` latents.

        The latents hold the tokens generated so far and noise elsewhere; returned latents replace the step's
        tokens before they join the clean prefix (so later AR steps see them).
        """
        hook = tensor_hook(self, callback, tensor_inputs)
        if hook is None:
            return None
        grid, patch = self.transformer.grid_size, self.transformer.config.patch_size

        def on_ar_step_end(step: int, tokens_BLD: torch.Tensor):
            returned = hook(step, unpatchify(tokens_BLD, patch, (grid, grid)))
            return None if returned is None else patchify(returned.to(tokens_BLD.dtype), patch)

        return on_ar_step_end

    def _labels_and_batch(self, class_labels, batch_size: int | None, device):
        """Class ids ``[B]`` (or None) and the batch size they imply (``batch_size`` must agree)."""
        labels = self.class_label_ids(class_labels, device)
        if labels is not None:
            if batch_size is not None and batch_size != len(labels):
                raise ValueError(f"batch_size={batch_size} disagrees with {len(labels)} class_labels")
            batch_size = len(labels)
        return labels, batch_size or 1

    def _editing_tokens(self, image, keep_mask, batch_size: int, device):
        """``(known_tokens, known_mask)`` for an edit, ``(None, None)`` for plain sampling."""
        if (image is None) != (keep_mask is None):
            raise ValueError("image / keep_mask: editing needs both the image and the keep mask")
        if image is None:
            return None, None
        return self._known_tokens(image, keep_mask, batch_size, device)

    def _num_ar_steps(self, num_ar_steps: int, step_sizes, known_mask) -> int:
        """AR steps actually taken: ``len(step_sizes)``, else ``num_ar_steps`` capped by the tokens to generate."""
        num_tokens = self.transformer.num_tokens
        if step_sizes is None and not 1 <= num_ar_steps <= num_tokens:
            raise ValueError(f"num_ar_steps: must be in [1, {num_tokens}] (number of tokens), got {num_ar_steps}")
        remaining = num_tokens - (int(known_mask.sum()) if known_mask is not None else 0)
        return len(step_sizes) if step_sizes is not None else min(num_ar_steps, max(remaining, 1))

    def _tokens_to_output(self, tokens_BLD: torch.Tensor, output_type: str):
        """Raster tokens -> latents ``[B, C, H, W]`` -> decoded images in ``output_type``."""
        grid = self.transformer.grid_size
        latents = unpatchify(tokens_BLD, self.transformer.config.patch_size, (grid, grid))
        images = latents if output_type == "latent" else self.decode_latents(latents)
        return self.images_to_output(images, output_type)

    def edit(self, image: torch.Tensor, keep_mask: torch.Tensor | str, class_labels=None, **kwargs):
        """Zero-shot in-/out-painting: keep the tokens of ``image`` under ``keep_mask``, generate the rest.

        ``image``: ``[B, C, H, W]`` (or one ``[C, H, W]``) in [-1, 1]; ``keep_mask``: ``[H, W]`` bool
        (True = keep) or a kind of ``edit_mask`` (``inpaint``, ``outpaint``, ``left``, ...). The kept
        tokens form the clean prefix of the generalized causal mask (Deng et al. 2024, zero-shot in-context editing).
        Other keywords as in ``__call__``.
        """
        image = torch.as_tensor(image)
        if isinstance(keep_mask, str):
            keep_mask = self.edit_mask(keep_mask, image.shape[-1])
        if class_labels is None and self.transformer.config.num_classes == 0 and "batch_size" not in kwargs:
            kwargs["batch_size"] = image.shape[0] if image.dim() == 4 else 1
        return self(class_labels=class_labels, image=image, keep_mask=keep_mask, **kwargs)
