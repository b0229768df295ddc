"""Normalisation layers (re-exported by ``genmod.nn.layers``)."""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019, eq. 4): ``x / sqrt(mean(x^2) + eps) * g``, in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.to(x.dtype)


def make_norm(kind: str, dim: int, affine: bool = True, eps: float = 1e-6) -> nn.Module:
    """``layernorm`` or ``rmsnorm`` over the last dim; ``affine=False`` drops the learned scale (and bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, elementwise_affine=affine)
    raise ValueError(f"norm: expected one of {', '.join(NORMS)}, got {kind!r}")
