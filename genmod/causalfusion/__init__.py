"""CausalFusion (Deng et al. 2024): dual factorization over token order and noise level.

``CausalFusionTransformer`` (model), ``sample_tokens`` (AR x diffusion sampler with KV cache, CFG,
zero-shot editing), ``CausalFusionPipeline`` (diffusers) and the ``causalfusion`` training family
(``genmod train causalfusion``).
"""

from genmod.causalfusion.sampling import CausalFusionSampling, draw_noise_and_order, even_step_sizes, sample_tokens
from genmod.causalfusion.transformer import CausalFusionTransformer, causalfusion_sequence_layout

__all__ = ["CausalFusionTransformer", "causalfusion_sequence_layout", "sample_tokens", "CausalFusionSampling", "even_step_sizes",
           "draw_noise_and_order"]


def __getattr__(name):
    if name == "CausalFusionPipeline":
        from genmod.causalfusion.pipeline import CausalFusionPipeline

        return CausalFusionPipeline
    raise AttributeError(f"module 'genmod.causalfusion' has no attribute {name!r}")
