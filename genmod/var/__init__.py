"""VAR: visual autoregressive modeling by next-scale prediction (Tian et al. 2024) on the multi-scale VQ tokenizer.

``VARTransformer`` (model), ``VARFamily`` / ``VARConfig`` (``genmod train var``), ``VARPipeline``
(sampling, KV cache, CFG ramp, top-k/top-p, zero-shot editing) and ``var_generate`` (the sampling loop).
"""

from genmod.var.family import VARConfig, VARFamily
from genmod.var.pipeline import VARPipeline, VARSampling, guidance_weight, scale_keep_masks, var_generate
from genmod.var.transformer import VARTransformer, var_loss

__all__ = ["VARTransformer", "var_loss", "VARConfig", "VARFamily", "VARPipeline", "VARSampling", "var_generate", "guidance_weight",
           "scale_keep_masks"]
