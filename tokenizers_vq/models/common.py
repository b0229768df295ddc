"""Pieces every tokenizer model shares: the encoder/decoder factory, latent normalisation and its
statistics, and the forward output type.

Latent normalisation follows diffusers (SD3 / Flux convention):
``latents = (z - shift_factor) * scaling_factor`` and ``z = latents / scaling_factor + shift_factor``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .blocks import Decoder1d, Decoder2d, Encoder1d, Encoder2d

MODALITY_KEYS = {"image": "image", "audio": "audio"}


@dataclass
class TokenizerOutput(BaseOutput):
    """``sample``: reconstruction; ``latent``: the (unnormalised) latent fed to the decoder;
    ``reg_loss``: the weighted quantizer / KL / mean-L2 term; ``indices``: code indices (discrete only);
    ``stats``: float logs (usage, perplexity, kl, ...)."""

    sample: torch.Tensor
    latent: torch.Tensor
    reg_loss: torch.Tensor
    indices: Optional[torch.Tensor] = None
    stats: dict = field(default_factory=dict)


def build_encoder_decoder(modality: str, in_channels: int, enc_out: int, dec_in: int, base_channels: int,
                          ch_mult: Sequence[int], num_res_blocks: int, attention: bool, strides: Sequence[int],
                          full_rate_blocks: bool = True, istft_levels: int = 0, attn_levels: Sequence[int] = (),
                          quant_conv_kernel: int = 0):
    """Image (2D, ``ch_mult``; ``attn_levels`` / ``quant_conv_kernel``: see ``blocks``) or waveform (1D,
    ``strides``; ``full_rate_blocks``: see ``Encoder1d``, ``istft_levels``: see ``Decoder1d``) encoder and decoder."""
    if modality == "image":
        attn_levels = check_attn_levels(attn_levels, len(ch_mult))
        return (Encoder2d(in_channels, enc_out, base_channels, ch_mult, num_res_blocks, attention, attn_levels,
                          quant_conv_kernel),
                Decoder2d(dec_in, in_channels, base_channels, ch_mult, num_res_blocks, attention, attn_levels,
                          quant_conv_kernel))
    if attn_levels or quant_conv_kernel:
        raise ValueError("attn_levels / quant_conv_kernel: image options; use 0 / () for audio")
    if modality == "audio":
        return (Encoder1d(in_channels, enc_out, base_channels, strides, attention, full_rate_blocks),
                Decoder1d(dec_in, in_channels, base_channels, strides, attention, full_rate_blocks, istft_levels))
    raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}")


def check_attn_levels(attn_levels: Sequence[int], num_levels: int) -> tuple:
    """``attn_levels`` as a tuple of distinct level indices in ``[0, num_levels)`` (one-line error otherwise)."""
    levels = tuple(int(v) for v in attn_levels)
    if any(not 0 <= v < num_levels for v in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"attn_levels: need distinct levels in [0, {num_levels - 1}] (one per ch_mult entry), got {list(levels)}")
    return levels


def downsample_factor(modality: str, ch_mult: Sequence[int], strides: Sequence[int]) -> int:
    if modality == "image":
        return 2 ** (len(ch_mult) - 1)
    result = 1
    for s in strides:
        result *= s
    return result


def batch_input(batch, modality: str) -> torch.Tensor:
    """The tensor a tokenizer eats from a dataset batch (dict with "image"/"audio") or a tensor."""
    if isinstance(batch, torch.Tensor):
        return batch
    key = MODALITY_KEYS[modality]
    if key not in batch:
        raise KeyError(f"batch has no {key!r} key (keys: {sorted(batch)}); modality={modality!r}")
    return batch[key]


class LatentNormMixin:
    """Normalisation with ``scaling_factor`` / ``shift_factor`` kept in the model config."""

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.config.scaling_factor + self.config.shift_factor

    def _raw_sample(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """An un-normalised posterior sample (the tokenizer's ``encode(x, sample=True)`` with the norm undone)."""
        return self.denormalize_latents(self.encode(x, sample=True, generator=generator))

    @torch.no_grad()
    def compute_latent_stats(self, dataloader: Iterable, max_batches: Optional[int] = None, sample: bool = False,
                             generator: Optional[torch.Generator] = None) -> dict:
        """Global mean / std of the raw latents over ``dataloader``: the deterministic ones, or with ``sample=True``
        posterior samples (``encode(x, sample=True)``; LatentLM takes its statistics from sigma-VAE samples);
        stores ``shift_factor = mean`` and ``scaling_factor = 1 / std`` in the config so that :meth:`encode`
        returns latents with mean 0 and std 1 on that data."""
        was_training = self.training
        self.eval()
        total = total_sq = 0.0
        count = 0
        device = next(self.parameters()).device
        for i, batch in enumerate(tqdm(dataloader, desc="latent stats", leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            x = batch_input(batch, self.config.modality).to(device)
            z = (self._raw_sample(x, generator) if sample else self.encode_raw(x)).double()
            total += z.sum().item()
            total_sq += z.pow(2).sum().item()
            count += z.numel()
        if count == 0:
            raise ValueError("compute_latent_stats: dataloader yielded no batches")
        mean = total / count
        std = max(total_sq / count - mean * mean, 1e-12) ** 0.5
        self.register_to_config(shift_factor=float(mean), scaling_factor=float(1.0 / std))
        self.train(was_training)
        return {"shift_factor": float(mean), "scaling_factor": float(1.0 / std)}
