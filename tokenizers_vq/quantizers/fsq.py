"""Finite Scalar Quantization (Mentzer, Minnen, Agustsson, Tschannen; ICLR 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import QuantizerBase, QuantizerOutput, check_last_dim, code_histogram_stats, fp32_linear, fp32_no_autocast

# Paper Table 1: recommended levels per target codebook size.
RECOMMENDED_LEVELS = {
    2 ** 8: (8, 6, 5),
    2 ** 10: (8, 5, 5, 5),
    2 ** 12: (7, 5, 5, 5, 5),
    2 ** 14: (8, 8, 8, 6, 5),
    2 ** 16: (8, 8, 8, 5, 5, 5),
}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (FSQ §3)."""
    return x + (x.round() - x).detach()


class FSQ(QuantizerBase):
    """FSQ over channel-last inputs ``(..., dim)``.

    Each of the ``len(levels)`` channels is bounded to L_i values with
    f(z) = tanh(z + shift) * half_l - offset, half_l = (L-1)(1+eps)/2, offset = 0.5 for even L
    (else 0), shift = atanh(offset / half_l) (paper App. A), rounded with a straight-through
    estimator and rescaled by floor(L/2), so codes lie on {-floor(L/2), ..., L - 1 - floor(L/2)} /
    floor(L/2). The implicit codebook has prod(levels) entries; indices are the mixed-radix number
    with digits (code + floor(L/2)) and basis cumprod([1, L0, L1, ...]) (int64).
    When ``dim`` differs from ``len(levels)`` linear ``project_in`` / ``project_out`` are added.
    """

    def __init__(self, levels: Sequence[int], dim: int | None = None, eps: float = 1e-3):
        super().__init__()
        levels = [int(v) for v in levels]
        if len(levels) == 0 or any(v < 3 for v in levels):
            raise ValueError(f"FSQ: levels must be a non-empty list of integers >= 3 (L=2 is degenerate), got {levels}")
        self.levels = tuple(levels)
        self.num_channels = len(levels)
        self.dim = dim or self.num_channels
        self.eps = eps
        self.codebook_size = math.prod(levels)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), dim=0)
        self.register_buffer("_basis", basis, persistent=False)
        self.projected = self.dim != self.num_channels
        if self.projected:
            self.project_in = nn.Linear(self.dim, self.num_channels)
            self.project_out = nn.Linear(self.num_channels, self.dim)

    @staticmethod
    def levels_for(codebook_size: int) -> tuple[int, ...]:
        """Paper Table 1 levels for a target size in {2^8, 2^10, 2^12, 2^14, 2^16}."""
        if codebook_size not in RECOMMENDED_LEVELS:
            raise ValueError(f"FSQ.levels_for: codebook_size must be one of {sorted(RECOMMENDED_LEVELS)}, got {codebook_size}")
        return RECOMMENDED_LEVELS[codebook_size]

    # ------------------------------------------------------------------ grid arithmetic (fp32 / int64)
    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Paper App. A bounding: L_i values after rounding, symmetric for odd L, half-level offset for even L."""
        levels = self._levels.float()
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = (self._levels % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Bound, round (straight-through) and rescale to [-1, 1]; input ``(..., len(levels))``."""
        half_width = (self._levels // 2).float()
        return round_ste(self.bound(z)) / half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid codes ``(..., len(levels))`` -> int64 mixed-radix indices ``(...)``."""
        half_width = self._levels // 2
        digits = torch.round(codes.float() * half_width.float()).long() + half_width
        return (digits * self._basis).sum(dim=-1)

    def indices_to_grid_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 indices ``(...)`` -> grid codes ``(..., len(levels))`` in fp32 (exact inverse)."""
        half_width = self._levels // 2
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels
        return (digits - half_width).float() / half_width.float()

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 indices -> codes ``(..., dim)`` (through ``project_out`` when projecting)."""
        with fp32_no_autocast(indices.device.type):
            codes = self.indices_to_grid_codes(indices)
            return fp32_linear(self.project_out, codes) if self.projected else codes

    # ------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim, "FSQ")
        in_dtype = z.dtype
        with fp32_no_autocast(z.device.type):
            x = fp32_linear(self.project_in, z) if self.projected else z.float()
            codes = self.quantize(x)
            indices = self.codes_to_indices(codes.detach())
            out = fp32_linear(self.project_out, codes) if self.projected else codes
            counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size)
            stats = code_histogram_stats(counts)
            stats["dead_codes"] = stats["unused_codes"]
        loss = torch.zeros((), device=z.device)
        return QuantizerOutput(out.to(in_dtype), indices, loss, stats)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, dim={self.dim}, codebook_size={self.codebook_size}"
