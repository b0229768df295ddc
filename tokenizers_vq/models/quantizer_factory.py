"""Build the quantizer a :class:`VQTokenizer` config names, from ``tokenizers_vq.quantizers``.

Falls back to the small local FSQ / EMA-VQ (``local_quantizers``) only when the quantizer package
is not importable, so the tokenizer stays usable while that package is being written.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

QUANTIZER_KINDS = ("vq", "fsq", "rvq", "msvq", "simvq")


def quantizer_dim(kind: str, latent_channels: int, fsq_levels: Sequence[int]) -> int:
    """Channel count the encoder must produce for quantizer ``kind``."""
    return len(fsq_levels) if kind == "fsq" else latent_channels


def build_quantizer(kind: str, dim: int, codebook_size: int, fsq_levels: Sequence[int], num_quantizers: int,
                    scales: Sequence[int], ema: bool, decay: float, beta: float, dead_threshold: float,
                    quantizer_dropout: float) -> nn.Module:
    if kind not in QUANTIZER_KINDS:
        raise ValueError(f"quantizer must be one of {QUANTIZER_KINDS}, got {kind!r}")
    shared = _shared_class(kind)
    if shared is not None:
        return _construct(shared, kind, dim=dim, codebook_size=codebook_size, levels=list(fsq_levels),
                          num_quantizers=num_quantizers, scales=tuple(scales), ema=ema, decay=decay, beta=beta,
                          dead_threshold=dead_threshold, quantizer_dropout=quantizer_dropout)
    from .local_quantizers import LocalEMAVQ, LocalFSQ
    if kind == "fsq":
        return LocalFSQ(fsq_levels)
    if kind == "vq":
        return LocalEMAVQ(codebook_size, dim, decay=decay, beta=beta, dead_threshold=dead_threshold)
    raise ImportError(f"quantizer {kind!r} needs tokenizers_vq.quantizers, which is not importable")


_SHARED_NAMES = {"vq": "VectorQuantizer", "fsq": "FSQ", "rvq": "ResidualVQ", "msvq": "MultiScaleResidualVQ",
                 "simvq": "SimVQ"}


def _shared_class(kind: str):
    try:
        import tokenizers_vq.quantizers as q
    except ImportError:
        return None
    return getattr(q, _SHARED_NAMES[kind], None)


def _construct(cls, kind: str, **options):
    """Call the shared quantizer's constructor with the options its signature names."""
    import inspect

    aliases = {
        "dim": ("dim", "embed_dim", "codebook_dim"),
        "codebook_size": ("codebook_size", "num_codes"),
        "levels": ("levels",),
        "num_quantizers": ("num_quantizers", "num_stages"),
        "scales": ("scales", "patch_nums"),
        "decay": ("decay", "ema_decay"),
        "beta": ("beta", "commitment_weight", "commitment_beta"),
        "dead_threshold": ("dead_code_threshold", "threshold_dead"),
        "quantizer_dropout": ("quantizer_dropout", "dropout"),
    }
    params = inspect.signature(cls.__init__).parameters
    kwargs = {}
    for key, names in aliases.items():
        for name in names:
            if name in params:
                kwargs[name] = options[key]
                break
    if "ema" in params:
        kwargs["ema"] = options["ema"]
    elif "codebook_update" in params:
        kwargs["codebook_update"] = "ema" if options["ema"] else "loss"
    if kind == "fsq":
        kwargs = {k: v for k, v in kwargs.items() if k in ("levels",)}
    return cls(**kwargs)
