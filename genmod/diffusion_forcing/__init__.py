"""Diffusion Forcing (Chen et al. 2024): per-frame noise levels in a frame-causal transformer.

``DiffusionForcingTransformer`` (model), ``rollout`` (scheduling-matrix sampler with stabilised
context, KV cache, sliding window, history and gradient guidance), scheduling matrices, the fused-SNR
weight, and (imported lazily) ``DiffusionForcingFamily`` / ``DiffusionForcingPipeline``.
"""

import importlib

from genmod.diffusion_forcing.loss import fused_snr, fused_snr_weight
from genmod.diffusion_forcing.sampling import present_clean, rollout
from genmod.diffusion_forcing.schedules import (
    SCHEDULES,
    autoregressive_matrix,
    full_sequence_matrix,
    get_scheduling_matrix,
    level_times,
    pyramid_matrix,
    trapezoid_matrix,
    validate_scheduling_matrix,
)
from genmod.diffusion_forcing.transformer import DiffusionForcingTransformer

_LAZY = {
    "DiffusionForcingFamily": "genmod.diffusion_forcing.family",
    "DiffusionForcingConfig": "genmod.diffusion_forcing.family",
    "DiffusionForcingPipeline": "genmod.diffusion_forcing.pipeline",
    "DiffusionForcingPipelineOutput": "genmod.diffusion_forcing.pipeline",
}

__all__ = [
    "DiffusionForcingTransformer", "rollout", "present_clean", "fused_snr", "fused_snr_weight", "SCHEDULES",
    "autoregressive_matrix", "full_sequence_matrix", "get_scheduling_matrix", "level_times", "pyramid_matrix",
    "trapezoid_matrix", "validate_scheduling_matrix", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genmod.diffusion_forcing' has no attribute {name!r}")
