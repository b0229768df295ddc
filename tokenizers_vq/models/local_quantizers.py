"""Minimal FSQ and EMA-VQ used only when ``tokenizers_vq.quantizers`` is not importable.

They follow the shared contract ``forward(z) -> QuantizerOutput(z_q, indices, loss, stats)`` on
channel-last tokens ``(..., D)`` and ``indices_to_codes(indices) -> z_q``; the full-featured versions
live in ``tokenizers_vq.quantizers`` and are preferred by :func:`build_quantizer`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict = field(default_factory=dict)


def _usage_stats(indices: torch.Tensor, codebook_size: int) -> dict:
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


class LocalFSQ(nn.Module):
    """FSQ (Mentzer et al. 2024, Sec. 3): tanh bound with half-level offset for even L, STE rounding."""

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        levels_t = torch.tensor(list(levels), dtype=torch.int64)
        self.register_buffer("levels", levels_t, persistent=False)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), levels_t[:-1]]), 0)
        self.register_buffer("basis", basis, persistent=False)
        self.dim = len(levels)
        self.codebook_size = int(torch.prod(levels_t))

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        levels = self.levels.float()
        half_l = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self._bound(z.float())
            rounded = bounded + (bounded.round() - bounded).detach()
            half_width = (self.levels // 2).float()
            z_q = rounded / half_width
            indices = ((rounded.round() + half_width).long() * self.basis).sum(-1)
        return QuantizerOutput(z_q.to(z.dtype), indices, z.new_zeros(()), _usage_stats(indices, self.codebook_size))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels
        half_width = (self.levels // 2).float()
        return (digits.float() - half_width) / half_width


class LocalEMAVQ(nn.Module):
    """VQ with EMA codebook (van den Oord et al. 2017, App. A.1; Laplace smoothing), commitment beta
    and dead-code restart from encoder outputs (EnCodec / SoundStream)."""

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, beta: float = 0.25,
                 dead_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim, self.decay, self.beta = codebook_size, dim, decay, beta
        self.dead_threshold, self.eps = dead_threshold, eps
        self.register_buffer("codebook", torch.randn(codebook_size, dim))
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().reshape(-1, self.dim)
            if self.training and not bool(self.initialized):
                self._reseed(torch.ones(self.codebook_size, dtype=torch.bool, device=flat.device), flat)
                self.initialized.fill_(True)
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)
            indices = dist.argmin(1)
            codes = self.codebook[indices]
            if self.training:
                self._ema_update(flat, indices)
            loss = self.beta * F.mse_loss(flat, codes.detach())
            z_q = flat + (codes - flat).detach()
        stats = _usage_stats(indices, self.codebook_size)
        return QuantizerOutput(z_q.reshape(z.shape).to(z.dtype), indices.reshape(z.shape[:-1]), loss, stats)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.zeros(self.codebook_size, device=flat.device).index_add_(0, indices, torch.ones_like(indices, dtype=torch.float))
        sums = torch.zeros_like(self.codebook).index_add_(0, indices, flat)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        self._reseed(self.cluster_size < self.dead_threshold, flat)

    @torch.no_grad()
    def _reseed(self, dead: torch.Tensor, flat: torch.Tensor) -> None:
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        picks = torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)
        self.codebook[dead] = flat[picks]
        self.embed_sum[dead] = flat[picks]
        self.cluster_size[dead] = 1.0

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook[indices]
