"""SigmaVAE: LatentLM's sigma-VAE (Sun et al. 2024, "Multimodal Latent Language Modeling with
Next-Token Diffusion", Sec. 2.3).

The encoder predicts the mean ``mu`` only. During training a per-sample scalar noise scale
``sigma ~ N(0, (C_sigma / 0.8)^2)`` (its sign is irrelevant, ``|N|`` in the paper's notation) multiplies
``eps ~ N(0, I)``: ``z = mu + sigma * eps``. Because sigma is fixed rather than learned, the latent keeps
variance (no variance collapse) for autoregressive next-token diffusion. The regulariser is the L2 pull
``mean_l2_weight * mean(mu^2)``. At evaluation the latent is ``mu`` (deterministic); ``encode(x, sample=True)``
gives the noisy sample (what LatentLM's language model is trained on).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.accelerate_utils import apply_forward_hook

from .common import LatentNormMixin, TokenizerOutput, build_encoder_decoder, downsample_factor


class SigmaVAE(ModelMixin, ConfigMixin, LatentNormMixin):
    @register_to_config
    def __init__(self, modality: str = "image", in_channels: int = 3, base_channels: int = 64,
                 ch_mult: Sequence[int] = (1, 2, 4), num_res_blocks: int = 1, attention: bool = False,
                 strides: Sequence[int] = (2, 4, 5, 8), latent_channels: int = 8, sigma_std: float = 0.75,
                 mean_l2_weight: float = 1e-2, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 full_rate_blocks: bool = True, istft_levels: int = 0):
        super().__init__()
        self.encoder, self.decoder = build_encoder_decoder(modality, in_channels, latent_channels, latent_channels,
                                                           base_channels, ch_mult, num_res_blocks, attention, strides,
                                                           full_rate_blocks, istft_levels)
        self.downsample_factor = downsample_factor(modality, ch_mult, strides)

    @property
    def sigma_scale(self) -> float:
        """Std of the per-sample sigma distribution, ``C_sigma / 0.8`` as in the LatentLM code."""
        return self.config.sigma_std / 0.8

    def sample_sigma(self, batch: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        return self.sigma_scale * torch.randn(batch, generator=generator, device=device)

    def add_noise(self, mu: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``z = mu + sigma_b * eps`` with one sigma per sample (the training-time latent)."""
        sigma = self.sample_sigma(mu.shape[0], generator, mu.device).to(mu.dtype)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + sigma.view(-1, *([1] * (mu.dim() - 1))) * eps

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def posterior_std(self, x: torch.Tensor) -> None:
        """None: a sigma-VAE has no per-element posterior std; its noise scale is drawn per item (:meth:`add_noise`)."""
        return None

    @apply_forward_hook
    def encode(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Normalised latent: ``mu`` (``sample=False``), or the training-time sample ``mu + sigma_b * eps``
        (one sigma per item, :meth:`add_noise`), which LatentLM's language model trains on."""
        mu = self.encoder(x)
        return self.normalize_latents(self.add_noise(mu, generator) if sample else mu)

    @apply_forward_hook
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.denormalize_latents(latents))

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> TokenizerOutput:
        mu = self.encoder(x)
        z = self.add_noise(mu, generator) if self.training else mu
        mean_l2 = mu.float().pow(2).mean()
        return TokenizerOutput(sample=self.decoder(z), latent=z, reg_loss=self.config.mean_l2_weight * mean_l2,
                               stats={"mean_l2": float(mean_l2.detach()), "latent_std": float(mu.detach().float().std())})

    @property
    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight
