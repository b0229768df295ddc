"""Diffusion Forcing (Chen et al. 2024): per-frame noise levels in a frame-causal network.

``DiffusionForcingTransformer`` and ``DiffusionForcingUNet`` (models: a causal DiT, a per-frame conv
U-Net with causal temporal attention; both have a non-causal mode), ``rollout`` (scheduling-matrix
sampler with stabilised context, KV cache, sliding window, history and gradient guidance), scheduling matrices, the fused-SNR
weight, and (imported lazily) ``DiffusionForcingFamily`` / ``DiffusionForcingPipeline``.
"""

import importlib

from genmod.diffusion_forcing.loss import fused_snr, fused_snr_weight
from genmod.diffusion_forcing.guidance import HISTORY_GUIDANCE, history_conditions
from genmod.diffusion_forcing.sampling import RolloutSettings, plan_chunks, present_clean, rollout
from genmod.diffusion_forcing.stabilization import STABILIZATION_MODES, Stabilizer
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
from genmod.diffusion_forcing.unet import DiffusionForcingUNet

_LAZY = {
    "DiffusionForcingFamily": "genmod.diffusion_forcing.family",
    "DiffusionForcingConfig": "genmod.diffusion_forcing.family",
    "DiffusionForcingPipeline": "genmod.diffusion_forcing.pipeline",
    "DiffusionForcingPipelineOutput": "genmod.diffusion_forcing.pipeline",
}

__all__ = [
    "DiffusionForcingTransformer", "DiffusionForcingUNet", "rollout", "RolloutSettings", "present_clean", "fused_snr", "fused_snr_weight", "SCHEDULES",
    "autoregressive_matrix", "full_sequence_matrix", "get_scheduling_matrix", "level_times", "pyramid_matrix",
    "trapezoid_matrix", "validate_scheduling_matrix", "HISTORY_GUIDANCE", "history_conditions", "plan_chunks",
    "STABILIZATION_MODES", "Stabilizer", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genmod.diffusion_forcing' has no attribute {name!r}")
