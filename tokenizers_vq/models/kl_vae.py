"""KLVAE: the standard Gaussian VAE of LDM (Rombach et al. 2022, Sec. 3 / App. G; Kingma & Welling 2014).

The encoder predicts mean and log-variance (clamped to [-30, 20] as in LDM); ``z = mean + std * eps``
in training. KL to N(0, I) in closed form, summed over latent elements and averaged over the batch:
``KL = 0.5 * sum(mean^2 + var - 1 - logvar)``; the regulariser is ``kl_weight * KL``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.accelerate_utils import apply_forward_hook

from .common import LatentNormMixin, TokenizerOutput, build_encoder_decoder, downsample_factor


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mean, exp(logvar)) || N(0, I)), summed per sample, averaged over the batch."""
    per_element = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return per_element.flatten(1).sum(1).mean()


class KLVAE(ModelMixin, ConfigMixin, LatentNormMixin):
    @register_to_config
    def __init__(self, modality: str = "image", in_channels: int = 3, base_channels: int = 64,
                 ch_mult: Sequence[int] = (1, 2, 4), num_res_blocks: int = 1, attention: bool = False,
                 strides: Sequence[int] = (2, 4, 5, 8), latent_channels: int = 8, kl_weight: float = 1e-6,
                 scaling_factor: float = 1.0, shift_factor: float = 0.0, full_rate_blocks: bool = True,
                 istft_levels: int = 0):
        super().__init__()
        self.encoder, self.decoder = build_encoder_decoder(modality, in_channels, 2 * latent_channels,
                                                           latent_channels, base_channels, ch_mult,
                                                           num_res_blocks, attention, strides, full_rate_blocks,
                                                           istft_levels)
        self.downsample_factor = downsample_factor(modality, ch_mult, strides)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def posterior_std(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element std of the normalised posterior, ``exp(logvar / 2) * scaling_factor`` (same shape as ``encode``)."""
        return (0.5 * self.posterior(x)[1]).exp() * self.config.scaling_factor

    @apply_forward_hook
    def encode(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Normalised posterior mode (``sample=False``) or a posterior sample."""
        mean, logvar = self.posterior(x)
        z = mean
        if sample:
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device,
                                                          dtype=mean.dtype)
        return self.normalize_latents(z)

    @apply_forward_hook
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.denormalize_latents(latents))

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> TokenizerOutput:
        mean, logvar = self.posterior(x)
        z = mean
        if self.training:
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device,
                                                          dtype=mean.dtype)
        kl = gaussian_kl(mean.float(), logvar.float())
        return TokenizerOutput(sample=self.decoder(z), latent=z, reg_loss=self.config.kl_weight * kl,
                               stats={"kl": float(kl.detach())})

    @property
    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight
