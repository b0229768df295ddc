"""Build the quantizer a :class:`VQTokenizer` config names from ``genmod.tokenizers_vq.quantizers``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from genmod.tokenizers_vq.quantizers import FSQ, MultiScaleResidualVQ, ResidualVQ, VectorQuantizer

QUANTIZER_KINDS = ("vq", "fsq", "rvq", "rfsq", "msvq", "simvq")


def quantizer_dim(kind: str, latent_channels: int, fsq_levels: Sequence[int]) -> int:
    """Channels the encoder must produce: ``len(fsq_levels)`` for FSQ (no projection), else ``latent_channels``."""
    return len(fsq_levels) if kind == "fsq" else latent_channels


def build_quantizer(kind: str, dim: int, codebook_size: int = 4096, fsq_levels: Sequence[int] = (8, 8, 8, 8),
                    codebook_dim: Optional[int] = None, cosine: bool = False, codebook_update: str = "ema",
                    ema_decay: float = 0.99, kmeans_init: bool = False, dead_code_threshold: float = 0.0,
                    gradient: str = "ste", commitment_beta: float = 0.25, num_quantizers: int = 1,
                    quantizer_dropout: float = 0.0, scales: Sequence[int] = (1, 2, 3, 4, 6, 8)) -> nn.Module:
    """One quantizer by name: ``vq`` (VectorQuantizer), ``simvq`` (VectorQuantizer with a SimVQ
    codebook, loss-updated), ``fsq``, ``rvq`` / ``rfsq`` (ResidualVQ over VQ / FSQ stages) or
    ``msvq`` (VAR multi-scale residual VQ; ``scales[-1]`` must equal the latent size)."""
    vq_options = dict(codebook_dim=codebook_dim, beta=commitment_beta, codebook_update=codebook_update,
                      ema_decay=ema_decay, kmeans_init=kmeans_init, dead_code_threshold=dead_code_threshold,
                      cosine=cosine, gradient=gradient)
    if kind == "vq":
        return VectorQuantizer(dim, codebook_size, **vq_options)
    if kind == "simvq":
        vq_options.update(codebook_update="loss", simvq=True)
        return VectorQuantizer(dim, codebook_size, **vq_options)
    if kind == "fsq":
        return FSQ(fsq_levels)
    if kind == "rvq":
        return ResidualVQ(dim, num_quantizers, codebook_size, kind="vq", quantizer_dropout=quantizer_dropout,
                          **vq_options)
    if kind == "rfsq":
        return ResidualVQ(dim, num_quantizers, kind="fsq", levels=fsq_levels, quantizer_dropout=quantizer_dropout)
    if kind == "msvq":
        return MultiScaleResidualVQ(dim, codebook_size, scales=tuple(scales), beta=commitment_beta, cosine=cosine)
    raise ValueError(f"quantizer must be one of {QUANTIZER_KINDS}, got {kind!r}")
