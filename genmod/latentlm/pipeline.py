"""LatentLMPipeline: prompt or class in, image or audio out (next-token diffusion over sigma-VAE
latents, Sun et al. 2024), plus ``caption(inputs)`` (latents in, text out) with the same model.

Generation: ``<bos> prompt <bol>`` (or ``<bos> <class> <bol>``) is run through the causal transformer,
then each latent is sampled by the diffusion head with DPM-Solver++ (``num_head_steps``), guided
against the null condition (empty prompt / null class) with ``u + w (c - u)``, and fed back through
the KV cache; the sigma-VAE ``vae`` decodes the latent grid. ``temperature`` scales the head's initial
noise. See ``genmod.latentlm.sampling``.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline  # noqa: F401  (diffusers looks component base names up here)
from diffusers.pipelines.pipeline_utils import AudioPipelineOutput, ImagePipelineOutput

from genmod.latentlm.sampling import generate_latents, generate_text
from genmod.latentlm.text import BOL, BOS, EOL, LATENT, NULL, LatentLMTokenizer
from genmod.pipelines.base import GenmodPipeline
from genmod.pipelines.callbacks import tensor_hook


class LatentLMPipeline(GenmodPipeline):
    """Sample images / audio from a ``LatentLMTransformer`` and decode them with its sigma-VAE.

    Args:
        transformer: the ``LatentLMTransformer``.
        vae: the ``SigmaVAE`` whose normalised latents the transformer models.
        sample_rate: audio sample rate (audio models).
        id2label: class names of a class-conditional model.
        num_head_steps, guidance_scale, temperature: sampling defaults saved with the pipeline.
    """

    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["latents"]
    scheduler = None  # set ``pipe.scheduler = <diffusers flow scheduler>`` to swap the head's solver

    def __init__(self, transformer, vae, sample_rate: Optional[int] = None, id2label: Optional[dict] = None,
                 num_head_steps: int = 10, guidance_scale: float = 3.0, temperature: float = 1.0):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae)
        self.register_to_config(sample_rate=sample_rate, id2label={str(k): v for k, v in (id2label or {}).items()},
                                num_head_steps=num_head_steps, guidance_scale=guidance_scale, temperature=temperature)

    @property
    def text_tokenizer(self) -> LatentLMTokenizer:
        cfg = self.transformer.config
        return LatentLMTokenizer(cfg.num_classes, cfg.max_text_length)

    def _class_ids(self, class_labels) -> list[int]:
        """The shared parser (``GenmodPipeline.parse_class_labels``): ids, names, nested lists."""
        return self.parse_class_labels(class_labels, "cpu").tolist()

    def _prefixes(self, prompt, class_labels, batch_size):
        tok = self.text_tokenizer
        if self.transformer.config.num_classes:
            if prompt is not None:
                raise ValueError("prompt: this model is class-conditional; pass class_labels")
            if class_labels is None:
                raise ValueError("class_labels: this model is class-conditional; pass class ids or names")
            ids = self._class_ids(class_labels)
            return [[BOS, tok.class_token(y), BOL] for y in ids], [[BOS, NULL, BOL] for _ in ids]
        if class_labels is not None:
            raise ValueError("class_labels: this model is text-conditional; pass prompt")
        if prompt is None:
            prompt = ""
        if isinstance(prompt, str):
            prompt = [prompt] * (batch_size or 1)
        elif batch_size is not None and len(prompt) == 1:
            prompt = list(prompt) * batch_size
        return [[BOS, *tok.encode(p), BOL] for p in prompt], [[BOS, BOL] for _ in prompt]

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str], None] = None,
        class_labels=None,
        batch_size: Optional[int] = None,
        num_head_steps: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        temperature: Optional[float] = None,
        generator=None,
        output_type: str = "pil",
        return_dict: bool = True,
        use_kv_cache: bool = True,
        guidance_interval: Optional[tuple[float, float]] = None,
        scheduler=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generate one sample per prompt (or class id / name).

        ``prompt``: a string (repeated ``batch_size`` times, or once per generator in a list) or a
        list of strings; ``""``/None is unconditional. ``num_head_steps`` (alias
        ``num_inference_steps``): DPM-Solver++ steps of the diffusion head per latent.
        ``guidance_scale`` w: 1 is off. ``temperature``: scale of the head's initial noise.
        ``guidance_interval=(lo, hi)``: guidance only for head times t in [lo, hi]. ``scheduler`` (or
        ``pipe.scheduler``): a diffusers flow scheduler for every head solve instead of DPM-Solver++(2M).
        ``callback_on_step_end(pipe, i, timestep, {"latents": z})`` runs after the head solve of latent token
        ``i`` (``z`` ``[B, D]``, ``timestep`` 0); a returned ``latents`` replaces the token before the decoder reads it.
        ``generator``: one ``torch.Generator`` or a list of one per sample. Images come back as
        ``ImagePipelineOutput`` (pil / np / pt in [0, 1]), audio as ``AudioPipelineOutput`` (np, (B, 1, N)).
        """
        if isinstance(generator, list) and batch_size is None:
            batch_size = len(generator)
        cond, null = self._prefixes(prompt, class_labels, batch_size)
        if isinstance(generator, list) and len(generator) != len(cond):
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {len(cond)}")
        steps = num_head_steps or num_inference_steps or self.config.num_head_steps
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        temp = self.config.temperature if temperature is None else temperature
        show_progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        on_latent = tensor_hook(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        tokens = generate_latents(self.transformer, cond, null, steps, w, temp, generator, use_kv_cache=use_kv_cache,
                                  progress=show_progress, scheduler=scheduler if scheduler is not None else self.scheduler,
                                  guidance_interval=guidance_interval, on_latent=on_latent)
        latents = self.transformer.tokens_to_latents(tokens)
        if output_type == "latent":
            return ImagePipelineOutput(images=latents) if return_dict else (latents,)
        decoded = self.vae.decode(latents.to(self.vae.dtype)).clamp(-1, 1)
        self.maybe_free_model_hooks()
        if self.transformer.config.modality == "audio":
            audios = decoded.float().cpu().numpy()
            return AudioPipelineOutput(audios=audios) if return_dict else (audios,)
        images = self.images_to_output(decoded, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def caption(self, images, max_new_tokens: Optional[int] = None, temperature: float = 0.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None, generator=None,
                use_kv_cache: bool = True) -> list[str]:
        """Text for each input: images ``(B, C, H, W)`` / audio ``(B, 1, N)`` in [-1, 1] (tensor or
        array), or a list of PIL images. Greedy by default (``temperature=0``)."""
        x = _as_tensor(images)
        device = self._execution_device
        latents = self.vae.encode(x.to(device=device, dtype=self.vae.dtype))
        tokens = self.transformer.latents_to_tokens(latents)
        segments = [[[BOS, BOL], LATENT, [EOL]] for _ in range(len(tokens))]
        ids = generate_text(self.transformer, segments, tokens, max_new_tokens or self.transformer.config.max_text_length + 1,
                            temperature, top_k, top_p, generator, use_kv_cache=use_kv_cache)
        return [self.text_tokenizer.decode(row) for row in ids]


def _as_tensor(images) -> torch.Tensor:
    if torch.is_tensor(images):
        return images.float()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).float()
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    raise ValueError(f"images: expected a tensor, an array or a list of PIL images, got {type(images).__name__}")
