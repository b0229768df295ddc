"""VAR's multi-scale residual quantizer (Tian et al. 2024, §3.2 and Alg. 1/2; generators.md §1.1,
tokenizers.md §2.9): one shared codebook over scales, area down / bicubic up, phi convolutions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantizerBase, QuantizerOutput, all_reduce_sum_, code_histogram_stats, fp32_no_autocast
from .search import DEFAULT_CODE_CHUNK, DEFAULT_TOKEN_CHUNK, nearest_codes

DEFAULT_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class Phi(nn.Module):
    """phi(h) = (1 - g) h + g Conv3x3(h) (VAR ``quant_resi``); g = 0 is the identity."""

    def __init__(self, channels: int, gamma: float = 0.5):
        super().__init__()
        self.gamma = gamma
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if abs(gamma) > 1e-6 else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return h
        return (1.0 - self.gamma) * h + self.gamma * F.conv2d(h, self.conv.weight.float(), self.conv.bias.float(), padding=1)


def phi_ticks(num_phi: int) -> np.ndarray:
    """VAR's tick positions: linspace(1/(3K'), 1 - 1/(3K'), K') for K' = 4, else
    linspace(1/(2K'), 1 - 1/(2K'), K'). float64 numpy on purpose: for 10 scales and K' = 4, scale 2
    sits exactly between two ticks and the reference's float64 rounding decides the tie."""
    if num_phi == 4:
        return np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    return np.linspace(1 / 2 / num_phi, 1 - 1 / 2 / num_phi, num_phi)


def phi_index_for_scale(k: int, num_scales: int, num_phi: int) -> int:
    """Scale k uses the phi whose tick is nearest to k / (K - 1) (partially shared phi)."""
    if num_phi == 1:
        return 0
    position = k / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(num_phi) - position)))


