"""VQTokenizer: conv encoder -> quantizer (vq / simvq / fsq / rvq / rfsq / msvq) -> conv decoder.

VQ-VAE / VQGAN (van den Oord et al. 2017; Esser et al. 2021, Sec. 3.1), FSQ (Mentzer et al. 2024),
residual VQ (SoundStream / DAC) and VAR's multi-scale residual VQ (Tian et al. 2024, Sec. 3.2), for
images (2D) and waveforms (1D). The quantizer's ``loss`` is the codebook/commitment term.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.accelerate_utils import apply_forward_hook

from .common import LatentNormMixin, TokenizerOutput, build_encoder_decoder, downsample_factor
from .quantizer_factory import build_quantizer, quantizer_dim


class VQTokenizer(ModelMixin, ConfigMixin, LatentNormMixin):
    """Discrete tokenizer. ``encode(x)`` -> normalised quantized latents, ``decode(latents)`` -> x,
    ``encode_indices(x)`` -> int64 indices, ``decode_indices(indices)`` -> x.

    Image options of the LDM / VAR VQVAE: ``attn_levels`` (self-attention after every ResNet block of
    those ``ch_mult`` levels, encoder and decoder) and ``quant_conv_kernel`` (k x k ``quant_conv`` at the
    encoder's end and ``post_quant_conv`` at the decoder's start; 0 = none). VAR's
    ``vae_ch160v4096z32`` is ``base_channels=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
    attention=True, attn_levels=(4,), quant_conv_kernel=3, quantizer="msvq", latent_channels=32``.
    """

    @register_to_config
    def __init__(self, modality: str = "image", in_channels: int = 3, base_channels: int = 64,
                 ch_mult: Sequence[int] = (1, 2, 4), num_res_blocks: int = 1, attention: bool = False,
                 strides: Sequence[int] = (2, 4, 5, 8), quantizer: str = "fsq", latent_channels: int = 8,
                 codebook_size: int = 4096, fsq_levels: Sequence[int] = (8, 8, 8, 8),
                 codebook_dim: Optional[int] = None, cosine: bool = False, codebook_update: str = "ema",
                 ema_decay: float = 0.99, kmeans_init: bool = False, dead_code_threshold: float = 0.0,
                 gradient: str = "ste", commitment_beta: float = 0.25, num_quantizers: int = 1,
                 quantizer_dropout: float = 0.0, scales: Sequence[int] = (1, 2, 3, 4, 6, 8),
                 scaling_factor: float = 1.0, shift_factor: float = 0.0, full_rate_blocks: bool = True,
                 istft_levels: int = 0, attn_levels: Sequence[int] = (), quant_conv_kernel: int = 0):
        super().__init__()
        dim = quantizer_dim(quantizer, latent_channels, fsq_levels)
        self.encoder, self.decoder = build_encoder_decoder(modality, in_channels, dim, dim, base_channels, ch_mult,
                                                           num_res_blocks, attention, strides, full_rate_blocks,
                                                           istft_levels, attn_levels, quant_conv_kernel)
        self.quantize_layer = build_quantizer(
            quantizer, dim, codebook_size=codebook_size, fsq_levels=fsq_levels, codebook_dim=codebook_dim,
            cosine=cosine, codebook_update=codebook_update, ema_decay=ema_decay, kmeans_init=kmeans_init,
            dead_code_threshold=dead_code_threshold, gradient=gradient, commitment_beta=commitment_beta,
            num_quantizers=num_quantizers, quantizer_dropout=quantizer_dropout, scales=scales)
        self.latent_dim = dim
        self.downsample_factor = downsample_factor(modality, ch_mult, strides)

    # channel-first maps <-> channel-last tokens for the token-wise quantizers
    def _quantize(self, z: torch.Tensor, generator: Optional[torch.Generator] = None):
        if self.config.quantizer == "msvq":
            out = self.quantize_layer(z)
            return out, out.z_q
        kwargs = {} if self.config.quantizer in ("fsq",) else {"generator": generator}
        out = self.quantize_layer(z.movedim(1, -1), **kwargs)
        return out, out.z_q.movedim(-1, 1)

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized latent before normalisation (what the decoder eats)."""
        return self._quantize(self.encoder(x))[1]

    @apply_forward_hook
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize_latents(self.encode_raw(x))

    @apply_forward_hook
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.denormalize_latents(latents))

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(self.encoder(x))[0].indices

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.quantize_layer.indices_to_codes(indices)
        if self.config.quantizer != "msvq":
            codes = codes.movedim(-1, 1)
        return self.decoder(codes)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> TokenizerOutput:
        out, z_q = self._quantize(self.encoder(x), generator)
        stats = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in (out.stats or {}).items() if torch.is_tensor(v) and v.numel() == 1
                 or isinstance(v, (int, float))}
        loss = out.loss if torch.is_tensor(out.loss) else x.new_tensor(float(out.loss))
        return TokenizerOutput(sample=self.decoder(z_q), latent=z_q, reg_loss=loss.mean(),
                               indices=out.indices, stats=stats)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's last conv: the VQGAN adaptive GAN weight is measured here."""
        return self.decoder.conv_out.weight
