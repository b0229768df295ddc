"""VARPipeline: class-conditional next-scale sampling and zero-shot editing with a VARTransformer and its
multi-scale VQ tokenizer (Tian et al. 2024, Sec. 3.3 and Sec. 5 "zero-shot generalisation").

Sampling (official ``autoregressive_infer_cfg``): the batch is doubled with the null class, scale k's
tokens run through the blocks with every block's KV cache extended by that scale, the guided logits
are filtered (temperature, top-k, top-p) and sampled, the codes are added to ``f_hat`` and the next
input is ``f_hat`` area-downsampled to scale k+1 (``MultiScaleResidualVQ.next_autoregressive_input``,
the function teacher forcing uses too). The decoder turns the final ``f_hat`` into the image.

Guidance convention (docs/DESIGN.md §1). VAR ramps its CFG ratio linearly over scales,
``t_k = cfg * k / (K - 1)`` and ``logits = (1 + t_k) c - t_k u``. That is ``u + w_k (c - u)`` with
``w_k = 1 + t_k``, so here ``guidance_scale`` is the final weight ``w = 1 + cfg`` and
``w_k = 1 + (w - 1) k / (K - 1)``: VAR's README setting ``cfg = 1.5`` is ``guidance_scale = 2.5``;
``guidance_scale = 1`` is no guidance. ``guidance_schedule="constant"`` uses ``w`` at every scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline  # noqa: F401  (diffusers looks component base names up here)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from genmod.core.settings import with_options
from genmod.pipelines.base import GenmodPipeline
from genmod.samplers import combine_guidance, sample_logits

GUIDANCE_SCHEDULES = ("linear", "constant")


@dataclass
class VARSample:
    """Result of :func:`var_generate`: the index map of every scale ``[B, h_k, w_k]``, the final
    ``f_hat [B, Cvae, H, W]`` and, with ``return_logits``, the (guided) logits of every scale ``[B, h_k w_k, V]``."""

    index_maps: list
    f_hat: torch.Tensor
    logits: list | None = None


def guidance_weight(k: int, num_scales: int, guidance_scale: float, schedule: str = "linear") -> float:
    """CFG weight at scale k: VAR's linear ramp ``1 + (w - 1) k / (K - 1)`` (w at the last scale, 1 at the
    first), or ``w`` everywhere for ``constant``."""
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule: expected one of {', '.join(GUIDANCE_SCHEDULES)}, got {schedule!r}")
    if schedule == "constant":
        return float(guidance_scale)
    ratio = k / (num_scales - 1) if num_scales > 1 else 1.0
    return 1.0 + (float(guidance_scale) - 1.0) * ratio


def scale_keep_masks(keep_mask: torch.Tensor, scale_sizes, batch_size: int, always_keep_up_to: int = 3) -> list[torch.Tensor]:
    """Per-scale boolean keep masks ``[B, h_k, w_k]`` from a keep mask at any resolution (1 = keep the
    given image's token), as VAR's zero-shot demo: bilinear resize, ``> 0.5``; scales of at most
    ``always_keep_up_to`` tokens keep every given token (they hold the global layout)."""
    mask = torch.as_tensor(keep_mask).float()
    if mask.dim() == 2:
        mask = mask[None, None].expand(batch_size, 1, *mask.shape)
    elif mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch_size):
        raise ValueError(f"keep_mask: expected [H, W], [B, H, W] or [B, 1, H, W] with B = {batch_size}, got {tuple(torch.as_tensor(keep_mask).shape)}")
    mask = mask.expand(batch_size, -1, -1, -1)
    out = []
    for h, w in scale_sizes:
        if h * w <= always_keep_up_to:
            out.append(torch.ones(batch_size, h, w, dtype=torch.bool, device=mask.device))
        else:
            out.append(F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5)
    return out


def _draw(logits: torch.Tensor, generator, temperature: float, top_k, top_p) -> torch.Tensor:
    """Token ids ``[B, n]`` from logits ``[B, n, V]``; a list of generators draws row b from generator b."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != logits.shape[0]:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {logits.shape[0]}")
        return torch.stack([sample_logits(row, temperature, top_k, top_p, generator=g) for row, g in zip(logits, generator)])
    return sample_logits(logits, temperature, top_k, top_p, generator=generator)


@dataclass(frozen=True)
class VARSampling:
    """Settings of next-scale sampling (Tian et al. 2024, Sec. 3.3): CFG weight ``w`` at the last scale and
    its ramp over scales (module docstring), the logit filters and the KV cache.

    ``use_kv_cache=False`` recomputes the whole prefix under the block-causal mask at every scale (same
    logits; the benchmark's slow path).
    """

    guidance_scale: float = 1.0
    guidance_schedule: str = "linear"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    use_kv_cache: bool = True

    def __post_init__(self):
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule: expected one of {', '.join(GUIDANCE_SCHEDULES)}, got {self.guidance_schedule!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1] or None, got {self.top_p}")


def _scale_logits(transformer, x: torch.Tensor, cond, caches, prefix: list, num_tokens: int) -> torch.Tensor:
    """Logits ``[B', h w, V]`` of one scale's tokens given every coarser scale: the new tokens through the
    KV-cached blocks, or (no cache) the whole prefix again under the block-causal mask."""
    if caches is not None:
        return transformer.run_blocks(x, cond, caches)
    prefix.append(x)
    return transformer.run_blocks(torch.cat(prefix, dim=1), cond)[:, -num_tokens:]


def _check_inputs(transformer, quantizer, given_index_maps, keep_masks) -> None:
    """The tokenizer's scales are the transformer's; editing needs both the index maps and the masks."""
    scales = transformer.scale_sizes
    if tuple(tuple(s) for s in quantizer.scales) != tuple(scales):
        raise ValueError(f"quantizer: scales {list(quantizer.scales)} differ from the transformer's {scales}")
    if (given_index_maps is None) != (keep_masks is None):
        raise ValueError("given_index_maps / keep_masks: pass both for editing, or neither")


def _guided(logits_2BNV: torch.Tensor, weight: float) -> torch.Tensor:
    """CFG on a batch doubled as ``[cond | null]``: ``u + w (c - u)`` (docs/DESIGN.md §1)."""
    cond_logits, null_logits = logits_2BNV.chunk(2)
    return combine_guidance(cond_logits, null_logits, weight)


@torch.no_grad()
def var_generate(
    transformer,
    quantizer,
    class_labels: torch.Tensor,
    settings: VARSampling | None = None,
    *,
    generator=None,
    given_index_maps: list | None = None,
    keep_masks: list | None = None,
    return_logits: bool = False,
    progress=None,
    **options,
) -> VARSample:
    """Next-scale sampling (Tian et al. 2024, Sec. 3.3, Alg. 2 of the tokenizer) for ``class_labels [B]``.

    ``settings``: a ``VARSampling`` (``options``, its field names, override single fields); the batch is
    doubled with the null class when w != 1. ``given_index_maps`` + ``keep_masks`` (lists over scales,
    ``[B, h_k, w_k]``): zero-shot editing; the given tokens replace the sampled ones wherever the keep
    mask is True, at every scale.
    """
    settings = with_options(settings or VARSampling(), options, "var_generate")
    _check_inputs(transformer, quantizer, given_index_maps, keep_masks)
    scales = transformer.scale_sizes
    device = transformer.block_ids.device
    labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
    batch = labels.shape[0]
    do_cfg = float(settings.guidance_scale) != 1.0
    cond = transformer.condition(torch.cat([labels, torch.full_like(labels, transformer.null_class_id)]) if do_cfg else labels)
    caches = transformer.new_kv_caches() if settings.use_kv_cache else None
    x = transformer.embed_scale(0, cond)  # scale 0: the start token, from the class condition
    prefix, index_maps, all_logits = [], [], []
    f_hat = torch.zeros(batch, quantizer.dim, *scales[-1], device=device)
    for k, (h, w) in enumerate(scales):
        # 1. logits of scale k's h*w tokens given all coarser scales (block-causal over scales)
        logits = _scale_logits(transformer, x, cond, caches, prefix, h * w)
        # 2. CFG at this scale's weight w_k (VAR's linear ramp): u + w_k (c - u)
        if do_cfg:
            logits = _guided(logits, guidance_weight(k, len(scales), settings.guidance_scale, settings.guidance_schedule))
        # 3. sample the token map r_k (temperature, top-k, top-p); editing keeps the given tokens
        ids = _draw(logits, generator, settings.temperature, settings.top_k, settings.top_p).view(batch, h, w)
        if given_index_maps is not None:
            ids = torch.where(keep_masks[k].to(device), given_index_maps[k].to(device), ids)
        index_maps.append(ids)
        if return_logits:
            all_logits.append(logits)
        # 4. f_hat += phi_k(upsample(z_k)); the next scale's input is f_hat area-downsampled to it
        f_hat, next_input = quantizer.next_autoregressive_input(k, f_hat, quantizer.embed(ids))
        if k + 1 < len(scales):
            next_input = next_input.flatten(2).transpose(1, 2)
            x = transformer.embed_scale(k + 1, cond, next_input.repeat(2, 1, 1) if do_cfg else next_input)
        if progress is not None:
            progress.update()
    return VARSample(index_maps, f_hat, all_logits if return_logits else None)


class VARPipeline(GenmodPipeline):
    """Sample (or edit) images with a ``VARTransformer`` and its multi-scale VQ tokenizer ``vqvae``.

    The sampling defaults (``guidance_scale``, ``guidance_schedule``, ``top_k``, ``top_p``,
    ``temperature``) are saved in ``model_index.json`` and used when a call does not pass them.
    """

    model_cpu_offload_seq = "transformer->vqvae"

    def __init__(self, transformer, vqvae, id2label: dict | None = None, guidance_scale: float = 2.5,
                 guidance_schedule: str = "linear", top_k: int | None = None, top_p: float | None = 0.96,
                 temperature: float = 1.0):
        super().__init__()
        if getattr(getattr(vqvae, "config", None), "quantizer", None) != "msvq":
            raise ValueError("vqvae: VARPipeline needs a VQTokenizer with the multi-scale quantizer (quantizer='msvq')")
        guidance_weight(0, 1, guidance_scale, guidance_schedule)  # validates the schedule name
        self.register_modules(transformer=transformer, vqvae=vqvae)
        self.register_to_config(id2label={str(k): v for k, v in (id2label or {}).items()},
                                guidance_scale=float(guidance_scale), guidance_schedule=guidance_schedule,
                                top_k=top_k, top_p=top_p, temperature=float(temperature))

    def sampling_settings(self) -> dict:
        """The saved sampling defaults (printed by ``genmod sample``)."""
        return {k: self.config[k] for k in ("guidance_scale", "guidance_schedule", "top_k", "top_p", "temperature")}

    def _class_labels(self, class_labels, batch_size: int | None, device, num_images_per_label: int = 1) -> torch.Tensor:
        """Ids ``[B]``; ``None`` (or the id ``num_classes``) is the null class: unconditional samples / edits."""
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            return torch.full((batch_size or 1,), num_classes, dtype=torch.long, device=device)
        labels = self.parse_class_labels(class_labels, device, allow_null=True,  # the shared parser (nested lists too)
                                         num_images_per_label=num_images_per_label)
        if batch_size is not None and batch_size != len(labels):
            if len(labels) != 1:
                raise ValueError(f"batch_size={batch_size} disagrees with {len(labels)} class_labels")
            labels = labels.expand(batch_size)
        return labels

    def _image_tensor(self, image, device) -> torch.Tensor:
        if isinstance(image, (list, tuple)) or hasattr(image, "convert"):  # PIL image(s) -> [-1, 1]
            images = image if isinstance(image, (list, tuple)) else [image]
            channels = self.vqvae.config.in_channels
            arrays = [np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 127.5 - 1 for im in images]
            image = torch.from_numpy(np.stack(arrays))
            image = image.permute(0, 3, 1, 2) if image.dim() == 4 else image[:, None]
        image = torch.as_tensor(image, dtype=torch.float32)
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[1] != self.vqvae.config.in_channels:
            raise ValueError(f"image: expected [B, {self.vqvae.config.in_channels}, H, W] in [-1, 1] or PIL images, got {tuple(image.shape)}")
        return image.to(device=device, dtype=self.vqvae.dtype)

    def encode_scales(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Ground-truth index maps of ``image [B, C, H, W]`` in [-1, 1], one per scale."""
        quantizer = self.vqvae.quantize_layer
        return quantizer.encode_scales(self.vqvae.encoder(image))

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        batch_size: int | None = None,
        num_images_per_label: int = 1,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        num_inference_steps: int | None = None,
        generator=None,
        image=None,
        keep_mask=None,
        use_kv_cache: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate ``len(class_labels)`` images, or edit ``image`` keeping its tokens where ``keep_mask`` is 1.

        ``class_labels``: ids or names; ``None`` (``batch_size`` samples) or the null id ``num_classes``
        is unconditional (for editing: class-free in-/out-painting); each label makes ``num_images_per_label``
        images (generation only). ``guidance_scale`` w (1 = off; VAR cfg = w - 1), ramped linearly
        over scales unless ``guidance_schedule="constant"``. Unset sampling options use the saved
        defaults (``self.sampling_settings()``). ``num_inference_steps`` must be None or the number of
        scales (one step per scale). ``generator``: one or a list of one per sample.
        ``image``: ``[B, C, H, W]`` in [-1, 1] (or PIL); ``keep_mask``: ``[H', W']``, ``[B, H', W']`` or
        ``[B, 1, H', W']`` at any resolution, 1 = keep the image's tokens (resized per scale).
        """
        device = self._execution_device
        settings = self._call_settings(guidance_scale=guidance_scale, guidance_schedule=guidance_schedule, top_k=top_k,
                                       top_p=top_p, temperature=temperature, use_kv_cache=use_kv_cache)
        if num_inference_steps is not None and num_inference_steps != self.transformer.num_scales:
            raise ValueError(f"num_inference_steps: VAR takes one step per scale ({self.transformer.num_scales}), "
                             f"got {num_inference_steps}")
        editing = image is not None or keep_mask is not None
        if editing:
            if num_images_per_label != 1:
                raise ValueError("num_images_per_label: editing makes one image per input image; leave it at 1")
            image, batch_size = self._edit_image(image, keep_mask, class_labels, batch_size, device)
        labels = self._class_labels(class_labels, batch_size, device, num_images_per_label)
        given, masks = self._edit_targets(image, keep_mask, labels.shape[0]) if editing else (None, None)
        generator = self._generator_for(generator, labels.shape[0])
        with self.progress_bar(total=self.transformer.num_scales) as progress:
            result = var_generate(self.transformer, self.vqvae.quantize_layer, labels, settings, generator=generator,
                                  given_index_maps=given, keep_masks=masks, progress=progress)
        if output_type == "latent":
            images = result.f_hat
        else:
            images = self.images_to_output(self.vqvae.decoder(result.f_hat.to(self.vqvae.dtype)).clamp(-1, 1), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _call_settings(self, use_kv_cache: bool, **overrides) -> VARSampling:
        """The call's ``VARSampling``: the saved defaults (``sampling_settings``) where a keyword is None."""
        saved = self.sampling_settings()
        chosen = {name: saved[name] if value is None else value for name, value in overrides.items()}
        return VARSampling(use_kv_cache=use_kv_cache, **chosen)

    def _edit_image(self, image, keep_mask, class_labels, batch_size: int | None, device):
        """The image to edit as ``[B, C, H, W]`` (one image is repeated) and the batch size it implies."""
        if image is None or keep_mask is None:
            raise ValueError("image / keep_mask: editing needs both the image and the keep mask")
        image = self._image_tensor(image, device)
        if batch_size is None:
            batch_size = image.shape[0] if class_labels is None or isinstance(class_labels, (int, str)) else len(class_labels)
        if image.shape[0] == 1 and batch_size > 1:
            image = image.expand(batch_size, -1, -1, -1)
        if image.shape[0] != batch_size:
            raise ValueError(f"image: {image.shape[0]} images for a batch of {batch_size}")
        return image, batch_size

    def _edit_targets(self, image: torch.Tensor, keep_mask, batch: int):
        """Zero-shot editing (Tian et al. 2024, Sec. 5): the image's index map and the keep mask at every scale."""
        given = self.encode_scales(image)
        keep_mask = keep_mask.to(image.device) if torch.is_tensor(keep_mask) else keep_mask
        return given, scale_keep_masks(keep_mask, self.transformer.scale_sizes, batch)

    def edit(self, image, keep_mask, class_labels=None, **kwargs):
        """Zero-shot in-/out-painting and class-conditional editing: ``__call__(image=..., keep_mask=...)``."""
        return self(class_labels=class_labels, image=image, keep_mask=keep_mask, **kwargs)