class MultiScaleResidualVQ(QuantizerBase):
    """Multi-scale residual VQ over channel-first maps ``(B, C, H, W)``.

    Per scale k with size (h_k, w_k) (Alg. 1): r_k = area-downsample(f_rest); idx_k = nearest code;
    h = phi_k(bicubic-upsample(C[idx_k]) to (H, W)); f_hat += h; f_rest -= h. The last scale must be
    (H, W) and is neither resized down nor up. Loss = mean over scales of
    beta * ||sg(f_hat) - f||^2 + ||f_hat - sg(f)||^2 on the cumulative f_hat; output
    z_q = f + sg(f_hat - f) (straight-through).

    Args:
        dim: channels C (Cvae).
        codebook_size: V, one codebook shared by all scales.
        scales: ints (square) or (h, w) pairs, increasing, the last equal to the input size.
        beta: commitment weight.
        phi_gamma: g in phi (0 disables phi).
        share_quant_resi: number of distinct phi convs (VAR: 4); 0 = one per scale, 1 = one shared.
        cosine: l2-normalised lookup (VAR ``using_znorm``).
        usage_decay: EMA decay of the per-scale hit counts kept for usage logging.

    ``forward`` returns indices as ``(B, L)`` (scales concatenated in raster order, L = sum h_k w_k).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 4096,
        scales: Sequence[int | Sequence[int]] = DEFAULT_SCALES,
        beta: float = 0.25,
        phi_gamma: float = 0.5,
        share_quant_resi: int = 4,
        cosine: bool = False,
        usage_decay: float = 0.99,
        token_chunk: int | None = DEFAULT_TOKEN_CHUNK,
        code_chunk: int | None = DEFAULT_CODE_CHUNK,
    ):
        super().__init__()
        parsed = []
        for s in scales:
            hw = (int(s), int(s)) if isinstance(s, (int,)) else tuple(int(v) for v in s)
            if len(hw) != 2 or min(hw) < 1:
                raise ValueError(f"MultiScaleResidualVQ: each scale must be an int or (h, w) pair >= 1, got {s!r}")
            parsed.append(hw)
        if len(parsed) == 0:
            raise ValueError("MultiScaleResidualVQ: scales must be non-empty")
        if share_quant_resi < 0:
            raise ValueError(f"MultiScaleResidualVQ: share_quant_resi must be >= 0, got {share_quant_resi}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.scales = tuple(parsed)
        self.beta = beta
        self.cosine = cosine
        self.usage_decay = usage_decay
        self.token_chunk = token_chunk
        self.code_chunk = code_chunk
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.normal_(self.codebook.weight, std=1.0)
        num_phi = len(self.scales) if share_quant_resi == 0 else share_quant_resi
        self.phis = nn.ModuleList(Phi(dim, phi_gamma) for _ in range(num_phi))
        self.phi_of_scale = [phi_index_for_scale(k, len(self.scales), num_phi) for k in range(len(self.scales))]
        self.register_buffer("ema_hits_per_scale", torch.zeros(len(self.scales), codebook_size))

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def full_size(self) -> tuple[int, int]:
        return self.scales[-1]

    def _check_map(self, f: torch.Tensor) -> None:
        if f.ndim != 4 or f.shape[1] != self.dim:
            raise ValueError(f"MultiScaleResidualVQ: f must be (B, {self.dim}, H, W), got shape {tuple(f.shape)}")
        if tuple(f.shape[-2:]) != self.full_size:
            raise ValueError(f"MultiScaleResidualVQ: map size {tuple(f.shape[-2:])} != last scale {self.full_size}")

    def _codes(self) -> torch.Tensor:
        weight = self.codebook.weight.float()
        return F.normalize(weight, dim=1) if self.cosine else weight

    def _lookup(self, r: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> nearest-code indices (B, h, w)."""
        b, c, h, w = r.shape
        flat = r.permute(0, 2, 3, 1).reshape(-1, c)
        if self.cosine:
            flat = F.normalize(flat, dim=1)
        idx, _ = nearest_codes(flat.detach(), self._codes().detach(), self.token_chunk, self.code_chunk)
        return idx.view(b, h, w)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Index map (B, h, w) -> code map (B, C, h, w)."""
        return F.embedding(indices.long(), self._codes()).permute(0, 3, 1, 2)

    def scale_contribution(self, k: int, code_map: torch.Tensor) -> torch.Tensor:
        """h = phi_k(bicubic-upsample(code_map) to full size) (no resize at full size)."""
        if tuple(code_map.shape[-2:]) != self.full_size:
            code_map = F.interpolate(code_map, size=self.full_size, mode="bicubic")
        return self.phis[self.phi_of_scale[k]](code_map)

    def next_autoregressive_input(self, k: int, f_hat: torch.Tensor, code_map: torch.Tensor):
        """One step of VAR sampling/teacher forcing: add scale k's contribution (code map
        ``(B, C, h_k, w_k)``) to ``f_hat`` and return ``(new_f_hat, next_input)`` where ``next_input``
        is the new f_hat area-downsampled to scale k+1 (the full f_hat after the last scale)."""
        if not 0 <= k < self.num_scales:
            raise ValueError(f"next_autoregressive_input: k must be in [0, {self.num_scales}), got {k}")
        with fp32_no_autocast(code_map.device.type):
            new_f_hat = f_hat.float() + self.scale_contribution(k, code_map.float())
            if k == self.num_scales - 1:
                return new_f_hat, new_f_hat
            next_size = self.scales[k + 1]
            next_input = new_f_hat if next_size == self.full_size else F.interpolate(new_f_hat, size=next_size, mode="area")
            return new_f_hat, next_input

    # ------------------------------------------------------------------ forward / encode / decode
    def _run_scales(self, f: torch.Tensor):
        """Shared encoder loop; returns (index maps, f_hat with grad, per-scale loss list)."""
        f = f.float()
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f)
        index_maps, losses = [], []
        for k, size in enumerate(self.scales):
            r = f_rest if size == self.full_size else F.interpolate(f_rest, size=size, mode="area")
            idx = self._lookup(r)
            h = self.scale_contribution(k, self.embed(idx))
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            index_maps.append(idx)
            losses.append(self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach()))
        return index_maps, f_hat, losses

    def forward(self, f: torch.Tensor) -> QuantizerOutput:
        self._check_map(f)
        in_dtype = f.dtype
        with fp32_no_autocast(f.device.type):
            index_maps, f_hat, losses = self._run_scales(f)
            z_q = f.float() + (f_hat - f.float()).detach()  # VAR's final straight-through on f_hat
            loss = torch.stack(losses).mean()
            stats = self._usage_stats(index_maps)
        indices = torch.cat([m.flatten(1) for m in index_maps], dim=1)
        return QuantizerOutput(z_q.to(in_dtype), indices, loss, stats)

    @torch.no_grad()
    def _usage_stats(self, index_maps) -> dict:
        counts = torch.stack([torch.bincount(m.reshape(-1), minlength=self.codebook_size).float() for m in index_maps])
        if self.training:
            all_reduce_sum_(counts)
            self.ema_hits_per_scale.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        per_scale = [code_histogram_stats(c) for c in counts]
        stats = code_histogram_stats(counts.sum(0))
        stats["dead_codes"] = stats["unused_codes"]
        stats["usage_per_scale"] = torch.stack([s["usage"] for s in per_scale])
        stats["perplexity_per_scale"] = torch.stack([s["perplexity"] for s in per_scale])
        return stats

    @torch.no_grad()
    def encode_scales(self, f: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> list of int64 index maps (B, h_k, w_k), coarse to fine."""
        self._check_map(f)
        with fp32_no_autocast(f.device.type):
            return self._run_scales(f)[0]

    def split_indices(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) concatenated indices -> list of (B, h_k, w_k) maps."""
        expected = sum(h * w for h, w in self.scales)
        if indices.ndim != 2 or indices.shape[1] != expected:
            raise ValueError(f"MultiScaleResidualVQ: indices must be (B, {expected}), got {tuple(indices.shape)}")
        maps, start = [], 0
        for h, w in self.scales:
            maps.append(indices[:, start:start + h * w].reshape(-1, h, w))
            start += h * w
        return maps

    def _as_maps(self, indices) -> list[torch.Tensor]:
        maps = self.split_indices(indices) if torch.is_tensor(indices) else list(indices)
        if len(maps) > self.num_scales:
            raise ValueError(f"MultiScaleResidualVQ: got {len(maps)} index maps for {self.num_scales} scales")
        for k, m in enumerate(maps):
            if tuple(m.shape[-2:]) != self.scales[k]:
                raise ValueError(f"MultiScaleResidualVQ: index map {k} has size {tuple(m.shape[-2:])}, expected {self.scales[k]}")
        return maps

    def decode_scales(self, indices) -> torch.Tensor:
        """List of index maps (the first n scales, n <= K) or (B, L) indices -> f_hat (B, C, H, W)."""
        maps = self._as_maps(indices)
        f_hat = torch.zeros(maps[0].shape[0], self.dim, *self.full_size, device=maps[0].device)
        for k, m in enumerate(maps):
            f_hat, _ = self.next_autoregressive_input(k, f_hat, self.embed(m))
        return f_hat

    def indices_to_codes(self, indices) -> torch.Tensor:
        return self.decode_scales(indices)

    def forward_channel_first(self, f: torch.Tensor) -> QuantizerOutput:
        """This quantizer is channel-first already: same as ``forward``."""
        return self(f)

    def scales_to_teacher_forcing_inputs(self, indices) -> torch.Tensor:
        """VAR's teacher-forcing input (``idxBl_to_var_input``): for k = 0..K-2 the accumulated f_hat
        after scale k, area-downsampled to scale k+1, flattened and concatenated:
        (B, L - h_0 w_0, C)."""
        maps = self._as_maps(indices)
        if len(maps) != self.num_scales:
            raise ValueError(f"scales_to_teacher_forcing_inputs: need all {self.num_scales} scales, got {len(maps)}")
        f_hat = torch.zeros(maps[0].shape[0], self.dim, *self.full_size, device=maps[0].device)
        inputs = []
        for k in range(self.num_scales - 1):
            f_hat, next_input = self.next_autoregressive_input(k, f_hat, self.embed(maps[k]))
            inputs.append(next_input.flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)
