"""A diffusers ``AutoencoderKL`` folder (SD-VAE, SDXL-VAE, FLUX-VAE, ...) as a genmod tokenizer.

The LDM KL autoencoder (Rombach et al. 2022, Sec. 3 and App. G) behind genmod's tokenizer interface
(docs/DESIGN.md §4): ``encode(x) -> latents`` normalised with the folder's ``scaling_factor`` /
``shift_factor`` (``latents = (z - shift) * scale``, the SD3 / FLUX convention; SD-VAE has no shift),
``decode(latents) -> x`` in [-1, 1]. ``encode`` returns the posterior mean, or a posterior sample with
``sample=True``, as genmod's ``KLVAE`` does. The weights and config keys are diffusers' own, so a folder
saved by this class also loads with ``diffusers.AutoencoderKL.from_pretrained``.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin  # noqa: F401  (pipeline loading looks ModelMixin up here)



class DiffusersAutoencoderKL(AutoencoderKL):
    """``diffusers.AutoencoderKL`` with genmod's ``encode`` / ``decode`` (normalised latents, pixels in [-1, 1])."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a diffusers ``AutoencoderKL`` folder; its config gains ``modality="image"`` (read by genmod's data code)."""
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model.register_to_config(modality="image")
        return model

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """``modality`` is genmod's key, not an ``AutoencoderKL`` argument: leave it out of the init."""
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "modality"}, **kwargs)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def latent_norm(self) -> tuple[float, float]:
        """``(scaling_factor, shift_factor)`` of the config; a missing / null shift is 0 (SD-VAE)."""
        return float(self.config.scaling_factor), float(self.config.get("shift_factor") or 0.0)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Normalised posterior mean (``sample=False``) or a posterior sample of images ``[B, C, H, W]`` in [-1, 1]."""
        dist = super().encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        scale, shift = self.latent_norm
        return (z - shift) * scale

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> torch.Tensor:
        """Images in [-1, 1] from normalised latents (``decode(z / scale + shift)`` of diffusers)."""
        scale, shift = self.latent_norm
        return super().decode(latents / scale + shift).sample

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return super().encode(x).latent_dist.mean

    def posterior_std(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element std of the normalised posterior (the latent distribution's std times ``scaling_factor``)."""
        return super().encode(x).latent_dist.std * self.latent_norm[0]

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Reconstruction of ``x`` through the posterior mean (diffusers' own forward needs its encode)."""
        return self.decode(self.encode(x))


def is_autoencoder_kl(config: dict) -> bool:
    """Whether a ``config.json`` describes a diffusers ``AutoencoderKL`` (or a folder saved by this class)."""
    return config.get("_class_name") in ("AutoencoderKL", DiffusersAutoencoderKL.__name__)
